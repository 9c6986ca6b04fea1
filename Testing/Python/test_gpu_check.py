"""scripts/gpu_check.sh, the one command for a GPU machine, in its CPU mode (tiny sizes): every step
runs, and each writes its figures, finite, with the command that produced them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["worker_info", "cuda_tests", "saliency_paper", "saliency_demo", "cohort"]


def gpu_check(*args, tmp, timeout=900):
    # --python: the Python running the tests (in CI that is .venv's, which setup_env.sh made); the run's
    # logs and phantoms go to TMPDIR
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--python", sys.executable, *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("work")
    res = gpu_check("--device", "cpu", "--out", out, tmp=work)
    return res, out, work


def load(out, step=None):
    return json.loads((out / (f"gpu_check_cpu_{step}.json" if step else "gpu_check_cpu.json")).read_text())


def test_cpu_mode_runs_every_step_and_sums_up(cpu_run):
    res, out, work = cpu_run
    assert res.returncode == 0, res.stdout + res.stderr
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split()[1] for ln in progress] == STEPS and all(" ok in " in ln for ln in progress)
    summary = load(out)
    assert summary["ok"] and summary["tiny"] and [s["step"] for s in summary["steps"]] == STEPS
    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_check_cpu.json"] + [f"gpu_check_cpu_{s}.json" for s in STEPS])
    assert not list(work.glob("gpu_check_cpu_*"))  # logs and phantoms removed once every step passed


@pytest.mark.parametrize("step", STEPS)
def test_each_figure_is_finite_and_names_its_command(cpu_run, step):
    _, out, _ = cpu_run
    record = load(out, step)
    assert record["step"] == step and record["device"] == "cpu" and record["wall_s"] > 0
    assert "python" in record["command"].split()[0]
    values = list(numbers(record["result"]))
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("model", ["paper", "demo"])
def test_saliency_figures_compare_ours_with_the_authors_loop(cpu_run, model):
    _, out, _ = cpu_run
    record = load(out, f"saliency_{model}")
    r = record["result"]
    assert f"--model {model}" in record["command"] and "--device cpu" in record["command"]
    assert r["model"] == model and r["device"] == "cpu" and r["lesion_voxels"] > 0
    for way in ("authors", "one_copy_per_pass", "ours_patch"):
        assert r[way]["seconds_per_lesion"] > 0 and r[way]["tflops_per_s"] > 0 and r[way]["vjps_per_s"] > 0
    assert r["ours_patch"]["speedup_vs_authors"] > 0
    assert "peak_fp32_tflops" in r  # the share of peak, on a GPU


def test_worker_report_and_cohort_figures(cpu_run):
    _, out, _ = cpu_run
    info = load(out, "worker_info")["result"]
    assert info["device"] == "cpu" and info["torch"] == torch.__version__ and info["device_note"]
    tests = load(out, "cuda_tests")["result"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    cohort = load(out, "cohort")
    c = cohort["result"]
    assert "msis" in cohort["command"] or "MSInstanceSaliencyLib cohort" in cohort["command"]
    assert len(cohort["phantom_commands"]) == c["cases"] == len(c["summary"]) == 2  # the tiny cohort
    assert c["lesions"] > 0 and c["cohort_wall_s"] > 0 and sum(row["lesions"] for row in c["summary"]) == c["lesions"]


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    """With no time budget every step fails at once: each says so, the summary lists them all, exit code 1."""
    res = gpu_check("--device", "cpu", "--out", tmp_path / "out", "--budget-s", "0", tmp=tmp_path, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert len(progress) == len(STEPS) and all("FAILED" in ln and "budget" in ln for ln in progress)
    summary = json.loads((tmp_path / "out" / "gpu_check_cpu.json").read_text())
    assert not summary["ok"] and [s["ok"] for s in summary["steps"]] == [False] * len(STEPS)
    assert "FAILED: " + ", ".join(STEPS) in res.stdout
    assert "gpu_check: logs in " in res.stdout and len(list(tmp_path.glob("gpu_check_cpu_*"))) == 1  # kept to look at


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device is cuda or cpu"),
    pytest.param(["--device", "cuda"], "sees no GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_refusals_are_one_line_before_any_work(tmp_path, args, message):
    res = gpu_check(*args, "--out", tmp_path / "out", tmp=tmp_path, timeout=120)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written, not even --out
