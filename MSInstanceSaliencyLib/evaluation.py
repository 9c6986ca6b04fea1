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
    pred_labels = np.asarray(pred_labels)
    gt = np.asarray(gt_mask) != 0  # every non-zero voxel is lesion, whatever its label or type
    if pred_labels.shape != gt.shape:
        from .errors import InputError

        raise InputError(f"prediction {pred_labels.shape} and ground truth {gt.shape} are not on the same grid")
    gt_labels = label_instances(gt, min_volume_mm3=0.0, connectivity=18)
    n_pred = int(pred_labels.max()) if pred_labels.size else 0
    n_gt = int(gt_labels.max()) if gt_labels.size else 0
    overlap_pred = np.bincount(pred_labels[gt].ravel(), minlength=n_pred + 1)[1:] if n_pred else np.zeros(0)
    overlap_gt = np.bincount(gt_labels[pred_labels > 0].ravel(), minlength=n_gt + 1)[1:] if n_gt else np.zeros(0)
    present = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:] > 0 if n_pred else np.zeros(0, bool)
    ids = np.arange(1, n_pred + 1)
    return {
        "tp": [int(i) for i in ids[(overlap_pred > 0) & present]],
        "fp": [int(i) for i in ids[(overlap_pred == 0) & present]],
        "fn": [int(i) for i in np.arange(1, n_gt + 1)[overlap_gt == 0]],
        "gt_detected": int((overlap_gt > 0).sum()),
        "n_gt": n_gt,
        "gt_labels": gt_labels,
    }


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
