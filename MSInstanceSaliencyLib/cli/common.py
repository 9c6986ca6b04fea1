"""Helpers the commands share: loading the model, the output folder, warnings and CSV rows."""

from __future__ import annotations

import os
import sys

from ..errors import InputError
from ..io.outputs import write_csv_rows as _write_rows  # noqa: F401 - the commands' CSV tables
from .parser import PHANTOM_VOXEL_SIZES


def OutputFolder(*args, **kwargs):  # noqa: N802 - the class, imported when used so that `msis` starts light
    from ..io.outputs import OutputFolder as _OutputFolder

    return _OutputFolder(*args, **kwargs)


def _load(args):
    from ..models.loading import load_model
    from ..models.device import resolve_device
    from ..models.device import env_threads

    env_threads()
    dev = resolve_device(args.device)
    return load_model(args.model, device=dev, channels=getattr(args, "model_channels", None), folds=getattr(args, "folds", None),
                      mirroring=not getattr(args, "no_mirroring", False)), dev


def _classifier_for(model, args):
    """The TP/FP classifier of the model (or --classifier), refused when it was trained for another model."""
    from ..classifier.scoring import load_classifier

    return load_classifier(args.classifier, model=model)


def _phantom_voxel_size(note: bool = False) -> float:
    """MSIS_PHANTOM_VOXEL_SIZE: the voxel size in mm of every phantom a command generates: `phantom`
    (where --voxel-size overrides it), `demo`, `features --phantom-patients`, the experiments' phantom
    cases (context, sanity, stats, reproduce) and validate-model (default 1, the model's training
    phantoms; tests use 2 for small, fast cases). Recorded in each command's sidecar, summary or run
    record. note: say on stderr, once, when the phantoms are not at the model's 1 mm."""
    text = os.environ.get("MSIS_PHANTOM_VOXEL_SIZE", "").strip()
    if not text:
        return 1.0
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    lo, hi = PHANTOM_VOXEL_SIZES
    if not lo <= v <= hi:
        raise InputError(f"MSIS_PHANTOM_VOXEL_SIZE must be a voxel size in mm between {lo:g} and {hi:g}, got {text!r}")
    if note and v != 1.0:
        print(f"phantoms with {v:g} mm voxels (MSIS_PHANTOM_VOXEL_SIZE); the model's training phantoms have 1 mm", file=sys.stderr)
    return v


def _warn(message):
    print(f"msis: warning: {message}", file=sys.stderr)
