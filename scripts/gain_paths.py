"""Where a MONAI U-Net's saliency peak comes from: its top-level path or the deeper levels.

    .venv/bin/python scripts/gain_paths.py [--model DIR] [--patient 17]

For the TP lesion and the healthy white-matter sphere that `msis sanity control-regions` uses (phantom
of the given validation patient), prints at 8 voxels of each region the self-gain dy[v]/dx[v] of the
lesion logit with respect to the FLAIR input at the same voxel, once through the whole network and once
with the deeper levels' output detached (only the top-level path: stride-2 convolution, top skip,
final transposed convolution), and the TP / WM ratio of the FLAIR peak of plain gradients and of
SmoothGrad at two absolute noise levels. docs/MODEL_CARD.md quotes its output.
"""

import argparse

import numpy as np
import torch

from MSInstanceSaliencyLib.research.experiments import control_regions, phantom_cases
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad


def self_gain(net, image, voxel, roi, top_path_only):
    """dy[v]/dx[v] (lesion logit, FLAIR) on the roi³ window around v; with top_path_only the deeper levels are detached."""
    lo = np.clip(np.array(voxel) - roi // 2, 0, np.array(image.shape[1:]) - roi)
    window = image[(slice(None),) + tuple(slice(a, a + roi) for a in lo)]
    x = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None].requires_grad_()
    hook = net.model[1].submodule.register_forward_hook(lambda m, i, o: o.detach()) if top_path_only else None
    try:
        y = net(x)
    finally:
        if hook:
            hook.remove()
    v = tuple(np.array(voxel) - lo)
    (g,) = torch.autograd.grad(y[0, 1][v], x)
    return float(g[0, 0][v])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--patient", type=int, default=17)
    args = ap.parse_args(argv)
    model = load_model(args.model, device="cpu")
    case = next(phantom_cases(model, [args.patient], device="cpu"))
    res = case.result
    _, masks = control_regions(case)  # the defaults of `msis sanity control-regions`
    regions = {"TP lesion": masks["tp_lesion"], "WM sphere": masks["wm_sphere_93mm3"]}
    net, roi = model.network.eval(), model.spec.roi_size[0]
    for name, om in regions.items():
        voxels = [tuple(p) for p in np.argwhere(om)[:: max(1, int(om.sum()) // 8)][:8]]
        whole = np.mean([self_gain(net, res.prepared.image, v, roi, False) for v in voxels])
        top = np.mean([self_gain(net, res.prepared.image, v, roi, True) for v in voxels])
        print(f"{name}: self-gain through the whole network {whole:.2f}, through the top-level path alone {top:.2f}")
    for sigma, n in ((0.0, 1), (0.1, 10), (0.3, 10)):
        peaks = [float(np.abs(smoothgrad(model, res.prepared.image, om, n_samples=n, sigma=sigma, sigma_mode="absolute", seed=0,
                                         device="cpu")[0]).max()) for om in regions.values()]
        label = "plain gradient" if sigma == 0 else f"SmoothGrad sigma {sigma} (z units), N={n}"
        print(f"{label}: FLAIR peak TP {peaks[0]:.2f}, WM {peaks[1]:.2f}, ratio {peaks[0] / peaks[1]:.2f}")


if __name__ == "__main__":
    main()
