"""Synthetic MS phantoms: FLAIR + MPRAGE on real anatomy with real lesion geometry.

Anatomy is the MNI ICBM152 2009 1 mm template and its grey/white-matter maps
(shipped offline by nilearn). Each seed gets its own smooth random deformation,
contrasts, bias fields and noise. Lesion geometry comes from real MS lesion masks in MNI
space (Lesjak et al., Neuroinformatics 2018, CC-BY; bundled under
Resources/LesionMasks).

The default phantom is a head, not a skull-stripped brain (the journal paper's scans were not
skull-stripped), and it carries what makes FLAIR hard on real scans (see docs/PHANTOMS.md):

- head layers around the brain, from the brain surface outwards: extra-axial CSF, the skull's inner
  table, the diploe's fatty marrow, the outer table, subcutaneous scalp fat and skin, each a few mm
  thick with smooth random thickness; relative brightness as on 3 T scans (fat and marrow bright on
  T1 and, FLAIR being a fast spin-echo sequence without fat suppression, on FLAIR; cortical bone dark
  on both; CSF nulled on FLAIR);
- normal FLAIR hyperintensities that are not lesions: periventricular rims and the brighter caps at
  the frontal and occipital horns, the septum pellucidum, choroid plexus in the atria, inflow
  (incomplete CSF nulling) in the ventricles and basal cisterns, partial volume in sulci;
- lesion mimics: cortical/sulcal hyperintensities and faint white-matter spots without T1 drop;
- lesions from subtle (near grey matter on FLAIR) to bright, T1 from iso- to hypo-intense;
- between-scan variation of tissue contrast (including a gamma), bias field and noise large enough
  that a z-scored intensity alone does not say "lesion".

`skull_stripped=True` gives the earlier kind (brain only, narrower contrast ranges), voxel for
voxel as before.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..io.volumes import image_from_array, read_image, write_image

N_PATIENTS = 22
PHANTOM_VERSION = 2  # bump when the same seed makes a different phantom (caches key on it); 2 = the head
_CROP_MARGIN = 8  # mm of background kept around a skull-stripped brain
_HEAD_MARGIN = 20  # mm around the brain for the head layers (at most 16 mm) and some air

# Per-scan parameter ranges. Both kinds draw the same numbers from the seed's stream in the same
# order (so skull-stripped phantoms stay what they were); the head kind has wider ranges.
_RANGES = {
    "skull_stripped": dict(tissue_jitter=0.05, lesion_flair=(0.75, 1.05), lesion_t1_drop=(0.1, 0.55), noise=(0.015, 0.03)),
    "head": dict(tissue_jitter=0.15, lesion_flair=(0.55, 1.05), lesion_t1_drop=(0.0, 0.55), noise=(0.01, 0.045)),
}
# Head layers outwards from the brain mask: (name, thickness range in mm, T1 relative to white
# matter, FLAIR relative to white matter). Typical 3 T appearance; thicknesses from adult anatomy.
_HEAD_LAYERS = (
    ("extra-axial CSF", (1.0, 2.5), 0.25, 0.20),
    ("inner table", (1.0, 2.0), 0.05, 0.08),
    ("diploe (marrow)", (1.5, 3.5), 0.80, 1.25),
    ("outer table", (1.0, 2.0), 0.05, 0.08),
    ("scalp fat", (2.0, 4.0), 1.15, 1.70),
    ("skin", (1.0, 2.0), 0.55, 0.95),
)


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
    head: sitk.Image | None = None  # uint8 labels: 0 air/brain, 1.. the _HEAD_LAYERS in order (None when skull-stripped)
    patient: int | None = None
    info: dict = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write flair/mprage/lesions/mimics as NIfTI into out_dir, each whole; returns the paths."""
        out = Path(out_dir)
        return {name: write_image(getattr(self, name), out / f"{name}.nii.gz")
                for name in ("flair", "mprage", "lesions", "mimics", "head") if getattr(self, name) is not None}


