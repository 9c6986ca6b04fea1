"""How far two feature tables of the same lesions differ: per feature, and in the P(TP) of a classifier.

For a change to the saliency engine (here: the patch context moved onto the network's grid), compare
the table made before with the one made after, lesion by lesion (rows matched on case and lesion id;
the segmentation is the same, only the maps changed):

    .venv/bin/python benchmarks/feature_shift.py OLD.csv NEW.csv [--classifier CLF.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier, default_feature_names  # noqa: E402
from MSInstanceSaliencyLib.classifier.scoring import read_feature_rows  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--classifier", default=None, help="classifier JSON (default: the bundled one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = default_feature_names()
    scored = lambda rows: {(r["case"], str(r["lesion_id"])): r for r in rows if r.get("kind") in ("TP", "FP") and not r.get("error")}  # noqa: E731
    old, new = scored(read_feature_rows(args.old)), scored(read_feature_rows(args.new))
    common = sorted(set(old) & set(new))
    if not common:
        raise SystemExit("no lesion is in both tables with features")
    a = np.array([[float(old[k][n]) for n in names] for k in common])
    b = np.array([[float(new[k][n]) for n in names] for k in common])
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-12)
    per_feature = {n: float(np.median(rel[:, i])) for i, n in enumerate(names)}
    from MSInstanceSaliencyLib.classifier.radiomics import default_classifier_path

    clf = TPClassifier.load(args.classifier or default_classifier_path())
    p_old = clf.predict_proba(clf.features_to_matrix([{n: old[k][n] for n in names} for k in common]))[:, 1]
    p_new = clf.predict_proba(clf.features_to_matrix([{n: new[k][n] for n in names} for k in common]))[:, 1]
    dp = np.abs(p_new - p_old)
    flips = int(np.sum((p_old >= 0.5) != (p_new >= 0.5)))
    out = {"lesions": len(common), "only_old": len(set(old) - set(new)), "only_new": len(set(new) - set(old)),
           "relative_change_median_over_lesions_and_features": float(np.median(rel)),
           "relative_change_p90": float(np.quantile(rel, 0.9)),
           "features_most_moved": sorted(per_feature.items(), key=lambda kv: -kv[1])[:5],
           "p_tp_abs_change_median": float(np.median(dp)), "p_tp_abs_change_max": float(dp.max()),
           "decisions_flipped_at_0.5": flips}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
