"""Synthetic MS phantoms: FLAIR + MPRAGE on real anatomy with real lesion geometry.

Anatomy is the MNI ICBM152 2009 1 mm template and its grey/white-matter maps
(shipped offline by nilearn). Each seed gets its own smooth random deformation,
bias fields and noise. Lesion geometry comes from real MS lesion masks in MNI
space (Lesjak et al., Neuroinformatics 2018, CC-BY; bundled under
Resources/LesionMasks). Lesion *mimics* (cortical/sulcal hyperintensities and
small bright white-matter spots without T1 hypo-intensity) are added so that a
segmentation model makes false positives the way it does on real scans.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .volumes import image_from_array, read_image

N_PATIENTS = 22
_CROP_MARGIN = 8  # voxels of background kept around the brain


@dataclass
class Phantom:
    """One synthetic case. All images share one grid (1 mm, MNI ICBM152 2009 space)."""

    flair: sitk.Image
    mprage: sitk.Image
    lesions: sitk.Image  # uint8 ground-truth lesion mask (0/1)
    mimics: sitk.Image  # uint8 mask of the lesion mimics (not lesions: potential FPs)
    white_matter: sitk.Image  # float32 white-matter probability after deformation
    brain_mask: sitk.Image  # uint8
    seed: int
    patient: int | None = None
    info: dict = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write flair/mprage/lesions/mimics as NIfTI into out_dir; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in ("flair", "mprage", "lesions", "mimics"):
            paths[name] = out / f"{name}.nii.gz"
            sitk.WriteImage(getattr(self, name), str(paths[name]), useCompression=True)
        return paths


def lesion_mask_dir() -> Path:
    """Folder of the bundled real lesion masks (override with MSIS_LESION_MASKS)."""
    env = os.environ.get("MSIS_LESION_MASKS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "LesionMasks"


def patient_mask_path(patient: int) -> Path:
    if not 1 <= int(patient) <= N_PATIENTS:
        raise InputError(f"patient must be 1..{N_PATIENTS}, got {patient}")
    path = lesion_mask_dir() / f"patient{int(patient):02d}.nii.gz"
    if not path.is_file():
        raise InputError(f"lesion mask {path} not found: set MSIS_LESION_MASKS to the folder of patientNN.nii.gz")
    return path


@functools.lru_cache(maxsize=2)
def _atlas(voxel_size: float):
    """Template T1, GM, WM and brain mask as float32 arrays (x, y, z) on the cropped grid, plus that grid."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        imgs = [
            datasets.load_mni152_template(resolution=1),
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
            datasets.load_mni152_brain_mask(resolution=1),
        ]
    arrays = [np.asarray(im.get_fdata(), dtype=np.float32) for im in imgs]
    affine = imgs[0].affine
    brain = arrays[3] > 0
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - _CROP_MARGIN, 0)
    hi = np.minimum(idx.max(0) + 1 + _CROP_MARGIN, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    arrays = [a[sl] for a in arrays]
    # nilearn's affine is RAS with a diagonal direction; ITK works in LPS.
    origin_ras = affine[:3, :3] @ lo + affine[:3, 3]
    origin_lps = origin_ras * np.array([-1.0, -1.0, 1.0])
    direction_lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3] / np.abs(np.diag(affine[:3, :3]))
    ref = image_from_array(arrays[0], spacing=(1.0, 1.0, 1.0), origin=origin_lps, direction=direction_lps.ravel())
    if voxel_size != 1.0:
        arrays, ref = _resample_atlas(arrays, ref, voxel_size)
    return arrays, ref


