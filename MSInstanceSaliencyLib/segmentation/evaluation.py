"""Lesion-wise detection and voxel-wise overlap metrics (METHOD.md, "Lesion-wise categories").

- TP: predicted component with non-zero overlap with the ground truth mask.
- FP: predicted component with zero overlap with the ground truth.
- FN: ground-truth component (18-connectivity) with zero overlap with the prediction.
F1 = 2 TP / (2 TP + FP + FN) and PPV = TP / (TP + FP) from these counts; TPR is the fraction of
ground-truth lesions that the prediction touches. Dice and normalised Dice (nDSC, r = 0.001) are
voxel-wise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from .instances import label_instances

NDSC_REFERENCE_LOAD = 0.001


@dataclass
class LesionCounts:
    tp: int = 0  # predicted lesions touching GT
    fp: int = 0
    fn: int = 0  # GT lesions not touched
    gt_detected: int = 0  # GT lesions touched (the sensitivity numerator)
    n_gt: int = 0
    n_pred: int = 0

    def __add__(self, other: "LesionCounts") -> "LesionCounts":
        return LesionCounts(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    @property
    def ppv(self) -> float:
        d = self.tp + self.fp
        return self.tp / d if d else 1.0

    @property
    def tpr(self) -> float:
        return self.gt_detected / self.n_gt if self.n_gt else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "f1": self.f1, "ppv": self.ppv, "tpr": self.tpr}


def classify_lesions(pred_labels: np.ndarray, gt_mask: np.ndarray) -> dict:
    """Per-lesion categories: {'tp': [ids], 'fp': [ids], 'fn': [gt ids], 'gt_labels': array}."""
    pred_labels, ids = _countable_labels(np.asarray(pred_labels))
    gt = np.asarray(gt_mask) != 0  # every non-zero voxel is lesion, whatever its label or type
    if pred_labels.shape != gt.shape:
        raise InputError(f"prediction {pred_labels.shape} and ground truth {gt.shape} are not on the same grid")
    gt_labels = label_instances(gt, min_volume_mm3=0.0, connectivity=18)
    n_pred = len(ids)
    n_gt = int(gt_labels.max()) if gt_labels.size else 0
    overlap_pred = np.bincount(pred_labels[gt].ravel(), minlength=n_pred + 1)[1:] if n_pred else np.zeros(0)
    overlap_gt = np.bincount(gt_labels[pred_labels > 0].ravel(), minlength=n_gt + 1)[1:] if n_gt else np.zeros(0)
    present = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:] > 0 if n_pred else np.zeros(0, bool)
    return {
        "tp": [int(i) for i in ids[(overlap_pred > 0) & present]],
        "fp": [int(i) for i in ids[(overlap_pred == 0) & present]],
        "fn": [int(i) for i in np.arange(1, n_gt + 1)[overlap_gt == 0]],
        "gt_detected": int((overlap_gt > 0).sum()),
        "n_gt": n_gt,
        "gt_labels": gt_labels,
    }


def _countable_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, ids) to count with np.bincount, whose memory follows the largest label: `labels` as given
    when that is at most the number of voxels (ids 1..max), else renumbered 1..K in the order of the
    labels present (ids[k - 1] is the label of k). Labels <= 0 are background."""
    top = int(labels.max()) if labels.size else 0
    background = labels < 0
    if top <= labels.size:
        return (np.where(background, 0, labels) if background.any() else labels), np.arange(1, top + 1)
    lesion = labels > 0
    values = labels[lesion]
    ids = np.unique(values)
    return _renumbered(labels.shape, lesion, values, ids, np.int64), ids


def _renumbered(shape, lesion: np.ndarray, values: np.ndarray, present: np.ndarray, dtype) -> np.ndarray:
    """Labels 1..K at the voxels `lesion` (K = len(present), sorted), k where `values` is present[k - 1]; 0 elsewhere."""
    labels = np.zeros(shape, dtype)
    labels[lesion] = np.searchsorted(present, values) + 1
    return labels


def prediction_labels(pred: np.ndarray, spacing=(1.0, 1.0, 1.0), what: str = "the prediction") -> np.ndarray:
    """Instance labels 1..K of a prediction as stored: a binary mask (one non-zero value, whatever it
    is) labelled with 18-connectivity, or instance labels (two or more whole numbers >= 1, in any
    integer or float type, of any size) renumbered 1..K in their order. Anything else is refused
    (InputError): negative labels, other numbers (a probability map), NaN. Memory follows the voxels,
    not the largest label."""
    lesion = pred != 0
    values = pred[lesion]
    present = np.unique(values)
    if present.size <= 1:
        return label_instances(lesion, spacing=spacing, min_volume_mm3=0.0)
    if not np.issubdtype(present.dtype, np.integer):
        whole = np.isfinite(present) & (present == np.round(present))
        if not whole.all():
            raise InputError(f"{what} has {present.size} different non-zero values, not all of them whole numbers (such as "
                             f"{present[~whole][0]:g}): give instance labels (1..K) or a binary mask; threshold a probability map first")
    if present[0] < 0:
        raise InputError(f"{what} has negative labels (such as {present[0]:g}): instance labels are whole numbers 1..K, 0 the "
                         "background; or give a binary mask (one non-zero value)")
    return _renumbered(pred.shape, lesion, values, present, np.int32 if present.size < 2**31 else np.int64)


def lesion_counts(pred_labels: np.ndarray, gt_mask: np.ndarray) -> LesionCounts:
    c = classify_lesions(pred_labels, gt_mask)
    return LesionCounts(
        tp=len(c["tp"]), fp=len(c["fp"]), fn=len(c["fn"]), gt_detected=c["gt_detected"],
        n_gt=c["n_gt"], n_pred=len(c["tp"]) + len(c["fp"]),
    )


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    d = p.sum() + g.sum()
    return float(2 * (p & g).sum() / d) if d else 1.0


def normalized_dice(pred: np.ndarray, gt: np.ndarray, r: float = NDSC_REFERENCE_LOAD) -> float:
    """nDSC (Raina et al. 2023): Dice with FPs rescaled to a reference lesion load r."""
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    n_g = g.sum()
    if n_g == 0:
        return 1.0 if p.sum() == 0 else 0.0
    k = (1 - r) * n_g / (r * (g.size - n_g))
    tp = (p & g).sum()
    fp = (p & ~g).sum()
    fn = (~p & g).sum()
    return float(2 * tp / (k * fp + 2 * tp + fn))


def evaluate_case(pred_labels: np.ndarray, gt_mask: np.ndarray) -> dict:
    counts = lesion_counts(pred_labels, gt_mask)
    return {**counts.as_dict(), "dice": dice(pred_labels, gt_mask), "ndsc": normalized_dice(pred_labels, gt_mask)}


def summarize(cases: list[dict]) -> dict:
    """Counts summed over cases (F1/PPV/TPR from the sums), Dice/nDSC averaged over cases."""
    total = LesionCounts()
    for c in cases:
        total = total + LesionCounts(**{k: c[k] for k in ("tp", "fp", "fn", "gt_detected", "n_gt", "n_pred")})
    return {
        **total.as_dict(),
        "dice_mean": float(np.mean([c["dice"] for c in cases])) if cases else float("nan"),
        "ndsc_mean": float(np.mean([c["ndsc"] for c in cases])) if cases else float("nan"),
        "n_cases": len(cases),
    }
