"""`msis cohort`: segment and explain every case of a CSV manifest on dask.distributed.

Work units: one task per case (read, prepare, segment; its state, the prepared image and the lesion
labels, stays on the worker as a future), then one task per lesion that depends on it, so that dask
runs a case's lesions where its image is (data locality). A confluent lesion is split into parts of
Ω, each a task (`saliency.smoothgrad.smoothgrad_part`), and one task combines them: the signed maximum of Eq. 3
is associative, so the combined map is the one-worker map. The model is loaded once per worker
process (a worker plugin, and a per-process cache for workers that join later).

Results: DIR/lesions.parquet/ and DIR/cases.parquet/ are append-only Parquet dataset folders written
by the client alone, as results arrive: each batch goes to a hidden temporary file, fsync, then
os.replace to part-<uuid>.parquet, so a kill at any moment leaves only whole files (readers skip
hidden names). Every row has a `key`: a hash of the case id, its input files (name, size, mtime),
the model's sha256 and every setting that shapes the row (lesion rows add the lesion id). A case row
is written only after all of its lesion rows are durable, so a case with a row is finished; a re-run
skips finished cases, and of unfinished ones the lesions whose keys are there; a case whose inputs changed
is refused once finished, else done again (its earlier rows dropped). DIR/cohort.json records the
settings, written once the cluster is up (it marks DIR as a cohort's: without it DIR must be empty); a
re-run with other settings is refused. DIR/summary.csv is rewritten at the end. Every file goes through
io.outputs.write_output_file (complete, then renamed; never over a file msis did not write).

dask is imported inside functions, so `msis` starts light and the Slicer side never needs it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

REQUIRED_COLUMNS = ("case_id", "flair", "mprage")
OPTIONAL_COLUMNS = ("gt",)
COHORT_FORMAT = 1
SETTINGS_FILE = "cohort.json"
LESIONS = "lesions.parquet"
CASES = "cases.parquet"
SUMMARY = "summary.csv"
MAPS = "maps"
SUMMARY_HEADER = "case_id,lesions,lesions_failed,n_tp,n_fp,n_fn"  # the first columns of summary.csv
LOCK = ".cohort.lock"
PRIORITY_STEP = 10**7  # dask priorities: one band per case (higher runs first)
FLUSH_SECONDS = 10.0  # lesion rows are written at least this often (and whenever a case completes)
MAX_LISTED_PROBLEMS = 20
MAX_NAME_BYTES = 255  # the longest file or folder name of ext4, APFS, NTFS and SMB shares
# Columns that differ between two runs of the same work (compare rows without them)
TIMING_COLUMNS = ("seconds", "segment_seconds", "worker")


def need_cohort_packages():
    missing = [m for m in ("distributed", "pyarrow", "pandas") if _find_spec(m) is None]
    if missing:
        raise InputError(f"msis cohort needs {', '.join(missing)}, not installed here: pip install 'MSInstanceSaliencyLib[cohort]' "
                         "(dask.distributed, pyarrow, pandas; bokeh for --dashboard)")


def _find_spec(name):
    import importlib.util

    return importlib.util.find_spec(name)


# ----------------------------------------------------------------------------- manifest

@dataclass
class CohortCase:
    """One manifest row: the case's id and its files (absolute; gt optional), with its CSV line."""

    case_id: str
    flair: Path
    mprage: Path | None
    gt: Path | None
    line: int
    names: dict = field(default_factory=dict)  # the file names as the manifest writes them

    def identity(self) -> dict:
        """What identifies the inputs in the resume keys: each file's name as written, size and mtime."""
        out = {}
        for what in ("flair", "mprage", "gt"):
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


def read_manifest(path, *, check_images: bool = True) -> list[CohortCase]:
    """The cases of a manifest CSV: columns case_id, flair, mprage (an empty cell: FLAIR-only models) and
    optionally gt; file names relative to the manifest's folder (or absolute). Every problem is collected
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
    unknown = [h for h in header if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    twice = sorted({h for h in header if header.count(h) > 1})
    if missing:
        problems.append(f"line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if unknown:
        problems.append(f"line 1: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
                        f"(the columns are {', '.join(REQUIRED_COLUMNS)} and optionally gt)")
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
        for what in ("flair", "mprage", "gt"):
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
        cases.append(CohortCase(cid, files["flair"], files["mprage"], files["gt"], start, names))
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


# ----------------------------------------------------------------------------- table schemas

def lesion_columns(cfg: CohortConfig) -> list[tuple[str, str]]:
    """(name, type) of the lesion table's columns for these settings: fixed per output folder."""
    from .segmentation.instances import TABLE_COLUMNS

    cols = [("key", "string"), ("case_key", "string"), ("case_id", "string"), ("lesion_id", "int64")]
    for c in TABLE_COLUMNS[1:]:
        if c == "tp_probability":
            continue
        cols.append((c, "int64" if c == "voxels" or c.startswith("bbox_") else "float64"))
    if cfg.saliency is not None:
        cols += [("omega_voxels", "int64"), ("omega_work", "int64"), ("backward_passes", "int64"), ("parts", "int64")]
    if cfg.tp_probability:
        cols.append(("tp_probability", "float64"))
    if cfg.gt:
        cols.append(("kind", "string"))
    if cfg.peaks:
        for c in cfg.channels:
            cols += [(f"{c}_max", "float64"), (f"{c}_min", "float64")]
        for c in cfg.channels:
            for where in ("inside", "ring"):
                cols += [(f"{c}_{where}_positive", "float64"), (f"{c}_{where}_negative", "float64")]
    if cfg.features:
        from .classifier.radiomics import default_feature_names

        cols += [(n, "float64") for n in default_feature_names()]
    if cfg.maps:
        cols += [(f"map_{c}", "string") for c in cfg.channels]
    cols += [("error", "string"), ("seconds", "float64"), ("worker", "string")]
    return cols


