"""Preparing FLAIR and MPRAGE for the network (METHOD.md, "Inputs").

FLAIR is brought onto the MPRAGE grid (resampled; optionally rigidly registered first), optionally
N4 bias-corrected, then each image is z-scored. The MPRAGE grid is the reference: every output
volume is written on it, so it lies on the input in any viewer.

Only acquired voxels are data: zero padding (exact zeros) and, for FLAIR, the part of the MPRAGE
grid the FLAIR does not cover are left out of the z-score statistics, so padding a volume or a
FLAIR slab does not change the network's input where there is data. Where the FLAIR is missing,
no lesion is reported (PreparedCase.valid), and the case carries a warning with the covered fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.volumes import array_from_image, check_distinct_inputs, check_intensities, image_from_array, overlap_fraction, same_grid
from .grids import ResampledGrid, SameGrid

MIN_OVERLAP = 0.5  # of the MPRAGE field of view that FLAIR must cover
FULL_COVERAGE = 0.999  # of the MPRAGE's acquired voxels; below this the FLAIR counts as partial
# The network sees an artificial FLAIR edge where a slab ends: on a phantom with a 70% slab, 4 false
# positives lay within 3 voxels of that edge and none of the full-coverage lesions did.
EDGE_MARGIN_VOXELS = 3


@dataclass
class PreparedCase:
    """Network input (C, X, Y, Z) float32 on the reference (MPRAGE) grid."""

    image: np.ndarray
    reference: sitk.Image
    channels: list
    flair_on_reference: sitk.Image
    steps: list  # what was done, for logs and reports
    valid: np.ndarray | None = None  # (X, Y, Z) bool: where the FLAIR has data (None: everywhere)
    warnings: list = field(default_factory=list)  # what the user must know about the inputs
    grid: object = field(default_factory=SameGrid)  # where `image` lies (grids.py); SameGrid: the reference grid

    @property
    def spacing(self):
        """Of the reference grid, where every output lies."""
        return tuple(self.reference.GetSpacing())

    @property
    def shape(self) -> tuple:
        """(X, Y, Z) of the reference grid, where lesion labels and outputs lie."""
        return tuple(self.reference.GetSize())

    def to_reference(self, array: np.ndarray, kind: str = "linear") -> np.ndarray:
        """An array on the network's grid (a probability, a saliency map) on the reference grid."""
        return self.grid.to_reference(array, kind)

    def to_network(self, mask: np.ndarray) -> np.ndarray:
        """A voxel set on the reference grid (a lesion, Ω) on the network's grid."""
        return self.grid.to_network(mask)

    def only_where_valid(self, array: np.ndarray) -> np.ndarray:
        """The array with 0 where the FLAIR is missing (no lesion can be seen there)."""
        return array if self.valid is None else np.where(self.valid, array, 0).astype(array.dtype, copy=False)


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


def normalize(array: np.ndarray, mode: str = "zscore", acquired: np.ndarray | None = None) -> np.ndarray:
    """Per-image z-score (MONAI NormalizeIntensity) with statistics over the acquired voxels only.

    zscore: mean and standard deviation of the acquired voxels, applied to every voxel (voxels not
    acquired get the value a 0 gets, i.e. background); with every voxel acquired this is MONAI's
    whole-volume z-score, bit for bit. zscore_nonzero: MONAI's nonzero option (zeros stay 0).
    acquired: (X, Y, Z) bool; default: the non-zero voxels (zero padding is not data).
    """
    if mode == "none":
        return array.astype(np.float32)
    from monai.transforms import NormalizeIntensity

    a = np.asarray(array, dtype=np.float32)
    if acquired is None:
        acquired = a != 0
    if mode == "zscore_nonzero":
        out = np.asarray(NormalizeIntensity(nonzero=True)(np.where(acquired, a, 0).astype(np.float32)), dtype=np.float32)
        return out
    if acquired.all():
        return np.asarray(NormalizeIntensity()(a), dtype=np.float32)
    if not acquired.any():
        raise InputError("the image has no non-zero voxel to normalise")
    values = a[acquired]
    mean, std = NormalizeIntensity._mean(values), NormalizeIntensity._std(values)
    out = np.asarray(NormalizeIntensity(subtrahend=float(mean), divisor=float(std) or 1.0)(np.where(acquired, a, 0).astype(np.float32)),
                     dtype=np.float32)
    return out


