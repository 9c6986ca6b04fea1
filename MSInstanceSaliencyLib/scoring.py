"""Per-lesion TP probability: SmoothGrad map -> 93 radiomic features -> logistic regression.

The features of a lesion always come from its max-aggregated SmoothGrad map w.r.t. FLAIR made with
the settings recorded in the classifier (n_samples, sigma, sigma_mode, context, max_omega_voxels),
so training and use see the same saliency definition.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError
from .radiomics import FeatureError, TPClassifier, default_classifier_path, make_extractor, saliency_features

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {"method": "smoothgrad", "aggregation": "max", "channel": "flair", "n_samples": 10, "sigma": 0.05,
                    "sigma_mode": "range", "context": "patch", "seed": 0,
                    # the max over at most 256 voxels of Ω: confluent lesions of thousands of voxels would
                    # otherwise cost hours each on a CPU (docs/PERFORMANCE.md measures the approximation)
                    "max_omega_voxels": 256}
META_COLUMNS = ["case", "lesion_id", "kind", "label", "voxels", "error"]


def saliency_settings(**overrides) -> dict:
    """DEFAULT_SETTINGS with the given (not None) values; max_omega_voxels=0 means all of Ω."""
    s = dict(DEFAULT_SETTINGS)
    s.update({k: v for k, v in overrides.items() if v is not None})
    if s.get("max_omega_voxels") == 0:
        s["max_omega_voxels"] = None
    return s


def iter_lesion_features(model, prepared, labels: np.ndarray, lesion_ids, settings: dict, *, device="auto", progress=None, on_error=None):
    """Yields (lesion_id, features dict or FeatureError) lesion by lesion, so a caller keeps what is
    done when the work is cancelled (errors.Cancelled from the progress callback) or stopped.

    progress(done, total) counts backward passes over all the lesions (N x |Ω|, or N x the sample
    for the max), so it runs in step with time also through a large lesion; returning False cancels.
    A lesion that fails is reported through on_error(id, message) and yielded as a FeatureError,
    never failing the case.
    """
    from .saliency import smoothgrad

    channel = prepared.channels.index(settings.get("channel", "flair"))
    extractor = make_extractor()
    ids = [int(i) for i in lesion_ids]
    work = _backward_passes(lesion_sizes(labels, ids), ids, settings)
    total, done = sum(work.values()), 0
    for lid in ids:
        omega = labels == lid
        report = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
        try:
            maps = smoothgrad(model, prepared.image, omega, n_samples=int(settings["n_samples"]), sigma=float(settings["sigma"]),
                              sigma_mode=settings["sigma_mode"], aggregation=settings["aggregation"], context=settings["context"],
                              seed=int(settings.get("seed", 0)), max_omega_voxels=settings.get("max_omega_voxels"), device=device,
                              progress=report)
            result = saliency_features(maps[channel], omega, prepared.spacing, extractor=extractor)
        except (FeatureError, InputError) as exc:
            result = FeatureError(f"lesion {lid}: {exc}")
            (on_error or (lambda _i, m: log.warning(m)))(lid, str(result))
        done += work[lid]
        yield lid, result
        if progress is not None and progress(done, total) is False:
            raise Cancelled("cancelled")


def lesion_features(model, prepared, labels: np.ndarray, lesion_ids, settings: dict, *, device="auto", progress=None, on_error=None) -> dict:
    """{lesion_id: features dict} (or {lesion_id: FeatureError} for lesions pyradiomics cannot handle);
    see iter_lesion_features."""
    return dict(iter_lesion_features(model, prepared, labels, lesion_ids, settings, device=device, progress=progress, on_error=on_error))


def lesion_sizes(labels: np.ndarray, ids=()) -> np.ndarray:
    """Voxels per label id (index = id; 0 for given ids that are absent), in one pass over the volume."""
    return np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=int(max(ids, default=0)) + 1)


def _backward_passes(sizes: np.ndarray, ids: list, settings: dict) -> dict:
    """Backward passes each lesion's map costs: N x |Ω| (max, at most N x the sample) or N (mean)."""
    n = int(settings["n_samples"])
    if settings.get("aggregation", "max") != "max":
        return {lid: n for lid in ids}
    cap = settings.get("max_omega_voxels")
    return {lid: n * max(1, int(min(sizes[lid], cap) if cap else sizes[lid])) for lid in ids}


def load_classifier(path=None) -> TPClassifier:
    p = Path(path) if path else default_classifier_path()
    if not p.is_file():
        raise InputError(f"no TP/FP classifier at {p}; train one with `msis train-classifier` or pass --classifier")
    return TPClassifier.load(p)


def classifier_settings(classifier: TPClassifier) -> dict:
    """The complete saliency settings of the maps a classifier was trained on."""
    return {**DEFAULT_SETTINGS, **classifier.saliency}


