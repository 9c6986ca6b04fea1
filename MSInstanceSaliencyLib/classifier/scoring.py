"""Per-lesion TP probability: SmoothGrad map -> 93 radiomic features -> logistic regression.

The features of a lesion always come from its max-aggregated SmoothGrad map w.r.t. FLAIR made with
the settings recorded in the classifier (n_samples, sigma, sigma_mode, context, max_omega_voxels),
so training and use see the same saliency definition.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import Cancelled, InputError
from ..io.outputs import atomic_write
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
    from ..saliency.smoothgrad import smoothgrad

    channel = prepared.channels.index(settings.get("channel", "flair"))
    extractor = make_extractor()
    ids = [int(i) for i in lesion_ids]
    work = _backward_passes(lesion_sizes(labels, ids), ids, settings)
    total, done = sum(work.values()), 0
    for lid in ids:
        omega = labels == lid
        report = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
        try:
            maps = smoothgrad(model, prepared.image, prepared.to_network(omega), n_samples=int(settings["n_samples"]), sigma=float(settings["sigma"]),
                              sigma_mode=settings["sigma_mode"], aggregation=settings["aggregation"], context=settings["context"],
                              seed=int(settings.get("seed", 0)), max_omega_voxels=settings.get("max_omega_voxels"), device=device,
                              progress=report)
            result = saliency_features(prepared.to_reference(maps[channel]), omega, prepared.spacing, extractor=extractor)
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


def load_classifier(path=None, model=None) -> TPClassifier:
    """The TP/FP classifier for `model`: `path`, else the one in the model's folder (the bundled demo
    model's when no model is given). A classifier learnt the saliency maps of one model, so one that
    records another model is refused; a model without a classifier gets an error saying how to train one."""
    if path:
        p = Path(path)
    elif model is not None:
        p = model.default_classifier()
        if p is None:
            raise InputError(f"no TP/FP classifier for the model {model.spec.name} ({model.format}); the TP probability stays empty. "
                             "Train one for it: `msis features --model MODEL ...` on cases with ground truth, then "
                             "`msis train-classifier FEATURES.csv --out tp_classifier.json`, and pass --classifier "
                             "(docs/OWN_MODEL.md)")
    else:
        p = default_classifier_path()
    if not p.is_file():
        raise InputError(f"no TP/FP classifier at {p}; train one with `msis train-classifier` or pass --classifier")
    clf = TPClassifier.load(p)
    if model is not None:
        check_classifier_model(clf, model, p)
    return clf


def check_classifier_model(clf: TPClassifier, model, source) -> None:
    """Refuse a classifier trained on another model's maps (when the classifier records its model)."""
    want = clf.trained_for.get("model_sha256")
    if not want:
        return
    have = model_identity(model)
    if have["model_sha256"] != want:
        raise InputError(f"the classifier {source} was trained on the maps of the model {clf.trained_for.get('model')} "
                         f"{clf.trained_for.get('model_version', '')} (sha256 {want[:12]}), not of {have['model']} {have['model_version']} "
                         f"(sha256 {have['model_sha256'][:12]}); its probabilities would mean nothing here. Train one for this model "
                         "(`msis features` + `msis train-classifier`) or leave the TP probability out")


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
    from ..segmentation.evaluation import classify_lesions

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


def _csv_bytes(rows, fieldnames) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames, restval="")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode("utf-8")


def write_feature_rows(rows: list[dict], path, feature_names: list, append: bool = False) -> Path:
    """Write a feature table atomically (the whole table, through a temporary file and os.replace);
    append=True keeps the rows already there (they must have the same columns)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fields = META_COLUMNS + list(feature_names)
    earlier = _resumable_rows(p, fields)[0] if append else []
    return atomic_write(p, _csv_bytes(earlier + list(rows), fields))


def write_table_manifest(path, settings: dict, **info) -> Path:
    """The saliency settings of a feature table and what else made it, beside it (FEATURES.csv.json),
    written atomically."""
    side = Path(str(path) + ".json")
    atomic_write(side, (json.dumps({"saliency": settings, **info}, indent=2) + "\n").encode("utf-8"))
    return side


def table_manifest(path) -> dict | None:
    """The sidecar FEATURES.csv.json of a feature table, or None when there is none."""
    side = Path(str(path) + ".json")
    if not side.is_file():
        return None
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{side} is not valid JSON ({exc}); it should hold the settings of {Path(path).name}") from None
    if not isinstance(d, dict) or not isinstance(d.get("saliency"), dict):
        raise InputError(f"{side} has no saliency settings; it is not the sidecar of a feature table written by `msis features`")
    return d


def table_settings(path) -> dict:
    """Saliency settings of a feature table: from the manifest beside it, else the defaults."""
    d = table_manifest(path)
    return d["saliency"] if d is not None else saliency_settings()


def model_identity(model) -> dict:
    """Name, version and a SHA-256 of the spec, the weights (the state_dict's tensors, so the same
    weights saved differently are the same model) and what else changes the output (the model's
    identity_extras: nnU-Net's plans, dataset, folds and mirroring; LST-AI's configs). Spec keys added
    later count only when set (models.base.LATER_KEYS), and empty extras not at all, so a model keeps the
    identity its feature tables and classifier record."""
    import torch

    from ..models.base import LATER_KEYS

    spec = model.spec
    described = {k: v for k, v in spec.to_dict().items() if not (k in LATER_KEYS and v == LATER_KEYS[k])}
    if getattr(model, "format", "msis") != "msis":
        described["format"] = model.format
    extras = model.identity_extras()
    if extras:
        described["identity_extras"] = extras
    h = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode("utf-8"))
    for k, t in sorted(model.network.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}\n".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"model": spec.name, "model_version": spec.version, "model_sha256": h.hexdigest()}


def tables_model(paths) -> dict:
    """The model the feature tables' maps came from (their sidecars), {} when they do not say."""
    found = {}
    for p in paths:
        d = table_manifest(p) or {}
        info = {k: d[k] for k in ("model", "model_version", "model_sha256") if k in d}
        if not info.get("model_sha256"):
            continue
        if found and found["model_sha256"] != info["model_sha256"]:
            raise InputError(f"{p} was made with the model {info.get('model')} (sha256 {info['model_sha256'][:12]}), the other tables "
                             f"with {found.get('model')} (sha256 {found['model_sha256'][:12]}); a classifier learns one model's maps")
        found = info
    return found


