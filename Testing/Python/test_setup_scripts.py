"""The setup scripts stay quiet and honest: one line per step, pip's output in a log named on failure, the
test-only packages installed only by `setup_env.sh --test` (scripts/test.sh), never by scripts/msis.sh, and
pyproject.toml's license declared the current way (no setuptools deprecation banner).

No test here creates a real environment (minutes): setup_env.sh runs in a copy of its inputs against a stand-in
interpreter that records each command, and on the real .venv only where it is the one running the tests."""

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SETUP_INPUTS = ["scripts/setup_env.sh", "scripts/setup_slicer_env.sh", "scripts/setup_steps.sh", "pyproject.toml",
                "scripts/reference-constraints.txt", "scripts/slicer-python-constraints.txt"]
TEST_ONLY_PACKAGES = ["nnunetv2", "lst-ai", "captum", "slicer-core", "pytest", "[test"]
IGNORED_LOCATION = "WARNING: Location 'file:///opt/pypi-more/simple/x/' is ignored: it is neither a file nor a directory."

# A stand-in for python3 and the venv's python: `-m venv DIR` copies itself to DIR/bin/python; every call is
# recorded; pip installs print pip-like noise, and the one whose arguments contain $FAIL_ON fails after 30 lines.
FAKE_PYTHON = f"""#!/usr/bin/env bash
echo "$*" >> "$RECORD"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
[ "$1 $2 $3" = "-m pip install" ] || exit 0
echo "{IGNORED_LOCATION}"
case "$*" in *"${{FAIL_ON:-no such argument}}"*)
  for i in $(seq 30); do echo "pip output line $i"; done; echo "{IGNORED_LOCATION}"; exit 1;;
esac
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of what setup_env.sh reads, and the stand-in interpreter."""
    root = tmp_path / "checkout"
    for name in SETUP_INPUTS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return root, fake, tmp_path / "record.txt"


def run_setup(checkout, *args, fail_on=None, script="setup_env.sh"):
    root, fake, record = checkout
    env = dict(os.environ, PYTHON=str(fake), SLICER_PYTHON=str(fake), RECORD=str(record))
    if fail_on:
        env["FAIL_ON"] = fail_on
    return subprocess.run(["bash", str(root / "scripts" / script), *args], capture_output=True, text=True, env=env, timeout=60)


def pip_calls(record, root):
    """The recorded pip installs, with the checkout's path cut out of them (what remains names packages)."""
    return [line.replace(str(root), "<root>") for line in record.read_text().splitlines() if line.startswith("-m pip install")]


def assert_one_line_per_step(proc):
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("setup: ") for line in lines), proc.stderr
    assert all(re.search(r" \.\.\. ok \(\d+ s\)$", line) for line in lines if " ... " in line), proc.stderr  # with its seconds


def test_tool_setup_prints_one_line_per_step_and_installs_no_test_package(checkout):
    root, _, record = checkout
    proc = run_setup(checkout)
    assert_one_line_per_step(proc)
    assert "torch 2.13.0 (CPU) ... ok (" in proc.stderr
    calls = pip_calls(record, root)
    assert "-e <root>[cohort,web]" in " ".join(calls)  # the project itself, editable, with msis view's trame-slicer
    leaked = [c for c in calls for name in TEST_ONLY_PACKAGES if name in c]
    assert leaked == [], f"the tool's setup installs test-only packages: {leaked}"
    assert IGNORED_LOCATION in (root / ".venv/setup.log").read_text()  # pip's noise is kept, in the log
    # stamp up to date: nothing to do, nothing printed, no command run
    before = record.read_text()
    again = run_setup(checkout)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert record.read_text() == before


def test_test_setup_adds_the_references_last_and_only_once(checkout):
    root, _, record = checkout
    proc = run_setup(checkout, "--test")
    assert_one_line_per_step(proc)
    calls = pip_calls(record, root)
    # --no-deps references last: any pip install after them would report lst-ai's requirements left out on purpose
    assert "nnunetv2" in calls[-1] and "lst-ai" in calls[-1] and "--no-deps" in calls[-1]
    assert any("[test" in c for c in calls)
    assert run_setup(checkout, "--test").stderr == ""
    # after a tool-only run, --test still adds the test packages (their own stamp)
    (root / ".venv/.msis-setup-test").unlink()
    n_before = len(calls)
    proc = run_setup(checkout, "--test")
    assert_one_line_per_step(proc)
    new = pip_calls(record, root)[n_before:]
    assert new and all("torch==" not in c for c in new), "the tool's steps ran again although their stamp is current"


@pytest.mark.parametrize("fail_on", ["torch==2.13.0", "lst-ai"])
def test_failed_step_shows_the_log_tail_and_its_path(checkout, fail_on):
    root, _, _ = checkout
    proc = run_setup(checkout, "--test", fail_on=fail_on)
    log = root / ".venv/setup.log"
    assert proc.returncode != 0
    assert re.search(r"^setup: .* \.\.\. failed$", proc.stderr, re.M), proc.stderr
    assert "pip output line 30" in proc.stderr and "pip output line 5\n" not in proc.stderr  # the last lines only
    assert "is ignored" not in proc.stderr
    assert str(log) in proc.stderr.splitlines()[-1] and "pip output line 30" in log.read_text()
    assert not (root / ".venv/.msis-setup-test").exists()  # never recorded as done


def test_slicer_setup_prints_one_line_per_step(checkout):
    root, _, _ = checkout
    proc = run_setup(checkout, script="setup_slicer_env.sh")
    assert_one_line_per_step(proc)
    assert "is ignored" in (root / ".venv-slicer/setup.log").read_text()
    assert run_setup(checkout, script="setup_slicer_env.sh").stderr == ""
    stamp = root / ".venv-slicer/.msis-slicer-setup"
    stamp.unlink()
    failed = run_setup(checkout, script="setup_slicer_env.sh", fail_on="slicer-core")
    assert failed.returncode != 0 and "pip output line 30" in failed.stderr and "is ignored" not in failed.stderr
    assert not stamp.exists()


def test_unknown_argument_is_refused_in_one_line(checkout):
    proc = run_setup(checkout, "--tests")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "--tests" in proc.stderr


def setup_env_calls(script):
    return [line for line in (ROOT / "scripts" / script).read_text().splitlines()
            if "setup_env.sh" in line and not line.lstrip().startswith("#")]


def test_msis_sh_sets_up_the_tool_only_and_test_sh_adds_the_test_packages():
    msis_calls = setup_env_calls("msis.sh")
    assert msis_calls and all("--test" not in line for line in msis_calls)
    assert any("setup_env.sh\" --test" in line for line in setup_env_calls("test.sh"))


def test_pyproject_declares_the_license_as_spdx_with_its_file():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"] and (ROOT / "LICENSE").is_file()
    # the SPDX string needs setuptools >= 77 to build
    setuptools_req = [Requirement(r) for r in pyproject["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert setuptools_req and all(not r.specifier.contains("76.3") for r in setuptools_req)


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="runs on the checkout's own .venv only (scripts/test.sh); elsewhere it could create one")
@pytest.mark.parametrize("args", [[], ["--test"]])
def test_setup_on_the_current_environment_is_silent(args):
    proc = subprocess.run(["bash", str(ROOT / "scripts/setup_env.sh"), *args], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