CASE_COLUMNS = [("key", "string"), ("case_id", "string"), ("flair", "string"), ("mprage", "string"), ("gt", "string"),
                ("n_lesions", "int64"), ("lesions_failed", "int64"), ("n_tp", "int64"), ("n_fp", "int64"), ("n_fn", "int64"),
                ("n_gt", "int64"), ("warnings", "string"), ("error", "string"), ("segment_seconds", "float64"),
                ("seconds", "float64"), ("worker", "string")]


def _schema(columns):
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
    return pa.schema([(n, types[t]) for n, t in columns])


class ResultTable:
    """An append-only Parquet dataset folder: whole part files only, each key at most once.

    Written by one process (the client, holding DIR's lock). `append` writes a batch to a hidden
    temporary file, fsyncs it, renames it to part-<uuid>.parquet and fsyncs the folder; readers
    (pyarrow, pandas) skip names starting with '.', so a kill leaves either the whole part or none."""

    def __init__(self, folder: Path, columns):
        self.folder = Path(folder)
        self.columns = list(columns)
        self.schema = _schema(self.columns)
        self.keys: set = set()

    def open(self) -> "ResultTable":
        """Create the folder (with an empty part holding the schema, so it always opens) or read its keys."""
        import pyarrow.parquet as pq

        new = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".part-*"):  # a killed writer's unfinished batch
            stale.unlink(missing_ok=True)
        parts = sorted(self.folder.glob("part-*.parquet"))
        if new or not parts:
            self._write([])
            return self
        for part in parts:
            try:
                schema = pq.read_schema(part)
            except Exception as exc:  # noqa: BLE001 - a damaged file, whatever pyarrow says
                raise InputError(f"{part} is not a readable Parquet file ({str(exc)[:120]}); msis writes whole files only, "
                                 "so it was changed by something else: move it away or use another --out") from None
            if schema.names != self.schema.names:
                raise InputError(f"{part} has other columns than this run writes (made by another msis version or other "
                                 "settings?); use another --out")
            self.keys.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
        return self

    def read(self, columns=None):
        """The table as a pandas DataFrame (every part)."""
        import pyarrow.dataset as ds

        return ds.dataset(self.folder, format="parquet", schema=self.schema).to_table(columns=columns).to_pandas()

    def append(self, rows: list[dict]) -> int:
        """Write the rows whose keys are new (also new within `rows`); returns how many were written."""
        fresh, seen = [], set()
        for r in rows:
            if r["key"] not in self.keys and r["key"] not in seen:
                seen.add(r["key"])
                fresh.append(r)
        if fresh:
            self._write(fresh)
            self.keys.update(seen)
        return len(fresh)

    def drop(self, column: str, values) -> None:
        """Remove the rows whose `column` is in `values` (rows of inputs that are done again): a part holding
        some is replaced in one step by the part without them, or removed when nothing is left of it."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from .io.outputs import fsync_folder

        values = pa.array(sorted(values), pa.string())
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            gone = pc.is_in(table.column(column), value_set=values)
            if not pc.any(gone).as_py():
                continue
            self.keys -= set(table.filter(gone).column("key").to_pylist())
            kept = table.filter(pc.invert(gone))
            if kept.num_rows:
                self._put(kept, part, replace=True)
            else:
                part.unlink()
                fsync_folder(self.folder)
        if not any(self.folder.glob("part-*.parquet")):
            self._write([])  # the folder keeps a part with the schema, so that it always opens

    def _write(self, rows):
        import pyarrow as pa

        names = [n for n, _ in self.columns]
        table = pa.Table.from_pylist([{n: _cell(r.get(n)) for n in names} for r in rows], schema=self.schema)
        self._put(table, self.folder / f"part-{uuid.uuid4().hex}.parquet")

    def _put(self, table, path: Path, replace: bool = False) -> None:
        """Through io.outputs.write_output_file, as every output: a hidden .part-<uuid>.parquet.msis-* until whole
        (readers skip it, open() removes it), then renamed; a full disk is one line naming the part."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .io.outputs import write_output_file

        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        write_output_file(path, "--out", lambda tmp: Path(tmp).write_bytes(data), replace_own=replace, ours=lambda _: replace)


def _cell(v):
    """Row values as Parquet takes them: NumPy scalars to Python, NaN kept, '' kept."""
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------- worker side

_WORKER: dict = {}  # per worker process: the loaded model, classifier, feature extractor


def _worker_device(model_cfg: dict):
    """The device of this worker: cuda:<worker number modulo the GPUs> when several are visible."""
    from .models.device import resolve_device

    dev = resolve_device(model_cfg.get("device", "auto"))
    if dev.type == "cuda" and dev.index is None:
        import torch

        n = torch.cuda.device_count()
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            name = 0
        if n > 1 and isinstance(name, int):
            dev = torch.device(f"cuda:{name % n}")
    return dev


def worker_model(model_cfg: dict, threads: int | None = None):
    """(model, device) of this worker process, loaded once (keyed by how it is loaded)."""
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if _WORKER.get("model_key") != key:
        import torch

        from .models.loading import load_model

        if threads:
            torch.set_num_threads(int(threads))
        dev = _worker_device(model_cfg)
        _WORKER["model"] = load_model(model_cfg.get("path"), device=dev, channels=model_cfg.get("channels"),
                                      folds=model_cfg.get("folds"), mirroring=model_cfg.get("mirroring", True))
        _WORKER["device"] = dev
        _WORKER["model_key"] = key
    return _WORKER["model"], _WORKER["device"]


def _worker_classifier(path, model):
    if _WORKER.get("classifier_path") != path:
        from .classifier.scoring import load_classifier

        _WORKER["classifier"] = load_classifier(path, model=model)
        _WORKER["classifier_path"] = path
    return _WORKER["classifier"]


def _worker_extractor():
    if "extractor" not in _WORKER:
        from .classifier.radiomics import make_extractor

        _WORKER["extractor"] = make_extractor()
    return _WORKER["extractor"]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid{os.getpid()}"


