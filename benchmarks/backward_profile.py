"""Where a SmoothGrad backward pass spends its time on this machine: torch.profiler over 5 input-gradient backward
passes of the demo U-Net on a 64^3 patch with 8 noisy copies (the engine's CPU batch), one output voxel each, on the
retained graph, as the engine runs them. Prints the operators by their own CPU time.

    .venv/bin/python benchmarks/backward_profile.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402


def main():
    from torch.profiler import ProfilerActivity, profile

    net = load_model(None, device="cpu").network.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64, 64, 64, requires_grad=True)
    t0 = time.perf_counter()
    out = net(x)[:, 1].reshape(8, -1)
    print(f"forward of 8 copies: {time.perf_counter() - t0:.2f} s")
    voxels = torch.randint(0, 64**3, (6,))
    torch.autograd.grad(out[:, voxels[0]].sum(), x, retain_graph=True)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for v in voxels[1:]:
            torch.autograd.grad(out[:, v].sum(), x, retain_graph=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
