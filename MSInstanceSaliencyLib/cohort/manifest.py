"""The inputs of a cohort: the manifest's cases (their ids, their image files), and the settings and
keys that identify every row (a case's key hashes its id, its files and the settings)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

REQUIRED_COLUMNS = ("case_id", "flair", "mprage")
OPTIONAL_COLUMNS = ("gt",)
COHORT_FORMAT = 1
MAPS = "maps"  # DIR/maps/<case id>/: a case id names a folder
MAX_LISTED_PROBLEMS = 20
MAX_NAME_BYTES = 255  # the longest file or folder name of ext4, APFS, NTFS and SMB shares


@dataclass
class CohortCase:
    """One manifest row: the case's id and its files (absolute; gt optional), with its CSV line."""

    case_id: str
    flair: Path
    mprage: Path | None
    gt: Path | None
    line: int
    names: dict = field(default_factory=dict)  # the file names as the manifest writes them
    wm: Path | None = None  # a white-matter map (the experiments' manifests only)

    def identity(self) -> dict:
        """What identifies the inputs in the resume keys: each file's name as written, size and mtime."""
        out = {}
        for what in ("flair", "mprage", "gt", "wm"):
            p = getattr(self, what)
            if p is not None:
                st = p.stat()
                out[what] = [self.names[what], st.st_size, st.st_mtime_ns]
        return out