def model_plugin(model_cfg: dict, threads: int | None):
    """A worker plugin that loads the model when a worker starts (on all workers at once, before the
    first task), so each worker process loads it once; tasks take it from the same per-process cache,
    which also serves workers that join later. Defined here so that dask is imported only when used."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class MSISModel(WorkerPlugin):
        name = "msis-model"
        idempotent = False

        def __init__(self, cfg, n_threads):
            self.cfg, self.n_threads = cfg, n_threads

        def setup(self, worker):
            worker_model(self.cfg, self.n_threads)

    return MSISModel(model_cfg, threads)


@dataclass
class CaseState:
    """A segmented case, kept on its worker while its lesions are computed."""

    case_id: str
    prepared: object = None
    labels: np.ndarray | None = None
    table: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # lesion id -> (Ω voxels on the network grid, voxels the max runs over)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    error: str | None = None


def _omega_work(omega, saliency: dict) -> int:
    """Backward passes per noisy copy: the Ω voxels the signed max runs over, or 1 for the mean."""
    from .saliency.smoothgrad import omega_work

    if saliency.get("aggregation", "max") != "max":
        return 1
    return omega_work(omega, saliency.get("max_omega_voxels"), int(saliency.get("seed", 0)))


def case_task(case: CohortCase, cfg: CohortConfig) -> CaseState:
    """Read, prepare and segment a case; with a ground truth, classify its lesions TP/FP. Failures that
    are the case's (an image that cannot be read, a grid mismatch) become its error, not the run's."""
    from .segmentation.evaluation import classify_lesions
    from .segmentation.pipeline import segment
    from .io.volumes import mask_from_image, read_image, same_grid

    t0 = time.time()
    state = CaseState(case.case_id, worker=_worker_name())
    try:
        model, dev = worker_model(cfg.model, cfg.threads)
        flair = read_image(case.flair, "FLAIR")
        mprage = read_image(case.mprage, "MPRAGE") if case.mprage is not None else None
        res = segment(flair, mprage, model, device=dev, threshold=cfg.threshold, min_volume_mm3=cfg.min_volume_mm3)
        state.prepared, state.labels, state.table = res.prepared, res.labels, res.table
        state.warnings = list(res.prepared.warnings)
        state.counts = {"n_lesions": len(res.table)}
        if case.gt is not None:
            gt_img = read_image(case.gt, "ground truth")
            if not same_grid(gt_img, res.reference):
                raise InputError(f"the ground truth {case.gt} is not on the {'MPRAGE' if mprage is not None else 'FLAIR'} grid")
            c = classify_lesions(res.labels, mask_from_image(gt_img))
            state.kinds = {**{i: "TP" for i in c["tp"]}, **{i: "FP" for i in c["fp"]}}
            state.counts.update(n_tp=len(c["tp"]), n_fp=len(c["fp"]), n_fn=len(c["fn"]), n_gt=c["n_gt"])
        if cfg.saliency is not None:
            for r in res.table:
                om = res.prepared.to_network(res.labels == r["lesion_id"])
                state.work[r["lesion_id"]] = (int(np.count_nonzero(om)), _omega_work(om, cfg.saliency))
    except Exception as exc:  # noqa: BLE001 - recorded in the case's row; the run goes on
        if _transient(exc):
            raise
        state.error = _error_text(exc)
    state.seconds = time.time() - t0
    return state


def case_info(state: CaseState) -> dict:
    """The small part of a case's state the client needs (the arrays stay on the worker)."""
    return {"case_id": state.case_id, "table": state.table, "work": state.work, "counts": state.counts, "warnings": state.warnings,
            "seconds": state.seconds, "worker": state.worker, "error": state.error}


def _transient(exc) -> bool:
    """Failures of the machine, not of the case or lesion (memory, the disk): raised, so that dask reports
    the task as failed, nothing is recorded and a re-run does it again; anything else is the row's error."""
    return isinstance(exc, (MemoryError, OSError)) or "out of memory" in str(exc).lower()


def _error_text(exc) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def _smoothgrad_kwargs(saliency: dict) -> dict:
    return dict(n_samples=int(saliency["n_samples"]), sigma=float(saliency["sigma"]), sigma_mode=saliency["sigma_mode"],
                context=saliency["context"], seed=int(saliency.get("seed", 0)), max_omega_voxels=saliency.get("max_omega_voxels"))


def lesion_task(state: CaseState, lesion_id: int, cfg: CohortConfig) -> dict:
    """The row of one lesion, its map computed in one piece."""
    from .saliency.smoothgrad import smoothgrad

    t0 = time.time()
    try:
        maps = None
        if cfg.saliency is not None:
            model, dev = worker_model(cfg.model, cfg.threads)
            omega = state.prepared.to_network(state.labels == lesion_id)
            maps = smoothgrad(model, state.prepared.image, omega, aggregation=cfg.saliency["aggregation"], device=dev,
                              **_smoothgrad_kwargs(cfg.saliency))
        return _lesion_row(state, lesion_id, maps, cfg, t0, parts=1)
    except Exception as exc:  # noqa: BLE001 - the lesion's row says why; the run goes on
        if _transient(exc):
            raise
        return _error_row(state, lesion_id, cfg, exc, t0)


def part_task(state: CaseState, lesion_id: int, part: int, n_parts: int, cfg: CohortConfig):
    """One part of a split lesion's map: the signed max over a part of Ω (saliency.smoothgrad_part);
    an error is returned, not raised, so the combining task can put it in the lesion's row."""
    from .saliency.smoothgrad import smoothgrad_part

    t0 = time.time()
    try:
        model, dev = worker_model(cfg.model, cfg.threads)
        omega = state.prepared.to_network(state.labels == lesion_id)
        return smoothgrad_part(model, state.prepared.image, omega, part=part, n_parts=n_parts, device=dev,
                               **_smoothgrad_kwargs(cfg.saliency)), time.time() - t0
    except Exception as exc:  # noqa: BLE001
        if _transient(exc):
            raise
        return exc, time.time() - t0


