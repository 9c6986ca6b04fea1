"""Preparing FLAIR and MPRAGE for the network (METHOD.md, "Inputs").

FLAIR is brought onto the MPRAGE grid (resampled; optionally rigidly registered first), optionally
N4 bias-corrected, then each image is z-scored. The MPRAGE grid is the reference: every output
volume is written on it, so it lies on the input in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volumes import array_from_image, check_intensities, overlap_fraction, same_grid

MIN_OVERLAP = 0.5  # of the MPRAGE field of view that FLAIR must cover


@dataclass
class PreparedCase:
    """Network input (C, X, Y, Z) float32 on the reference (MPRAGE) grid."""

    image: np.ndarray
    reference: sitk.Image
    channels: list
    flair_on_reference: sitk.Image
    steps: list  # what was done, for logs and reports

    @property
    def spacing(self):
        return tuple(self.reference.GetSpacing())


def register_rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> sitk.Transform:
    """Rigid (Euler) FLAIR-to-MPRAGE registration with Mattes mutual information."""
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(f, m)


def n4_correct(img: sitk.Image, shrink: int = 4) -> sitk.Image:
    """N4 bias-field correction on a shrunk copy, field applied at full resolution."""
    img = sitk.Cast(img, sitk.sitkFloat32)
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(mask, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([25, 25, 25])
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    return img / sitk.Exp(log_field)


def normalize(array: np.ndarray, mode: str = "zscore") -> np.ndarray:
    """Per-image z-score (MONAI NormalizeIntensity), over all voxels or the non-zero ones."""
    if mode == "none":
        return array.astype(np.float32)
    from monai.transforms import NormalizeIntensity

    out = NormalizeIntensity(nonzero=(mode == "zscore_nonzero"))(array)
    return np.asarray(out, dtype=np.float32)


def align_flair(flair: sitk.Image, mprage: sitk.Image, register: bool = False) -> tuple[sitk.Image, list]:
    """FLAIR on the MPRAGE grid: as is when the grids match, else (registered and) resampled."""
    steps = []
    if same_grid(flair, mprage) and not register:
        return flair, steps
    frac = overlap_fraction(flair, mprage)
    if frac < MIN_OVERLAP:
        raise InputError(
            f"FLAIR and MPRAGE do not overlap in physical space (FLAIR covers {frac:.0%} of the MPRAGE field of view); "
            "check that both volumes belong to the same scan session and keep their orientation headers"
        )
    transform = sitk.Transform()
    if register:
        transform = register_rigid(mprage, flair)
        steps.append("rigid registration FLAIR->MPRAGE (Mattes MI)")
    steps.append("FLAIR resampled onto the MPRAGE grid (linear)")
    out = sitk.Resample(sitk.Cast(flair, sitk.sitkFloat32), mprage, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return out, steps


def prepare_case(flair: sitk.Image, mprage: sitk.Image, spec=None, *, register: bool = False, n4: bool = False) -> PreparedCase:
    """Check both images and build the network input in the spec's channel order."""
    channels = list(spec.input_channels) if spec is not None else ["flair", "mprage"]
    mode = spec.normalization if spec is not None else "zscore"
    for img, what in ((flair, "FLAIR"), (mprage, "MPRAGE")):
        if img.GetDimension() != 3:
            raise InputError(f"{what} is {img.GetDimension()}D; a 3D volume is needed")
        if min(img.GetSize()) < 2:
            raise InputError(f"{what} has size {img.GetSize()}; a 3D volume with at least 2 voxels per axis is needed")
    check_intensities(array_from_image(flair), "FLAIR")
    check_intensities(array_from_image(mprage), "MPRAGE")
    flair_ref, steps = align_flair(flair, mprage, register=register)
    images = {"flair": flair_ref, "mprage": sitk.Cast(mprage, sitk.sitkFloat32)}
    if n4:
        images = {k: n4_correct(v) for k, v in images.items()}
        steps.append("N4 bias-field correction")
    arrays = []
    for name in channels:
        a = array_from_image(images[name])
        check_intensities(a, f"{name.upper()} on the MPRAGE grid")
        arrays.append(normalize(a, mode))
    if mode != "none":
        steps.append(f"{mode} normalisation per image")
    return PreparedCase(np.stack(arrays), mprage, channels, flair_ref, steps)
