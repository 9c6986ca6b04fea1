"""Instance-level Grad-CAM++ (Eqs. 4-10 of METHOD.md, which is the specification).

Arrays: `image` is (C, X, Y, Z) float32 prepared for the network; `omega` is a boolean (X, Y, Z).
"""

from __future__ import annotations


import numpy as np

from ..errors import InputError
from .common import _check_inputs, _divisor, _lesion_head, _network_and_spec, check_backward_fits, frozen, list_layers
from .context import DEFAULT_ROI, _crop_pad, context_box


# ----------------------------------------------------------------------------- Grad-CAM++

def gradcampp(
    model,
    image,
    omega=None,
    *,
    layer: str | None = None,
    threshold: float = 0.3,
    alpha: str = "paper",
    device="auto",
    context: str | None = None,
    target_class: int | None = None,
    roi_size=None,
    upsample: bool = True,
) -> np.ndarray:
    """Grad-CAM++ map (X, Y, Z) float32 on the image's grid.

    omega=None: class-level map (Eqs. 4-7), y' = sum of the lesion logits where the lesion
    probability exceeds `threshold`, channel weights summed over space. A mask: instance-level map
    (Eqs. 8-10), y' = sum of the logits over Ω, per-voxel weights. alpha="paper" is Eq. 7,
    g² / (2g² + (Σ_v A)·g³) with α = 0 where g = 0; alpha="monai" reproduces MONAI's GradCAMpp
    (Σ_v A·g³ in the denominator, gradient scaled by exp(y'), whose exponent is capped at 80 so
    float32 cannot overflow); alpha="layercam" sets α ≡ 1 (LayerCAM, a cross-check). The map is
    upsampled trilinearly to the input grid (upsample=False returns it at the layer's resolution,
    context "full" only).
    context: "full" (default for class-level) or "patch" (default for instance-level).
    """
    import torch
    import torch.nn.functional as F

    from ..models.device import resolve_device

    image, omega = _check_inputs(image, omega, allow_none=True)
    if alpha not in ("paper", "monai", "layercam"):
        raise InputError(f"alpha must be 'paper', 'monai' or 'layercam', got {alpha!r}")
    net, spec = _network_and_spec(model)
    lesion_logits, lesion_probability = _lesion_head(model, target_class)
    layer = layer or (spec.gradcam_layer if spec is not None else None)
    modules = dict(net.named_modules())
    if layer not in modules:
        names = ", ".join(n for n, _ in list_layers(net)[:40])
        raise InputError(f"layer {layer!r} is not in the network; choose one of: {names}")
    dev = resolve_device(device)
    context = context or ("full" if omega is None else "patch")
    if omega is None and context != "full":
        raise InputError("a class-level Grad-CAM++ map (no omega) needs context='full'")
    roi = tuple(roi_size or (spec.roi_size if spec is not None else DEFAULT_ROI))
    box = context_box(omega if omega is not None else np.ones(image.shape[1:], bool), context, roi, _divisor(model, spec))
    x = _crop_pad(torch.from_numpy(image), box).to(dev)[None]

    store = {}
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: store.__setitem__("A", out))
    try:
        with frozen(net, dev):
            check_backward_fits(net, tuple(x.shape), dev, _divisor(model, spec))
            x.requires_grad_(True)  # so that the layer's activations are part of the graph
            out = net(x)
            logits = lesion_logits(out)
            if omega is None:
                prob = lesion_probability(out)
                valid = torch.zeros_like(prob, dtype=torch.bool)
                valid[(slice(None),) + tuple(slice(0, n) for n in box.shape)] = True
                score = logits[(prob > threshold) & valid].sum()
            else:
                om = _crop_pad(torch.from_numpy(omega), box).to(dev)[None]
                score = logits[om].sum()
            acts = store["A"]
            (grad,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    cam = _gradcampp_map(acts.detach().float(), grad.float(), score.detach().float(), instance=omega is not None, alpha=alpha)
    if not upsample:
        if context != "full" or any(box.pad):
            raise InputError("upsample=False needs context='full' on a volume the network takes without padding")
        return cam[0, 0].cpu().numpy().astype(np.float32)
    cam = F.interpolate(cam, size=box.padded_shape, mode="trilinear", align_corners=False)
    result = np.zeros(image.shape[1:], np.float32)
    result[box.slices] = cam[0, 0][tuple(slice(0, n) for n in box.shape)].cpu().numpy()
    return result


def _gradcampp_map(acts, grad, score, *, instance: bool, alpha: str):
    """(1, 1, ...) map at the layer's resolution from activations A and gradients g = ∂y'/∂A."""
    import torch
    import torch.nn.functional as F

    b, c, *spatial = grad.shape
    flat = lambda t: t.reshape(b, c, -1)  # noqa: E731
    per_channel = lambda t: t.reshape(b, c, *[1] * len(spatial))  # noqa: E731
    g2 = grad.pow(2)
    if alpha == "paper":
        denom = 2 * g2 + per_channel(flat(acts).sum(-1)) * grad.pow(3)
        a = torch.where((grad != 0) & (denom != 0), g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        relu_grad = F.relu(grad)
    elif alpha == "layercam":
        a = torch.ones_like(g2)
        relu_grad = F.relu(grad)
    else:
        denom = 2 * g2 + per_channel(flat(acts * grad.pow(3)).sum(-1))
        denom = torch.where(denom != 0.0, denom, torch.ones_like(denom))
        a = g2 / (denom + 1e-7)
        relu_grad = F.relu(torch.exp(torch.clamp(score, max=80.0)) * grad)
    weights = a * relu_grad
    if not instance:
        weights = per_channel(flat(weights).sum(-1))
    return F.relu((weights * acts).sum(1, keepdim=True))
