"""load_model: any supported model folder, by its format (formats.detect_format); the bundled demo model
by default. The format modules do not import this one, so the dispatch has no cycle."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .base import LoadedModel
from .monai import load_msis_model


def default_model_dir() -> Path:
    """The bundled demo model (override with MSIS_MODEL_DIR)."""
    env = os.environ.get("MSIS_MODEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_unet"  # Resources/ is beside the Lib folder


def load_model(model: str | os.PathLike | None = None, device="cpu", *, channels=None, folds=None, mirroring: bool = True) -> LoadedModel:
    """Load a model in eval mode, parameters frozen: a model.json folder (default: the bundled demo
    model), an nnU-Net v2 trained-model folder or an LST-AI 2.x checkpoint folder (formats.py).

    channels: the images the network's input channels are, in order ("flair", "mprage"), when the
    model's own names are to be overridden. folds, mirroring: nnU-Net's (default: every fold present,
    test-time mirroring on, as nnU-Net's predictor does)."""
    from .formats import detect_format

    p = Path(model) if model is not None else default_model_dir()
    fmt, where = detect_format(p)
    if fmt != "nnunet" and (folds is not None):
        raise InputError(f"--folds is for nnU-Net models; {p} is {'a ' + fmt if fmt != 'msis' else 'a model.json'} model")
    if fmt == "nnunet":
        from .nnunet import load_nnunet_model

        return load_nnunet_model(where, device=device, folds=folds, mirroring=mirroring, channels=channels)
    if fmt == "lst-ai":
        from .lstai import load_lstai_model

        return load_lstai_model(where, device=device, channels=channels)
    return load_msis_model(where, device=device, channels=channels)
