"""What both saliency methods share: the network and its lesion logit, frozen parameters, input checks,
autocast, and the memory estimates that size the backward passes.

Arrays: `image` is (C, X, Y, Z) float32 prepared for the network; `omega` is a boolean (X, Y, Z).
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from ..errors import InputError
from ..models.base import size_divisor


# ----------------------------------------------------------------------------- model helpers

def _network_and_spec(model):
    """(torch module, spec or None) from a LoadedModel or a plain torch.nn.Module."""
    spec = getattr(model, "spec", None)
    net = getattr(model, "network", model)
    return net, spec


def _lesion_head(model, target_class):
    """(logit, probability) functions of the network's output (B, K, ...) -> (B, ...): the model's own
    (its lesion class and output activation), or channel `target_class` under softmax for a plain module."""
    import torch

    if target_class is None and hasattr(model, "lesion_logits"):
        return model.lesion_logits, model.probability
    k = 1 if target_class is None else int(target_class)
    return (lambda out: out[:, k]), (lambda out: torch.softmax(out, dim=1)[:, k])


@contextlib.contextmanager
def frozen(net, device=None):
    """Eval mode, no parameter gradients and (given a device) the network on it for the duration;
    the caller's mode, flags and device are restored (a no-op move for a LoadedModel, already there)."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    home = flags[0][0].device if flags else None
    net.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        if device is not None:
            net.to(device)
        yield net
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)
        if device is not None and home is not None:
            net.to(home)


def _divisor(model, spec) -> int:
    d = getattr(model, "size_divisor", None)
    return int(d) if isinstance(d, int) else size_divisor(spec)


def list_layers(model) -> list[tuple[str, str]]:
    """(name, type) of the convolution-like layers a Grad-CAM++ map can be computed from, input to output."""
    net, _ = _network_and_spec(model)
    out = []
    for name, mod in net.named_modules():
        kind = type(mod).__name__
        if name and ("Conv" in kind or kind in ("Convolution", "ResidualUnit", "UnetResBlock", "UnetBasicBlock", "UnetUpBlock")):
            out.append((name, kind))
    return out


def _check_inputs(image, omega, allow_none=False):
    image = np.asarray(image)
    if image.ndim != 4:
        raise InputError(f"image must be (C, X, Y, Z); got shape {image.shape}")
    if not np.isfinite(image).all():
        raise InputError("image contains NaN or Inf values")
    if omega is None:
        if allow_none:
            return image.astype(np.float32, copy=False), None
        raise InputError("omega (the lesion's voxels) is required")
    omega = np.asarray(omega).astype(bool)
    if omega.shape != image.shape[1:]:
        raise InputError(f"omega has shape {omega.shape} but the image grid is {image.shape[1:]}")
    if not omega.any():
        raise InputError("omega is empty: give at least one voxel (a lesion id that exists, or a non-empty mask)")
    return image.astype(np.float32, copy=False), omega


def _autocast(device, precision):
    import torch

    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise InputError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- chunk sizing

def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _activation_bytes(net, x) -> int:
    """Bytes of all module outputs in one forward pass: what one backward pass roughly needs again."""
    import torch

    total = [0]
    kept = {}  # outputs held until the end, as a pass with gradients holds them, so no storage is reused

    def hook(_m, _i, out):
        # an in-place layer (LeakyReLU(inplace=True)) returns its input's storage: count it once
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in kept:
            kept[out.untyped_storage().data_ptr()] = out
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


GIB = 1 << 30
PROBE_SIDE = 64  # estimate backward memory from a forward pass on a crop this large


def backward_bytes(net, shape, divisor: int = 16) -> int:
    """Memory one backward pass needs for an input of `shape` (1, C, X, Y, Z): about the activations of
    the forward pass, which autograd keeps for it (peak resident memory of a forward + backward pass of
    LST-AI's mdlA at 96^3 measured 0.83x of them on the CPU). Measured on a PROBE_SIDE^3 crop and scaled
    with the voxel count (activations grow linearly with it: benchmarks/model_memory.py)."""
    import torch

    probe = [max(divisor, min(int(n), PROBE_SIDE) // divisor * divisor) for n in shape[2:]]
    dev = next(net.parameters()).device
    per_probe = _activation_bytes(net, torch.zeros((1, shape[1], *probe), device=dev))
    return int(per_probe * math.prod(shape[2:]) / math.prod(probe))


def check_backward_fits(net, shape, device, divisor: int = 16, what: str = "") -> None:
    """InputError, before any work, when one backward pass over an input of `shape` cannot fit the free
    memory of `device` (whole-volume context of large networks: LST-AI at 192^3)."""
    if math.prod(shape[2:]) <= 128 ** 3:
        return
    need = backward_bytes(net, shape, divisor)
    avail = _available_bytes(device)
    if need > 0.9 * avail:
        members = getattr(net, "members", None)
        per = f", {need / len(members) / GIB:.1f} GiB per ensemble member" if members is not None and len(members) > 1 else ""
        raise InputError(f"one backward pass of the network over its {'x'.join(map(str, shape[2:]))} input{what} needs about "
                         f"{need / GIB:.1f} GiB in fp32{per}, but {device} has {avail / GIB:.1f} GiB free: use a GPU with more memory, "
                         "or a single ensemble member as --model")


def _halved_after_oom(exc, size: int, device) -> int:
    """Half of a batch size after an out-of-memory error (the cache emptied); any other error, or one
    at size 1, is raised again."""
    import torch

    if not _is_oom(exc) or size == 1:
        raise exc
    exc.__traceback__ = None  # its frames hold the failed pass's tensors: free them before emptying the cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(1, size // 2)


def _is_oom(exc) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# Noisy copies per forward pass at most (CPU, GPU). On the 2-core CPU, s per lesion with 1 / 4 / 8 / 16
# copies per pass: 68.3 / 37.4 / 36.5 / 57.2 (benchmarks/saliency_speed.py --copies-sweep 1,4,8,16,
# docs/PERFORMANCE.md); a GPU is bounded by its memory.
MAX_COPIES_PER_PASS = (8, 64)
# On a CPU, also at most as many copies as keep a pass's activations (as _activation_bytes counts them) under
# this: the paper's U-Net on 96^3 (115 MiB per copy) took 15.9 / 15.8 / 23.7 / 25.3 s per lesion with 1 / 2 / 4 / 8
# copies per pass, while the demo U-Net on 64^3 (10 MiB per copy) was fastest with 8 (2 cores, a 480 MiB L3
# cache; benchmarks/saliency_speed.py --copies-sweep, docs/PERFORMANCE.md "CPU kernels").
CPU_PASS_ACTIVATION_BYTES = 256 << 20


def auto_chunk_size(net, x, device, n_omega: int, copies: int = 1) -> int:
    """Ω voxels per batched backward pass over `copies` noisy copies. GPU: as many as 60% of free memory
    holds (at most 256). CPU: 1, since batching through vmap measured slower there than one VJP after
    another on a retained graph (docs/PERFORMANCE.md, chunk sweep)."""
    if device.type != "cuda":
        return 1
    return _chunk_fitting(max(_activation_bytes(net, x), 1), _available_bytes(device), n_omega, copies)


def _chunk_fitting(per_copy_bytes: int, avail: int, n_omega: int, copies: int) -> int:
    """Ω voxels per batched backward pass: 60 % of free memory over about twice the activations of the
    copies, at most 256 and |Ω|."""
    return int(max(1, min(n_omega, 256, 0.6 * avail // (2 * copies * per_copy_bytes))))
