"""Radiomic features of a lesion's saliency map and the TP/FP logistic regression (METHOD.md,
"Radiomics and the TP/FP classifier"; MICCAI 2024 workshop paper).

pyradiomics does all feature work: the map is z-scored with `imageoperations.normalizeImage`
(over the whole array), the lesion mask is dilated with a 5x5x5 maximum filter so the negative rim
around the lesion is included, and `RadiomicsFeatureExtractor(binWidth=10, sigma=[1, 2, 3])` with
firstorder, glcm, glrlm, glszm, gldm and ngtdm enabled (shape disabled) gives exactly 93 features.

The classifier is StandardScaler (fitted on training lesions only) + L1 logistic regression
(liblinear, C=1, class weights FP 0.29 / TP 0.71). It is stored as JSON, never pickled, together
with the saliency settings its features came from; the pipeline refuses to mix settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

N_FEATURES = 93
FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
EXTRACTOR_SETTINGS = {"binWidth": 10, "sigma": [1, 2, 3]}
CLASS_WEIGHT = {0: 0.29, 1: 0.71}  # 0 = FP, 1 = TP
DILATION = 5  # maximum-filter size around the lesion
FORMAT = "msis-tp-classifier/1"


class FeatureError(InputError):
    """pyradiomics could not compute features for one lesion (e.g. a degenerate mask)."""


def _quiet_radiomics():
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    return radiomics


def make_extractor():
    _quiet_radiomics()
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    ext = RadiomicsFeatureExtractor(**EXTRACTOR_SETTINGS)
    ext.disableAllFeatures()
    for c in FEATURE_CLASSES:
        ext.enableFeatureClassByName(c)
    return ext


def dilate_lesion(lesion_mask: np.ndarray) -> np.ndarray:
    """The lesion's own voxels plus a 5x5x5 maximum-filter neighbourhood (label 1)."""
    from scipy import ndimage

    m = np.asarray(lesion_mask) > 0
    return ndimage.maximum_filter(m.astype(np.uint8), size=DILATION) > 0


def saliency_features(saliency_map: np.ndarray, lesion_mask: np.ndarray, spacing=(1.0, 1.0, 1.0), *, extractor=None) -> dict:
    """93 pyradiomics features (name -> float) of a lesion's saliency map.

    saliency_map and lesion_mask are (x, y, z) arrays on one grid (the max-aggregated SmoothGrad
    map w.r.t. FLAIR, and the lesion's voxels). Raises FeatureError with the reason when
    pyradiomics cannot compute them.
    """
    from radiomics import imageoperations

    from ..io.volumes import image_from_array

    saliency_map = np.asarray(saliency_map, dtype=np.float32)
    mask = np.asarray(lesion_mask) > 0
    if saliency_map.shape != mask.shape:
        raise InputError(f"saliency map {saliency_map.shape} and lesion mask {mask.shape} differ in shape")
    if not mask.any():
        raise FeatureError("the lesion mask is empty")
    if not np.isfinite(saliency_map).all():
        raise FeatureError("the saliency map has NaN or Inf values")
    if float(saliency_map.std()) == 0.0:
        raise FeatureError("the saliency map is constant, so it cannot be z-scored")
    img = image_from_array(saliency_map, spacing=spacing)
    img = imageoperations.normalizeImage(img)
    roi = image_from_array(dilate_lesion(mask).astype(np.uint8), spacing=spacing)
    ext = extractor or make_extractor()
    _quiet_radiomics()
    try:
        result = ext.execute(img, roi, label=1)
    except (ValueError, RuntimeError, IndexError, ZeroDivisionError) as exc:
        raise FeatureError(f"pyradiomics failed: {str(exc).splitlines()[0][:200]}") from None
    feats = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}
    if len(feats) != N_FEATURES:
        raise FeatureError(f"pyradiomics returned {len(feats)} features instead of {N_FEATURES}")
    return feats


def feature_value(row: dict, name: str) -> float:
    """A row's feature as a finite float; InputError naming the lesion and the feature otherwise."""
    v = row.get(name)
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = None
    if x is None or not np.isfinite(x):
        where = f"case {row['case']} lesion {row.get('lesion_id', '?')}" if "case" in row else "a lesion"
        what = "missing" if v is None else f"{v!r}, not a finite number"
        raise InputError(f"feature {name} of {where} is {what}; recompute that table with `msis features`")
    return x


# ----------------------------------------------------------------------------- classifier