def iter_tp_probabilities(model, prepared, labels, lesion_ids, classifier: TPClassifier, *, device="auto", progress=None, on_error=None):
    """Yields (lesion_id, P(TP) or None where features could not be computed), lesion by lesion."""
    for lid, f in iter_lesion_features(model, prepared, labels, lesion_ids, classifier_settings(classifier), device=device,
                                       progress=progress, on_error=on_error):
        yield lid, None if isinstance(f, Exception) else float(classifier.predict_proba(classifier.features_to_matrix([f]))[0, 1])


def tp_probabilities(model, prepared, labels, lesion_ids, classifier: TPClassifier, *, device="auto", progress=None, on_error=None) -> dict:
    """{lesion_id: P(TP)} (None where features could not be computed)."""
    return dict(iter_tp_probabilities(model, prepared, labels, lesion_ids, classifier, device=device, progress=progress, on_error=on_error))


def tp_probability_of_explanation(classifier: TPClassifier, explanation, spacing):
    """P(TP) from a SmoothGrad explanation already computed, or None when its settings are not the
    classifier's (then the map would not mean what the classifier learnt; use `tp_probabilities`)."""
    want = classifier_settings(classifier)
    used = {"method": explanation.method, "channel": "flair" if "flair" in explanation.maps else None, **explanation.params}
    if used.get("precision", "fp32") != "fp32" or any(used.get(k) != want[k] for k in DEFAULT_SETTINGS):
        return None
    f = saliency_features(explanation.maps["flair"], explanation.omega, spacing)
    return float(classifier.predict_proba(classifier.features_to_matrix([f]))[0, 1])


# ----------------------------------------------------------------------------- feature tables

def case_feature_rows(model, prepared, labels, case: str, settings: dict, gt_mask=None, lesion_ids=None, *, device="auto", progress=None) -> list[dict]:
    """Feature rows for a case; with a ground truth each lesion gets kind TP/FP (label 1/0) and the
    missed GT lesions get a row of kind FN (no features), so evaluation can count them."""
    from .evaluation import classify_lesions

    kinds = {}
    fn_rows = []
    if gt_mask is not None:
        c = classify_lesions(labels, gt_mask)
        kinds = {**{i: "TP" for i in c["tp"]}, **{i: "FP" for i in c["fp"]}}
        gt_sizes = lesion_sizes(c["gt_labels"])
        fn_rows = [{"case": case, "lesion_id": f"gt{g}", "kind": "FN", "label": "", "voxels": int(gt_sizes[g]), "error": ""} for g in c["fn"]]
    ids = [int(i) for i in lesion_ids] if lesion_ids is not None else [int(i) for i in np.unique(labels) if i > 0]
    sizes = lesion_sizes(labels, ids)
    feats = lesion_features(model, prepared, labels, ids, settings, device=device, progress=progress)
    rows = []
    for lid in ids:
        kind = kinds.get(lid, "")
        row = {"case": case, "lesion_id": lid, "kind": kind, "label": {"TP": 1, "FP": 0}.get(kind, ""), "voxels": int(sizes[lid]), "error": ""}
        f = feats[lid]
        if isinstance(f, Exception):
            row["error"] = str(f)
        else:
            row.update(f)
        rows.append(row)
    return rows + fn_rows


def write_feature_rows(rows: list[dict], path, feature_names: list, append: bool = False) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and p.is_file())
    with open(p, "a" if not new else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=META_COLUMNS + list(feature_names), restval="")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return p


def write_table_manifest(path, settings: dict, **info) -> Path:
    """The saliency settings of a feature table, beside it (FEATURES.csv.json)."""
    import json

    side = Path(str(path) + ".json")
    side.write_text(json.dumps({"saliency": settings, **info}, indent=2) + "\n")
    return side


def table_settings(path) -> dict:
    """Saliency settings of a feature table: from the manifest beside it, else the defaults."""
    import json

    side = Path(str(path) + ".json")
    if side.is_file():
        return json.loads(side.read_text())["saliency"]
    return saliency_settings()


def read_feature_tables(paths) -> tuple[list[dict], dict]:
    """The rows of one or more feature tables made with the same saliency settings, and those settings."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    settings = table_settings(paths[0])
    rows, seen = [], {}
    for p in paths:
        other = table_settings(p)
        if other != settings:
            raise InputError(f"{p} was made with other saliency settings than {paths[0]} ({other} vs {settings}); "
                             "tables can only be combined when their maps are defined alike")
        table = read_feature_rows(p)
        for case in {r["case"] for r in table}:
            if case in seen:
                raise InputError(f"case {case} is in both {seen[case]} and {p}; give each table once")
            seen[case] = p
        rows += table
    return rows, settings


def read_feature_rows(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"feature table {p} does not exist")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "kind" not in rows[0]:
        raise InputError(f"{p} is not a feature table written by `msis features`")
    return rows


def split_scored(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The predicted lesions (TP/FP rows) with features, and those without (their `error` says why)."""
    predicted = [r for r in rows if r["kind"] in ("TP", "FP")]
    return [r for r in predicted if not r.get("error")], [r for r in predicted if r.get("error")]


