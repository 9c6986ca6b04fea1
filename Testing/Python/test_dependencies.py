"""What the Slicer module installs: MONAI versions that fit the torch PyTorch Utils installed."""

import importlib.metadata

import pytest

from MSInstanceSaliencyLib import dependencies


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
    from packaging.requirements import Requirement
    from packaging.version import Version

    torch_version = importlib.metadata.version("torch")
    monai_version = Version(importlib.metadata.version("monai"))
    assert monai_version in Requirement(dependencies.monai_requirement(torch_version)).specifier
    needs = [Requirement(r) for r in importlib.metadata.requires("monai") if r.startswith("torch") and "extra" not in r]
    assert needs and all(Version(torch_version.split("+")[0]) in r.specifier for r in needs)


def test_missing_packages_are_import_names():
    assert dependencies.missing_packages() == []  # this environment has torch and monai
    assert dependencies.version_tuple("2.10.1+cu130") == (2, 10, 1)
