"""What a cohort run keeps in DIR: the Parquet tables (ResultTable, their columns), the map files,
summary.csv, the settings file cohort.json that pins DIR's settings, and the checks of DIR before a run
(a cohort's or an empty folder, one writer at a time)."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError
from .manifest import COHORT_FORMAT, MAPS, MAX_LISTED_PROBLEMS, CohortCase, CohortConfig

SETTINGS_FILE = "cohort.json"
LESIONS = "lesions.parquet"
CASES = "cases.parquet"
SUMMARY = "summary.csv"
SUMMARY_HEADER = "case_id,lesions,lesions_failed,n_tp,n_fp,n_fn"  # the first columns of summary.csv
LOCK = ".cohort.lock"
# Columns that differ between two runs of the same work (compare rows without them)
TIMING_COLUMNS = ("seconds", "segment_seconds", "worker")


# ----------------------------------------------------------------------------- table schemas

def lesion_columns(cfg: CohortConfig) -> list[tuple[str, str]]:
    """(name, type) of the lesion table's columns for these settings: fixed per output folder."""
    from ..segmentation.instances import TABLE_COLUMNS

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
        from ..classifier.radiomics import default_feature_names

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

        from ..io.outputs import fsync_folder

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

        from ..io.outputs import write_output_file

        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        write_output_file(path, "--out", lambda tmp: Path(tmp).write_bytes(data), replace_own=replace, ours=lambda _: replace)


def _cell(v):
    """Row values as Parquet takes them: NumPy scalars to Python, NaN kept, '' kept."""
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------- map files

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

    from ..io.outputs import write_output_file
    from ..io.volumes import image_from_array

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


# ----------------------------------------------------------------------------- DIR: settings, checks, lock

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
    from ..io.outputs import write_output_file

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


def _drop_changed_inputs(out, lesions, cases_t, keys) -> None:
    """Cases whose rows in DIR were made from other files (changed since: name, size or mtime). A finished
    case (its case row has no error) is refused: its rows pin its inputs. Any other (its case row is an
    error, or it has none yet) is done again with the new files, its earlier rows dropped first, so that
    no case has rows of two inputs. lesions: None for a run with case rows only (the experiments')."""
    known, finished = {}, set()
    if cases_t.keys:
        df = cases_t.read(columns=["case_id", "key", "error"])
        finished = set(df["key"][df["error"].isna()])
        for cid, k in zip(df["case_id"], df["key"]):
            known.setdefault(cid, set()).add(k)
    if lesions is not None and lesions.keys:
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
        if lesions is not None:
            lesions.drop("case_key", stale)
        cases_t.drop("key", stale)


def _failed_keys(lesions: ResultTable) -> set:
    if not lesions.keys:
        return set()
    df = lesions.read(columns=["key", "error"])
    return set(df["key"][df["error"].notna()])


# ----------------------------------------------------------------------------- summary

def write_summary(out: Path, lesions: ResultTable, cases_t: ResultTable, order: list, cfg: CohortConfig) -> Path:
    """DIR/summary.csv, one line per case of the manifest that has a row: lesions, failures, mean TP
    probability, seconds (rewritten whole, atomically; never over a file msis did not write)."""
    from ..io.outputs import write_output_file

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
