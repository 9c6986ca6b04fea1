"""`msis cohort` with one dask worker against two, on a fixed small phantom cohort (not a test).

Four phantom cases (fixed seeds and patients, 2 mm voxels) are written into a temporary folder; the
same cohort then runs with `--workers 1` (one worker, every core as torch threads) and `--workers 2`
(two workers, cores / 2 threads each), each into a fresh --out, `--repeat` times alternately. Settings
are the defaults but --min-volume 40 (TP probability with the bundled classifier: SmoothGrad N=10 over at most 256 voxels
of each lesion). Printed: the wall time of each whole command (start-up of the cluster and the
workers' model loading included), the busy time of the workers (sum of the case and lesion task
times), and the speed-up of the medians. Target on a 2-core machine: at least 1.6x.

    .venv/bin/python benchmarks/cohort_workers.py [--repeat 2] [--json docs/benchmarks/cohort_workers_cpu.json]

Other processes on the machine distort the numbers: the load average before and after each run is
printed. On a shared machine, give the benchmark the CPU first: Linux groups processes by session
(autogroup), so `nice` alone does not help against another session's jobs, but
`bash -c 'echo -15 > /proc/self/autogroup; .venv/bin/python benchmarks/cohort_workers.py'` does.

What bounds the speed-up: one worker runs torch with every core as intra-op threads, and since noisy
copies share forward and backward passes (saliency.py, several copies per pass on the CPU) the second
thread pays on its own: the third configuration here, one worker with one thread, shows how much
(docs/PERFORMANCE.md: 111.3 s with one thread, 87.2 s with two, 68.0 s for two one-thread workers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [(7, 3), (8, 3), (12, 2), (15, 8)]  # (seed, shared patient): 4 cases, 2 mm voxels
SETTINGS = ["--min-volume", "40"]  # lesions of more than 5 voxels: 30-odd lesions, about 6000 backward passes


def make_cohort(folder: Path, voxel_size: float) -> Path:
    from MSInstanceSaliencyLib.research.phantom import make_phantom

    lines = ["case_id,flair,mprage,gt"]
    for seed, patient in CASES:
        name = f"p{patient:02d}_s{seed}"
        make_phantom(seed, patient=patient, voxel_size=voxel_size).save(folder / name)
        lines.append(f"{name},{name}/flair.nii.gz,{name}/mprage.nii.gz,{name}/lesions.nii.gz")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run(manifest: Path, out: Path, workers: int, extra, threads: int | None = None) -> dict:
    import pandas as pd

    cmd = [sys.executable, "-m", "MSInstanceSaliencyLib", "cohort", str(manifest), "--out", str(out), "--workers", str(workers), *SETTINGS,
           *extra]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MSIS_THREADS", None)
    if threads:
        env["MSIS_THREADS"] = str(threads)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    les, cases = pd.read_parquet(out / "lesions.parquet"), pd.read_parquet(out / "cases.parquet")
    return {"workers": workers, "threads": threads, "wall_s": round(wall, 2), "busy_s": round(float(les["seconds"].sum() + cases["segment_seconds"].sum()), 2),
            "lesions": len(les), "backward_passes": int(les["backward_passes"].sum()), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs of each worker count, alternating (default 2)")
    ap.add_argument("--voxel-size", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("extra", nargs="*", help="more `msis cohort` arguments (after --)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="msis-cohort-bench-") as tmp:
        tmp = Path(tmp)
        manifest = make_cohort(tmp, args.voxel_size)
        runs = []
        # (workers, torch threads each): one worker on every core, two workers; and one worker on one
        # core, which shows how well the work scales out when each worker has a core of its own
        configs = [(1, cores), (2, max(1, cores // 2)), (1, 1)]
        for r in range(args.repeat):
            for workers, threads in configs:
                res = run(manifest, tmp / f"out_{workers}x{threads}_{r}", workers, args.extra, threads)
                runs.append(res)
                print(f"workers {workers} ({threads} torch threads each): {res['wall_s']:.1f} s wall, "
                      f"{res['busy_s']:.1f} s busy in tasks, {res['lesions']} lesions, {res['backward_passes']} backward passes "
                      f"(load average {res['load_before']} -> {res['load_after']})", flush=True)
    med = {f"{w}x{t}": statistics.median(r["wall_s"] for r in runs if (r["workers"], r["threads"]) == (w, t)) for w, t in configs}
    one, two, single = med[f"1x{cores}"], med[f"2x{max(1, cores // 2)}"], med["1x1"]
    print(f"median wall time: 1 worker x {cores} threads {one:.1f} s, 2 workers {two:.1f} s: speed-up {one / two:.2f}x "
          f"(target >= 1.6x on {cores} cores)")
    print(f"scale-out, one core per worker: 1 worker x 1 thread {single:.1f} s -> 2 workers {two:.1f} s: {single / two:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "cases": CASES, "voxel_size": args.voxel_size, "extra": args.extra,
                                               "runs": runs, "median_wall_s": med, "speedup": round(one / two, 3),
                                               "scale_out_speedup": round(single / two, 3)}, indent=2) + "\n")

if __name__ == "__main__":
    main()