def combine_task(state: CaseState, lesion_id: int, parts: list, cfg: CohortConfig) -> dict:
    """The row of a split lesion: its parts combined (exactly the one-piece map), then as lesion_task."""
    from .saliency.smoothgrad import combine_parts

    t0 = time.time()
    spent = sum(s for _, s in parts)
    failed = [p for p, _ in parts if isinstance(p, Exception)]
    try:
        if failed:
            raise failed[0]
        maps = combine_parts([p for p, _ in parts])
        return _lesion_row(state, lesion_id, maps, cfg, t0 - spent, parts=len(parts))
    except Exception as exc:  # noqa: BLE001
        if _transient(exc):
            raise
        return _error_row(state, lesion_id, cfg, exc, t0 - spent)


def _base_row(state: CaseState, lesion_id: int, cfg: CohortConfig) -> dict:
    row = dict(next(r for r in state.table if r["lesion_id"] == lesion_id))
    row.pop("tp_probability", None)
    row.update(case_id=state.case_id, lesion_id=int(lesion_id), worker=_worker_name())
    if cfg.saliency is not None:
        n_omega, work = state.work[lesion_id]
        row.update(omega_voxels=n_omega, omega_work=work, backward_passes=int(cfg.saliency["n_samples"]) * work)
    if cfg.gt:
        row["kind"] = state.kinds.get(lesion_id)
    return row


def _error_row(state, lesion_id, cfg, exc, t0) -> dict:
    row = _base_row(state, lesion_id, cfg)
    row.update(error=_error_text(exc), seconds=time.time() - t0)
    return row


def _lesion_row(state: CaseState, lesion_id: int, maps, cfg: CohortConfig, t0: float, parts: int) -> dict:
    """TP probability, features, peaks and map files of a lesion from its maps (C, X, Y, Z) on the network grid."""
    row = _base_row(state, lesion_id, cfg)
    if maps is not None:
        prepared = state.prepared
        omega = state.labels == lesion_id
        ref = [prepared.to_reference(maps[i]) if not prepared.grid.same else maps[i] for i in range(maps.shape[0])]
        by_channel = dict(zip(prepared.channels, ref))
        row["parts"] = parts
        if cfg.tp_probability or cfg.features:
            from .classifier.radiomics import saliency_features

            model, _ = worker_model(cfg.model, cfg.threads)
            feats = saliency_features(by_channel[cfg.saliency.get("channel", "flair")], omega, prepared.spacing, extractor=_worker_extractor())
            if cfg.features:
                row.update(feats)
            if cfg.tp_probability:
                clf = _worker_classifier(cfg.classifier, model)
                row["tp_probability"] = float(clf.predict_proba(clf.features_to_matrix([feats]))[0, 1])
        if cfg.peaks:
            from .research.experiments import modality_contribution

            stacked = np.stack(ref)
            for c, m in by_channel.items():
                row[f"{c}_max"], row[f"{c}_min"] = float(m.max()), float(m.min())
            row.update(modality_contribution(stacked, omega, prepared.channels))
        if cfg.maps:
            for c, m in by_channel.items():
                row[f"map_{c}"] = _write_map(cfg.out, state.case_id, lesion_id, c, m, prepared.reference)
    row["seconds"] = time.time() - t0
    return row


MAP_NOTE = "msis cohort saliency map"  # in each map's NIfTI header (descrip): a map there is msis's to replace


def map_name(lesion_id: int, channel: str) -> str:
    return f"lesion{int(lesion_id)}_smoothgrad_{channel}.nii.gz"


def is_cohort_map(path) -> bool:
    """Whether an image file is a map `msis cohort` wrote (its header carries MAP_NOTE)."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
        return r.HasMetaDataKey("ITK_FileNotes") and r.GetMetaData("ITK_FileNotes") == MAP_NOTE
    except RuntimeError:
        return False


def _write_map(out: str, case_id: str, lesion_id: int, channel: str, array, reference) -> str:
    """DIR/maps/<case>/lesion<id>_smoothgrad_<channel>.nii.gz, by the checked atomic write of every output
    (complete, then renamed; never over a file msis did not write); returns its path relative to DIR.
    A re-run writes the same map again. A map that cannot be written is the machine's failure (the disk),
    not the lesion's: it is raised as OSError, so nothing is recorded and a re-run does the lesion again."""
    import SimpleITK as sitk

    from .io.outputs import write_output_file
    from .io.volumes import image_from_array

    name = map_name(lesion_id, channel)
    img = image_from_array(np.asarray(array, np.float32), reference=reference)
    img.SetMetaData("ITK_FileNotes", MAP_NOTE)
    try:
        write_output_file(Path(out) / MAPS / case_id / name, "--out", lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=True),
                          ours=is_cohort_map)
    except InputError as exc:
        raise OSError(str(exc)) from None
    return f"{MAPS}/{case_id}/{name}"


def _check_map_files(out: Path, cases: list[CohortCase], channels) -> None:
    """Before the work: the maps of the cases to do can be written (a user's file under a map's name is
    refused; a case's path must fit the system's limit)."""
    longest = f".{map_name(10**9, max(channels, key=len))}.msis-xxxxxxxx.nii.gz"  # its temporary name, lesion ids of 10 digits
    try:
        path_max = os.pathconf(out, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):
        path_max = 260 if os.name == "nt" else 4096
    long_paths = [c for c in cases if len(os.fsencode(str(out / MAPS / c.case_id / longest))) >= path_max]
    if long_paths:
        raise InputError(f"the paths of the maps of case{'s' if len(long_paths) > 1 else ''} on line"
                         f"{'s' if len(long_paths) > 1 else ''} {', '.join(str(c.line) for c in long_paths[:MAX_LISTED_PROBLEMS])} "
                         f"would be longer than the {path_max} bytes a path may have here; use shorter case ids or a shorter --out")
    theirs = []
    for c in cases:
        folder = out / MAPS / c.case_id
        if folder.exists() and not folder.is_dir():
            theirs.append(folder)
        elif folder.is_dir():
            theirs += [f for f in folder.iterdir() if f.name.startswith("lesion") and f.name.endswith(tuple(f"_smoothgrad_{ch}.nii.gz" for ch in channels))
                       and not is_cohort_map(f)]
    if theirs:
        raise InputError(f"{theirs[0]} already exists and was not written by msis" + (f" (and {len(theirs) - 1} more)" if len(theirs) > 1 else "")
                         + "; move it, or give a new --out")


