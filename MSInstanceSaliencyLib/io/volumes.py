"""Reading, checking and writing volumes with SimpleITK.

Array convention of the whole library: numpy arrays are indexed (x, y, z) = ITK's (i, j, k);
SimpleITK's GetArrayFromImage gives (z, y, x), so every conversion goes through here.
Physical coordinates from ITK are LPS; Slicer shows RAS (x and y negated).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .complete import check_complete

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D scalar image; InputError with the reason for anything else."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    if p.is_dir():
        img = _read_dicom_series(p, what)
    elif not p.is_file():
        raise InputError(f"{what} {p} is not a file")
    else:
        check_complete(p, what)
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:  # ITK's message is long; keep its first line
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
            raise InputError(f"cannot read {what} {p} (NIfTI or NRRD expected): {first[:200]}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {p} has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise InputError(f"{what} {p} is {img.GetDimension()}D with size {img.GetSize()}; a 3D volume is needed")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_finite(p, what)
    return img



def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    """A folder of DICOM files holding one series (GDCM sorts the slices by position)."""
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise InputError(f"{what} {folder} is a folder without a DICOM series; give a NIfTI or NRRD file, or a folder of one DICOM series")
    if len(series) > 1:
        raise InputError(f"{what} folder {folder} holds {len(series)} DICOM series; give a folder that holds only the {what} series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(f"cannot read the DICOM series in {what} folder {folder}: {first[:200]}") from None


def mask_from_image(img: sitk.Image) -> np.ndarray:
    """(x, y, z) bool: the non-zero voxels of a mask or label image, whatever its pixel type
    (labels of 256 or masks of 0.5 are lesions too; a cast to uint8 would lose them)."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(img).transpose(2, 1, 0) != 0)


def _check_nifti_finite(path: Path, what: str) -> None:
    """ITK's NIfTI reader silently turns NaN/Inf into 0; look at the stored values ourselves."""
    import nibabel as nib

    try:
        nii = nib.load(str(path))
    except Exception:  # ITK read it; nibabel's opinion is not needed then
        return
    if not np.issubdtype(nii.get_data_dtype(), np.floating):
        return
    data = np.asanyarray(nii.dataobj)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{what} {path} contains {bad} NaN or Inf voxels; fix or mask them before running")


def array_from_image(img: sitk.Image, dtype=np.float32) -> np.ndarray:
    """(x, y, z) array copy of a 3D image."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0), dtype=dtype)


def image_from_array(array: np.ndarray, reference: sitk.Image | None = None, *, spacing=None, origin=None, direction=None) -> sitk.Image:
    """3D image from an (x, y, z) array, geometry copied from `reference` or given explicitly."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
    if reference is not None:
        if tuple(reference.GetSize()) != tuple(a.shape):
            raise ValueError(f"array shape {a.shape} does not match reference size {reference.GetSize()}")
        img.CopyInformation(reference)
    if spacing is not None:
        img.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return img


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


SAME_INPUTS = ("FLAIR and MPRAGE are the same volume: give the T1 (MPRAGE) as the second input, or none "
               "(FLAIR-only models)")


def _voxels_and_grid(volume):
    """(voxels, index-to-world matrix) of a SimpleITK image or of an (array, 4x4 matrix) pair; array axes as
    the caller has them (only equality between two volumes of the same kind matters)."""
    if isinstance(volume, sitk.Image):
        m = np.eye(4)
        m[:3, :3] = np.array(volume.GetDirection()).reshape(3, 3) @ np.diag(volume.GetSpacing())
        m[:3, 3] = volume.GetOrigin()
        return sitk.GetArrayViewFromImage(volume), m
    array, matrix = volume
    return np.asarray(array), np.asarray(matrix, dtype=float)


def check_distinct_inputs(flair, mprage) -> None:
    """Refuse a FLAIR and an MPRAGE that are the same volume (the network would get the FLAIR twice and
    answer nonsense without complaint). Each is a path, a SimpleITK image, or an (array, 4x4
    index-to-world matrix) pair (Slicer's volume nodes); mprage None (FLAIR-only) passes.
    Same object, same file, or equal voxels on the same grid: InputError SAME_INPUTS."""
    if flair is None or mprage is None:
        return
    if flair is mprage:
        raise InputError(SAME_INPUTS)
    if isinstance(flair, (str, os.PathLike)) and isinstance(mprage, (str, os.PathLike)):
        a, b = Path(flair), Path(mprage)
        try:
            same = a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
        except OSError:
            same = False
        if same:
            raise InputError(SAME_INPUTS)
        return
    va, ma = _voxels_and_grid(flair)
    vb, mb = _voxels_and_grid(mprage)
    if va.shape == vb.shape and np.allclose(ma, mb, atol=1e-4) and np.array_equal(va, vb):
        raise InputError(SAME_INPUTS)


def read_inputs(flair_path, mprage_path=None) -> tuple:
    """(FLAIR, MPRAGE or None) read as images, refused when they are the same file or the same volume."""
    check_distinct_inputs(flair_path, mprage_path)
    flair = read_image(flair_path, "FLAIR")
    mprage = read_image(mprage_path, "MPRAGE") if mprage_path else None
    check_distinct_inputs(flair, mprage)
    return flair, mprage


def physical_bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (LPS) bounding box of the voxel centres' hull."""
    size = np.array(img.GetSize()) - 1
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], float)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return pts.min(0), pts.max(0)


def overlap_fraction(moving: sitk.Image, fixed: sitk.Image) -> float:
    """Fraction of the fixed image's bounding box covered by the moving image's bounding box."""
    lo_m, hi_m = physical_bounds(moving)
    lo_f, hi_f = physical_bounds(fixed)
    inter = np.clip(np.minimum(hi_m, hi_f) - np.maximum(lo_m, lo_f), 0, None)
    extent = np.maximum(hi_f - lo_f, 1e-6)
    return float(np.prod(inter / extent))


def check_intensities(array: np.ndarray, what: str) -> None:
    """Reject NaN/Inf, empty and constant images with a message naming the problem."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(f"{what} contains {bad} NaN or Inf voxels; fix or mask them before running")
    if not np.any(array):
        raise InputError(f"{what} is empty (all voxels are 0)")
    if float(array.max()) == float(array.min()):
        raise InputError(f"{what} is constant (all voxels are {float(array.min()):g}); is it the right file?")


def write_image(img: sitk.Image, path: str | os.PathLike) -> Path:
    """Written whole and checked complete (io.outputs.atomic_write): never a truncated image at `path`."""
    from .outputs import atomic_write

    return atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=True))


def lps_to_ras(points) -> np.ndarray:
    return np.asarray(points, float) * np.array([-1.0, -1.0, 1.0])
