"""Memory of one whole-volume backward pass (what saliency needs) for LST-AI's released members.

Prints, per member of LST-AI's v1.3/2.x ensemble (its published topologies: lst_ai/model.py
SHIPPED_VARIANTS), the fp32 activation bytes of a forward pass measured at 64^3 and 96^3, the ratio
(linear scaling with the voxel count is what saliency.backward_bytes assumes), and the estimate for a
backward pass at 192^3 (activations kept + their gradients), per member and for the ensemble.

    .venv/bin/python benchmarks/model_memory.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MSInstanceSaliencyLib.models.lstai import build_lstai_network  # noqa: E402
from MSInstanceSaliencyLib.saliency.common import GIB, _activation_bytes, backward_bytes  # noqa: E402

VARIANTS = {  # LST-AI's three released members
    "mdlA": dict(in_channels=2, n_conv_blocks=5, n_filters=28, bottleneck_filters=168, ds_layers=(-2, -3)),
    "mdlB": dict(in_channels=2, n_conv_blocks=5, n_filters=24, bottleneck_filters=144, ds_layers=(-2,)),
    "mdlC": dict(in_channels=2, n_conv_blocks=5, n_filters=32, bottleneck_filters=160, ds_layers=(-2, -3)),
}


def main() -> None:
    torch.set_grad_enabled(False)
    total = 0
    print(f"{'member':6} {'act 64^3 MiB':>13} {'act 96^3 MiB':>13} {'ratio (ideal 3.375)':>20} {'backward 192^3 GiB':>19}")
    for name, cfg in VARIANTS.items():
        net = build_lstai_network(cfg).eval()
        a64 = _activation_bytes(net, torch.zeros(1, 2, 64, 64, 64))
        a96 = _activation_bytes(net, torch.zeros(1, 2, 96, 96, 96))
        need = backward_bytes(net, (1, 2, 192, 192, 192), 32)
        total += need
        print(f"{name:6} {a64 / 2**20:13.0f} {a96 / 2**20:13.0f} {a96 / a64:20.3f} {need / GIB:19.1f}")
    print(f"ensemble (3 members, one backward through their mean): {total / GIB:.1f} GiB; voxels 192^3 = {math.prod((192,) * 3):,}")


if __name__ == "__main__":
    main()
