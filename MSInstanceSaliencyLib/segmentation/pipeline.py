"""Segmentation of one case end to end: prepare inputs, run the model, label instances; and what a
segmentation run writes into its output folder (io.outputs.OutputFolder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.outputs import OutputFolder
from ..io.volumes import image_from_array, write_image
from ..models.preprocessing import PreparedCase
from .instances import label_instances, lesion_table, write_table


@dataclass
class SegmentationResult:
    prepared: PreparedCase
    probability: np.ndarray  # (X, Y, Z) float32
    labels: np.ndarray  # (X, Y, Z) int32, 1..K
    table: list
    threshold: float
    min_volume_mm3: float
    timings: dict = field(default_factory=dict)

    @property
    def reference(self) -> sitk.Image:
        return self.prepared.reference

    def probability_image(self) -> sitk.Image:
        return image_from_array(self.probability.astype(np.float32), reference=self.reference)

    def labels_image(self) -> sitk.Image:
        dtype = np.uint16 if self.labels.max() < 65535 else np.uint32
        return image_from_array(self.labels.astype(dtype), reference=self.reference)


def segment(flair: sitk.Image, mprage: sitk.Image, model, *, device="auto", threshold=None, min_volume_mm3=None,
            register=False, n4=False, progress=None) -> SegmentationResult:
    """Segment lesions; threshold and minimum volume default to the model spec's."""
    spec = model.spec
    t = {}
    t0 = time.time()
    prepared = model.prepare(flair, mprage, register=register, n4=n4)
    t["prepare_s"] = time.time() - t0
    t0 = time.time()
    prob = model.predict_case(prepared, device=device, progress=progress)
    t["inference_s"] = time.time() - t0
    thr = spec.threshold if threshold is None else float(threshold)
    if not 0.0 < thr < 1.0:
        raise InputError(f"threshold must be between 0 and 1, got {thr}")
    min_vol = spec.min_lesion_mm3 if min_volume_mm3 is None else float(min_volume_mm3)
    if min_vol < 0:
        raise InputError(f"minimum lesion volume must be >= 0 mm^3, got {min_vol}")
    labels = label_instances(prob > thr, spacing=prepared.spacing, min_volume_mm3=min_vol)
    table = lesion_table(labels, prepared.reference, prob)
    return SegmentationResult(prepared, prob, labels, table, thr, min_vol, t)


SEGMENTATION_FILES = ("probability.nii.gz", "lesion_labels.nii.gz", "lesions.csv")


def write_segmentation(result: SegmentationResult, out: OutputFolder) -> dict:
    """Stage the three outputs of a segmentation; the paths they will have once `out` is closed."""
    with out.writing():
        paths = {
            "probability": write_image(result.probability_image(), out.file("probability.nii.gz")),
            "labels": write_image(result.labels_image(), out.file("lesion_labels.nii.gz")),
            "table": write_table(result.table, out.file("lesions.csv")),
        }
    return {k: out.final(v) for k, v in paths.items()}


def run_info(model, result: SegmentationResult, **extra) -> dict:
    import torch

    from .. import __version__

    return {
        "msis_version": __version__,
        "torch": torch.__version__,
        "model": str(model.path) if model.path else model.spec.name,
        "model_name": model.spec.name,
        "model_version": model.spec.version,
        "threshold": result.threshold,
        "min_lesion_mm3": result.min_volume_mm3,
        "preprocessing": result.prepared.steps,
        "n_lesions": len(result.table),
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        **extra,
    }