def _parse_table(p: Path):
    """(header or None, [(line, record)], cut): the complete records of a CSV and whether its end is cut
    off (the file does not end with a line break: a write was interrupted; that record is left out).
    A record with another number of fields than the header anywhere else is refused."""
    text = p.read_bytes().decode("utf-8", errors="replace")
    if not text:
        return None, [], False
    cut = not text.endswith("\n")
    reader = csv.reader(io.StringIO(text, newline=""))
    header, records, line, partial = None, [], 0, cut
    try:
        header = next(reader)
        line = reader.line_num
        for rec in reader:
            start, line = line + 1, reader.line_num
            if rec:
                records.append((start, rec))
    except csv.Error as exc:
        if not cut:
            raise InputError(f"{p} line {reader.line_num} cannot be read as CSV ({exc})") from None
        partial = False  # the cut-off record is the one that failed: it is not among the records
    if cut:
        if header is None or (partial and not records):  # only (part of) the header
            return None, [], True
        if partial:
            records.pop()
    for start, rec in records:
        if len(rec) != len(header):
            raise InputError(f"{p} line {start} has {len(rec)} fields, the header {len(header)}: the table is damaged (a row cut off by "
                             "an interrupted write, then appended to?); remove that case's rows or make the table again")
    return header, records, cut


def _first_duplicate(p: Path, header, records):
    """InputError naming the first (case, lesion_id) that has two rows, else None."""
    ci, li = header.index("case"), header.index("lesion_id")
    seen = {}
    for line, rec in records:
        key = (rec[ci], rec[li])
        if key in seen:
            return InputError(f"{p} has two rows for case {key[0]}, lesion {key[1]} (lines {seen[key]} and {line}), as two `msis features` "
                              "runs writing one table leave it; make the table again (or remove the repeated rows)")
        seen[key] = line
    return None


def _resumable_rows(p: Path, fields, log=None) -> tuple[list[dict], str | None]:
    """The rows of the complete cases of an existing table, for resuming it ([] where there is none, or
    only an empty or header-only file: a kill at creation), and the case dropped from it, if any: a
    table an older msis left with a cut-off last row loses the rows of the case it was appending (they
    are computed again)."""
    if not p.is_file():
        return [], None
    header, records, cut = _parse_table(p)
    if not records:
        expected = _csv_bytes([], fields).decode("utf-8")
        text = p.read_bytes().decode("utf-8", errors="replace")
        if header == list(fields) or (header is None and expected.startswith(text)):
            return [], None
        raise InputError(f"{p} is not a feature table written by `msis features`; choose another --out")
    if header != list(fields):
        extra, missing = [c for c in header if c not in fields], [c for c in fields if c not in header]
        raise InputError(f"{p} has other columns than this msis writes (extra {extra[:3]}, missing {missing[:3]}); "
                         "write a new table (another --out)")
    last = None
    if cut:  # only the last case can be incomplete: cases are appended whole, one after another
        ci = header.index("case")
        last = records[-1][1][ci]
        records = [(line, rec) for line, rec in records if rec[ci] != last]
        (log or (lambda m: None))(f"{p}: the rows of {last} were cut off by an interrupted write; that case is computed again")
    dup = _first_duplicate(p, header, records)
    if dup is not None:
        raise dup
    return [dict(zip(header, rec)) for _, rec in records], last


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
    """The rows of a feature table; a table with a cut-off last row or with two rows for one
    (case, lesion_id) is refused."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"feature table {p} does not exist")
    header, records, cut = _parse_table(p)
    if header is None or "kind" not in header or "case" not in header or "lesion_id" not in header:
        raise InputError(f"{p} is not a feature table written by `msis features`" + (" (it is empty)" if header is None and not cut else ""))
    if cut:
        raise InputError(f"{p}: its last row is cut off, as an interrupted write leaves it; "
                         "run the `msis features --phantom-patients ...` command that made it again with the same --out (it computes "
                         "that case again), or make the table again")
    if not records:
        raise InputError(f"{p} has a header but no rows (was `msis features` stopped before its first case?)")
    dup = _first_duplicate(p, header, records)
    if dup is not None:
        raise dup
    return [dict(zip(header, rec)) for _, rec in records]


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
