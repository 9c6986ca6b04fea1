"""Segmentation of one case end to end: prepare inputs, run the model, label instances, write outputs.

Outputs go only into the output folder. A manifest (msis_run.json) lists what the tool wrote there,
so a second run may replace its own earlier outputs but never a file the user put there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .instances import label_instances, lesion_table, write_table
from .preprocessing import PreparedCase, prepare_case
from .volumes import image_from_array, write_image

MANIFEST = "msis_run.json"


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
    from .inference import predict_probability

    spec = model.spec
    t = {}
    t0 = time.time()
    prepared = prepare_case(flair, mprage, spec, register=register, n4=n4)
    t["prepare_s"] = time.time() - t0
    t0 = time.time()
    prob = prepared.only_where_valid(predict_probability(model, prepared.image, device=device, progress=progress))
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


class OutputFolder:
    """Writes into one folder without ever replacing a file the tool did not write there itself."""

    def __init__(self, path, protected=()):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} exists and is not a folder")
        self.protected = {Path(p).resolve() for p in protected}
        manifest = self.path / MANIFEST
        self.record = json.loads(manifest.read_text()) if manifest.is_file() else {"files": []}
        self.previous = set(self.record.get("files", []))
        self.written = []

    def file(self, name: str) -> Path:
        target = self.path / name
        if target.resolve() in self.protected:
            raise InputError(f"output {target} would overwrite an input file; choose another --out")
        if target.exists() and name not in self.previous and name not in self.written:
            raise InputError(f"{target} already exists and was not written by msis; choose another --out or move it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.written.append(name)
        return target

    def close(self, **info) -> Path:
        self.record = {"files": sorted(set(self.written) | self.previous), **info}
        p = self.path / MANIFEST
        p.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        return p


def write_segmentation(result: SegmentationResult, out: OutputFolder) -> dict:
    paths = {
        "probability": write_image(result.probability_image(), out.file("probability.nii.gz")),
        "labels": write_image(result.labels_image(), out.file("lesion_labels.nii.gz")),
        "table": write_table(result.table, out.file("lesions.csv")),
    }
    return paths


def run_info(model, result: SegmentationResult, **extra) -> dict:
    import torch

    from . import __version__

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


def env_threads() -> None:
    """Use all cores for torch on CPU (torch defaults may be lower inside some launchers), or
    MSIS_THREADS of them (to run several jobs side by side)."""
    import torch

    n = int(os.environ.get("MSIS_THREADS") or os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
