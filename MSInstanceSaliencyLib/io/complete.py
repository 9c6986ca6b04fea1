"""Whether an image file holds every byte its header promises: inputs before they are read (check_complete)
and outputs before they are published (verify_complete). Apart from io.volumes, so that io.outputs and
io.volumes can both use it (io.volumes writes through io.outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError


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
