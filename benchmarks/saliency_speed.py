"""Instance-level SmoothGrad speed: the authors' way against ours, measured side by side in one run.

(a) authors: whole-volume forward per noisy copy, then one torch.autograd.grad per voxel of Ω
    (retain_graph); timed on --authors-voxels voxels and EXTRAPOLATED to N copies x |Ω| voxels.
(b) one copy per pass (the engine before noisy copies shared backward passes): patch context, one
    forward and |Ω| VJPs per noisy copy (copies_per_pass=1), measured in the same run;
(c) ours, patch context: the model's roi around Ω on the network's grid, the noisy copies sharing
    forward and backward passes (measured; extrapolated from --patch-samples copies when below N);
(d) ours, full context: the whole volume, same engine (same rule).

Prints seconds per lesion, ratios, VJPs per second, achieved TFLOP/s (FLOPs counted with
torch.utils.flop_counter on one forward and one input-gradient backward), on a GPU the share of its
peak fp32 FLOP/s, and peak memory; writes everything as JSON.

    .venv/bin/python benchmarks/saliency_speed.py --model demo --json out.json
    .venv/bin/python benchmarks/saliency_speed.py --model paper --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSInstanceSaliencyLib.models.base import PAPER_UNET_ARGS, LoadedModel, ModelSpec, freeze, size_divisor  # noqa: E402
from MSInstanceSaliencyLib.models.device import resolve_device  # noqa: E402
from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.models.monai import build_network  # noqa: E402
from MSInstanceSaliencyLib.saliency.context import _crop_pad, context_box  # noqa: E402
from MSInstanceSaliencyLib.saliency.smoothgrad import noise_sigma, smoothgrad  # noqa: E402


def get_model(name: str, dev) -> LoadedModel:
    if name == "paper":
        torch.manual_seed(0)
        spec = ModelSpec(network_args=dict(PAPER_UNET_ARGS), name="paper-unet-random-weights")
        net = build_network(spec)
        freeze(net)
        return LoadedModel(net.to(dev), spec, None)
    return load_model(None if name == "demo" else name, device=dev)


def lesion_of_size(image: np.ndarray, brain: np.ndarray, n_vox: int, seed: int = 0) -> np.ndarray:
    """Ω: the n_vox voxels nearest to a brain point near the centre (a compact blob, exactly n_vox voxels)."""
    rng = np.random.default_rng(seed)
    shape = np.array(image.shape[1:])
    cands = np.argwhere(brain)
    centre = cands[np.argmin(np.abs(cands - shape // 2).sum(1) + rng.random(len(cands)))]
    r = int(np.ceil((n_vox * 3 / (4 * np.pi)) ** (1 / 3))) + 2
    lo = np.maximum(centre - r, 0)
    grid = np.stack(np.meshgrid(*[np.arange(lo[a], min(centre[a] + r + 1, shape[a])) for a in range(3)], indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm(grid - centre, axis=1) + 1e-3 * rng.random(len(grid))
    pick = grid[np.argsort(d)[:n_vox]]
    om = np.zeros(image.shape[1:], bool)
    om[tuple(pick.T)] = True
    return om


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far


def authors_way(model, image, omega, dev, n_voxels: int, n_samples: int, sd: float):
    """Whole volume, one autograd.grad per voxel with retain_graph; returns timings for extrapolation."""
    net = model.network
    box = context_box(omega, "full", model.spec.roi_size, size_divisor(model.spec))
    x0 = _crop_pad(torch.from_numpy(image), box).to(dev)[None]
    idx = np.argwhere(omega)[:n_voxels]
    gen = torch.Generator().manual_seed(0)
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    x = (x0 + (torch.randn(x0.shape, generator=gen) * sd).to(dev)).requires_grad_(True)
    logits = net(x)[0, 1]
    sync(dev)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    for (a, b, c) in idx:
        (g,) = torch.autograd.grad(logits[a, b, c], x, retain_graph=True)
    sync(dev)
    t_grad = (time.perf_counter() - t0) / len(idx)
    n_omega = int(omega.sum())
    return {"forward_s": t_fwd, "per_voxel_grad_s": t_grad, "voxels_timed": len(idx),
            "seconds_per_lesion": n_samples * (t_fwd + n_omega * t_grad), "extrapolated": True, "peak_mb": peak_mb(dev)}


def ours(model, image, omega, dev, context: str, n_samples: int, measured_samples: int, precision: str, copies_per_pass=None):
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    smoothgrad(model, image, omega, n_samples=measured_samples, context=context, device=dev, precision=precision,
               copies_per_pass=copies_per_pass)
    sync(dev)
    dt = time.perf_counter() - t0
    return {"measured_samples": measured_samples, "measured_s": dt, "seconds_per_lesion": dt / measured_samples * n_samples,
            "extrapolated": measured_samples < n_samples, "peak_mb": peak_mb(dev)}


def count_flops(model, image, omega, dev, context: str):
    """FLOPs of one forward pass and of one input-gradient VJP at the given context."""
    from torch.utils.flop_counter import FlopCounterMode

    box = context_box(omega, context, model.spec.roi_size, size_divisor(model.spec))
    x = _crop_pad(torch.from_numpy(image), box).to(dev)[None].requires_grad_(True)
    with FlopCounterMode(display=False) as fwd:
        y = model.network(x)[0, 1]
    target = tuple(int(v) for v in np.argwhere(_crop_pad(torch.from_numpy(omega), box).numpy())[0])
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(y[target], x)
    return fwd.get_total_flops(), bwd.get_total_flops()


# Dense fp32 peak of common GPUs (vendor data sheets; TF32 tensor cores are not used by default in fp32).
PEAK_FP32_TFLOPS = {"H200": 67.0, "H100 80GB HBM3": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5}


def peak_fp32_tflops(name: str):
    for key, value in PEAK_FP32_TFLOPS.items():
        if key in name:
            return value
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="paper", help="paper (random weights), demo, or a model folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lesion-voxels", type=int, default=100)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--authors-voxels", type=int, default=None, help="voxels timed the authors' way (default 5 on CPU, 50 on GPU)")
    ap.add_argument("--patch-samples", type=int, default=None, help="copies actually run in patch mode (default: all N)")
    ap.add_argument("--full-samples", type=int, default=None, help="copies actually run in full mode (default: 1 on CPU, N on GPU)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--copies-sweep", default="", help="comma-separated noisy copies per pass to time in patch mode, e.g. 1,4,8,16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak fp32 TFLOP/s (default: known H100/H200/A100 figures)")
    ap.add_argument("--chunk-sweep", default="", help="comma-separated chunk sizes to time in patch mode on 3 copies, e.g. 1,8,32,128")
    ap.add_argument("--voxel-size", type=float, default=1.0, help="the phantom's voxel size in mm (default 1; 2 for a quick run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from MSInstanceSaliencyLib.research.phantom import make_phantom
    from MSInstanceSaliencyLib.models.preprocessing import prepare_case
    from MSInstanceSaliencyLib.io.volumes import array_from_image

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    model = get_model(args.model, dev)
    ph = make_phantom(2024, patient=17, voxel_size=args.voxel_size)
    image = prepare_case(ph.flair, ph.mprage, model.spec).image
    omega = lesion_of_size(image, array_from_image(ph.white_matter) > 0.9, args.lesion_voxels)
    sd = noise_sigma(image, 0.05, "range")
    N = args.samples
    n_vjp = N * int(omega.sum())

    smoothgrad(model, image, omega, n_samples=1, device=dev)  # warm-up (kernels, allocator)
    res = {"model": args.model, "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "volume": list(image.shape[1:]), "roi": model.spec.roi_size,
           "lesion_voxels": int(omega.sum()), "samples": N, "precision": args.precision, "voxel_size_mm": args.voxel_size}
    res["authors"] = authors_way(model, image, omega, dev, args.authors_voxels or (50 if gpu else 5), N, sd)
    res["one_copy_per_pass"] = ours(model, image, omega, dev, "patch", N, args.patch_samples or N, args.precision, copies_per_pass=1)
    res["ours_patch"] = ours(model, image, omega, dev, "patch", N, args.patch_samples or N, args.precision)
    if not args.skip_full:
        res["ours_full"] = ours(model, image, omega, dev, "full", N, args.full_samples or (N if gpu else 1), args.precision)
    peak = args.peak_tflops or (peak_fp32_tflops(res["device_name"]) if gpu else None)
    res["peak_fp32_tflops"] = peak
    for key, ctx in (("one_copy_per_pass", "patch"), ("ours_patch", "patch"), ("ours_full", "full")):
        if key not in res:
            continue
        f_fwd, f_vjp = count_flops(model, image, omega, dev, ctx)
        r = res[key]
        r["flops_per_lesion"] = N * (f_fwd + int(omega.sum()) * f_vjp)
        r["tflops_per_s"] = r["flops_per_lesion"] / r["seconds_per_lesion"] / 1e12
        r["vjps_per_s"] = n_vjp / r["seconds_per_lesion"]
        if peak:
            r["share_of_peak"] = r["tflops_per_s"] / peak
    f_fwd, f_vjp = count_flops(model, image, omega, dev, "full")
    a = res["authors"]
    a["flops_per_lesion"] = N * (f_fwd + int(omega.sum()) * f_vjp)
    a["tflops_per_s"] = a["flops_per_lesion"] / a["seconds_per_lesion"] / 1e12
    a["vjps_per_s"] = n_vjp / a["seconds_per_lesion"]
    for k in ("one_copy_per_pass", "ours_patch", "ours_full"):
        if k in res:
            res[k]["speedup_vs_authors"] = a["seconds_per_lesion"] / res[k]["seconds_per_lesion"]
    res["shared_vs_one_copy_per_pass"] = res["one_copy_per_pass"]["seconds_per_lesion"] / res["ours_patch"]["seconds_per_lesion"]

    print(f"{res['model']} on {res['device']} ({res['device_name']}, {res['threads']} threads), volume {res['volume']}, roi {res['roi']}, "
          f"|Ω| = {res['lesion_voxels']}, N = {N}, {args.precision}")
    print(f"{'way':<22}{'s/lesion':>12}{'speedup':>10}{'VJP/s':>10}{'TFLOP/s':>10}{'% peak':>8}{'peak MB':>10}  note")
    for k, label in (("authors", "authors"), ("one_copy_per_pass", "one copy per pass"), ("ours_patch", "ours patch"), ("ours_full", "ours full")):
        if k not in res:
            continue
        r = res[k]
        note = "extrapolated" if r["extrapolated"] else "measured"
        if k == "authors":
            note += f" from {r['voxels_timed']} voxels"
        elif r["extrapolated"]:
            note += f" from {r['measured_samples']} copies"
        share = f"{100 * r['share_of_peak']:>8.1f}" if r.get("share_of_peak") else f"{'-':>8}"
        print(f"{label:<22}{r['seconds_per_lesion']:>12.2f}{r.get('speedup_vs_authors', 1.0):>10.1f}{r['vjps_per_s']:>10.1f}"
              f"{r['tflops_per_s']:>10.3f}{share}{r['peak_mb']:>10.0f}  {note}")
    print(f"copies sharing passes vs one copy per pass (patch, same run): {res['shared_vs_one_copy_per_pass']:.2f}x")
    if not gpu:
        print("peak MB on CPU is the process's peak resident memory so far (monotone), not per row")
    if args.copies_sweep:
        res["copies_sweep"] = {}
        print(f"copies-per-pass sweep (patch, {min(N, 16)} copies, extrapolated to N):")
        for c in [int(v) for v in args.copies_sweep.split(",")]:
            sync(dev)
            t0 = time.perf_counter()
            smoothgrad(model, image, omega, n_samples=min(N, 16), context="patch", device=dev, copies_per_pass=c, precision=args.precision)
            sync(dev)
            s_per_lesion = (time.perf_counter() - t0) / min(N, 16) * N
            res["copies_sweep"][c] = s_per_lesion
            print(f"  copies {c:>4}: {s_per_lesion:8.2f} s/lesion")
    if args.chunk_sweep:
        res["chunk_sweep"] = {}
        print("chunk sweep (patch, 3 copies, extrapolated to N):")
        for k in [int(v) for v in args.chunk_sweep.split(",")]:
            sync(dev)
            t0 = time.perf_counter()
            smoothgrad(model, image, omega, n_samples=3, context="patch", device=dev, chunk_size=k, precision=args.precision)
            sync(dev)
            s_per_lesion = (time.perf_counter() - t0) / 3 * N
            res["chunk_sweep"][k] = s_per_lesion
            print(f"  chunk {k:>4}: {s_per_lesion:8.2f} s/lesion")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
