"""A white-matter map, brain mask and head mask for a user's MPRAGE, derived when the user gives none.

The MNI ICBM152 2009 template (nilearn, offline; research/mni.py) is registered to the MPRAGE with SimpleITK:
an affine registration, then a B-spline one, both with Mattes mutual information on 2 mm copies of the images
(seconds, not minutes). The template's white-matter probability and brain mask are taken through that
transform onto the MPRAGE grid. The head mask comes from the MPRAGE's own intensities. How well the template
fits is measured without ground truth (see QUALITY_THRESHOLDS) and a poor fit gives a warning, not a silent map.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..io.volumes import array_from_image, check_intensities, image_from_array
from ..progress import report

FILES = {"white_matter": "derived_white_matter.nii.gz", "brain_mask": "derived_brain_mask.nii.gz",
         "head_mask": "derived_head_mask.nii.gz", "json": "derived_anatomy.json"}
REGISTRATION_MM = 2.0  # registration grid: the maps need the brain's shape, not 1 mm detail
MIN_EXTENT_MM = 100.0  # a brain is 120-170 mm along each axis; less than this is not a whole-head scan
BSPLINE_MESH_MM = 50.0  # B-spline control point spacing: gyral-scale shape differences stay with the template
# Below these the fit is reported as poor. Measured on 2 mm head and skull-stripped phantoms (seeds 1-5, 7, 11;
# moved up to 30 mm and 30 degrees, scaled by 0.9-1.1): registered, correlation 0.77-0.93 and brain_in_head
# 0.956-1.0 (skull-stripped scans lose their surface CSF from the Otsu head); the template left 3 mm off the
# registered fit gives 0.64, 5 mm 0.48, 8 mm 0.30; noise 0.0. Phantoms are this template deformed, so real scans
# fit less well: the margin below the phantoms' 0.77 is for them (no real scan was measured here).
QUALITY_THRESHOLDS = {"correlation": 0.6, "brain_in_head": 0.9}
STAGES = ("template", "affine", "deformable", "maps")
PITCH_STARTS_DEG = (-30, -15, 0, 15, 30)  # head tilts (about left-right) the rigid search starts from


@dataclass
class Anatomy:
    """Maps on the MPRAGE grid, (x, y, z) arrays, and the same as images for writing."""

    white_matter: np.ndarray  # float32 probability in [0, 1]
    brain_mask: np.ndarray  # bool
    head_mask: np.ndarray  # bool
    images: dict[str, sitk.Image]  # white_matter, brain_mask, head_mask
    quality: dict  # correlation, brain_in_head, metric values, warning (None when the fit looks good)
    parameters: dict = field(default_factory=dict)

    @property
    def warning(self) -> str | None:
        return self.quality.get("warning")


def derive_anatomy(mprage: sitk.Image, progress=None) -> Anatomy:
    """Register the MNI template to `mprage` (affine, then B-spline) and give its white matter, brain mask
    and the MPRAGE's head mask on the MPRAGE grid. progress(done, total): done counts the STAGES finished,
    with fractions within the registrations; a False answer stops the work (Cancelled). InputError for an image
    that cannot be a whole-head MPRAGE; a poor fit is not an error but `quality["warning"]`."""
    from .mni import TEMPLATE_NAME

    fixed_full = checked_mprage(mprage)
    total = len(STAGES)
    report(progress, 0, total)
    moving, moving_mask, wm, brain = _template()
    fixed = _registration_copy(fixed_full)
    head = _head_mask(fixed_full)
    report(progress, 1, total)

    affine_tf, affine_metric = _register_affine(fixed, moving, moving_mask, progress, 1, total)
    report(progress, 2, total)
    bspline_tf, bspline_metric = _register_bspline(fixed, moving, moving_mask, affine_tf, progress, 2, total)
    report(progress, 3, total)

    # keep the deformable stage only where it did not make the fit worse
    head_small = sitk.Resample(image_from_array(head, reference=fixed_full), fixed, sitk.Transform(), sitk.sitkNearestNeighbor)
    fits = {name: _fit(fixed, moving, brain, tf, head_small) for name, tf in (("affine", affine_tf), ("deformable", bspline_tf))}
    chosen = "deformable" if fits["deformable"]["correlation"] >= fits["affine"]["correlation"] - 0.01 else "affine"
    transform = bspline_tf if chosen == "deformable" else affine_tf

    # onto the MPRAGE grid through a 2 mm displacement field: a linear lookup per voxel instead of 64 control
    # points (1 mm phantom: 1.1 s instead of 4.7 s, the WM probability within 1e-4 of the B-spline's)
    field_tf = sitk.DisplacementFieldTransform(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()))
    white_matter = np.clip(array_from_image(sitk.Resample(wm, fixed_full, field_tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)), 0, 1)
    brain_mask = array_from_image(sitk.Resample(brain, fixed_full, field_tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    head |= brain_mask  # the brain is in the head even where the MPRAGE is dark (a dropout, a cyst at the edge)
    report(progress, 4, total)

    quality = {"registration": chosen, "correlation": fits[chosen]["correlation"], "brain_in_head": fits[chosen]["brain_in_head"],
               "correlation_affine": fits["affine"]["correlation"], "correlation_deformable": fits["deformable"]["correlation"],
               "metric_affine": affine_metric, "metric_deformable": bspline_metric, "thresholds": dict(QUALITY_THRESHOLDS)}
    quality["warning"] = _warning(quality)
    parameters = {"template": TEMPLATE_NAME, "registration_grid_mm": REGISTRATION_MM,
                  "affine": "moments initializer; rigid (Euler) from pitches "
                            f"{'/'.join(map(str, PITCH_STARTS_DEG))} degrees at 8 mm, the best kept; then AffineTransform at "
                            "4 and 2 mm; Mattes MI (32 bins, 10% random samples), regular-step gradient descent",
                  "deformable": f"SimpleITK B-spline, {BSPLINE_MESH_MM:g} mm control points, Mattes MI, L-BFGS, 4 and 2 mm (control points halved at 2 mm)",
                  "metric_mask": "template brain mask dilated 3 mm",
                  "white_matter": "template WM probability, linear interpolation",
                  "brain_mask": "template brain mask, linear interpolation > 0.5",
                  "head_mask": "Otsu threshold of the MPRAGE, components of 5% of the largest or more, closed, holes filled, with the brain mask"}
    images = {"white_matter": image_from_array(white_matter.astype(np.float32), reference=fixed_full),
              "brain_mask": image_from_array(brain_mask.astype(np.uint8), reference=fixed_full),
              "head_mask": image_from_array(head.astype(np.uint8), reference=fixed_full)}
    return Anatomy(white_matter.astype(np.float32), brain_mask, head, images, quality, parameters)


def write_anatomy(anatomy: Anatomy, folder) -> dict[str, Path]:
    """derived_white_matter/brain_mask/head_mask.nii.gz and derived_anatomy.json (quality, parameters) in
    `folder`: an OutputFolder (staged, put in place by its close()) or a plain folder (each file atomically,
    never over a file msis did not write). Returns the paths the files have (will have, once closed)."""
    from .. import __version__
    from ..io.outputs import OutputFolder, write_json_output, write_output_file

    record = {"quality": anatomy.quality, "parameters": anatomy.parameters,
              "files": {k: FILES[k] for k in ("white_matter", "brain_mask", "head_mask")}}
    out = {}
    if isinstance(folder, OutputFolder):
        with folder.writing():
            for key, img in anatomy.images.items():
                sitk.WriteImage(img, str(folder.file(FILES[key])), useCompression=True)
                out[key] = folder.path / FILES[key]
            text = json.dumps({"msis_version": __version__, **record}, indent=2, default=str) + "\n"
            folder.file(FILES["json"]).write_text(text, encoding="utf-8")
            out["json"] = folder.path / FILES["json"]
        return out
    folder = Path(folder)
    for key, img in anatomy.images.items():
        out[key] = write_output_file(folder / FILES[key], "--out", lambda tmp, img=img: sitk.WriteImage(img, str(tmp), useCompression=True),
                                     ours=_written_here)
    out["json"] = write_json_output(folder / FILES["json"], record, "--out")
    return out


def _written_here(path: Path) -> bool:
    """A derived map msis wrote: the derived_anatomy.json beside it, written by msis, lists it."""
    from ..io.outputs import written_by_msis

    record = path.parent / FILES["json"]
    if not written_by_msis(record):
        return False
    return path.name in json.loads(record.read_text(encoding="utf-8")).get("files", {}).values()


def checked_mprage(mprage) -> sitk.Image:
    """The MPRAGE as float32, once it is known to be one a map can be derived from (InputError otherwise): no time."""
    if not isinstance(mprage, sitk.Image) or mprage.GetDimension() != 3:
        raise InputError("the MPRAGE must be a 3D image to derive a white-matter map from it")
    if mprage.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the MPRAGE has several components per voxel; give a single-channel image")
    check_intensities(array_from_image(mprage), "the MPRAGE")
    extent = np.array(mprage.GetSize()) * np.array(mprage.GetSpacing())
    if extent.min() < MIN_EXTENT_MM:
        raise InputError(f"the MPRAGE covers only {' x '.join(f'{e:.0f}' for e in extent)} mm; a white-matter map can be "
                         f"derived only from a whole-head scan (at least {MIN_EXTENT_MM:.0f} mm along each axis): give --wm")
    return sitk.Cast(mprage, sitk.sitkFloat32)


@functools.lru_cache(maxsize=1)
def _template() -> tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Image]:
    """The template T1 and the metric's mask on the registration grid; WM probability and brain mask at 1 mm.
    Kept (45 MB): a cohort derives one map per case, and this is a second of each."""
    from .mni import lps_geometry, mni152

    template, affine = mni152()
    origin, direction = lps_geometry(affine)
    t1, wm = (image_from_array(template[k], spacing=(1.0, 1.0, 1.0), origin=origin, direction=direction.ravel()) for k in ("t1", "wm"))
    brain = image_from_array((template["brain"] > 0.5).astype(np.uint8), reference=t1)  # linear interpolation still gives fractions
    # the metric looks at the brain and a few mm around it: the template has no head, the MPRAGE has
    moving_mask = _registration_copy(sitk.BinaryDilate(brain, [3] * 3), mask=True)
    return _registration_copy(t1), moving_mask, wm, brain


def _registration_copy(img: sitk.Image, mask: bool = False) -> sitk.Image:
    """The image on a REGISTRATION_MM grid with its own direction and extent, smoothed first (no aliasing)."""
    spacing = np.array(img.GetSpacing())
    size = [max(1, int(round(n * s / REGISTRATION_MM))) for n, s in zip(img.GetSize(), spacing)]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    # same physical box: the first voxel's centre moves by half the change of spacing
    origin = np.array(img.GetOrigin()) + direction @ ((REGISTRATION_MM - spacing) / 2)
    if mask:
        return sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin.tolist(), [REGISTRATION_MM] * 3,
                             img.GetDirection(), 0, sitk.sitkUInt8)
    sigma = np.sqrt(np.maximum(REGISTRATION_MM**2 - spacing**2, 0)) / 2.355  # the blur a 2 mm voxel has
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), [float(max(s, 1e-3)) for s in sigma])
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [REGISTRATION_MM] * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def _head_mask(mprage: sitk.Image) -> np.ndarray:
    """Everything above background: Otsu on the (lightly smoothed) MPRAGE, its large components, closed, holes
    filled in 3D and slice by slice along each axis (a head cut by the field of view is open at that face)."""
    smooth = sitk.SmoothingRecursiveGaussian(mprage, [float(s) for s in mprage.GetSpacing()])
    fg = array_from_image(sitk.OtsuThreshold(smooth, 0, 1), dtype=bool)
    lab, n = ndimage.label(fg)
    if n > 1:  # not only the largest: at 1 mm the dark skull parts the scalp from the brain (head Dice 0.73 vs 0.99)
        sizes = np.bincount(lab.ravel())[1:]
        fg = np.r_[False, sizes >= 0.05 * sizes.max()][lab]
    fg = ndimage.binary_closing(fg, iterations=2, border_value=0) | fg
    fg = ndimage.binary_fill_holes(fg)
    for axis in range(3):
        fg = np.moveaxis(fg, axis, 0)
        for i in range(fg.shape[0]):
            fg[i] = ndimage.binary_fill_holes(fg[i])
        fg = np.moveaxis(fg, 0, axis)
    return np.ascontiguousarray(fg)


def _execute(reg, fixed, moving, progress, done, total, iterations, share=1.0):
    """reg.Execute with progress within a stage (done .. done + share) at every optimizer iteration. What the
    callback raises (Cancelled for a False answer, a Ctrl-C) stops the registration and is raised after it:
    SimpleITK would turn it into a RuntimeError."""
    state = {"n": 0, "error": None}

    def step():
        state["n"] += 1
        if state["error"] is not None:
            return
        try:
            report(progress, done + share * min(state["n"] / iterations, 0.99), total)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, outside ITK
            state["error"] = exc
            reg.StopRegistration()

    if progress is not None:
        reg.AddCommand(sitk.sitkIterationEvent, step)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError:
        if state["error"] is None:
            raise
    if state["error"] is not None:
        raise state["error"]
    return result


def _mattes(moving_mask, shrink, sigmas) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 1)  # a fixed seed: the same scan gives the same map
    reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    return reg


def _register_affine(fixed, moving, moving_mask, progress, done, total):
    """Rigid from a few head tilts at 8 mm (the best fit wins: a gradient from the upright start alone ends in
    a wrong minimum for tilts of 20 degrees or more), then affine at 4 and 2 mm."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    fits = []
    for k, pitch in enumerate(PITCH_STARTS_DEG):
        start = sitk.Euler3DTransform(init)
        start.SetRotation(np.deg2rad(pitch), 0.0, 0.0)
        reg = _mattes(moving_mask, [4], [2])
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-2, numberOfIterations=40, relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(start, inPlace=True)
        reg.Execute(fixed, moving)
        fits.append((float(reg.GetMetricValue()), k, start))
        report(progress, done + 0.4 * (k + 1) / len(PITCH_STARTS_DEG), total)
    rigid = min(fits)[2]
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    reg = _mattes(moving_mask, [2, 1], [1, 0])
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    _execute(reg, fixed, moving, progress, done + 0.4, total, 2 * 60, share=0.6)
    return affine, float(reg.GetMetricValue())


