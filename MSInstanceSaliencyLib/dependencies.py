"""What the Slicer workflow needs installed, and which versions go together (no Slicer imports).

The module needs torch (installed through the PyTorch extension, which picks the CUDA build) and
MONAI (installed with pip without letting pip replace the torch, numpy, SimpleITK, requests or
packaging that Slicer ships or PyTorch Utils chose). Versions are read from the installed
distributions' metadata, never by importing torch: an old or broken torch must not be loaded into
Slicer's process just to be judged. pyradiomics, for the TP probability only, cannot be
pip-installed into Slicer's Python 3.12: it comes from the optional SlicerRadiomics extension,
which the module offers to install. Everything else the Lib uses in that workflow (numpy, scipy,
SimpleITK) is part of Slicer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

# monai 1.5 needs torch >= 2.4.1 and is the first to accept numpy 2 (Slicer 5.10 ships numpy 2.0.2)
TORCH_REQUIREMENT = ">=2.4.1"
MONAI_MINIMUM = "1.5"
# the extension that brings pyradiomics into Slicer's Python (its name in the Extensions Index)
RADIOMICS_EXTENSION = "SlicerRadiomics"
RADIOMICS_HINT = ("The TP probability needs pyradiomics, which in 3D Slicer comes from the optional SlicerRadiomics "
                  "extension: the module offers to install it (or use View > Extensions Manager), then restart Slicer. "
                  "Segmentation and saliency maps work without it.")
# what pip must leave as it is when it installs MONAI (Slicer ships them, or PyTorch Utils chose the build):
# MONAI is installed without its dependencies (pip --no-deps; on Slicer 5.11+ pip_ensure's skip_packages)
KEEP_AS_INSTALLED = ("torch", "numpy", "SimpleITK", "requests", "packaging")


def version_tuple(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '2.8.0+cu128'."""
    parts = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def monai_requirement(torch_version: str) -> str:
    """The MONAI release range that works with this torch (from MONAI's own requirements:
    1.6 needs torch >= 2.8, 1.5 needs torch >= 2.4.1; older MONAI needs numpy < 2, which Slicer does not have)."""
    t = version_tuple(torch_version)
    if t >= (2, 8, 0):
        return "monai>=1.5,<1.7"
    if t >= (2, 4, 1):
        return "monai>=1.5,<1.6"
    raise ValueError(f"torch {torch_version} is too old for MONAI with numpy 2; torch {TORCH_REQUIREMENT} is needed "
                     "(update it with the PyTorch Utils module)")


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, from its metadata (nothing is imported); None when absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfies(version: str, requirement: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        # pre-releases count: a torch nightly 2.9.0.dev is newer than 2.4.1
        return SpecifierSet(requirement).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def torch_problem(torch_version: str | None) -> str | None:
    """Why this torch cannot be used (None: it can)."""
    if torch_version is None:
        return "PyTorch is not installed"
    if not _satisfies(torch_version, TORCH_REQUIREMENT):
        return f"PyTorch {torch_version} is too old (MONAI with numpy 2 needs torch {TORCH_REQUIREMENT})"
    return None


def monai_problem(monai_version: str | None, torch_version: str | None) -> str | None:
    """Why this MONAI cannot be used with this torch (None: it can). With no usable torch, only a
    MONAI older than 1.5 is known to be wrong (the torch to come decides the rest)."""
    if monai_version is None:
        return "MONAI is not installed"
    if torch_problem(torch_version):
        if not _satisfies(monai_version, ">=" + MONAI_MINIMUM):
            return f"MONAI {monai_version} is too old (1.5 or later works with numpy 2)"
        return None
    wanted = monai_requirement(torch_version)
    if not _satisfies(monai_version, wanted.removeprefix("monai")):
        return f"MONAI {monai_version} does not fit PyTorch {torch_version} ({wanted} does)"
    return None


def dependency_problems(torch_version: str | None, monai_version: str | None) -> dict[str, str]:
    """{"torch": why, "monai": why} for what must be installed or replaced, from the two versions
    (None: not installed); empty when both can be used."""
    problems = {"torch": torch_problem(torch_version), "monai": monai_problem(monai_version, torch_version)}
    return {name: why for name, why in problems.items() if why}


def installed_problems() -> dict[str, str]:
    """dependency_problems for the torch and MONAI installed in this Python (re-read after an install)."""
    importlib.invalidate_caches()
    return dependency_problems(installed_version("torch"), installed_version("monai"))


def missing_packages() -> list[str]:
    """Import names of the packages the Slicer workflow needs and this Python lacks."""
    return [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]


def has_radiomics() -> bool:
    return importlib.util.find_spec("radiomics") is not None