# ----------------------------------------------------------------------------- client side

def n_parts_for(work: int, split_above: int | None) -> int:
    """Parts of about split_above Ω voxels for a lesion whose max runs over `work` voxels (1: not split)."""
    if not split_above or work <= split_above:
        return 1
    return int(math.ceil(work / split_above))


def check_settings_file(out: Path, settings: dict) -> bool:
    """Whether DIR/cohort.json pins the settings already (a run made rows there); they must be these."""
    f = out / SETTINGS_FILE
    if f.exists() or f.is_symlink():
        try:
            earlier = json.loads(f.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{f} is not a cohort settings file written by msis; use another --out") from None
        if earlier != json.loads(json.dumps(settings, default=str)):
            keys = [k for k in {**earlier, **settings} if earlier.get(k) != settings.get(k)]
            diff = "; ".join(f"{k} {_short(earlier.get(k))} (in {out}) vs {_short(settings.get(k))} (now)" for k in keys)
            raise InputError(f"{out} holds results made with other settings: {diff}. Run again with those settings to resume, "
                             "or give a new --out")
        return True
    return False


def pin_settings(out: Path, settings: dict) -> None:
    """Write DIR/cohort.json: from now on the folder is a cohort's, and its settings are these."""
    from .io.outputs import write_output_file

    text = json.dumps({"msis_cohort": COHORT_FORMAT, "settings": settings}, indent=2, default=str) + "\n"
    write_output_file(out / SETTINGS_FILE, "--out", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), replace_own=False)


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text[:13] + "..." if isinstance(v, str) and len(v) == 64 else text


def _check_out(out: Path) -> None:
    """--out is a new or empty folder, or one a cohort run pinned (cohort.json, written before any other
    output): any other file there, even under the name of an output, is the user's."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not (out / SETTINGS_FILE).exists():
        others = [p.name for p in out.iterdir() if p.name != LOCK]
        if others:
            raise InputError(f"--out {out} is a folder with other files in it ({', '.join(sorted(others)[:3])}) but no {SETTINGS_FILE}; "
                             "give a new folder (or one a `msis cohort` run wrote)")


class _Lock:
    """DIR/.cohort.lock (filelock: an OS lock that dies with its process): one writer per folder."""

    def __init__(self, out: Path):
        self.path = out / LOCK

    def __enter__(self):
        from filelock import FileLock, Timeout

        self.lock = FileLock(str(self.path))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise InputError(f"{self.path.parent} is being written by another msis cohort run; wait for it to end or use another --out") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


LOOPBACK = "127.0.0.1"  # a local cluster listens here only: its pages and ports show case ids
SCHEDULER_TIMEOUT = 10  # seconds to reach a --scheduler and hear its handshake, then to connect the client
SCHEDULER_FORM = "a scheduler's address looks like tcp://10.1.2.3:8786: its port (8786 by default), not its dashboard's (8787)"
MAX_HANDSHAKE_BYTES = 1 << 20  # a dask scheduler's first message (its handshake) is some 100 bytes


def _scheduler_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a --scheduler address, tcp://HOST:PORT or HOST:PORT; any other form is refused."""
    from distributed.comm.addressing import parse_host_port

    scheme, sep, location = address.strip().partition("://")
    if not sep:
        scheme, location = "tcp", address.strip()
    if scheme == "tls":
        raise InputError(f"--scheduler {address}: a tls:// scheduler needs the cluster's certificates, which msis cohort does not take; "
                         f"give one reached over tcp:// ({SCHEDULER_FORM})")
    if scheme != "tcp":
        raise InputError(f"--scheduler {address}: msis cohort reaches schedulers over tcp:// only; {SCHEDULER_FORM}")
    try:
        host, port = parse_host_port(location)
    except (ValueError, TypeError):
        host, port = "", 0
    if not host or not 0 < int(port) < 65536:
        raise InputError(f"--scheduler {address} is not a scheduler address; {SCHEDULER_FORM}")
    return host, int(port)


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> str:
    """The tcp:// address of the dask scheduler at `address`, after making sure, within `timeout` seconds,
    that one answers there (InputError otherwise, before any work starts). A dask scheduler speaks first:
    it sends its handshake, 8 bytes of length and a small message, as a connection opens. dask's own
    client waits for that handshake without a time limit and trusts the length, so an HTTP server (a
    dashboard), a silent listener or another protocol would hang it or make it allocate exabytes."""
    import socket
    import struct

    host, port = _scheduler_host_port(address)
    deadline = time.monotonic() + timeout

    def refuse(why):
        raise InputError(f"--scheduler {address}: {why}; {SCHEDULER_FORM}. Start the cluster first (docs/COHORTS.md), or leave "
                         "--scheduler out for a local one")

    def receive(sock, n):
        data = b""
        while len(data) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(n - len(data))
            if not chunk:
                refuse("the server there closed the connection without a dask handshake, so it is not a dask scheduler")
            data += chunk
        return data

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        refuse(f"no answer within {timeout:g} s (the host is unreachable, or a firewall drops the connection)")
    except socket.gaierror as exc:
        refuse(f"unknown host {host!r} ({exc.strerror})")
    except OSError as exc:
        refuse(f"cannot connect ({exc.strerror or exc})")
    try:
        with sock:
            (length,) = struct.unpack("Q", receive(sock, 8))  # dask's frame header: native unsigned 64 bits
            if not 0 < length <= MAX_HANDSHAKE_BYTES:
                refuse("the server there answered, but not as a dask scheduler does (an HTTP server, a dashboard or another service?)")
            receive(sock, length)
    except socket.timeout:
        refuse(f"something listens there but sent no dask handshake within {timeout:g} s (an HTTP server, such as a dask dashboard?)")
    except OSError as exc:
        refuse(f"the connection failed before a dask handshake ({exc.strerror or exc})")
    return f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}"