def _safe_case_id(cid: str) -> str | None:
    """Why a case id cannot name a folder under DIR/maps, or None when it can."""
    if cid in (".", "..") or cid.startswith("."):
        return "must not start with '.'"
    bad = [c for c in cid if c in '/\\:*?"<>|' or ord(c) < 32]
    if bad:
        return f"must not contain {bad[0]!r} (it names the case's folder under {MAPS}/)"
    if cid != cid.strip():
        return "has leading or trailing spaces"
    if len(cid.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is {len(cid.encode('utf-8'))} bytes long, more than the {MAX_NAME_BYTES} a folder name may have (it names the case's folder under {MAPS}/)"
    return None


def _folder_identity(cid: str) -> str:
    """The name a case's folder has where names ignore case and Unicode normalisation (macOS, Windows,
    SMB shares): two ids with the same one would share maps/<id>."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", cid).casefold())


def _image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (missing, not a file, unreadable, not an image), or None. Reads
    the header only, so validating a large manifest stays quick."""
    import SimpleITK as sitk

    if not path.exists():
        return f"file not found: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable (permissions): {path}"
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["unknown reason"])[-1][:150]
        return f"not a readable image (NIfTI or NRRD expected): {path} ({first})"
    if r.GetDimension() not in (3, 4) or (r.GetDimension() == 4 and r.GetSize()[3] != 1):
        return f"not a 3D volume (size {r.GetSize()}): {path}"
    return None


def read_manifest(path, *, check_images: bool = True, optional=OPTIONAL_COLUMNS) -> list[CohortCase]:
    """The cases of a manifest CSV: columns case_id, flair, mprage (an empty cell: FLAIR-only models) and
    the `optional` ones (gt; the experiments also take wm, a white-matter map); file names relative to the manifest's folder (or absolute). Every problem is collected
    (missing or unknown columns, rows with another number of fields, empty or duplicate case ids, files
    missing or unreadable), then one InputError lists them with their CSV line numbers."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"manifest {p} does not exist" if not p.exists() else f"manifest {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the manifest {p}: {getattr(exc, 'strerror', None) or exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{p} line 1: not a CSV file ({exc})") from None
    if not header or not any(h.strip() for h in header):
        raise InputError(f"{p} is empty; a manifest has a header line case_id,flair,mprage[,gt] and one line per case")
    header = [h.strip() for h in header]
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    optional = tuple(optional)
    unknown = [h for h in header if h not in REQUIRED_COLUMNS + optional]
    twice = sorted({h for h in header if header.count(h) > 1})
    if missing:
        problems.append(f"line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if unknown:
        problems.append(f"line 1: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
                        f"(the columns are {', '.join(REQUIRED_COLUMNS)} and optionally {' and '.join(optional)})")
    if twice:
        problems.append(f"line 1: column{'s' if len(twice) > 1 else ''} {', '.join(twice)} given twice")
    if problems:
        raise InputError(f"{p}: " + "; ".join(problems))
    base = p.resolve().parent
    cases, seen = [], {}
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"line {reader.line_num}: not valid CSV ({exc})")
            break
        start, line = line + 1, reader.line_num
        if not row or not any(c.strip() for c in row):
            continue  # blank lines are allowed
        if len(row) != len(header):
            problems.append(f"line {start}: {len(row)} fields, the header has {len(header)}")
            continue
        cells = {h: c.strip() for h, c in zip(header, row)}
        cid = cells["case_id"]
        same = seen.get(_folder_identity(cid))
        if not cid:
            problems.append(f"line {start}: empty case_id")
        elif same is not None and same[0] == cid:
            problems.append(f"line {start}: case_id {cid!r} is already on line {same[1]}")
        elif same is not None:
            problems.append(f"line {start}: case_id {cid!r} differs from {same[0]!r} on line {same[1]} only by upper/lower case or "
                            f"Unicode normalisation; their folders under {MAPS}/ would be one on macOS, Windows and SMB shares")
        else:
            seen[_folder_identity(cid)] = (cid, start)
            why = _safe_case_id(cid)
            if why:
                problems.append(f"line {start}: case_id {cid!r} {why}")
        files, names = {}, {}
        for what in ("flair", "mprage") + optional:
            name = cells.get(what, "")
            if not name:
                if what == "flair":
                    problems.append(f"line {start}: empty flair")
                files[what] = None
                continue
            f = Path(name).expanduser()
            f = f if f.is_absolute() else base / f
            names[what] = name
            files[what] = f
            why = _image_problem(f) if check_images else (None if f.is_file() else f"file not found: {f}")
            if why:
                problems.append(f"line {start}: {what} {why}")
        cases.append(CohortCase(cid, files["flair"], files["mprage"], files.get("gt"), start, names, files.get("wm")))
    if not problems and not cases:
        problems.append("no cases (only a header)")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise InputError(f"{p} has {len(problems)} problem{'s' if len(problems) > 1 else ''}, nothing was started: "
                         + "; ".join(problems[:MAX_LISTED_PROBLEMS]) + more)
    return cases


def check_mprage(cases: list[CohortCase], channels, manifest) -> None:
    """Models that take an MPRAGE need one in every row (FLAIR-only models may leave the cell empty)."""
    if "mprage" not in channels:
        return
    empty = [c.line for c in cases if c.mprage is None]
    if empty:
        raise InputError(f"{manifest}: the model takes FLAIR and MPRAGE, but the mprage cell is empty on line"
                         f"{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty[:MAX_LISTED_PROBLEMS]))}; nothing was started")


# ----------------------------------------------------------------------------- settings and keys

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def case_key(settings: dict, case: CohortCase) -> str:
    return _digest({"settings": _digest(settings), "case_id": case.case_id, "files": case.identity()})


def lesion_key(ckey: str, lesion_id: int) -> str:
    return _digest({"case": ckey, "lesion_id": int(lesion_id)})


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class CohortConfig:
    """Everything a worker needs, and (`settings`) everything that shapes the rows."""

    out: str
    model: dict  # how workers load the model: path, device, channels, folds, mirroring
    channels: list
    threshold: float
    min_volume_mm3: float
    saliency: dict | None  # SmoothGrad settings of the lesion maps; None: no map is needed
    tp_probability: bool = True
    classifier: str | None = None
    features: bool = False
    maps: bool = False
    gt: bool = False  # the manifest gives ground truths: each lesion's kind, TP or FP
    peaks: bool = False  # and its map's peaks (when a map is computed anyway)
    split_above: int = 1000
    threads: int | None = None  # torch threads per worker (None: leave the worker's)
    settings: dict = field(default_factory=dict)


def row_settings(cfg: CohortConfig, identity: dict, classifier_sha256: str | None) -> dict:
    """The settings recorded in cohort.json and hashed into every key."""
    return {"format": COHORT_FORMAT, **identity, "channels": list(cfg.channels), "threshold": cfg.threshold,
            "min_volume_mm3": cfg.min_volume_mm3, "saliency": cfg.saliency, "tp_probability": cfg.tp_probability,
            "classifier_sha256": classifier_sha256 if cfg.tp_probability else None, "features": cfg.features,
            "maps": cfg.maps, "gt": cfg.gt, "peaks": cfg.peaks,
            "folds": cfg.model.get("folds"), "mirroring": cfg.model.get("mirroring")}