def labelled_matrix(rows: list[dict], feature_names: list):
    """(X, y, usable rows) of the TP/FP rows that have features."""
    usable, _ = split_scored(rows)
    if not usable:
        raise InputError("the feature table has no TP/FP lesions with features (was it made with a ground truth?)")
    X = np.array([[float(r[n]) for n in feature_names] for r in usable])
    y = np.array([1 if r["kind"] == "TP" else 0 for r in usable])
    return X, y, usable


def evaluate_classifier(classifier: TPClassifier, rows: list[dict], *, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict:
    """The classifier on a test feature table (METHOD.md): counts, F1 and PPV of the network alone and
    after removing lesions with P(TP) < threshold, with bootstrap means and 95% CIs; ROC AUC of P(TP)
    and of lesion size alone (the baseline the saliency features must beat); F1/PPV against the
    threshold; and "lesions", the per-lesion probabilities. Lesions without features are kept."""
    from .radiomics import bootstrap_detection, roc_auc_with_ci, threshold_sweep

    scored, unscored = split_scored(rows)
    n_fn = sum(r["kind"] == "FN" for r in rows)
    p = classifier.predict_proba(classifier.features_to_matrix(scored))[:, 1] if scored else np.zeros(0)
    scored_tp = np.array([r["kind"] == "TP" for r in scored], bool)
    unscored_tp = np.array([r["kind"] == "TP" for r in unscored], bool)
    keep = np.concatenate([p >= threshold, np.ones(len(unscored), bool)])
    rep = bootstrap_detection(np.concatenate([scored_tp, unscored_tp]), keep, n_fn, n_boot=n_boot, seed=seed)
    voxels = np.array([float(r["voxels"]) for r in scored])
    rep["roc_auc"] = roc_auc_with_ci(scored_tp, p, n_boot=n_boot, seed=seed)
    rep["roc_auc_size_only"] = roc_auc_with_ci(scored_tp, voxels, n_boot=n_boot, seed=seed)
    rep["threshold_sweep"] = threshold_sweep(scored_tp, p, n_fn, kept_tp=int(unscored_tp.sum()), kept_fp=int((~unscored_tp).sum()))
    rep.update({"threshold": threshold, "n_scored": len(scored), "n_unscored": len(unscored)})
    rep["lesions"] = [{"case": r["case"], "lesion_id": r["lesion_id"], "kind": r["kind"], "voxels": r["voxels"], "tp_probability": round(float(q), 6)}
                      for r, q in zip(scored, p)]
    return rep


def phantom_feature_table(model, patients, out_csv, settings: dict, *, seed_base: int = 20_000, max_tp_per_case: int | None = None,
                          device="auto", log=print) -> Path:
    """Feature table of phantom cases (seed = seed_base + 100 * patient), one case at a time appended
    to out_csv; cases already in the file are skipped, so an interrupted run resumes. With
    max_tp_per_case, a seeded random subset of each case's TPs is kept (every FP always is)."""
    from .evaluation import classify_lesions
    from .phantom import make_phantom
    from .pipeline import segment
    from .progress import ProgressBar
    from .radiomics import default_feature_names
    from .volumes import array_from_image

    names = default_feature_names()
    done = set()
    if Path(out_csv).is_file():
        done = {r["case"] for r in read_feature_rows(out_csv)}
        earlier = table_settings(out_csv)
        if earlier != settings:
            raise InputError(f"{out_csv} holds features made with other saliency settings ({earlier}); "
                             "resume with those or write a new table")
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    write_table_manifest(out_csv, settings, model=model.spec.name, phantom_seed_base=seed_base, max_tp_per_case=max_tp_per_case)
    for p in patients:
        seed = seed_base + 100 * int(p)
        case = f"phantom_p{int(p):02d}_s{seed}"
        if case in done:
            log(f"{case}: already in {out_csv}, skipped")
            continue
        ph = make_phantom(seed, patient=int(p))
        res = segment(ph.flair, ph.mprage, model, device=device)
        gt = array_from_image(ph.lesions, np.uint8)
        c = classify_lesions(res.labels, gt)
        ids = sorted(c["fp"]) + sorted(c["tp"])
        if max_tp_per_case is not None and len(c["tp"]) > max_tp_per_case:
            rng = np.random.default_rng(seed)
            ids = sorted(c["fp"]) + sorted(rng.choice(c["tp"], size=max_tp_per_case, replace=False).tolist())
        log(f"{case}: {len(c['tp'])} TP, {len(c['fp'])} FP, {len(c['fn'])} FN; features of {len(ids)} lesions")
        rows = case_feature_rows(model, res.prepared, res.labels, case, settings, gt, lesion_ids=ids, device=device,
                                 progress=ProgressBar(label=f"{case}: {len(ids)} lesions, backward passes"))
        if max_tp_per_case is not None:  # record the TPs left out so counts stay honest
            sizes = lesion_sizes(res.labels)
            for lid in sorted(set(c["tp"]) - set(ids)):
                rows.append({"case": case, "lesion_id": int(lid), "kind": "TP", "label": 1, "voxels": int(sizes[lid]), "error": "not sampled"})
        write_feature_rows(rows, out_csv, names, append=True)
    return Path(out_csv)