def l1_logistic_regression(C=1.0, class_weight=None, max_iter=10000, random_state=0):
    """The paper's LogisticRegression(solver='liblinear', penalty='l1'); scikit-learn >= 1.8 spells
    L1 as l1_ratio=1 (`penalty` is deprecated there and ignored in favour of l1_ratio=0, i.e. L2).
    liblinear shuffles, so the seed is fixed."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    kw = dict(C=C, class_weight=class_weight, max_iter=max_iter, solver="liblinear", random_state=random_state)
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, **kw)
    return LogisticRegression(penalty="l1", **kw)


@dataclass
class TPClassifier:
    """StandardScaler + L1 logistic regression predicting P(TP) from the 93 saliency features.

    scikit-learn style: fit(X, y), predict_proba(X) -> (n, 2), predict(X). `saliency` records the
    SmoothGrad settings the training features came from (method, aggregation, n_samples, sigma,
    sigma_mode, context, max_omega_voxels); `check_settings` refuses others.
    """

    C: float = 1.0
    class_weight: dict = field(default_factory=lambda: dict(CLASS_WEIGHT))
    max_iter: int = 10000
    saliency: dict = field(default_factory=dict)
    feature_names_: list | None = None
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    coef_: np.ndarray | None = None
    intercept_: float | None = None
    versions: dict = field(default_factory=dict)
    training_info: dict = field(default_factory=dict)
    trained_for: dict = field(default_factory=dict)  # the model whose maps it learnt: model, model_version, model_sha256

    def __post_init__(self):
        # classifiers from before max_omega_voxels existed were trained on maps over all of Ω
        self.saliency = {"max_omega_voxels": None, **self.saliency}

    def _model(self):
        return l1_logistic_regression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)

    def fit(self, X, y, feature_names=None):
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=int)
        if set(np.unique(y)) != {0, 1}:
            raise InputError("training needs both TP (1) and FP (0) lesions")
        scaler = StandardScaler().fit(X)
        lr = self._model().fit(scaler.transform(X), y)
        self.feature_names_ = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(X.shape[1])]
        self.mean_, self.scale_ = scaler.mean_.copy(), scaler.scale_.copy()
        self.coef_, self.intercept_ = lr.coef_[0].copy(), float(lr.intercept_[0])
        self.versions = _versions()
        return self

    def _check_fitted(self):
        if self.coef_ is None:
            raise InputError("the classifier is not fitted")

    def _standardize(self, X):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None]
        if X.shape[1] != len(self.coef_):
            raise InputError(f"expected {len(self.coef_)} features, got {X.shape[1]}")
        return (X - self.mean_) / self.scale_

    def decision_function(self, X):
        self._check_fitted()
        return self._standardize(X) @ self.coef_ + self.intercept_

    def predict_proba(self, X):
        from scipy.special import expit

        p = expit(self.decision_function(X))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X, threshold: float = 0.5):
        return (self.predict_proba(X)[:, 1] >= threshold).astype(int)

    def features_to_matrix(self, rows: list[dict]) -> np.ndarray:
        """Rows of feature dicts (or CSV rows) in this classifier's feature order."""
        self._check_fitted()
        missing = [n for n in self.feature_names_ if n not in rows[0]] if rows else []
        if missing:
            raise InputError(f"{len(missing)} features the classifier needs are missing, e.g. {missing[:3]}")
        return np.array([[feature_value(r, n) for n in self.feature_names_] for r in rows], dtype=np.float64)

    def importance(self) -> dict:
        """Coefficients divided by the largest |coefficient| (the paper's feature importance)."""
        self._check_fitted()
        m = float(np.abs(self.coef_).max()) or 1.0
        return {n: float(c / m) for n, c in zip(self.feature_names_, self.coef_)}

    def check_settings(self, **saliency) -> None:
        """Refuse saliency settings other than those the classifier was trained with."""
        diff = {k: (self.saliency[k], v) for k, v in saliency.items() if k in self.saliency and self.saliency[k] != v}
        if diff:
            text = ", ".join(f"{k}={got!r} (classifier: {want!r})" for k, (want, got) in diff.items())
            raise InputError(f"these saliency settings differ from the ones the classifier was trained with: {text}; "
                             "use the classifier's settings or train a classifier on features made with yours")

    # -- persistence: JSON only, nothing is unpickled
    def to_dict(self) -> dict:
        self._check_fitted()
        return {
            "format": FORMAT, "model": "StandardScaler + LogisticRegression(penalty='l1', solver='liblinear')",
            "C": self.C, "class_weight": {str(k): v for k, v in self.class_weight.items()}, "max_iter": self.max_iter,
            "saliency": self.saliency, "feature_names": self.feature_names_,
            "scaler_mean": self.mean_.tolist(), "scaler_scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(), "intercept": self.intercept_,
            "versions": self.versions, "training": self.training_info, "trained_for": self.trained_for,
        }

    def save(self, path) -> Path:
        """The classifier as JSON, written whole (io.outputs.atomic_write)."""
        from ..io.outputs import atomic_write

        return atomic_write(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path, expected_features: list | None = None) -> "TPClassifier":
        """Read a classifier JSON; InputError naming the first missing, mistyped or non-finite value."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"classifier file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{p} is not a classifier JSON file (truncated or not JSON?): {exc}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"{p} is not a {FORMAT} file")
        missing = [k for k in ("feature_names", "scaler_mean", "scaler_scale", "coef", "intercept", "C", "class_weight", "max_iter")
                   if k not in d]
        if missing:
            raise InputError(f"{p}: {missing[0]} is missing" + (f" (also {', '.join(missing[1:])})" if missing[1:] else "")
                             + "; retrain it with `msis train-classifier`")
        names = d["feature_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputError(f"{p}: feature_names must be a non-empty list of feature names")
        arrays = [_finite_vector(d[k], k, p) for k in ("scaler_mean", "scaler_scale", "coef")]
        if any(len(a) != len(names) for a in arrays):
            raise InputError(f"{p}: the feature names, scaler and coefficients have different lengths")
        expected = expected_features if expected_features is not None else default_feature_names()
        if expected is not None and list(names) != list(expected):
            raise InputError(f"{p}: its {len(names)} features do not match the {len(expected)} saliency features this tool computes "
                             "(names or order differ); retrain it with `msis train-classifier`")
        intercept = _finite_number(d["intercept"], "intercept", p)
        C = _finite_number(d["C"], "C", p)
        if C <= 0:
            raise InputError(f"{p}: C must be positive, got {C}")
        cw = d["class_weight"]
        if not isinstance(cw, dict) or set(cw) != {"0", "1"}:
            raise InputError(f"{p}: class_weight must be an object with the weights of classes \"0\" (FP) and \"1\" (TP)")
        class_weight = {int(k): _finite_number(v, f"class_weight {k}", p) for k, v in cw.items()}
        if min(class_weight.values()) <= 0:
            raise InputError(f"{p}: class_weight values must be positive, got {cw}")
        if not (isinstance(d["max_iter"], int) and not isinstance(d["max_iter"], bool) and d["max_iter"] >= 1):
            raise InputError(f"{p}: max_iter must be a positive integer, got {d['max_iter']!r}")
        for key in ("saliency", "versions", "training", "trained_for"):
            if not isinstance(d.get(key, {}), dict):
                raise InputError(f"{p}: {key} must be a JSON object")
        saliency = dict(d.get("saliency", {}))
        _check_saliency_settings(saliency, p)
        clf = cls(C=C, class_weight=class_weight, max_iter=d["max_iter"], saliency=saliency, versions=dict(d.get("versions", {})),
                  training_info=dict(d.get("training", {})), trained_for=dict(d.get("trained_for", {})))
        clf.feature_names_ = list(names)
        clf.mean_, clf.scale_, clf.coef_ = arrays
        clf.intercept_ = intercept
        if np.any(clf.scale_ <= 0):
            raise InputError(f"{p}: scaler_scale values must be positive")
        return clf


def _finite_number(value, key, source) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{source}: {key} must be a number, got {json.dumps(value)[:60]}")
    if not np.isfinite(value):
        raise InputError(f"{source}: {key} is {value}; it must be a finite number (a classifier with NaN or Inf gives NaN probabilities)")
    return float(value)


def _finite_vector(values, key, source) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InputError(f"{source}: {key} must be a list of numbers")
    a = np.array(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise InputError(f"{source}: {key} has {bad.size} NaN or Inf values (first at index {bad[0]}); every value must be finite "
                         "(a classifier with NaN or Inf gives NaN probabilities)")
    return a


_SALIENCY_CHOICES = {"method": ("smoothgrad",), "aggregation": ("max", "mean"), "channel": ("flair", "mprage"),
                     "sigma_mode": ("range", "absolute"), "context": ("patch", "full")}


def _check_saliency_settings(s: dict, source) -> None:
    """The saliency settings a classifier records are the ones its features are recomputed with."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key, choices in _SALIENCY_CHOICES.items():
        if key in s and s[key] not in choices:
            raise InputError(f"{source}: saliency {key} must be one of {list(choices)}, got {s[key]!r}")
    if "n_samples" in s and not (is_int(s["n_samples"]) and s["n_samples"] >= 1):
        raise InputError(f"{source}: saliency n_samples must be a positive integer, got {s['n_samples']!r}")
    if "seed" in s and not (is_int(s["seed"]) and s["seed"] >= 0):
        raise InputError(f"{source}: saliency seed must be an integer >= 0, got {s['seed']!r}")
    if "sigma" in s and not (not isinstance(s["sigma"], bool) and isinstance(s["sigma"], (int, float)) and np.isfinite(s["sigma"])
                             and s["sigma"] >= 0):
        raise InputError(f"{source}: saliency sigma must be a finite number >= 0, got {s['sigma']!r}")
    if s.get("max_omega_voxels") is not None and not (is_int(s["max_omega_voxels"]) and s["max_omega_voxels"] >= 1):
        raise InputError(f"{source}: saliency max_omega_voxels must be a positive integer or null, got {s['max_omega_voxels']!r}")


