"""Time to the first SmoothGrad map and to the final one, streaming partial maps (issue 21).

One lesion Ω (a compact blob of --lesion-voxels voxels in the white matter of a phantom, as in
saliency_speed.py), N noisy copies, max aggregation, patch context, side by side in one run:

(a) one go: `smoothgrad(...)` without partial maps: the time to the final map;
(b) streamed: the same call with `partial=...` (smoothgrad's default throttle: after the first batch
    of copies, then at most every PARTIAL_INTERVAL_S seconds, and the final map), each partial map
    written to a file with the worker's save_array, as `explain` with partial_every does in the worker:
    the time to the first map (and its copies), to the final map, and the partial maps sent.

Checks printed with the figures: the streamed final map is bit-identical to (a), and the first partial
map to a plain run with that many copies. The machine's load average is printed before and after.

    .venv/bin/python benchmarks/time_to_first_map.py --device cpu --json docs/benchmarks/time_to_first_map_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from saliency_speed import lesion_of_size  # noqa: E402

from MSInstanceSaliencyLib.models.device import resolve_device  # noqa: E402
from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.saliency.smoothgrad import PARTIAL_INTERVAL_S, smoothgrad  # noqa: E402
from MSInstanceSaliencyLib.worker import save_array  # noqa: E402


def streamed(model, image, omega, dev, kw, folder):
    """smoothgrad with partial maps written to `folder`: (map, first partial map, [(copies_done, seconds since start)])."""
    sent, first = [], []
    t0 = time.perf_counter()

    def partial(done, m):
        for i, name in enumerate(("flair", "mprage")):
            save_array(Path(folder) / f"partial_{name}.npy", m[i])
        sent.append((done, time.perf_counter() - t0))
        if not first:
            first.append(m.copy())  # kept for the check, outside the timed path's files

    final = smoothgrad(model, image, omega, device=dev, partial=partial, **kw)
    return final, first[0], sent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the bundled demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lesion-voxels", type=int, default=100)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--copies-per-pass", type=int, default=None, help="noisy copies per pass (default: the engine's, 8 on a CPU)")
    ap.add_argument("--voxel-size", type=float, default=1.0, help="the phantom's voxel size in mm (default 1; 2 for a quick run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from MSInstanceSaliencyLib.io.volumes import array_from_image
    from MSInstanceSaliencyLib.models.preprocessing import prepare_case
    from MSInstanceSaliencyLib.research.phantom import make_phantom

    dev = resolve_device(args.device)
    model = load_model(args.model, device=dev)
    ph = make_phantom(2024, patient=17, voxel_size=args.voxel_size)
    image = prepare_case(ph.flair, ph.mprage, model.spec).image
    omega = lesion_of_size(image, array_from_image(ph.white_matter) > 0.9, args.lesion_voxels)
    kw = dict(n_samples=args.samples, copies_per_pass=args.copies_per_pass)
    smoothgrad(model, image, omega, n_samples=1, device=dev)  # warm-up (kernels, allocator)

    res = {"model": model.spec.name, "model_version": model.spec.version, "device": str(dev), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "volume": list(image.shape[1:]),
           "voxel_size_mm": args.voxel_size, "lesion_voxels": int(omega.sum()), "samples": args.samples,
           "copies_per_pass": args.copies_per_pass, "partial_interval_s": PARTIAL_INTERVAL_S, "load_before": os.getloadavg(),
           "command": "benchmarks/time_to_first_map.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    t0 = time.perf_counter()
    one_go = smoothgrad(model, image, omega, device=dev, **kw)
    res["one_go_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="msis-partial-") as folder:
        final, first_map, sent = streamed(model, image, omega, dev, kw, folder)
    (first_copies, first_s), (_, final_s) = sent[0], sent[-1]
    res.update(first_copies=first_copies, first_map_s=first_s, final_map_s=final_s, partials=sent,
               final_identical=bool(np.array_equal(final, one_go)))
    fewer = smoothgrad(model, image, omega, device=dev, **{**kw, "n_samples": first_copies})
    res["first_identical_to_plain_run"] = bool(np.array_equal(first_map, fewer))
    res["load_after"] = os.getloadavg()

    print(f"{res['model']} {res['model_version']} on {dev} ({res['threads']} threads), volume {res['volume']} ({args.voxel_size:g} mm), "
          f"|Ω| = {res['lesion_voxels']}, N = {args.samples}, copies per pass {args.copies_per_pass or 'default'}")
    print(f"load average before {res['load_before'][0]:.1f}, after {res['load_after'][0]:.1f} (other work on the machine slows every row alike)")
    print(f"{'way':<40}{'first map s':>14}{'final map s':>14}{'first/final':>13}{'vs one go':>11}")
    print(f"{'one go (no partial maps)':<40}{'-':>14}{res['one_go_s']:>14.2f}{'-':>13}{1.0:>11.2f}")
    print(f"{'streamed (partial maps written)':<40}{first_s:>14.2f}{final_s:>14.2f}{first_s / final_s:>13.2f}{final_s / res['one_go_s']:>11.2f}")
    print(f"first map after {first_copies} of {args.samples} copies; {len(sent)} maps sent at copies "
          f"{', '.join(str(k) for k, _ in sent)}")
    print(f"final streamed map bit-identical to the one-go map: {res['final_identical']}; first map bit-identical to a plain "
          f"run with {first_copies} copies: {res['first_identical_to_plain_run']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
