"""Whole-volume lesion probability with MONAI sliding-window inference (METHOD.md, "Inference")."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..progress import report


def predict_probability(model, image: np.ndarray, *, device="auto", sw_batch_size: int = 1, progress=None) -> np.ndarray:
    """Lesion probability (X, Y, Z) float32 on the network's grid, as the model's format predicts it
    (model.json models: `sliding_window_probability`)."""
    return model.predict_probability(image, device=device, progress=progress, sw_batch_size=sw_batch_size)


def sliding_window_probability(model, image: np.ndarray, *, device="auto", sw_batch_size: int = 1, progress=None) -> np.ndarray:
    """Lesion probability (X, Y, Z) float32: sliding window over the spec's roi, Gaussian blending, then
    the spec's output activation (softmax over classes or sigmoid of the lesion logit).

    progress(done, total) is called before each window; returning False stops with errors.Cancelled.

    model: a LoadedModel; image: (C, X, Y, Z) float32 prepared for the network.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from .device import resolve_device

    spec = model.spec
    n_in = spec.network_args.get("in_channels", len(spec.input_channels))
    if image.ndim != 4 or image.shape[0] != n_in:
        raise InputError(f"the model expects {n_in} input channels ({spec.input_channels}); got an array of shape {image.shape}")
    dev = resolve_device(device)
    net = model.network.to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(dev)

    calls = {"n": 0}
    n_windows = _n_windows(image.shape[1:], spec.roi_size, spec.overlap, sw_batch_size)

    def predictor(patch):
        calls["n"] += 1
        report(progress, calls["n"], n_windows)  # False from the callback stops inference (Cancelled)
        return net(patch)

    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi_size=tuple(spec.roi_size), sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=spec.overlap, mode=spec.blend_mode,
        )
        prob = model.probability(logits)[0]
    return prob.float().cpu().numpy()


def _n_windows(shape, roi, overlap, batch):
    n = 1
    for s, r in zip(shape, roi):
        r = min(r, s)
        step = max(int(r * (1 - overlap)), 1)
        n *= int(np.ceil(max(s - r, 0) / step)) + 1
    return int(np.ceil(n / batch))
