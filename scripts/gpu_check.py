"""The checks and figures of a GPU machine, in one command (scripts/gpu_check.sh runs this; see there).

Steps, each a subprocess with its own timeout, capped by what is left of --budget-s so the whole run
ends in time: the worker's environment report, the CUDA tests, benchmarks/saliency_speed.py for the
paper U-Net and the demo model (the authors' loop on the same device, the share of peak FLOP/s), and
a 4-case `msis cohort`. Each step prints one progress line and writes one JSON file under --out,
gpu_check_<device>_<step>.json, with the command that produced its figures; a failing step is
reported and the next one runs; gpu_check_<device>.json sums up, and the exit code is 1 when a step
failed. Everything goes through the command line (msis, the benchmarks, pytest) and the worker's
public client, never through the library's internals.

--tiny (implied by --device cpu) shrinks every size so the whole run proves the script on a CPU in
about two minutes; its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (seed, shared patient) of the cohort's 4 phantom cases: those of benchmarks/cohort_workers.py
COHORT_CASES = [(7, 3), (8, 3), (12, 2), (15, 8)]
# --tiny: the first two, enough to prove phantoms made side by side and a cohort summed over its cases
TINY_COHORT_CASES = COHORT_CASES[:2]
# --min-volume 40 as in benchmarks/cohort_workers.py: the lesions of more than a few voxels
COHORT_SETTINGS = ["--min-volume", "40", "--workers", "1"]
# --tiny phantoms: the coarsest `msis phantom` makes (every lesion voxel is 64 mm³, above --min-volume 40)
TINY_VOXEL_MM = "4"


def saliency_args(model: str, device: str, tiny: bool) -> list:
    if not tiny:  # the GPU targets of docs/PERFORMANCE.md: 1 mm phantom, 100-voxel lesion, N = 50
        full = ["--skip-full"] if model == "paper" else ["--full-samples", "1"]
        return ["--model", model, "--device", device, "--copies-sweep", "1,8,25,50", *full]
    if model == "paper":  # 32..512 channels at 96³: one copy, two voxels is all a CPU can afford here
        return ["--model", model, "--device", device, "--voxel-size", TINY_VOXEL_MM, "--lesion-voxels", "2", "--samples", "1",
                "--authors-voxels", "1", "--skip-full"]
    return ["--model", model, "--device", device, "--voxel-size", TINY_VOXEL_MM, "--lesion-voxels", "4", "--samples", "2",
            "--authors-voxels", "1", "--skip-full", "--copies-sweep", "1,2"]


def cohort_args(device: str, tiny: bool) -> list:
    # tiny: segmentation only (the TP probability needs the classifier's N = 10 over 256 voxels: minutes on a CPU)
    return ["--device", device, *COHORT_SETTINGS, *(["--no-tp-probability"] if tiny else [])]


class StepFailed(Exception):
    pass


class Runner:
    def __init__(self, device: str, out: Path, work: Path, budget_s: float):
        self.device, self.out, self.work = device, out, work
        self.deadline = time.monotonic() + budget_s
        # this checkout first; a PYTHONPATH given (e.g. carried wheels for --python) is kept after it
        pythonpath = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONUNBUFFERED="1")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def time_limit(self, timeout_s: float) -> float:
        """min(timeout_s, what is left of the budget); StepFailed when too little is left to start."""
        limit = min(timeout_s, self.left_s())
        if limit < 5:
            raise StepFailed("no time left in the budget (--budget-s)")
        return limit

    def run(self, cmd: list, log_name: str, timeout_s: float) -> subprocess.CompletedProcess:
        """Run cmd from the repository root, its output to work/<log_name>.log; StepFailed on a non-zero
        exit or when it outlasts time_limit(timeout_s)."""
        limit = self.time_limit(timeout_s)
        log = self.work / f"{log_name}.log"
        with open(log, "w") as f:
            try:
                res = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                     timeout=limit)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"timed out after {limit:.0f} s (log: {log})") from None
        if res.returncode != 0:
            raise StepFailed(f"exit code {res.returncode}: {last_line(log)} (log: {log})")
        return res

    def write(self, step: str, record: dict) -> Path:
        path = self.out / f"gpu_check_{self.device}_{step}.json"
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def shell(cmd: list) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def rel(arg) -> str:
    """An argument of a recorded command; a path relative to the repository root where it lies under it."""
    if not isinstance(arg, Path):
        return str(arg)
    try:
        return str(arg.resolve().relative_to(ROOT))
    except ValueError:
        return str(arg)


# ----------------------------------------------------------------------------- steps

def step_worker_info(r: Runner, tiny: bool) -> dict:
    """The worker's own report of its torch build and GPU (what the Slicer module shows)."""
    out = r.work / "worker_info.json"
    cmd = [PY, Path(__file__), "--worker-info", r.device, out]
    r.run(cmd, "worker_info", 120)
    info = json.loads(out.read_text())
    if r.device == "cuda" and not (info.get("cuda_available") and info.get("device") == "cuda"):
        raise StepFailed(f"the worker sees no GPU: {info.get('device_note') or info.get('device_error')}")
    return {"command": shell([rel(c) for c in cmd]), "result": info}


