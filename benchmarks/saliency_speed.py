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

--kernels default,channels_last,bn_folded,compiled,bf16 adds, side by side in the same run, the other ways
torch can run the same passes (saliency.kernels): for each, ours (patch, 8 copies per pass) and one copy
per pass with the same kernels, their ratio, the share of this machine's peak (a large matmul, measured in
the same run) and the map's largest difference from the default kernels' map, relative to its peak.

    .venv/bin/python benchmarks/saliency_speed.py --model demo --json out.json
    .venv/bin/python benchmarks/saliency_speed.py --model paper --device cuda
    .venv/bin/python benchmarks/saliency_speed.py --model demo --skip-full --patch-samples 16 \
        --kernels default,channels_last,bn_folded,compiled,bf16
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


def matmul_peak_tflops(dev, dtype=torch.float32, n: int = 4096, repeat: int = 5) -> float:
    """This machine's reachable peak: the best of `repeat` n x n matmuls (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that matter here (Linux /proc/cpuinfo)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"))


def kernel_sweep(model, image, omega, dev, kinds, n_samples: int, measured: int, peak_tflops, n_flops_per_lesion) -> dict:
    """Each kernel choice: ours (8 copies per pass) and one copy per pass with the same kernels, and its map's
    largest difference from the default kernels' map relative to the peak (same noise, same copies)."""
    from MSInstanceSaliencyLib.saliency.kernels import kernel_model, precision_of

    out, reference = {}, None
    for kind in kinds:
        km = kernel_model(model, kind)
        row = {}
        for way, copies in (("ours", 8), ("one_copy_per_pass", 1)):
            kw = dict(n_samples=measured, context="patch", device=dev, copies_per_pass=copies, precision=precision_of(kind))
            smoothgrad(km, image, omega, **{**kw, "n_samples": min(measured, copies)})  # warm-up (compiles: each batch shape once)
            sync(dev)
            t0 = time.perf_counter()
            maps = smoothgrad(km, image, omega, **kw)
            sync(dev)
            s = (time.perf_counter() - t0) / measured * n_samples
            row[way] = {"seconds_per_lesion": s, "tflops_per_s": n_flops_per_lesion / s / 1e12}
            if peak_tflops:
                row[way]["share_of_peak"] = row[way]["tflops_per_s"] / peak_tflops
            if way == "ours":
                reference = maps if reference is None else reference
                row["max_diff_of_peak"] = float(np.abs(maps - reference).max() / np.abs(reference).max())
        row["ours_vs_one_copy_per_pass"] = row["one_copy_per_pass"]["seconds_per_lesion"] / row["ours"]["seconds_per_lesion"]
        out[kind] = row
    return out


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
    ap.add_argument("--kernels", default="", help="comma-separated kernel choices to time side by side (saliency.kernels), "
                    "e.g. default,channels_last,bn_folded,compiled,bf16")
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
    if args.kernels:
        kinds = [k for k in args.kernels.split(",") if k]
        if "default" in kinds:  # the reference map comes first
            kinds.remove("default")
        kinds.insert(0, "default")
        if not gpu:
            res["cpu_flags"] = cpu_flags()
            res["matmul_peak_fp32_tflops"] = matmul_peak_tflops(dev)
            peak = res["matmul_peak_fp32_tflops"]
        f_fwd, f_vjp = count_flops(model, image, omega, dev, "patch")
        res["kernels"] = kernel_sweep(model, image, omega, dev, kinds, N, args.patch_samples or N, peak, N * (f_fwd + int(omega.sum()) * f_vjp))
        print(f"kernels (patch, {args.patch_samples or N} copies measured, extrapolated to N; peak {peak or float('nan'):.3f} TFLOP/s"
              f"{' by a 4096^2 matmul' if not gpu else ''}; CPU flags: {', '.join(res.get('cpu_flags', [])) or '-'}):")
        print(f"  {'kernels':<15}{'ours s':>9}{'1/pass s':>10}{'ratio':>7}{'TFLOP/s':>9}{'% peak':>8}{'max diff/peak':>15}")
        for kind, r in res["kernels"].items():
            share = r["ours"].get("share_of_peak")
            print(f"  {kind:<15}{r['ours']['seconds_per_lesion']:>9.2f}{r['one_copy_per_pass']['seconds_per_lesion']:>10.2f}"
                  f"{r['ours_vs_one_copy_per_pass']:>7.2f}{r['ours']['tflops_per_s']:>9.3f}{100 * share if share else float('nan'):>8.1f}"
                  f"{r['max_diff_of_peak']:>15.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
