"""What the Slicer workflow needs installed, and which versions go together (no Slicer imports).

The module needs torch (installed through the PyTorch extension, which picks the CUDA build) and
MONAI (installed with pip --no-deps, so that pip never replaces the torch, numpy, SimpleITK,
requests or packaging that Slicer ships or has already imported). pyradiomics, for the TP
probability only, cannot be pip-installed into Slicer's Python 3.12: it comes from the
SlicerRadiomics extension. Everything else the Lib uses in that workflow (numpy, scipy, SimpleITK)
is part of Slicer.
"""

from __future__ import annotations

import importlib.util
import re

# monai 1.5 needs torch >= 2.4.1 and is the first to accept numpy 2 (Slicer 5.10 ships numpy 2.0.2)
TORCH_REQUIREMENT = ">=2.4.1"
RADIOMICS_HINT = ("The TP probability needs pyradiomics: install the SlicerRadiomics extension (View > Extensions Manager) "
                  "and restart Slicer. Segmentation and saliency maps work without it.")


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


def missing_packages() -> list[str]:
    """Import names of the packages the Slicer workflow needs and this Python lacks."""
    return [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]


def has_radiomics() -> bool:
    return importlib.util.find_spec("radiomics") is not None