_FEATURE_NAMES_CACHE: list | None = None


def default_feature_names() -> list:
    """The 93 feature names in pyradiomics' order (computed once on a tiny synthetic map)."""
    global _FEATURE_NAMES_CACHE
    if _FEATURE_NAMES_CACHE is None:
        rng = np.random.default_rng(0)
        m = rng.standard_normal((12, 12, 12)).astype(np.float32)
        mask = np.zeros(m.shape, bool)
        mask[4:8, 4:8, 4:8] = True
        _FEATURE_NAMES_CACHE = list(saliency_features(m, mask).keys())
    return list(_FEATURE_NAMES_CACHE)


def default_classifier_path() -> Path:
    env = os.environ.get("MSIS_CLASSIFIER")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_unet" / "tp_classifier.json"  # Resources/ is beside the Lib folder


def _versions() -> dict:
    import sklearn

    radiomics = _quiet_radiomics()
    from .. import __version__

    return {"msis": __version__, "scikit-learn": sklearn.__version__, "pyradiomics": str(radiomics.__version__), "numpy": np.__version__}


# ----------------------------------------------------------------------------- evaluation

def detection_scores(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """(F1, PPV) from lesion counts."""
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    ppv = tp / (tp + fp) if (tp + fp) else 1.0
    return f1, ppv


def bootstrap_detection(is_tp: np.ndarray, keep: np.ndarray, n_fn: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """F1 and PPV of the network alone and after removing lesions the classifier rejects.

    is_tp: per predicted lesion, 1 = TP, 0 = FP; keep: per predicted lesion, kept by the classifier;
    n_fn: GT lesions the network missed. A removed TP becomes a missed lesion (FN). The test lesions
    (predicted lesions and the missed GT lesions) are resampled with replacement `n_boot` times;
    returned: point estimates, bootstrap means and 95% percentile intervals, also of the paired changes
    f1_change and ppv_change (after - before).
    """
    is_tp = np.asarray(is_tp, bool)
    keep = np.asarray(keep, bool)
    # one row per test lesion: kind 0 = FP, 1 = TP, 2 = missed GT lesion
    kind = np.concatenate([is_tp.astype(int), np.full(n_fn, 2)])
    kept = np.concatenate([keep, np.zeros(n_fn, bool)])

    def scores(k, kp):
        tp, fp, fn = np.sum(k == 1), np.sum(k == 0), np.sum(k == 2)
        before = detection_scores(tp, fp, fn)
        after = detection_scores(np.sum((k == 1) & kp), np.sum((k == 0) & kp), fn + np.sum((k == 1) & ~kp))
        return before + after

    point = scores(kind, kept)
    rng = np.random.default_rng(seed)
    n = len(kind)
    boots = np.array([scores(kind[idx], kept[idx]) for idx in (rng.integers(0, n, n) for _ in range(n_boot))])
    names = ("f1_before", "ppv_before", "f1_after", "ppv_after")
    out = {"n_boot": n_boot, "seed": seed, "counts_before": {"tp": int(is_tp.sum()), "fp": int((~is_tp).sum()), "fn": int(n_fn)},
           "counts_after": {"tp": int((is_tp & keep).sum()), "fp": int((~is_tp & keep).sum()), "fn": int(n_fn + (is_tp & ~keep).sum())}}
    # the paired change (after - before on the same resample): its interval says whether the gain is real
    point = np.concatenate([point, [point[2] - point[0], point[3] - point[1]]])
    boots = np.column_stack([boots, boots[:, 2] - boots[:, 0], boots[:, 3] - boots[:, 1]])
    for i, name in enumerate(names + ("f1_change", "ppv_change")):
        out[name] = {"point": float(point[i]), "mean": float(boots[:, i].mean()),
                     "ci95": [float(np.percentile(boots[:, i], 2.5)), float(np.percentile(boots[:, i], 97.5))]}
    return out


def importance_figure(clf: TPClassifier, path, top: int = 10):
    """Normalised coefficients: the `top` most positive and `top` most negative features."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    imp = clf.importance()
    items = sorted(imp.items(), key=lambda kv: kv[1])
    neg = [kv for kv in items if kv[1] < 0][:top]
    pos = [kv for kv in items if kv[1] > 0][-top:]
    sel = neg + pos
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(sel), 4) + 1.2), constrained_layout=True)
    names = [k.replace("original_", "") for k, _ in sel]
    vals = [v for _, v in sel]
    ax.barh(range(len(sel)), vals, color=["tab:blue" if v < 0 else "tab:red" for v in vals])
    ax.set_yticks(range(len(sel)))
    ax.set_yticklabels(names, fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("coefficient / max |coefficient|  (red: towards TP, blue: towards FP)")
    ax.set_title(f"TP/FP classifier: top {top} positive and negative features")
    save_figure(fig, path, dpi=110)
    return path


def roc_auc_with_ci(is_tp, probability, n_boot: int = 1000, seed: int = 0) -> dict:
    """ROC AUC of P(TP) for telling TPs from FPs (threshold-free), with a 95% percentile bootstrap CI
    over the scored lesions (resamples holding one class only are skipped)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(is_tp, int)
    p = np.asarray(probability, float)
    if y.min(initial=1) == y.max(initial=0):
        return {"point": None, "mean": None, "ci95": [None, None], "note": "needs both TP and FP lesions"}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            boots.append(roc_auc_score(y[idx], p[idx]))
    return {"point": float(roc_auc_score(y, p)), "mean": float(np.mean(boots)),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))], "n_boot_used": len(boots)}


