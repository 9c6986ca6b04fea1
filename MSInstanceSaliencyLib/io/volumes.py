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

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D scalar image; InputError with the reason for anything else."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what} {p} is not a file")
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


# ----------------------------------------------------------------------------- complete files
# ITK's NIfTI reader fills a cut-off file with zeros without a word, so every image read is first
# checked against what its header promises: the bytes of voxel data (after decompression) must all
# be there and a compressed stream must end properly (CRC and length). NRRD and MetaImage are checked
# alike, although ITK's own readers refuse most truncated ones too. A header this check cannot parse
# is left to ITK, which then says why it cannot read the file.

_CHUNK = 1 << 20

_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
                     "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
                     "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"), 8),
}
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
                   "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


class _Truncated(Exception):
    pass


def check_complete(path: str | os.PathLike, what: str = "image") -> None:
    """InputError when the file holds less voxel data than its header promises, or when its
    compressed data do not decompress to their end (NIfTI, NRRD with raw/gzip/bzip2 encoding and
    detached .nhdr data files, MetaImage)."""
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti_complete(p)
        elif name.endswith((".nrrd", ".nhdr")):
            _check_nrrd_complete(p)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage_complete(p)
    except _Truncated as exc:
        raise InputError(f"{what} file {p} is truncated or corrupt: {exc}; was it copied or downloaded completely?") from None


def _decompressed_size(f, kind: str, skip: int = 0) -> int:
    """Bytes a compressed stream (an open binary file positioned at its start) decompresses to;
    _Truncated when it ends early or fails its checks."""
    import bz2
    import gzip
    import zlib

    try:
        if kind == "zlib":  # MetaImage: a zlib (or gzip) stream
            d = zlib.decompressobj(zlib.MAX_WBITS | 32)
            n = 0
            while chunk := f.read(_CHUNK):
                n += len(d.decompress(chunk))
                if d.eof:
                    break
            n += len(d.flush())
            if not d.eof:
                raise _Truncated("its compressed data end before the compressed stream does")
            return n
        stream = gzip.GzipFile(fileobj=f, mode="rb") if kind == "gzip" else bz2.BZ2File(f, mode="rb")
        n = 0
        while chunk := stream.read(_CHUNK):
            n += len(chunk)
        return n
    except EOFError:
        raise _Truncated("its compressed data end before the compressed stream does") from None
    except (OSError, zlib.error, ValueError) as exc:  # gzip.BadGzipFile is an OSError
        raise _Truncated(f"its compressed data cannot be decompressed ({str(exc).splitlines()[0][:120]})") from None


def _expect(have: int, need: int, unit: str = "bytes") -> None:
    if have < need:
        raise _Truncated(f"its header promises {need} {unit} (through the end of the voxel data), it holds only {have}")


def _check_nifti_complete(p: Path) -> None:
    import nibabel as nib

    with open(p, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        proxy = nib.load(str(p)).dataobj
        offset, shape, dtype = int(proxy.offset), tuple(proxy.shape), np.dtype(proxy.dtype)
    except Exception:  # nibabel cannot parse the header: ITK decides
        return
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if gzipped:
        with open(p, "rb") as f:
            have = _decompressed_size(f, "gzip")
    else:
        have = p.stat().st_size
    _expect(have, need)


def _nrrd_header(p: Path) -> tuple[dict, int] | None:
    """The fields of a NRRD header (lower-case keys) and its length in bytes, or None if it is not one."""
    fields = {}
    with open(p, "rb") as f:
        if not f.read(4) == b"NRRD":
            return None
        f.readline()
        while True:
            line = f.readline(1 << 16)
            if not line:  # a detached header may end without a blank line
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                break
            if text.startswith("#") or ":=" in text:
                continue
            key, sep, value = text.partition(": ")
            if sep:
                fields[key.strip().lower()] = value.strip()
        return fields, f.tell()


def _check_nrrd_complete(p: Path) -> None:
    parsed = _nrrd_header(p)
    if parsed is None:
        return
    fields, header_len = parsed
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        item = _NRRD_TYPE_BYTES[fields["type"].lower()]
        encoding = fields.get("encoding", "").lower()
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError):  # ITK decides
        return
    data_file = fields.get("data file", fields.get("datafile"))
    if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2") or line_skip or byte_skip < 0:
        return  # text encodings, skipped lines, data at the end of the file: ITK decides
    if data_file is not None:
        if data_file.startswith("LIST") or " " in data_file or "%" in data_file:
            return  # multi-file data sets: ITK decides
        source, start = (p.parent / data_file if not Path(data_file).is_absolute() else Path(data_file)), 0
        if not source.is_file():
            raise _Truncated(f"its data file {source} does not exist")
    else:
        source, start = p, header_len
    need = byte_skip + int(np.prod(sizes, dtype=np.int64)) * item
    if encoding == "raw":
        _expect(source.stat().st_size - start, need)
        return
    with open(source, "rb") as f:
        f.seek(start)
        _expect(_decompressed_size(f, "gzip" if encoding in ("gzip", "gz") else "bzip2"), need)


def _check_metaimage_complete(p: Path) -> None:
    fields = {}
    with open(p, "rb") as f:
        for _ in range(200):
            line = f.readline(1 << 16)
            if not line:
                return
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                return  # not a MetaImage header: ITK decides
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        else:
            return
        header_len = f.tell()
    try:
        n = int(np.prod([int(s) for s in fields["DimSize"].split()], dtype=np.int64))
        item = _MET_TYPE_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except (KeyError, ValueError):
        return
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        source, start = p, header_len
    elif data_file.startswith("LIST") or "%" in data_file or " " in data_file:
        return
    else:
        source, start = p.parent / data_file, 0
        if not source.is_file():
            raise _Truncated(f"its data file {source} does not exist")
    if header_size < 0:
        return
    need = n * item
    if fields.get("CompressedData", "False").lower() == "true":
        with open(source, "rb") as f:
            f.seek(start + header_size)
            _expect(_decompressed_size(f, "zlib"), need)
    else:
        _expect(source.stat().st_size - start - header_size, need)


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



# --- Outputs are complete before they are published ---------------------------------------------------
# A writer can return normally after writing only part of a file (SimpleITK's on a full disk); a killed
# one leaves a partial file. pipeline.OutputFolder checks every image it is about to publish.


def verify_complete(path: str | os.PathLike, what: str = "output", shown: str | os.PathLike | None = None) -> None:
    """InputError("{what} {path} is truncated: ...") unless the image file holds every byte its header
    promises (the tests of check_complete: NIfTI, NRRD, MetaImage, compressed data to their end). Stricter
    than check_complete, for files msis has just written: an empty file, or a NIfTI header nibabel cannot
    read, is truncated too. `shown` is the name in the message (default: path)."""
    p = Path(path)
    name = p if shown is None else shown
    try:
        if p.stat().st_size == 0:
            raise _Truncated("it is empty")
        if p.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            try:
                nib.load(str(p))
            except Exception:  # noqa: BLE001 - a header cut short or damaged, in whichever way nibabel notices
                raise _Truncated("its NIfTI header is incomplete or damaged") from None
            _check_nifti_complete(p)
        elif p.name.lower().endswith((".nrrd", ".nhdr")):
            _check_nrrd_complete(p)
        elif p.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage_complete(p)
    except _Truncated as exc:
        raise InputError(f"{what} {name} is truncated: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror or exc}") from None