def _start_client(scheduler, n_workers=None, *, gpu=False, dashboard=False):
    """(dask Client, LocalCluster or None): on `scheduler` (an existing cluster's address) or on a
    LocalCluster of n_workers processes of one dask thread each (torch threads are set by the model
    plugin), with one GPU resource each when `gpu`. A local cluster listens on the loopback interface
    only, and serves its dashboard (127.0.0.1:8787, or a free port) only when `dashboard`."""
    import logging

    from distributed import Client, LocalCluster

    if scheduler:
        scheduler = check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever dask met there, the address is the problem: one line
            raise InputError(f"--scheduler {scheduler}: cannot connect a dask client ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}); start the cluster first (docs/COHORTS.md) or leave "
                             "--scheduler out for a local one") from None
        return client, None
    # the case ids are in the task keys that every dask HTTP page shows: without --dashboard the scheduler's and the
    # workers' HTTP servers (dask always starts them) serve no page at all, on a free loopback port
    kw = dict(n_workers=n_workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR, host=LOOPBACK,
              dashboard_address=f"{LOOPBACK}:8787" if dashboard else None,
              scheduler_kwargs=None if dashboard else {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"})
    if gpu:
        kw["resources"] = {"GPU": 1}
    import dask

    # dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which turns off glibc's adaptive mmap
    # threshold: every activation buffer of a backward pass is then mmap'd and unmapped again, and a
    # pass took about 2x as long (profiled by hand, demo model, this CPU). Workers keep the default.
    config = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    if not dashboard:
        config.update({"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []})
    client = cluster = None
    try:
        with dask.config.set(config), _sigint_blocked_in_new_threads():
            cluster = LocalCluster(**kw)
            client = Client(cluster)
    except BaseException:  # a Ctrl-C held back while they started arrives as the block ends: stop them again
        _close(client, cluster)
        raise
    return client, cluster


@contextlib.contextmanager
def _sigint_blocked_in_new_threads():
    """Ctrl-C in a terminal signals the whole process group, so local dask worker processes would print
    tracebacks of their own beside the client's one line. Threads inherit the signal mask of the thread
    that creates them, and processes that of the thread that starts them: dask's threads created within
    (its event loop, which starts the workers, now and when it restarts one) keep SIGINT blocked, and so
    do the workers. This thread unblocks it at the end, and gets a Ctrl-C that came meanwhile then."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no process groups' SIGINT)
        yield
        return
    from multiprocessing import resource_tracker

    # whichever thread starts multiprocessing's resource tracker unblocks SIGINT in itself (dask's loop would):
    # start it here, before
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _workers_have_gpus(client) -> bool:
    return any((w.get("resources") or {}).get("GPU") for w in client.scheduler_info().get("workers", {}).values())


def run_cohort(manifest, out, cfg: CohortConfig, cases: list[CohortCase], *, workers: int | None = None, scheduler: str | None = None,
               dashboard: bool = False, log=None, progress=None) -> dict:
    """Run (or resume) a cohort; returns {"cases", "lesions_written", "cases_written", "skipped_cases", ...}.
    The manifest's cases come validated (read_manifest); cfg.settings is what cohort.json records."""
    from .io.outputs import check_output_file

    log = log or (lambda m: print(m, file=sys.stderr))
    if cfg.saliency is not None:  # the checks of msis explain and the worker, before anything is written
        from .saliency.explain import check_explain_args

        check_explain_args("smoothgrad", **{k: cfg.saliency[k] for k in ("n_samples", "sigma", "sigma_mode", "aggregation", "context",
                                                                          "seed", "max_omega_voxels") if k in cfg.saliency})
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        pinned = check_settings_file(out, cfg.settings)
        for pattern in ("*/.tmp-*", "*/.lesion*_smoothgrad_*.msis-*"):  # maps a killed run was writing
            for stale in (out / MAPS).glob(pattern):
                stale.unlink(missing_ok=True)
        lesions = ResultTable(out / LESIONS, lesion_columns(cfg))
        cases_t = ResultTable(out / CASES, CASE_COLUMNS)
        if pinned:
            lesions.open()
            cases_t.open()
        keys = {c.case_id: case_key(cfg.settings, c) for c in cases}
        _drop_changed_inputs(out, lesions, cases_t, keys)
        todo = [c for c in cases if keys[c.case_id] not in cases_t.keys]
        check_output_file(out / SUMMARY, "--out", ours=is_cohort_summary)  # before the work, not after
        if cfg.maps:
            _check_map_files(out, todo, cfg.channels)

        def pin():
            """Called once the cluster is up: a start that fails leaves the folder free for other settings."""
            if not pinned:
                pin_settings(out, cfg.settings)  # first: the folder is then a cohort's (see _check_out)
                lesions.open()
                cases_t.open()

        stats = {"cases": len(cases), "skipped_cases": len(cases) - len(todo), "lesions_written": 0, "cases_written": 0,
                 "lost": []}
        if todo:
            log(f"{len(todo)} of {len(cases)} cases to do" + (f" ({len(cases) - len(todo)} finished earlier, skipped)" if len(todo) < len(cases) else ""))
            _run(todo, keys, cfg, lesions, cases_t, stats, workers=workers, scheduler=scheduler, dashboard=dashboard, log=log,
                 progress=progress, pin=pin)
        else:
            log(f"all {len(cases)} cases are finished in {out}; nothing to do")
        stats["summary"] = str(write_summary(out, lesions, cases_t, [c.case_id for c in cases], cfg))
    return stats


def _drop_changed_inputs(out, lesions, cases_t, keys) -> None:
    """Cases whose rows in DIR were made from other files (changed since: name, size or mtime). A finished
    case (its case row has no error) is refused: its rows pin its inputs. Any other (its case row is an
    error, or it has none yet) is done again with the new files, its earlier rows dropped first, so that
    no case has rows of two inputs."""
    known, finished = {}, set()
    if cases_t.keys:
        df = cases_t.read(columns=["case_id", "key", "error"])
        finished = set(df["key"][df["error"].isna()])
        for cid, k in zip(df["case_id"], df["key"]):
            known.setdefault(cid, set()).add(k)
    if lesions.keys:
        df = lesions.read(columns=["case_id", "case_key"])
        for cid, k in zip(df["case_id"], df["case_key"]):
            known.setdefault(cid, set()).add(k)
    earlier = {cid: known[cid] - {k} for cid, k in keys.items() if known.get(cid, set()) - {k}}
    pinned = [cid for cid, ks in earlier.items() if ks & finished]
    if pinned:
        raise InputError(f"the input files of case{'s' if len(pinned) > 1 else ''} {', '.join(pinned[:5])} changed (name, size or "
                         f"modification time) since {out} got rows for them; give a new --out, or restore the files")
    stale = set().union(*earlier.values()) if earlier else set()
    if stale:
        lesions.drop("case_key", stale)
        cases_t.drop("key", stale)


class _Pending:
    """A case in flight on the client: its futures and what is left of it."""

    def __init__(self, case, key, state, t0):
        self.case, self.key, self.state, self.t0 = case, key, state, t0
        self.info = None
        self.remaining = 0
        self.failed = 0
        self.lost = False  # a task of it was lost with a worker: no case row, a re-run does the rest


def _run(todo, keys, cfg, lesions, cases_t, stats, *, workers, scheduler, dashboard, log, progress, pin):
    from distributed import as_completed

    from .models.device import resolve_device

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = False
    if not scheduler:
        dev = resolve_device(cfg.model.get("device", "auto"))
        if dev.type == "cuda":
            import torch

            gpu = True
            workers = workers or max(1, torch.cuda.device_count())
        workers = workers or cores
        # MSIS_THREADS, as for every msis command, sets the torch threads of each worker
        cfg.threads = 1 if gpu else int(os.environ.get("MSIS_THREADS") or max(1, cores // workers))
    client, cluster = _start_client(scheduler, workers, gpu=gpu, dashboard=dashboard)
    try:
        pin()
        gpu = gpu or (scheduler is not None and _workers_have_gpus(client))
        if dashboard:
            log(f"Dask dashboard: {client.dashboard_link}")
        n_workers = len(client.scheduler_info().get("workers", {}))
        log(f"{n_workers} dask workers" + (f", {cfg.threads} torch thread{'s' if cfg.threads != 1 else ''} each" if cfg.threads else "")
            + (", one GPU each" if gpu else ""))
        client.register_plugin(model_plugin(cfg.model, cfg.threads), name="msis-model")
        res = {"resources": {"GPU": 1}} if gpu else {}
        earlier_failed = _failed_keys(lesions)  # lesions of unfinished cases done earlier, with an error
        ac = as_completed()
        tags, pending = {}, {}
        n = len(todo)
        for i, case in enumerate(todo):
            # earlier cases first, a case's lesions before later cases' segmentation (cases finish early, so a
            # kill loses little), and within a case the largest lesions first (no long task left at the end)
            prio = (n - i) * PRIORITY_STEP
            st = client.submit(case_task, case, cfg, key=f"segment-{case.case_id}-{keys[case.case_id][:8]}", priority=prio, **res)
            info = client.submit(case_info, st, key=f"case-info-{case.case_id}-{keys[case.case_id][:8]}", priority=(n + 1) * PRIORITY_STEP)
            pending[case.case_id] = _Pending(case, keys[case.case_id], st, time.time())
            tags[info] = ("case", case.case_id, prio)
            ac.add(info)
        bar = _Progress(progress, n)
        buffer, last_flush = [], time.time()

        def flush():
            nonlocal buffer, last_flush
            if buffer:
                stats["lesions_written"] += lesions.append(buffer)
            buffer, last_flush = [], time.time()

        def finish_case(p: _Pending, error=None):
            flush()  # its lesion rows are durable before the case row says it is finished
            info = p.info or {}
            counts = info.get("counts", {})
            row = {"key": p.key, "case_id": p.case.case_id, "flair": p.case.names.get("flair"), "mprage": p.case.names.get("mprage"),
                   "gt": p.case.names.get("gt"), **counts, "lesions_failed": p.failed if not error else None,
                   "warnings": " | ".join(info.get("warnings", [])) or None, "error": error, "segment_seconds": info.get("seconds"),
                   "seconds": time.time() - p.t0, "worker": info.get("worker")}
            stats["cases_written"] += cases_t.append([row])
            pending.pop(p.case.case_id, None)
            p.state = None

        try:
            for fut in ac:
                kind, cid, prio = tags.pop(fut)
                p = pending.get(cid)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - the cluster's failure (a worker died): nothing is written, a re-run retries
                    stats["lost"].append(f"{cid}{'' if kind == 'case' else f' lesion {kind[1]}'}: {_error_text(exc)}")
                    log(f"msis: warning: {stats['lost'][-1]} (not recorded; a re-run retries it)")
                    if p is not None:
                        p.lost = True  # its case row is not written: the case is not finished
                        p.remaining -= 0 if kind == "case" else 1
                        if kind == "case" or p.remaining == 0:
                            pending.pop(cid, None)
                            p.state = None
                    continue
                finally:
                    fut.release()
                if kind == "case":
                    p.info = result
                    bar.case_done()
                    if result["error"]:
                        log(f"msis: warning: case {cid}: {result['error']}")
                        finish_case(p, result["error"])
                        continue
                    ids = [r["lesion_id"] for r in result["table"] if lesion_key(p.key, r["lesion_id"]) not in lesions.keys]
                    p.failed = sum(lesion_key(p.key, r["lesion_id"]) in earlier_failed for r in result["table"])
                    bar.add(len(ids), sum(_passes(cfg, result["work"].get(i)) for i in ids))
                    p.remaining = len(ids)
                    for lid in ids:
                        lkey = lesion_key(p.key, lid)
                        work = result["work"].get(lid, (0, 0))[1] if cfg.saliency is not None else 0
                        parts = n_parts_for(work, cfg.split_above) if cfg.saliency is not None else 1
                        lprio = prio + 1 + min(work, PRIORITY_STEP - 2)
                        if parts == 1:
                            f = client.submit(lesion_task, p.state, lid, cfg, key=f"lesion-{cid}-{lid}-{lkey[:8]}", priority=lprio, **res)
                        else:
                            pf = [client.submit(part_task, p.state, lid, k, parts, cfg, key=f"lesion-part-{cid}-{lid}-{k}-{lkey[:8]}",
                                                priority=lprio, **res) for k in range(parts)]
                            f = client.submit(combine_task, p.state, lid, pf, cfg, key=f"lesion-combine-{cid}-{lid}-{lkey[:8]}",
                                              priority=prio + PRIORITY_STEP - 1)
                            del pf  # the combine task holds them
                        tags[f] = (("lesion", lid), cid, prio)
                        ac.add(f)
                    if not ids:
                        finish_case(p)
                    continue
                row = {**result, "key": lesion_key(p.key, kind[1]), "case_key": p.key}
                if row.get("error"):
                    p.failed += 1
                    log(f"msis: warning: case {cid} lesion {kind[1]}: {row['error']}")
                buffer.append(row)
                p.remaining -= 1
                bar.lesion_done(_passes(cfg, (row.get("omega_voxels"), row.get("omega_work"))))
                if p.remaining == 0:
                    if p.lost:
                        flush()
                        pending.pop(cid, None)
                        p.state = None
                    else:
                        finish_case(p)
                elif time.time() - last_flush > FLUSH_SECONDS:
                    flush()
        finally:
            flush()  # lesions finished so far are kept (their case row waits for the rest)
    finally:
        _close(client, cluster)


def _failed_keys(lesions: ResultTable) -> set:
    if not lesions.keys:
        return set()
    df = lesions.read(columns=["key", "error"])
    return set(df["key"][df["error"].notna()])


def _passes(cfg, work) -> int:
    if cfg.saliency is None or not work or work[1] is None:
        return 0
    return int(cfg.saliency["n_samples"]) * int(work[1])


def _close(client, cluster):
    """Close the client, and the local cluster if any. dask's loggers are quiet meanwhile: a worker that
    ended first (a Ctrl-C, its nanny) makes the scheduler log errors that tell a user nothing (the results
    are written already), after the run's last line."""
    import logging

    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    dask_log.setLevel(logging.CRITICAL)
    try:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
    finally:
        dask_log.setLevel(level)


class _Progress:
    """The client's bar: lesions done of those known so far (cases are segmented as the run goes), and
    backward passes, the unit of SmoothGrad's cost."""

    def __init__(self, progress, n_cases):
        self.progress = progress
        self.n_cases, self.segmented = n_cases, 0
        self.lesions, self.lesions_done = 0, 0
        self.passes, self.passes_done = 0, 0

    def case_done(self):
        self.segmented += 1
        self._show()

    def add(self, lesions, passes):
        self.lesions += lesions
        self.passes += passes

    def lesion_done(self, passes):
        self.lesions_done += 1
        self.passes_done += passes
        self._show()

    def _show(self):
        if self.progress is None or not self.lesions:
            return
        label = f"{self.lesions_done}/{self.lesions} lesions of {self.segmented}/{self.n_cases} segmented cases"
        if self.passes:
            self.progress(label + ", backward passes", self.passes_done, self.passes)
        else:
            self.progress(label, self.lesions_done, max(self.lesions, 1))


# ----------------------------------------------------------------------------- summary

def write_summary(out: Path, lesions: ResultTable, cases_t: ResultTable, order: list, cfg: CohortConfig) -> Path:
    """DIR/summary.csv, one line per case of the manifest that has a row: lesions, failures, mean TP
    probability, seconds (rewritten whole, atomically; never over a file msis did not write)."""
    from .io.outputs import write_output_file

    cdf = cases_t.read()
    cols = ["case_id", "error"] + (["tp_probability"] if cfg.tp_probability else [])
    ldf = lesions.read(columns=cols)
    rank = {cid: i for i, cid in enumerate(order)}
    rows = []
    for _, c in sorted(cdf.iterrows(), key=lambda kv: rank.get(kv[1]["case_id"], len(rank))):
        mine = ldf[ldf["case_id"] == c["case_id"]]
        ok = mine[mine["error"].isna()]
        row = {"case_id": c["case_id"], "lesions": _int_or_blank(c["n_lesions"]),
               "lesions_failed": int(mine["error"].notna().sum()), "n_tp": _int_or_blank(c["n_tp"]), "n_fp": _int_or_blank(c["n_fp"]),
               "n_fn": _int_or_blank(c["n_fn"])}
        if cfg.tp_probability:
            p = ok["tp_probability"].dropna()
            row["mean_tp_probability"] = round(float(p.mean()), 4) if len(p) else ""
        row.update(seconds=round(float(c["seconds"]), 1) if c["seconds"] == c["seconds"] else "", error=_text_or_blank(c["error"]))
        rows.append(row)
    fields = SUMMARY_HEADER.split(",") + (["mean_tp_probability"] if cfg.tp_probability else []) + [
        "seconds", "error"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    return write_output_file(out / SUMMARY, "--out", lambda tmp: Path(tmp).write_bytes(data), ours=is_cohort_summary)


def is_cohort_summary(path) -> bool:
    """Whether a file is a summary.csv msis wrote (its header line; a user's notes under that name are not)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline().startswith(SUMMARY_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _text_or_blank(v) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def _int_or_blank(v):
    try:
        return "" if v is None or v != v else int(v)
    except (TypeError, ValueError):
        return ""