def _register_bspline(fixed, moving, moving_mask, affine_tf, progress, done, total):
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(e / BSPLINE_MESH_MM / 2))) for e in extent]  # doubled by the second level
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _mattes(moving_mask, [2, 1], [1, 0])
    reg.SetOptimizerAsLBFGS2(solutionAccuracy=1e-2, numberOfIterations=40, deltaConvergenceTolerance=0.01)
    reg.SetMovingInitialTransform(affine_tf)
    reg.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[1, 2])
    tf = _execute(reg, fixed, moving, progress, done, total, 2 * 40)
    composite = sitk.CompositeTransform(affine_tf)  # fixed point -> B-spline -> affine -> template
    composite.AddTransform(tf)
    return composite, float(reg.GetMetricValue())


def _fit(fixed, moving, brain, transform, head_small) -> dict:
    """Correlation of the registered template T1 with the MPRAGE inside the registered brain (a fit that needs
    no ground truth: both are T1-weighted) and the fraction of that brain inside the MPRAGE's head mask."""
    t1 = array_from_image(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = array_from_image(sitk.Resample(brain, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    if inside.sum() < 100:
        return {"correlation": 0.0, "brain_in_head": 0.0}
    a = array_from_image(fixed)[inside]
    b = t1[inside]
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    head = array_from_image(head_small, dtype=bool)
    return {"correlation": round(corr, 4), "brain_in_head": round(float(head[inside].mean()), 4)}


def _warning(quality: dict) -> str | None:
    poor = [f"{k} {quality[k]:.2f} < {t}" for k, t in QUALITY_THRESHOLDS.items() if quality[k] < t]
    if not poor:
        return None
    return ("the template registered poorly to the MPRAGE (" + ", ".join(poor) + "): look at derived_white_matter.nii.gz "
            "over the MPRAGE, and give --wm if it does not follow the white matter")