def flair_coverage(flair: sitk.Image, mprage: sitk.Image, transform=None) -> np.ndarray:
    """(X, Y, Z) bool on the MPRAGE grid: where the FLAIR's field of view lies."""
    ones = sitk.Image(flair.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(flair)
    cover = sitk.Resample(ones, mprage, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return array_from_image(cover, np.uint8) > 0


def align_flair(flair: sitk.Image, mprage: sitk.Image, register: bool = False) -> tuple[sitk.Image, list, np.ndarray | None]:
    """FLAIR on the MPRAGE grid: as is when the grids match, else (registered and) resampled; with the
    FLAIR's coverage of the MPRAGE grid (None when the grids match)."""
    steps = []
    if same_grid(flair, mprage) and not register:
        return flair, steps, None
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
    return out, steps, flair_coverage(flair, mprage, transform)


def check_volume(img: sitk.Image, what: str) -> np.ndarray:
    """A 3D volume with finite intensities; its (X, Y, Z) array."""
    if img.GetDimension() != 3:
        raise InputError(f"{what} is {img.GetDimension()}D; a 3D volume is needed")
    if min(img.GetSize()) < 2:
        raise InputError(f"{what} has size {img.GetSize()}; a 3D volume with at least 2 voxels per axis is needed")
    array = array_from_image(img)
    check_intensities(array, what)
    return array


def align_inputs(flair: sitk.Image, mprage: sitk.Image | None, channels, *, register: bool = False) -> tuple:
    """Both images on the reference grid (the MPRAGE's; the FLAIR's when there is no MPRAGE), checked.

    Returns (images {"flair", "mprage"?}, reference, steps, coverage or None, valid or None, warnings).
    """
    if mprage is None and "mprage" in channels:
        raise InputError(f"this model takes {', '.join(c.upper() for c in channels)}: an MPRAGE (T1) is needed as well as the FLAIR")
    check_volume(flair, "FLAIR")
    check_distinct_inputs(flair, mprage)
    if mprage is None:
        return {"flair": sitk.Cast(flair, sitk.sitkFloat32)}, flair, [], None, None, []
    mprage_array = check_volume(mprage, "MPRAGE")
    flair_ref, steps, covered = align_flair(flair, mprage, register=register)
    valid, warnings = None, []
    if covered is not None:
        head = mprage_array != 0
        fraction = float(covered[head].mean()) if head.any() else float(covered.mean())
        if fraction < FULL_COVERAGE:
            from scipy import ndimage

            valid = ndimage.binary_erosion(covered, iterations=EDGE_MARGIN_VOXELS, border_value=1)
            warnings.append(f"the FLAIR covers {fraction:.1%} of the MPRAGE volume; outside it the FLAIR is treated as missing "
                            f"and no lesion is reported there or within {EDGE_MARGIN_VOXELS} voxels of its edge")
            steps.append(f"FLAIR covers {fraction:.1%} of the MPRAGE (outside: missing, no lesions)")
        else:
            covered = None
    images = {"flair": sitk.Cast(flair_ref, sitk.sitkFloat32), "mprage": sitk.Cast(mprage, sitk.sitkFloat32)}
    return images, mprage, steps, covered, valid, warnings


def prepare_case(flair: sitk.Image, mprage: sitk.Image | None, spec=None, *, register: bool = False, n4: bool = False) -> PreparedCase:
    """Check the images and build the network input in the spec's channel order, on the spec's grid
    (the reference grid unless the spec names a target spacing or orientation)."""
    channels = list(spec.input_channels) if spec is not None else ["flair", "mprage"]
    mode = spec.normalization if spec is not None else "zscore"
    images, reference, steps, covered, valid, warnings = align_inputs(flair, mprage, channels, register=register)
    flair_ref = images["flair"]
    if n4:
        images = {k: n4_correct(v) for k, v in images.items()}
        steps.append("N4 bias-field correction")
    grid = SameGrid()
    if spec is not None and (getattr(spec, "target_spacing", None) or getattr(spec, "orientation", None)):
        grid = ResampledGrid.for_spec(reference, spec.target_spacing, spec.orientation)
    if not grid.same:
        images = {k: grid.image_to_network(v) for k, v in images.items()}
        if covered is not None:
            covered = array_from_image(grid.image_to_network(image_from_array(covered.astype(np.float32), reference=reference),
                                                             sitk.sitkNearestNeighbor)) > 0
        steps.append(f"resampled (linear) to the model's grid: {grid.describe()}")
    arrays = []
    for name in channels:
        a = array_from_image(images[name])
        acquired = a != 0  # zero padding is not data
        if name == "flair" and covered is not None:
            acquired &= covered
        check_intensities(a[acquired] if acquired.any() else a, f"{name.upper()} on the {'MPRAGE' if mprage is not None else 'FLAIR'} grid")
        if not acquired.all():
            steps.append(f"{name.upper()}: z-score statistics over its {acquired.mean():.1%} acquired (non-zero, covered) voxels")
        arrays.append(normalize(a, mode, acquired))
    if mode != "none":
        steps.append(f"{mode} normalisation per image")
    return PreparedCase(np.stack(arrays), reference, channels, flair_ref, steps, valid, warnings, grid)