def worker_info(device: str, json_path: str) -> None:
    """Run inside the step's subprocess: start a worker through its client, ask for "info", write it."""
    sys.path.insert(0, str(ROOT))
    from MSInstanceSaliencyLib.worker_client import WorkerClient

    client = WorkerClient(start_timeout_s=90)
    try:
        info = client.request("info", device=device, timeout_s=60)
    finally:
        client.close()
    Path(json_path).write_text(json.dumps(info, indent=2) + "\n")


def cuda_test_files() -> list:
    """The test files that mention CUDA (collecting only these is quicker than the whole suite); not
    this script's own test."""
    return sorted(Path("Testing/Python") / p.name for p in (ROOT / "Testing" / "Python").glob("test_*.py")
                  if p.name != "test_gpu_check.py" and "cuda" in p.read_text(errors="replace").lower())


def step_cuda_tests(r: Runner, tiny: bool) -> dict:
    """Every test named for CUDA or a GPU; on a GPU they must run, not skip."""
    xml = r.work / "cuda_tests.xml"
    cmd = [PY, "-m", "pytest", *cuda_test_files(), "-k", "cuda or gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    r.run(cmd, "cuda_tests", 240)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if r.device == "cuda" and counts["passed"] == 0:
        raise StepFailed(f"no CUDA test ran ({counts['skipped']} skipped): does torch see the GPU?")
    return {"command": shell([rel(c) for c in cmd]), "result": counts}


def step_saliency(model: str):
    def step(r: Runner, tiny: bool) -> dict:
        out = r.work / f"saliency_{model}.json"
        cmd = [PY, "benchmarks/saliency_speed.py", *saliency_args(model, r.device, tiny), "--json", out]
        r.run(cmd, f"saliency_{model}", 300)
        return {"command": shell([rel(c) for c in cmd]), "result": json.loads(out.read_text())}
    step.__name__ = f"saliency_{model}"
    return step


def step_cohort(r: Runner, tiny: bool) -> dict:
    """4 phantom cases (made side by side; 2 with --tiny), then `msis cohort` on them with the default settings but
    --min-volume 40 (TP probability included), one worker."""
    import pandas as pd

    limit = r.time_limit(180)
    voxel = TINY_VOXEL_MM if tiny else "1"
    folder = r.work / "cohort"
    folder.mkdir()
    lines, phantom_cmds, procs = ["case_id,flair,mprage,gt"], [], []
    t0 = time.perf_counter()
    try:
        for seed, patient in (TINY_COHORT_CASES if tiny else COHORT_CASES):
            name = f"p{patient:02d}_s{seed}"
            cmd = [PY, "-m", "MSInstanceSaliencyLib", "phantom", "--seed", seed, "--patient", patient, "--voxel-size", voxel,
                   "--out", folder / name]
            phantom_cmds.append(shell([rel(c) for c in cmd]))
            procs.append(subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=r.env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
            lines.append(f"{name},{name}/flair.nii.gz,{name}/mprage.nii.gz,{name}/lesions.nii.gz")
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(limit - (time.perf_counter() - t0), 1))
            except subprocess.TimeoutExpired:
                raise StepFailed(f"making the phantoms timed out after {limit:.0f} s") from None
            if p.returncode != 0:
                raise StepFailed(f"msis phantom failed: {(err.strip().splitlines() or ['?'])[-1]}")
    finally:  # none left running after a failure
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    phantoms_s = time.perf_counter() - t0
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    results = folder / "out"
    cmd = [PY, "-m", "MSInstanceSaliencyLib", "cohort", manifest, "--out", results, *cohort_args(r.device, tiny)]
    t0 = time.perf_counter()
    r.run(cmd, "cohort", 400)
    wall = time.perf_counter() - t0
    lesions, cases = pd.read_parquet(results / "lesions.parquet"), pd.read_parquet(results / "cases.parquet")
    summary = pd.read_csv(results / "summary.csv")
    failed = int(lesions["error"].notna().sum()) + int(cases["error"].notna().sum())
    if failed:
        raise StepFailed(f"{failed} lesions or cases failed (see {results / 'summary.csv'})")
    return {"phantom_commands": phantom_cmds, "command": shell([rel(c) for c in cmd]),
            "result": {"cases": len(cases), "voxel_size_mm": float(voxel), "phantoms_wall_s": round(phantoms_s, 2),
                       "cohort_wall_s": round(wall, 2), "lesions": len(lesions),
                       "tp_probability": not tiny,
                       "backward_passes": int(lesions["backward_passes"].sum()) if "backward_passes" in lesions else 0,
                       "busy_s": round(float(lesions["seconds"].sum() + cases["segment_seconds"].sum()), 2),
                       "summary": json.loads(summary.to_json(orient="records"))}}


STEPS = [step_worker_info, step_cuda_tests, step_saliency("paper"), step_saliency("demo"), step_cohort]


def finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="folder of the JSON files (default docs/benchmarks)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (implied by --device cpu): proves the script, measures nothing")
    ap.add_argument("--budget-s", type=float, default=450, help="seconds for all steps together (default 450)")
    ap.add_argument("--worker-info", nargs=2, metavar=("DEVICE", "JSON"), help=argparse.SUPPRESS)  # a step's subprocess
    args = ap.parse_args(argv)
    if args.worker_info:
        worker_info(*args.worker_info)
        return 0
    tiny = args.tiny or args.device == "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # logs and intermediate files (phantoms, the cohort's results), outside --out; kept for a look when a step fails
    work = Path(tempfile.mkdtemp(prefix=f"gpu_check_{args.device}_"))
    print(f"gpu_check on {args.device}{' (tiny sizes)' if tiny else ''}: JSON -> {out}, logs -> {work}", flush=True)
    r = Runner(args.device, out, work, args.budget_s)
    t_start, summary = time.perf_counter(), []
    for i, step in enumerate(STEPS, 1):
        name = step.__name__.removeprefix("step_")
        print(f"[{i}/{len(STEPS)}] {name} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            record = step(r, tiny)
            record = {"step": name, "device": args.device, "tiny": tiny, **record, "wall_s": round(time.perf_counter() - t0, 2)}
            if not finite_numbers(record):
                raise StepFailed("a figure is not a finite number")
            path = r.write(name, record)
            summary.append({"step": name, "ok": True, "wall_s": record["wall_s"], "file": path.name})
            print(f"ok in {record['wall_s']:.0f} s -> {path}", flush=True)
        except Exception as exc:  # a failing step is reported; the next one runs
            msg = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            summary.append({"step": name, "ok": False, "wall_s": round(time.perf_counter() - t0, 2), "error": msg})
            print(f"FAILED after {time.perf_counter() - t0:.0f} s: {msg}", flush=True)
    failed = [s["step"] for s in summary if not s["ok"]]
    total = {"device": args.device, "tiny": tiny, "ok": not failed, "wall_s": round(time.perf_counter() - t_start, 2),
             "command": shell(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]), "steps": summary}
    path = out / f"gpu_check_{args.device}.json"
    path.write_text(json.dumps(total, indent=2) + "\n")
    print(f"gpu_check: {len(summary) - len(failed)}/{len(summary)} steps ok in {total['wall_s']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" -> {path}")
    if failed:
        print(f"gpu_check: logs in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
