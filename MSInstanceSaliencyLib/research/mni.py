"""The MNI ICBM152 2009 1 mm template that nilearn ships (offline): T1, grey and white matter, brain mask.

Shared by the phantoms (anatomy to deform) and by the derived anatomy of a user's scan (a template to register).
"""

from __future__ import annotations

import numpy as np

TEMPLATE_NAME = "MNI ICBM152 2009 (nilearn 1 mm: T1, GM, WM probability, brain mask)"
_LOADERS = {"t1": "load_mni152_template", "gm": "load_mni152_gm_template", "wm": "load_mni152_wm_template",
            "brain": "load_mni152_brain_mask"}


def mni152() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{"t1", "gm", "wm", "brain"}: float32 arrays (x, y, z) on the template's 1 mm grid, and that grid's RAS
    affine (nilearn's). Not cached (0.2 s once nilearn is imported; 140 MB to keep)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        imgs = {key: getattr(datasets, loader)(resolution=1) for key, loader in _LOADERS.items()}
    arrays = {key: np.asarray(im.get_fdata(), dtype=np.float32) for key, im in imgs.items()}
    return arrays, imgs["t1"].affine


def lps_geometry(affine: np.ndarray, first_index=(0, 0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """ITK origin and direction (LPS) of the voxel grid that starts at `first_index` of a nilearn RAS affine
    with a diagonal direction."""
    origin_ras = affine[:3, :3] @ np.asarray(first_index) + affine[:3, 3]
    origin_lps = origin_ras * np.array([-1.0, -1.0, 1.0])
    direction_lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3] / np.abs(np.diag(affine[:3, :3]))
    return origin_lps, direction_lps
