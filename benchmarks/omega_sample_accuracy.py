"""What does the max over a sample of Ω (max_omega_voxels) cost in accuracy, and what does it save?

For TP lesions larger than the cap, the max-aggregated FLAIR SmoothGrad map over all of Ω (METHOD.md,
Eq. 3) and over a seeded random sample of `--caps` voxels, side by side in one run, same noise:
time of each, map correlation and max difference relative to the exact map's peak, the 93 radiomic
features' relative differences, and the bundled classifier's TP probability from each map.

    .venv/bin/python benchmarks/omega_sample_accuracy.py --patient 22 --lesions 3 --even-sample \
        --json docs/benchmarks/omega_sample_accuracy_demo_cpu.json

--even-sample adds a spatially even sample of the same size (farthest-point sampling, passed as Ω;
the network's box then comes from the sample's extent, nearly the lesion's), to see whether where
the sampled voxels lie matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from saliency_accuracy import compare  # noqa: E402

from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.models.device import resolve_device  # noqa: E402
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad  # noqa: E402


def farthest_point_sample(coords: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k of the points, spread evenly: each next one the farthest from those already taken."""
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(coords)))]
    dist = np.linalg.norm(coords - coords[chosen[0]], axis=1)
    for _ in range(k - 1):
        chosen.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(coords - coords[chosen[-1]], axis=1))
    return np.sort(chosen)


def feature_differences(exact: dict, other: dict) -> dict:
    """Relative differences |a - b| / max(|a|, tiny) over the 93 features: median, 90th percentile, max."""
    a = np.array([exact[k] for k in exact], float)
    b = np.array([other[k] for k in exact], float)
    rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-12)
    return {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)), "max": float(rel.max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--patient", type=int, default=22, help="validation phantom of this shared patient")
    ap.add_argument("--lesions", type=int, default=3, help="TP lesions larger than the largest cap, spanning sizes")
    ap.add_argument("--max-voxels", type=int, default=1500, help="skip larger lesions (the exact map costs N x |Ω| VJPs)")
    ap.add_argument("--caps", type=int, nargs="+", default=[256])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--even-sample", action="store_true",
                    help="also an evenly spread sample (farthest-point) of each cap's size, passed as Ω itself")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from MSInstanceSaliencyLib.segmentation.evaluation import classify_lesions
    from MSInstanceSaliencyLib.research.phantom import make_phantom
    from MSInstanceSaliencyLib.segmentation.pipeline import segment
    from MSInstanceSaliencyLib.classifier.radiomics import make_extractor, saliency_features
    from MSInstanceSaliencyLib.classifier.scoring import load_classifier
    from MSInstanceSaliencyLib.research.training import validation_seed
    from MSInstanceSaliencyLib.io.volumes import array_from_image

    dev = resolve_device(args.device)
    model = load_model(args.model, device=dev)
    try:
        clf = load_classifier()
    except Exception as exc:  # the table is still useful without a classifier
        print(f"no classifier ({exc}); TP probabilities left out", file=sys.stderr)
        clf = None
    ph = make_phantom(validation_seed(args.patient), patient=args.patient)
    res = segment(ph.flair, ph.mprage, model, device=dev)
    tps = classify_lesions(res.labels, array_from_image(ph.lesions, np.uint8))["tp"]
    sizes = {r["lesion_id"]: r["voxels"] for r in res.table}
    big = sorted((lid for lid in tps if max(args.caps) < sizes[lid] <= args.max_voxels), key=sizes.get)
    if not big:
        sys.exit(f"no TP lesion with {max(args.caps)} < voxels <= {args.max_voxels} in this phantom")
    picks = [big[int(i)] for i in np.linspace(0, len(big) - 1, min(args.lesions, len(big))).round()]
    flair = res.prepared.channels.index("flair")
    extractor = make_extractor()

    def run(omega, cap, sample=None):
        """The map over Ω, over a random sample of `cap` voxels, or over the voxel set `sample`;
        features always over Ω (as the classifier sees them)."""
        t = time.perf_counter()
        m = smoothgrad(model, res.prepared.image, omega if sample is None else sample, n_samples=args.samples, sigma=0.05,
                       aggregation="max", context="patch", seed=0, device=dev, max_omega_voxels=cap)[flair]
        seconds = time.perf_counter() - t
        f = saliency_features(m, omega, res.prepared.spacing, extractor=extractor)
        p = float(clf.predict_proba(clf.features_to_matrix([f]))[0, 1]) if clf is not None else None
        return m, seconds, f, p

    rows = []
    for lid in picks:
        omega = res.labels == lid
        exact, t_exact, f_exact, p_exact = run(omega, None)
        variants = [(cap, "random", None) for cap in args.caps]
        if args.even_sample:
            coords = np.argwhere(omega)
            for cap in args.caps:
                even = np.zeros_like(omega)
                even[tuple(coords[farthest_point_sample(coords.astype(float), cap)].T)] = True
                variants.append((cap, "farthest-point", even))
        for cap, how, sample in variants:
            m, t_cap, f_cap, p_cap = run(omega, None if sample is not None else cap, sample)
            row = {"lesion_id": int(lid), "voxels": int(sizes[lid]), "cap": cap, "sample": how, "seconds_exact": round(t_exact, 1),
                   "seconds_capped": round(t_cap, 1), "speedup": round(t_exact / t_cap, 2), **compare(exact, m),
                   "features_rel_diff": feature_differences(f_exact, f_cap), "tp_probability_exact": p_exact, "tp_probability_capped": p_cap}
            rows.append(row)
            print(f"lesion {lid:>4} ({sizes[lid]:>5} voxels) {how} {cap}: {t_exact:7.1f} s exact vs {t_cap:6.1f} s ({row['speedup']:.1f}x); "
                  f"map r = {row['correlation']:.4f}, max diff {100 * row['max_abs_diff_rel_peak']:.1f} % of peak; "
                  f"features rel. diff median {100 * row['features_rel_diff']['median']:.2f} %, max {100 * row['features_rel_diff']['max']:.1f} %"
                  + (f"; P(TP) {p_exact:.3f} vs {p_cap:.3f}" if p_exact is not None else ""), flush=True)
    out = {"command": " ".join(["benchmarks/omega_sample_accuracy.py"] + (argv or sys.argv[1:])), "device": str(dev),
           "model": model.spec.name, "patient": args.patient, "n_samples": args.samples, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