def lesion_mask_dir() -> Path:
    """Folder of the bundled real lesion masks (override with MSIS_LESION_MASKS)."""
    env = os.environ.get("MSIS_LESION_MASKS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "LesionMasks"  # Resources/ is beside the Lib folder


def patient_mask_path(patient: int) -> Path:
    if not 1 <= int(patient) <= N_PATIENTS:
        raise InputError(f"patient must be 1..{N_PATIENTS}, got {patient}")
    path = lesion_mask_dir() / f"patient{int(patient):02d}.nii.gz"
    if not path.is_file():
        raise InputError(f"lesion mask {path} not found: set MSIS_LESION_MASKS to the folder of patientNN.nii.gz")
    return path


@functools.lru_cache(maxsize=4)
def _atlas(voxel_size: float, margin: int = _CROP_MARGIN):
    """Template T1, GM, WM and brain mask as float32 arrays (x, y, z) on the brain's bounding box plus
    `margin` mm within the template's grid (which ends just below the cerebellum, as a scan's field of
    view does), plus that grid."""
    from .mni import lps_geometry, mni152

    template, affine = mni152()
    arrays = [template[key] for key in ("t1", "gm", "wm", "brain")]
    brain = arrays[3] > 0
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    arrays = [a[sl] for a in arrays]
    origin_lps, direction_lps = lps_geometry(affine, lo)  # nilearn's affine is RAS; ITK works in LPS
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


def _smooth_field(rng, shape, n_ctrl, amplitude, order=3):
    """A smooth random scalar field: Gaussian values on a coarse grid, cubic (or `order`) upsampling."""
    coarse = rng.normal(0.0, amplitude, size=n_ctrl)
    zoom = [s / c for s, c in zip(shape, n_ctrl)]
    f = _separable_zoom(coarse, zoom, order)
    return f[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def _separable_zoom(coarse, zoom, order):
    """ndimage.zoom(coarse, zoom, order=order, mode="nearest"), one axis at a time: its edge padding, spline
    prefilter and tensor-product evaluation are each separable, so the 3-D zoom is three 1-D linear maps, whose
    matrices are the 1-D zooms of unit impulses. Equal to ndimage.zoom within 1e-14 (test_phantom.py checks),
    and 10-20x faster (ndimage evaluates 4^3 spline terms per output voxel)."""
    out = np.asarray(coarse, dtype=np.float64)
    for axis, (n, z) in enumerate(zip(out.shape, zoom)):
        impulses = np.eye(n)
        weights = np.stack([ndimage.zoom(impulses[a], z, order=order, mode="nearest") for a in range(n)], axis=1)
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


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


def _head_layers(rng, outside_mm: np.ndarray, voxel_size: float) -> list[np.ndarray]:
    """Fractions (partial volume at the boundaries) of the _HEAD_LAYERS given each voxel's distance in mm
    outside the brain; every layer's thickness varies smoothly around the head."""
    shape = outside_mm.shape
    inner = np.zeros(shape, np.float32)
    fractions = []
    for _name, (lo, hi), _t1, _flair in _HEAD_LAYERS:
        mean = rng.uniform(lo, hi)
        thickness = np.clip(mean + _smooth_field(rng, shape, (4, 4, 4), (hi - lo) / 3, order=1), lo * 0.7, hi * 1.2)
        outer = inner + thickness
        # voxel fraction between the two surfaces (linear ramp one voxel wide at each)
        frac = np.clip((outside_mm - inner) / voxel_size + 0.5, 0, 1) - np.clip((outside_mm - outer) / voxel_size + 0.5, 0, 1)
        fractions.append(frac.astype(np.float32) * (outside_mm > 0))
        inner = outer
    return fractions


def _blend(image, weight, target):
    """Move image towards target by weight (0..1): partial volume of a structure of that brightness."""
    return image + weight * (target - image)


def _normal_hyperintensities(rng, csf, wm, brain, voxel_size, midline_x):
    """Weights (0..1) of the FLAIR hyperintensities of normal brains, as {name: (weight, FLAIR / WM, T1 / WM)}.

    Ventricles = CSF deeper than 12 mm in the brain and within 30 mm of the midline. Rims: a thin band of periventricular white matter
    (looser ependyma, more interstitial water); caps: thicker and brighter at the frontal and occipital
    horn tips. Septum pellucidum: the midline membrane between the lateral ventricles. Choroid plexus:
    blobs in the atria. Inflow: CSF entering the slice after the inversion pulse is not nulled, so
    parts of the ventricles and basal cisterns are bright. Sulci: partial volume of incompletely
    nulled CSF next to cortex.
    """
    sp = voxel_size
    depth = ndimage.distance_transform_edt(brain > 0.5, sampling=sp)
    xs = (np.arange(csf.shape[0]) - midline_x) * sp
    # deep, central CSF; the opening drops the thin interhemispheric fissure
    vent = (csf > 0.5) & (depth > 12.0) & (np.abs(xs)[:, None, None] < 30.0)
    vent = ndimage.binary_opening(vent, iterations=max(1, int(round(1.5 / sp))))
    lab, n = ndimage.label(vent)
    if n:
        sizes = ndimage.sum_labels(vent, lab, index=np.arange(1, n + 1))
        vent = np.isin(lab, 1 + np.flatnonzero(sizes * sp**3 >= 300))
    out = {}
    if not vent.any():
        return out
    d_vent = ndimage.distance_transform_edt(~vent, sampling=sp)
    white = np.clip(wm, 0, 1)
    out["periventricular rim"] = (np.exp(-d_vent / rng.uniform(0.8, 1.6)) * (d_vent > 0) * white, rng.uniform(1.15, 1.4), 1.0)
    ys = np.argwhere(vent)[:, 1]
    y_lo, y_hi = ys.min(), ys.max()
    span = (y_hi - y_lo) * sp
    tips = np.zeros_like(vent)
    idx = np.arange(vent.shape[1])
    front = idx >= y_hi - int(round(min(12.0, 0.2 * span) / sp))  # axis 1 runs posterior -> anterior (RAS)
    back = idx <= y_lo + int(round(min(10.0, 0.15 * span) / sp))
    tips[:, front | back, :] = vent[:, front | back, :]
    d_tip = ndimage.distance_transform_edt(~tips, sampling=sp)
    cap = np.exp(-d_tip / rng.uniform(2.0, 3.5)) * (d_vent > 0) * white * (d_tip < 8.0)
    out["horn caps"] = (cap.astype(np.float32), rng.uniform(1.35, 1.75), 0.95)
    # septum pellucidum: within 1 mm of the midline, between the lateral ventricles
    hull = ndimage.binary_closing(vent, iterations=max(1, int(round(4 / sp))))
    septum = hull & (np.abs(xs)[:, None, None] <= 1.0) & (depth > 15.0)
    out["septum pellucidum"] = (septum.astype(np.float32) * rng.uniform(0.6, 0.9), rng.uniform(0.95, 1.25), 0.85)
    # choroid plexus: blobs in the atria (posterior third of the ventricles, away from the midline)
    atria = np.argwhere(vent & (np.abs(xs)[:, None, None] > 8.0)
                        & ((idx >= y_lo + 0.2 * span / sp) & (idx <= y_lo + 0.5 * span / sp))[None, :, None])
    plexus = np.zeros(vent.shape, np.float32)
    for c in atria[rng.choice(len(atria), size=min(len(atria), int(rng.integers(2, 5))), replace=False)] if len(atria) else []:
        sl, blob = _ellipsoid_blob(rng, vent.shape, c, rng.uniform(1.5, 3.5, size=3) / sp)
        plexus[sl] = np.maximum(plexus[sl], blob)
    out["choroid plexus"] = (plexus * ndimage.binary_dilation(vent), rng.uniform(1.1, 1.6), 0.6)
    # inflow: smooth patches of the ventricles and the basal cisterns (CSF in the lowest third, near the midline)
    zs = np.argwhere(brain > 0.5)[:, 2]
    z_cut = zs.min() + 0.33 * (zs.max() - zs.min())
    cisterns = (csf > 0.5) & (np.arange(vent.shape[2]) < z_cut)[None, None, :] & (np.abs(xs)[:, None, None] < 20.0) & (depth > 4.0)
    field = _smooth_field(rng, vent.shape, tuple(max(3, int(n * sp / 12)) for n in vent.shape), 1.0, order=1)
    patches = np.clip(field - rng.uniform(0.3, 0.8), 0, 1)
    out["CSF inflow"] = (patches * (vent | cisterns) * np.clip(csf, 0, 1), rng.uniform(0.6, 1.5), 0.35)
    # sulcal CSF next to cortex, partly un-nulled
    sulcal = np.clip(csf, 0, 1) * (depth < 8.0) * (~vent)
    out["sulcal partial volume"] = (sulcal * rng.uniform(0.1, 0.35), 0.9, 0.3)
    return out


def make_phantom(
    seed: int,
    lesion_mask=None,
    *,
    patient: int | None = None,
    voxel_size: float = 1.0,
    min_lesion_mm3: float = 5.0,
    n_mimics: int | None = None,
    noise: float | None = None,
    skull_stripped: bool = False,
) -> Phantom:
    """Generate a phantom case.

    seed: drives deformation, contrasts, bias fields, mimics, head and noise.
    lesion_mask: a lesion mask (path or SimpleITK image) in MNI space, any grid; its lesions are
        placed exactly (after the phantom's deformation). Default: the real mask of `patient`
        (1..22; chosen from the seed when None).
    voxel_size: isotropic spacing in mm (1.0 = the template's; 2.0 makes fast test phantoms).
    min_lesion_mm3: ground-truth components smaller than this after resampling are dropped
        (they could never be detected as instances); 0 keeps everything.
    skull_stripped: the earlier kind: a brain without head, normal hyperintensities or wide contrast
        variation (identical to what this function made before the head was added).
    """
    rng = np.random.default_rng(seed)
    head = not skull_stripped
    ranges = _RANGES["head" if head else "skull_stripped"]
    # what only head phantoms have comes from a second stream, so the first stays as it was
    extra = np.random.default_rng([int(seed), 1])
    (t1, gm, wm, brain), ref = _atlas(float(voxel_size), _HEAD_MARGIN if head else _CROP_MARGIN)
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
    flair_gain = rng.uniform(*ranges["lesion_flair"], size=n + 1).astype(np.float32)  # target FLAIR, WM ~ 0.45
    t1_drop = rng.uniform(*ranges["lesion_t1_drop"], size=n + 1).astype(np.float32)  # fraction of WM T1 lost

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

    # FLAIR: CSF dark, WM < GM, lesions bright. (Head phantoms: wider jitter, GM still above WM.)
    j = ranges["tissue_jitter"]
    c = rng.uniform(1 - j, 1 + j, size=3)
    flair = csf * 0.10 * c[0] + gm * 0.62 * c[1] + wm * 0.45 * c[2]
    mprage = t1 * rng.uniform(0.95, 1.05)
    normal_mask = np.zeros(shape, bool)
    head_labels = None
    if head:  # levels relative to this scan's white matter
        flair_wm = 0.45 * c[2]
        t1_wm = float(np.median(mprage[wm > 0.9])) if (wm > 0.9).any() else 1.0
        midline_x = ref.TransformPhysicalPointToContinuousIndex((0.0, 0.0, 0.0))[0]
        hyper = _normal_hyperintensities(extra, csf, wm, brain, voxel_size, midline_x)
        for weight, flair_rel, t1_rel in hyper.values():
            flair = _blend(flair, weight, flair_rel * flair_wm)
            mprage = _blend(mprage, weight * (t1_rel < 1), t1_rel * t1_wm)
            normal_mask |= weight >= 0.3
        normal_mask &= flair > 1.1 * flair_wm  # the visibly hyperintense part: where a model could see a lesion
        outside_mm = ndimage.distance_transform_edt(~brain_bin, sampling=voxel_size).astype(np.float32)
        layers = _head_layers(extra, outside_mm, voxel_size)
        for frac, (_name, _thick, t1_rel, flair_rel) in zip(layers, _HEAD_LAYERS):
            flair += frac * flair_rel * flair_wm * extra.uniform(0.85, 1.15)
            mprage += frac * t1_rel * t1_wm * extra.uniform(0.85, 1.15)
        stack = np.stack(layers)
        head_labels = np.where(stack.max(0) >= 0.5, stack.argmax(0) + 1, 0).astype(np.uint8)
    flair = _blend(flair, lesion_pv, flair_gain[near])
    flair = _blend(flair, cort_frac * (cort_gain > 0), cort_gain)
    flair = _blend(flair, wm_frac * (wm_gain > 0), wm_gain)
    # MPRAGE: the template's real T1 texture; lesions dark, mimics nearly unchanged.
    mprage *= 1.0 - lesion_pv * t1_drop[near]
    mprage *= 1.0 - wm_frac * rng.uniform(0.0, 0.12)

    # Smooth multiplicative bias fields, then Rician noise everywhere (background too).
    sigma = noise if noise is not None else float(rng.uniform(*ranges["noise"]))
    out = []
    for img in (flair, mprage):
        if head:  # scanner/sequence differences in contrast: a gamma on the normalised image
            peak = float(np.percentile(img, 99.9)) or 1.0
            img = peak * (np.clip(img, 0, None) / peak) ** extra.uniform(0.8, 1.25)
        bias = np.exp(_smooth_field(rng, shape, (3, 3, 3), 0.08 if not head else extra.uniform(0.05, 0.2)))
        img = img * bias
        n1 = rng.normal(0, sigma, shape).astype(np.float32)
        n2 = rng.normal(0, sigma, shape).astype(np.float32)
        out.append((np.sqrt((img + n1) ** 2 + n2**2) * 1000.0).astype(np.float32))

    mimic_mask = ((cort_frac >= 0.5) | (wm_frac >= 0.5) | normal_mask) & ~gt
    return Phantom(
        flair=image_from_array(out[0], reference=ref),
        mprage=image_from_array(out[1], reference=ref),
        lesions=image_from_array(gt.astype(np.uint8), reference=ref),
        mimics=image_from_array(mimic_mask.astype(np.uint8), reference=ref),
        white_matter=image_from_array(wm.astype(np.float32), reference=ref),
        brain_mask=image_from_array(brain_bin.astype(np.uint8), reference=ref),
        seed=int(seed),
        patient=patient,
        head=None if head_labels is None else image_from_array(head_labels, reference=ref),
        info={"n_lesions": int(n), "n_mimics": int(n_mimics), "noise_sigma": sigma, "voxel_size": float(voxel_size),
              "skull_stripped": bool(skull_stripped)},
    )
