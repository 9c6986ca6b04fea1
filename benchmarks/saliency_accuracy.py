"""How far do cheaper saliency settings move the map? Measured side by side in one run.

1. patch context (on the network's grid) vs full context (the authors' whole-volume run), same
   lesion: plain gradient (N = 1, σ = 0, so both see identical inputs) with the max (Eq. 3) and the
   mean (Eq. 2) over Ω, and SmoothGrad with N copies (noise drawn per context box, so the two differ
   by noise too); Grad-CAM++ (instance level, the model's layer);
2. bf16 / fp16 autocast vs fp32, patch context, same seed.

Per lesion: Pearson correlation over the voxels where either map is non-zero, and the maximum
absolute difference relative to the fp32/full map's peak |value|. Lesions: TP lesions of a
validation phantom segmented by the model, picked to span sizes.

    .venv/bin/python benchmarks/saliency_accuracy.py --lesions 4 --json docs/benchmarks/saliency_accuracy_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.models.device import resolve_device  # noqa: E402
from MSInstanceSaliencyLib.saliency.gradcampp import gradcampp  # noqa: E402
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad  # noqa: E402


def compare(ref: np.ndarray, other: np.ndarray) -> dict:
    support = (ref != 0) | (other != 0)
    a, b = ref[support].astype(np.float64), other[support].astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    peak = float(np.abs(ref).max())
    return {"correlation": corr, "max_abs_diff_rel_peak": float(np.abs(ref - other).max() / peak) if peak else float("nan")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lesions", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5, help="N for the SmoothGrad comparisons")
    ap.add_argument("--patient", type=int, default=17)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from MSInstanceSaliencyLib.segmentation.evaluation import classify_lesions
    from MSInstanceSaliencyLib.research.phantom import make_phantom
    from MSInstanceSaliencyLib.segmentation.pipeline import segment
    from MSInstanceSaliencyLib.research.training import validation_seed
    from MSInstanceSaliencyLib.io.volumes import array_from_image

    dev = resolve_device(args.device)
    model = load_model(args.model, device=dev)
    ph = make_phantom(validation_seed(args.patient), patient=args.patient)
    res = segment(ph.flair, ph.mprage, model, device=dev)
    tps = classify_lesions(res.labels, array_from_image(ph.lesions, np.uint8))["tp"]
    sizes = {r["lesion_id"]: r["voxels"] for r in res.table}
    ranked = sorted(tps, key=lambda i: sizes[i])
    picks = [ranked[int(round(q * (len(ranked) - 1)))] for q in np.linspace(0.2, 0.9, args.lesions)]
    rows = []
    for lid in dict.fromkeys(picks):
        om = res.labels == lid
        row = {"lesion_id": int(lid), "voxels": int(om.sum())}
        t0 = time.time()
        full = smoothgrad(model, res.prepared.image, om, n_samples=1, sigma=0.0, context="full", device=dev)
        patch = smoothgrad(model, res.prepared.image, om, n_samples=1, sigma=0.0, context="patch", device=dev)
        row["vanilla_patch_vs_full"] = {c: compare(full[i], patch[i]) for i, c in enumerate(("flair", "mprage"))}
        full_mean = smoothgrad(model, res.prepared.image, om, n_samples=1, sigma=0.0, aggregation="mean", context="full", device=dev)
        patch_mean = smoothgrad(model, res.prepared.image, om, n_samples=1, sigma=0.0, aggregation="mean", context="patch", device=dev)
        row["vanilla_mean_patch_vs_full"] = {c: compare(full_mean[i], patch_mean[i]) for i, c in enumerate(("flair", "mprage"))}
        cam_full = gradcampp(model, res.prepared.image, om, context="full", device=dev)
        cam_patch = gradcampp(model, res.prepared.image, om, context="patch", device=dev)
        row["gradcampp_patch_vs_full"] = {"flair": compare(cam_full, cam_patch)}
        full_n = smoothgrad(model, res.prepared.image, om, n_samples=args.samples, context="full", device=dev)
        patch_n = smoothgrad(model, res.prepared.image, om, n_samples=args.samples, context="patch", device=dev)
        row[f"smoothgrad{args.samples}_patch_vs_full"] = {c: compare(full_n[i], patch_n[i]) for i, c in enumerate(("flair", "mprage"))}
        for prec in ("bf16", "fp16"):
            try:
                low = smoothgrad(model, res.prepared.image, om, n_samples=args.samples, context="patch", device=dev, precision=prec)
                row[f"{prec}_vs_fp32"] = {c: compare(patch_n[i], low[i]) for i, c in enumerate(("flair", "mprage"))}
            except RuntimeError as exc:  # fp16 autocast is not available on every CPU build
                row[f"{prec}_vs_fp32"] = {"error": str(exc).splitlines()[0][:120]}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row))
    out = {"model": model.spec.name, "device": str(dev), "patient": args.patient, "samples": args.samples, "lesions": rows}
    print()
    keys = ("vanilla_patch_vs_full", "vanilla_mean_patch_vs_full", f"smoothgrad{args.samples}_patch_vs_full", "gradcampp_patch_vs_full",
            "bf16_vs_fp32", "fp16_vs_fp32")
    heads = ("grad max patch/full", "grad mean patch/full", f"SG{args.samples} patch/full", "Grad-CAM++ patch/full", "bf16/fp32", "fp16/fp32")
    print(f"{'lesion':>6} {'voxels':>6} | " + " | ".join(f"{h:>22}" for h in heads))
    print(f"{'':>6} {'':>6} | " + " | ".join(f"{'corr   maxdiff/peak':>22}" for _ in heads))
    for r in rows:
        cells = []
        for k in keys:
            v = r[k].get("flair", {})
            cells.append(f"{v.get('correlation', float('nan')):>8.4f} {v.get('max_abs_diff_rel_peak', float('nan')):>12.4f}" if v else f"{'n/a':>22}")
        print(f"{r['lesion_id']:>6} {r['voxels']:>6} | " + " | ".join(cells))
    print("(FLAIR maps and Grad-CAM++; the JSON has MPRAGE too)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