def _resample_atlas(arrays, ref, voxel_size):
    size = [int(round(n / voxel_size)) for n in ref.GetSize()]
    coarse = sitk.Image(size, sitk.sitkFloat32)
    coarse.SetSpacing([voxel_size] * 3)
    coarse.SetDirection(ref.GetDirection())
    # keep the physical centre of the first voxel consistent with the larger voxels
    shift = np.array(ref.GetDirection()).reshape(3, 3) @ np.full(3, (voxel_size - 1.0) / 2)
    coarse.SetOrigin(tuple(np.array(ref.GetOrigin()) + shift))
    out = []
    for a in arrays:
        img = image_from_array(a, reference=ref)
        res = sitk.Resample(img, coarse, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out.append(sitk.GetArrayFromImage(res).transpose(2, 1, 0).copy())
    return out, coarse


def _smooth_field(rng, shape, n_ctrl, amplitude):
    """A smooth random scalar field: Gaussian values on a coarse grid, cubic upsampling."""
    coarse = rng.normal(0.0, amplitude, size=n_ctrl)
    zoom = [s / c for s, c in zip(shape, n_ctrl)]
    f = ndimage.zoom(coarse, zoom, order=3, mode="nearest")
    return f[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def _deformation(rng, shape, voxel_size, max_mm=3.0):
    """Sampling coordinates of a smooth random displacement (few mm) of the grid."""
    grid = np.indices(shape, dtype=np.float32)
    amp = max_mm / voxel_size / 2.0
    for d in range(3):
        grid[d] += _smooth_field(rng, shape, (5, 6, 5), amp)
    return grid


def _warp(array, coords, order=1):
    return ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def _load_lesion_fraction(source, ref: sitk.Image) -> np.ndarray:
    """Lesion mask (MNI space, any grid) resampled world-to-world onto the phantom grid, linear (partial volume)."""
    img = read_image(source) if not isinstance(source, sitk.Image) else source
    if img.GetDimension() != 3:
        raise InputError(f"lesion mask {source} is not a 3D image")
    img = sitk.Cast(img > 0, sitk.sitkFloat32)
    res = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(res).transpose(2, 1, 0).copy()


_STRUCT18 = ndimage.generate_binary_structure(3, 2)


def _ellipsoid_blob(rng, shape, centre, radii_vox):
    """Soft ellipsoid (values in [0, 1]) as a small sub-array and its slices into the volume."""
    r = np.asarray(radii_vox, dtype=np.float32)
    half = np.ceil(r + 2).astype(int)
    lo = np.maximum(np.asarray(centre) - half, 0)
    hi = np.minimum(np.asarray(centre) + half + 1, shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    coords = np.indices(tuple(hi - lo), dtype=np.float32) + lo[:, None, None, None]
    d = np.sqrt(sum(((coords[i] - centre[i]) / r[i]) ** 2 for i in range(3)))
    # irregular edge: modulate the radius a little
    blob = np.clip(1.5 - d - 0.15 * rng.standard_normal(d.shape).astype(np.float32), 0.0, 1.0)
    return sl, blob


def _place_mimics(rng, n, candidates, shape, voxel_size, contrast_range):
    """Soft mimic map and per-voxel target contrast; candidates are (k, 3) voxel indices."""
    frac = np.zeros(shape, np.float32)
    contrast = np.zeros(shape, np.float32)
    if len(candidates) == 0:
        return frac, contrast
    for c in candidates[rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)]:
        radii = rng.uniform(0.8, 2.6, size=3) / voxel_size
        sl, blob = _ellipsoid_blob(rng, shape, c, radii)
        frac[sl] = np.maximum(frac[sl], blob)
        contrast[sl] = np.where(blob > 0, rng.uniform(*contrast_range), contrast[sl])
    return frac, contrast


def make_phantom(
    seed: int,
    lesion_mask=None,
    *,
    patient: int | None = None,
    voxel_size: float = 1.0,
    min_lesion_mm3: float = 5.0,
    n_mimics: int | None = None,
    noise: float | None = None,
) -> Phantom:
    """Generate a phantom case.

    seed: drives deformation, contrasts, bias fields, mimics and noise.
    lesion_mask: a lesion mask (path or SimpleITK image) in MNI space, any grid; its lesions are
        placed exactly (after the phantom's deformation). Default: the real mask of `patient`
        (1..22; chosen from the seed when None).
    voxel_size: isotropic spacing in mm (1.0 = the template's; 2.0 makes fast test phantoms).
    min_lesion_mm3: ground-truth components smaller than this after resampling are dropped
        (they could never be detected as instances); 0 keeps everything.
    """
    rng = np.random.default_rng(seed)
    (t1, gm, wm, brain), ref = _atlas(float(voxel_size))
    shape = t1.shape
    if lesion_mask is None:
        if patient is None:
            patient = int(rng.integers(1, N_PATIENTS + 1))
        lesion_source = patient_mask_path(patient)
    else:
        lesion_source = lesion_mask
        if not isinstance(lesion_mask, sitk.Image) and not Path(lesion_mask).is_file():
            raise InputError(f"lesion mask {lesion_mask} not found")
    lesion_frac = _load_lesion_fraction(lesion_source, ref)

    coords = _deformation(rng, shape, voxel_size)
    t1, gm, wm, brain, lesion_frac = (_warp(a, coords) for a in (t1, gm, wm, brain, lesion_frac))
    brain_bin = brain > 0.5

    # Tissue fractions with partial volume; CSF = brain not GM/WM.
    gm = np.clip(gm, 0, 1)
    wm = np.clip(wm, 0, 1)
    s = gm + wm
    over = s > 1
    gm[over] /= s[over]
    wm[over] /= s[over]
    csf = np.clip(brain - gm - wm, 0, 1)

    # Ground truth: components of the resampled mask, tiny ones dropped.
    lesion_frac *= np.clip(brain, 0, 1)
    gt = lesion_frac >= 0.5
    labels, n = ndimage.label(gt, structure=_STRUCT18)
    if n and min_lesion_mm3 > 0:
        sizes = ndimage.sum_labels(gt, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes * voxel_size**3 >= min_lesion_mm3
        gt = keep[labels]
        labels, n = ndimage.label(gt, structure=_STRUCT18)
    # partial volume only around kept lesions; per-lesion contrast
    near = ndimage.grey_dilation(labels, size=(3, 3, 3))
    lesion_pv = np.where(near > 0, lesion_frac, 0.0).astype(np.float32)
    lesion_pv = np.maximum(lesion_pv, gt.astype(np.float32) * 0.8)
    flair_gain = rng.uniform(0.75, 1.05, size=n + 1).astype(np.float32)  # target FLAIR, WM ~ 0.45
    t1_drop = rng.uniform(0.1, 0.55, size=n + 1).astype(np.float32)  # fraction of WM T1 lost

    # Mimics: cortical/sulcal hyperintensities and faint bright WM spots, away from lesions.
    away = ~ndimage.binary_dilation(gt, iterations=max(1, int(round(4 / voxel_size))))
    if n_mimics is None:
        n_mimics = int(rng.integers(8, 18))
    n_cortical = n_mimics // 2
    step = max(1, int(round(3 / voxel_size)))  # thin the candidate list for speed
    cort_cand = np.argwhere((gm > 0.5) & (csf > 0.15) & away)[::step]
    wm_cand = np.argwhere((wm > 0.95) & away)[::step]
    cort_frac, cort_gain = _place_mimics(rng, n_cortical, cort_cand, shape, voxel_size, (0.7, 1.0))
    wm_frac, wm_gain = _place_mimics(rng, n_mimics - n_cortical, wm_cand, shape, voxel_size, (0.62, 0.85))
    cort_frac *= np.clip(brain, 0, 1)

    # FLAIR: CSF dark, WM < GM, lesions bright.
    c = rng.uniform(0.95, 1.05, size=3)
    flair = csf * 0.10 * c[0] + gm * 0.62 * c[1] + wm * 0.45 * c[2]
    flair += lesion_pv * (flair_gain[near] - flair)
    flair += cort_frac * (cort_gain - flair) * (cort_gain > 0)
    flair += wm_frac * (wm_gain - flair) * (wm_gain > 0)
    # MPRAGE: the template's real T1 texture; lesions dark, mimics nearly unchanged.
    mprage = t1 * rng.uniform(0.95, 1.05)
    mprage *= 1.0 - lesion_pv * t1_drop[near]
    mprage *= 1.0 - wm_frac * rng.uniform(0.0, 0.12)

    # Smooth multiplicative bias fields, then Rician noise everywhere (background too).
    sigma = noise if noise is not None else float(rng.uniform(0.015, 0.03))
    out = []
    for img in (flair, mprage):
        bias = np.exp(_smooth_field(rng, shape, (3, 3, 3), 0.08))
        img = img * bias
        n1 = rng.normal(0, sigma, shape).astype(np.float32)
        n2 = rng.normal(0, sigma, shape).astype(np.float32)
        out.append((np.sqrt((img + n1) ** 2 + n2**2) * 1000.0).astype(np.float32))

    mimic_mask = ((cort_frac >= 0.5) | (wm_frac >= 0.5)) & ~gt
    return Phantom(
        flair=image_from_array(out[0], reference=ref),
        mprage=image_from_array(out[1], reference=ref),
        lesions=image_from_array(gt.astype(np.uint8), reference=ref),
        mimics=image_from_array(mimic_mask.astype(np.uint8), reference=ref),
        white_matter=image_from_array(wm.astype(np.float32), reference=ref),
        brain_mask=image_from_array(brain_bin.astype(np.uint8), reference=ref),
        seed=int(seed),
        patient=patient,
        info={"n_lesions": int(n), "n_mimics": int(n_mimics), "noise_sigma": sigma, "voxel_size": float(voxel_size)},
    )
