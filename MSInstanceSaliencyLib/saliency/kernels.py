"""Other ways torch can run the same network for SmoothGrad's forward and input-gradient backward passes: the
kernel choices benchmarks/saliency_speed.py --kernels measures against the default (docs/PERFORMANCE.md, "CPU
kernels"). None is the engine's default: on the 2-core CPU measured, torch.compile was 7-12% faster once compiled
(22 s of compilation with empty caches, and a C++ compiler needed), the others within run-to-run noise or slower,
and bf16 changes the maps by percents of their peak.

- default: the network as loaded (eval mode, frozen parameters), contiguous NCDHW tensors;
- channels_last: weights and inputs in channels-last 3D memory format (oneDNN's preferred layout);
- bn_folded: each eval-mode BatchNorm folded into the convolution before it (float rounding: 1.7e-7 of the demo
  U-Net's map peak, 2.5e-5 of the paper U-Net's);
- compiled: torch.compile of the network (inductor; the first pass per batch shape compiles, seconds);
- bf16: autocast to bfloat16 (native on CPUs with AVX512-BF16 or AMX; not exact).

`kernel_model(model, kind)` gives a model whose network runs that way, for smoothgrad(..., precision=precision_of(kind)).
"""

from __future__ import annotations

import copy

from ..errors import InputError

KERNELS = ("default", "channels_last", "bn_folded", "compiled", "bf16")
EXACT = ("default", "channels_last", "bn_folded", "compiled")  # the same maps up to float32 rounding


def precision_of(kind: str) -> str:
    return "bf16" if kind == "bf16" else "fp32"


def kernel_model(model, kind: str):
    """A LoadedModel like `model` whose network runs the `kind` way (a shallow copy holding a copy of the network)."""
    import torch

    if kind not in KERNELS:
        raise InputError(f"kernel must be one of {', '.join(KERNELS)}, got {kind!r}")
    if kind in ("default", "bf16"):
        return model
    net = copy.deepcopy(model.network).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if kind == "channels_last":
        net = _channels_last(net)
    elif kind == "bn_folded":
        fold_batch_norm(net)
    else:
        net = torch.compile(net, dynamic=False)
    other = copy.copy(model)
    other.network = net
    return other


def fold_batch_norm(net) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution (in a Sequential, or as the norm of
    MONAI's ADN block after it) into that convolution, in place; returns how many were folded."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    folded = 0

    def walk(m):
        nonlocal folded
        names = list(m._modules)
        for i, name in enumerate(names):
            child = m._modules[name]
            nxt = m._modules[names[i + 1]] if i + 1 < len(names) else None
            if isinstance(child, convs) and nxt is not None:
                holder, key = (m, names[i + 1]) if isinstance(nxt, norms) else (nxt, "N")
                bn = holder._modules.get(key) if holder is not None and hasattr(holder, "_modules") else None
                if isinstance(bn, norms) and bn.track_running_stats and not bn.training:
                    transposed = isinstance(child, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
                    m._modules[name] = fuse_conv_bn_eval(child, bn, transpose=transposed)
                    holder._modules[key] = torch.nn.Identity()
                    folded += 1
                    continue
            if child is not None:
                walk(child)

    walk(net)
    for p in net.parameters():
        p.requires_grad_(False)
    return folded


def _channels_last(net):
    """The network with channels-last 3D weights, and its inputs made channels-last 3D too."""
    import torch

    class ChannelsLast3d(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.to(memory_format=torch.channels_last_3d)

        def forward(self, x):
            return self.inner(x.contiguous(memory_format=torch.channels_last_3d))

    return ChannelsLast3d(net)