def probability_figure(probability, is_tp, voxels, threshold: float, path):
    """P(TP) of every scored test lesion against its size, TPs and FPs apart, with the threshold."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    p, tp, v = np.asarray(probability, float), np.asarray(is_tp, bool), np.asarray(voxels, float)
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    ax.scatter(v[tp], p[tp], s=10, alpha=0.5, color="tab:red", label=f"TP ({tp.sum()})")
    ax.scatter(v[~tp], p[~tp], s=28, marker="x", color="tab:blue", label=f"FP ({(~tp).sum()})")
    ax.axhline(threshold, color="k", lw=0.8, ls="--", label=f"threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("lesion size (voxels)")
    ax.set_ylabel("P(TP) from saliency radiomics")
    ax.set_title("TP/FP classifier on the test lesions")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path, dpi=110)
    return path


def threshold_sweep(is_tp, probability, n_fn: int, kept_tp: int = 0, kept_fp: int = 0, thresholds=None) -> list[dict]:
    """F1 and PPV after removing the scored lesions with P(TP) < t, for each t (point estimates).
    kept_tp/kept_fp: lesions without a probability, kept whatever the threshold."""
    tp_mask = np.asarray(is_tp, bool)
    p = np.asarray(probability, float)
    ts = np.round(np.linspace(0.0, 1.0, 101), 2) if thresholds is None else np.asarray(thresholds, float)
    rows = []
    for t in ts:
        keep = p >= t
        tp, fp = int((tp_mask & keep).sum()) + kept_tp, int((~tp_mask & keep).sum()) + kept_fp
        fn = int(n_fn + (tp_mask & ~keep).sum())
        f1, ppv = detection_scores(tp, fp, fn)
        rows.append({"threshold": float(t), "tp": tp, "fp": fp, "fn": fn, "f1": f1, "ppv": ppv})
    return rows


def threshold_figure(sweep: list[dict], threshold: float, path):
    """F1 and PPV against the pruning threshold; t = 0 is the network alone."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    t = [r["threshold"] for r in sweep]
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.plot(t, [r["f1"] for r in sweep], color="tab:purple", label="F1")
    ax.plot(t, [r["ppv"] for r in sweep], color="tab:green", label="PPV")
    ax.axhline(sweep[0]["f1"], color="tab:purple", lw=0.7, ls=":", label="F1, network alone")
    ax.axhline(sweep[0]["ppv"], color="tab:green", lw=0.7, ls=":", label="PPV, network alone")
    ax.axvline(threshold, color="k", lw=0.8, ls="--", label=f"threshold used {threshold:g}")
    ax.set_xlabel("remove lesions with P(TP) below")
    ax.set_ylabel("test-set score")
    ax.set_title("Detection scores against the pruning threshold (test set)")
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, path, dpi=110)
    return path
