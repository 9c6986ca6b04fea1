"""What the Slicer module installs or replaces: torch and MONAI versions judged from installed metadata
(never by importing torch), and MONAI versions that fit the torch PyTorch Utils installed."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from MSInstanceSaliencyLib import dependencies

# torch releases from 2.3 to 2.9 (the range where MONAI's torch floor moved), plus a CUDA build and a nightly
TORCH_RELEASES = ["2.3.1", "2.4.0", "2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0+cu128", "2.9.1", "2.10.0.dev20250901"]


def monai_torch_requirement():
    """MONAI's own torch requirement, from the installed MONAI's metadata."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("monai")]
    return next(r for r in reqs if r.name == "torch" and r.marker is None)


def test_monai_range_follows_monai_requirements():
    assert dependencies.monai_requirement("2.8.0+cu128") == "monai>=1.5,<1.7"
    assert dependencies.monai_requirement("2.13.0+cpu") == "monai>=1.5,<1.7"
    assert dependencies.monai_requirement("2.5.1") == "monai>=1.5,<1.6"
    assert dependencies.monai_requirement("2.4.1") == "monai>=1.5,<1.6"
    with pytest.raises(ValueError, match="too old"):
        dependencies.monai_requirement("2.4.0")


def test_installed_monai_fits_the_installed_torch():
    """The range chosen for this environment's torch admits the MONAI installed here, whose own
    metadata names the torch it needs."""
    torch_version = importlib.metadata.version("torch")
    monai_version = Version(importlib.metadata.version("monai"))
    assert monai_version in Requirement(dependencies.monai_requirement(torch_version)).specifier
    assert monai_torch_requirement().specifier.contains(Version(torch_version), prereleases=True)


def test_torch_versions_too_old_for_monai_with_numpy_2():
    assert dependencies.torch_problem(None) == "PyTorch is not installed"
    assert "2.3.1 is too old" in dependencies.torch_problem("2.3.1")
    assert "too old" in dependencies.torch_problem("2.4.0+cu121")
    for ok in ("2.4.1", "2.4.1+cu121", "2.8.0+cu128", "2.10.0.dev20250901", importlib.metadata.version("torch")):
        assert dependencies.torch_problem(ok) is None, ok


def test_installed_monai_is_judged_as_its_own_metadata_judges_each_torch():
    """For every torch release, the installed MONAI is accepted exactly when MONAI's own declared torch
    requirement admits that torch (and the torch is new enough for numpy 2)."""
    monai_version = importlib.metadata.version("monai")
    needs = monai_torch_requirement().specifier
    for torch_version in TORCH_RELEASES:
        if dependencies.torch_problem(torch_version):
            continue  # the torch is replaced first; MONAI is judged again against the new one
        fits = dependencies.monai_problem(monai_version, torch_version) is None
        assert fits == needs.contains(Version(torch_version), prereleases=True), (monai_version, torch_version)


def test_what_to_install_or_replace():
    assert dependencies.dependency_problems("2.8.0+cu128", "1.6.1") == {}
    assert dependencies.dependency_problems("2.5.1", "1.5.2") == {}
    assert set(dependencies.dependency_problems(None, None)) == {"torch", "monai"}
    assert set(dependencies.dependency_problems("2.8.0", None)) == {"monai"}
    # an old MONAI left by another extension, with a good torch
    assert "1.4.0 does not fit PyTorch 2.5.1" in dependencies.dependency_problems("2.5.1", "1.4.0")["monai"]
    # MONAI 1.6 needs torch 2.8: with torch 2.5 the MONAI is replaced (by 1.5.x), not the torch
    assert set(dependencies.dependency_problems("2.5.1", "1.6.1")) == {"monai"}
    # an old torch: replaced; a MONAI 1.5 waits for the new torch, a MONAI 1.3 is replaced anyway
    assert set(dependencies.dependency_problems("2.3.1", "1.5.0")) == {"torch"}
    assert set(dependencies.dependency_problems("2.3.1", "1.3.2")) == {"torch", "monai"}
    assert dependencies.torch_problem("garbage") is not None


def test_this_environment_needs_nothing():
    """One call on the real environment: torch and MONAI are installed here in versions that work."""
    assert dependencies.installed_version("torch") == importlib.metadata.version("torch")
    assert dependencies.installed_version("no-such-distribution-msis") is None
    assert dependencies.installed_problems() == {}
    assert dependencies.missing_packages() == []
    assert dependencies.version_tuple("2.10.1+cu130") == (2, 10, 1)


def test_judging_the_versions_does_not_import_torch():
    code = ("import sys; from MSInstanceSaliencyLib import dependencies as d; d.installed_problems(); "
            "d.dependency_problems('2.3.1', '1.3.2'); print('torch' in sys.modules, 'monai' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "False"]


def test_monai_needs_nothing_that_pip_must_leave_alone():
    """MONAI is installed without its dependencies: all of them are among what Slicer ships or PyTorch Utils
    installs (from the installed MONAI's metadata), so --no-deps loses nothing."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("monai")]
    hard = {r.name.lower() for r in reqs if r.marker is None}
    assert hard and hard <= {name.lower() for name in dependencies.KEEP_AS_INSTALLED}
