"""Shared fixtures: small real phantoms and a small real (randomly initialised) MONAI model."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

# pytest-xdist runs several test processes on these cores. torch in each of them, and in every msis process or dask
# worker a test starts, would take all the cores: OpenMP threads spinning on oversubscribed cores made the torch-heavy
# test files about 1.8x slower (three files with -n 2 on 2 cores: 60 s, 33 s with one thread each). Each test process
# gets its share, set before torch is first imported and inherited by the processes it starts (MSIS_THREADS: msis's).
_TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _TEST_PROCESSES > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _SHARE = str(max(1, _CORES // _TEST_PROCESSES))
    os.environ.setdefault("OMP_NUM_THREADS", _SHARE)
    os.environ.setdefault("MSIS_THREADS", _SHARE)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from MSInstanceSaliencyLib.models.base import ModelSpec  # noqa: E402
from MSInstanceSaliencyLib.models.monai import build_network, save_model  # noqa: E402
from MSInstanceSaliencyLib.research.phantom import make_phantom  # noqa: E402

# Tests that need pyradiomics carry @pytest.mark.needs_radiomics. Where pyradiomics is not
# installed they are skipped: it cannot be installed on Python 3.12, the Python of Slicer 5.10
# (scripts/test_slicer_python.sh), where it comes from the SlicerRadiomics extension instead.
# MSIS_REQUIRE_RADIOMICS=1 (set by scripts/test.sh for the main run) makes a missing pyradiomics
# an error instead, so the main run never skips them silently.
RADIOMICS_SKIP_REASON = (
    "needs pyradiomics, not installed here; it is not installable on Python 3.12 (no wheel, the sdists "
    "do not build); inside Slicer it comes from the SlicerRadiomics extension"
)


# A run started as a background job of a shell without job control (a CI runner, `cmd &` in a script) has SIGINT
# ignored, and an ignored signal stays ignored in every child process, where Python then never raises
# KeyboardInterrupt: the Ctrl-C tests would test nothing real. Give the tests the disposition a user's terminal has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_radiomics: needs pyradiomics; skipped where it is not installed (Python 3.12, Slicer 5.10 pins)")


# pytest-xdist (--dist loadfile) hands out test files in collection order: the longest first, so that no long file
# starts last while the other process idles (by seconds per file with 2 processes, --durations=0 of 2026-12-04;
# a hint only).
LONGEST_FILES_FIRST = ["test_nnunet_model.py", "test_web.py", "test_cohort.py", "test_cli.py", "test_gpu_check.py", "test_worker.py",
                       "test_lstai_model.py", "test_feature_tables.py", "test_bad_inputs.py", "test_cohort_client.py", "test_phantom.py",
                       "test_preprocessing.py", "test_cohort_storage.py", "test_outputs.py", "test_anatomy.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    marked = [item for item in items if item.get_closest_marker("needs_radiomics")]
    if not marked or importlib.util.find_spec("radiomics") is not None:
        return
    if os.environ.get("MSIS_REQUIRE_RADIOMICS") == "1":
        raise pytest.UsageError(f"{len(marked)} selected tests need pyradiomics, which is not installed (MSIS_REQUIRE_RADIOMICS=1)")
    skip = pytest.mark.skip(reason=RADIOMICS_SKIP_REASON)
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def small_phantom():
    """A 2 mm phantom (80 x 98 x 82): the real generator, fast enough for many tests."""
    return make_phantom(7, patient=3, voxel_size=2.0)


@pytest.fixture(scope="session")
def phantom_files(small_phantom, tmp_path_factory):
    d = tmp_path_factory.mktemp("phantom")
    return small_phantom.save(d)


def tiny_spec(**overrides) -> ModelSpec:
    args = dict(spatial_dims=3, in_channels=2, out_channels=2, channels=[4, 8, 16], strides=[2, 2], norm="batch", num_res_units=0)
    kw = dict(network_args=args, roi_size=[32, 32, 32], name="tiny-test", version="0.0.1")
    kw.update(overrides)
    return ModelSpec(**kw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised small U-Net saved as a model folder, with a bias towards 'lesion' so it predicts some."""
    import torch

    torch.manual_seed(0)
    spec = tiny_spec()
    net = build_network(spec)
    d = tmp_path_factory.mktemp("tiny_model")
    save_model(net, spec, d)
    return d


def make_image(shape=(20, 24, 28), spacing=(0.8, 1.1, 2.5), seed=0, direction=None, origin=(12.5, -30.0, 7.25), dtype=np.float32):
    """A random image with anisotropic spacing and, by default, an oblique direction matrix."""
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(dtype)
    img = sitk.GetImageFromArray(a.transpose(2, 1, 0))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is None:
        t = np.deg2rad(20.0)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
        direction = rot.ravel()
    img.SetDirection(tuple(float(d) for d in direction))
    return img


def require_reference(module: str):
    """A framework used as a reference in tests (nnunetv2, lst_ai). The main run (scripts/test.sh sets
    MSIS_REQUIRE_REFERENCES=1) installs them, so there a missing one is an error, never a silent skip."""
    if importlib.util.find_spec(module) is not None:
        return importlib.import_module(module)
    if os.environ.get("MSIS_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{module} is not installed, and the main run needs it as a reference (`bash scripts/setup_env.sh --test` installs it)")
    pytest.skip(f"{module} (a reference implementation for tests) is not installed")


def msis_in_process(*args, env=None, cwd=None):
    """`msis ARGS` run by msis's own main() in this process, as a CompletedProcess (return code, stdout,
    stderr). A command in its own interpreter first imports torch and MONAI (some 4 s of CPU each time); here
    that is paid once. For commands that are not interrupted or killed (those tests start a real process).
    env: extra environment variables for this call; cwd: the working directory for it; torch's thread count
    is put back afterwards."""
    import contextlib
    import io
    import subprocess

    import torch

    from MSInstanceSaliencyLib.cli import main

    argv = [str(a) for a in args]
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.environ.pop("MSIS_DEBUG", None)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse's refusals and --help
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(["msis", *argv], rc, out.getvalue(), err.getvalue())
