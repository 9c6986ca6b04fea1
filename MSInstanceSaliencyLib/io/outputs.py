"""Every safe write of the project: an output folder staged and put in place whole (OutputFolder, with its
manifest and lock), single files written atomically, table locks, and protection of the user's own files.
Every file msis writes goes through atomic_write or write_output_file (the one implementation: _write_whole).

Outputs go only into the output folder. A manifest (msis_run.json) lists what the tool wrote there,
so a second run may replace its own earlier outputs but never a file the user put there. A run
stages its files in a hidden folder inside the output folder and puts them in place only when all
are complete, then writes the manifest last; one run at a time holds the folder (.msis.lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
import weakref
from pathlib import Path


from ..errors import InputError

MANIFEST = "msis_run.json"
LOCK = ".msis.lock"
STAGING_PREFIX = ".msis-staging-"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_OPEN_STAGING: set[str] = set()  # staging folders of this process's open OutputFolders


class OutputFolder:
    """Writes into one folder without ever replacing a file the tool did not write there itself.

    Created before the work: it makes the folder, refuses names it may not write (`names`: the outputs
    a command knows it will write; a user's file there, an input file, a manifest msis did not write),
    checks that the folder is writable by making a hidden staging folder in it, and takes the folder's
    lock (a second run into it is refused). `file(name)` gives the staged path to write to; `close()`
    checks every staged file (images: all the data their header promises), moves them into place and
    writes msis_run.json last. A run that fails leaves nothing; a killed one leaves its staging folder,
    which the next run into the folder removes.
    """

    def __init__(self, path, protected=(), names=()):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} exists and is not a folder")
        self.protected = {Path(p).resolve() for p in protected}
        self.written: list[str] = []
        self.staging: Path | None = None
        self.record: dict = {}
        self._prior: dict = {}  # the folder's msis_run.json before this run
        self._run = _Run()
        self._finalizer = weakref.finalize(self, self._run.abort)  # a run that ends without close() leaves nothing
        try:
            self._run.created = _make_folder(self.path)
            self.previous = self._read_manifest()
            self.declare(*names)
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.path))
            except OSError as exc:
                raise InputError(f"cannot write into --out {self.path}: {exc.strerror or exc}") from None
            self._run.staging = self.staging
            _OPEN_STAGING.add(str(self.staging))
            self._run.lock = _lock_folder(self.path)
            _remove_stale_staging(self.path)
            self.previous = self._read_manifest()  # again, under the lock
            self.declare(*names)
        except BaseException:
            self._finalizer()
            raise

    def _read_manifest(self) -> set:
        """Names msis wrote here earlier that are still there; InputError for a msis_run.json msis did not write."""
        m = self.path / MANIFEST
        if not (m.exists() or m.is_symlink()):
            return set()
        try:
            data = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not is_manifest(data):
            raise InputError(f"{m} already exists and was not written by msis; choose another --out or move it")
        self._prior = data
        return {n for n in data["files"] if _plain_name(n) and (self.path / n).exists()}

    def _check(self, name: str) -> Path:
        if not _plain_name(name) or name == MANIFEST or name.startswith(".msis"):
            raise ValueError(f"not an output file name: {name!r}")
        target = self.path / name
        if target.resolve() in self.protected:
            raise InputError(f"output {target} would overwrite an input file; choose another --out")
        if (target.exists() or target.is_symlink()) and name not in self.previous:
            raise InputError(f"{target} already exists and was not written by msis; choose another --out or move it")
        return target

    def declare(self, *names: str) -> None:
        """Refuse now, before the work, the outputs this run will write that it may not write."""
        for name in names:
            self._check(name)

    def file(self, name: str) -> Path:
        """Where to write output `name`: a path in the staging folder, put in place by close()."""
        self._check(name)
        if name not in self.written:
            self.written.append(name)
        return self.staging / name

    def final(self, path) -> Path:
        """Where a staged file will be once the run is closed."""
        p = Path(path)
        return self.path / p.name if self.staging is not None and p.parent == self.staging else p

    @contextlib.contextmanager
    def writing(self):
        """Errors of writers in this block (OSError, and RuntimeErrors about writing, such as SimpleITK's or
        torch's) end the run with one line naming the file."""
        try:
            yield
        except InputError:
            raise
        except (OSError, RuntimeError) as exc:
            text = str(exc)
            if isinstance(exc, RuntimeError) and "writ" not in text.lower() and str(self.staging) not in text:
                raise
            filename = getattr(exc, "filename", None)
            target = self.final(filename) if filename else (self.path / self.written[-1] if self.written else self.path)
            raise _cannot_write(target, _reason(exc), self.path) from None

    def close(self, **info) -> Path:
        """Check every staged file, put them in place, then write msis_run.json (last, atomically)."""
        for name in self.written:
            staged, target = self.staging / name, self._check(name)
            if not staged.is_file() or staged.stat().st_size == 0:
                raise InputError(f"cannot write {target}: the file was not written or is empty; the disk may be full. "
                                 f"Nothing was changed in {self.path}")
            if name.lower().endswith(IMAGE_SUFFIXES):
                from .complete import verify_complete

                try:
                    verify_complete(staged, "output", shown=target)
                except InputError as exc:
                    raise InputError(f"{exc}; the disk may be full. Nothing was changed in {self.path}") from None
        from .. import __version__

        files = sorted(set(self.written) | {n for n in self.previous if (self.path / n).exists()})
        self.record = {"files": files, "written": sorted(self.written), "msis_version": __version__, **info}
        try:
            for name in self.written:
                _fsync(self.staging / name)
            # first the earlier record, listing the names about to be put in place too: were this run killed
            # among the renames, its complete files there would still count as written by msis
            interim = {**self._prior, "files": files, "msis_version": self._prior.get("msis_version", __version__),
                       "publishing": {"pid": os.getpid(), "files": sorted(self.written),
                                      "note": "a run was putting these files in place; if this is still here, it was stopped"}}
            self._write_manifest(interim)
            for name in self.written:
                os.replace(self.staging / name, self.path / name)
            self._write_manifest(self.record)
        except OSError as exc:
            raise InputError(f"cannot put the outputs in place in {self.path}: {exc.strerror or exc}; the disk may be full") from None
        self._finalizer.detach()
        self._run.finish()
        return self.path / MANIFEST

    def _write_manifest(self, record: dict) -> None:
        tmp = self.staging / MANIFEST
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        _fsync(tmp)
        os.replace(tmp, self.path / MANIFEST)


class _Run:
    """What a run holds in its output folder (the staging folder, the lock, folders it made), so that a run
    which ends without close() can leave nothing behind (the finalizer of an OutputFolder calls abort)."""

    def __init__(self):
        self.staging = None
        self.lock = None
        self.created: list[Path] = []

    def finish(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            _OPEN_STAGING.discard(str(self.staging))
            self.staging = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abort(self) -> None:
        if self.created and self.lock is not None:  # a folder this run made: remove it with its lock file if nothing else is there
            folder = self.created[0]
            with contextlib.suppress(OSError):
                if self.staging is not None:
                    shutil.rmtree(self.staging, ignore_errors=True)
                if os.listdir(folder) == [LOCK]:
                    os.unlink(folder / LOCK)
        self.finish()
        for d in self.created:  # innermost first; stops at the first folder that is not empty
            try:
                d.rmdir()
            except OSError:
                break


def is_manifest(data) -> bool:
    """Whether parsed JSON is an msis_run.json that msis wrote."""
    return (isinstance(data, dict) and isinstance(data.get("files"), list) and all(isinstance(n, str) for n in data["files"])
            and ("command" in data or "msis_version" in data))


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _make_folder(path: Path) -> list[Path]:
    """mkdir -p; the folders it made, innermost first."""
    made, p = [], path
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write into --out {path}: {exc.strerror or exc}") from None
    return made


def _lock_folder(path: Path):
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pids = sorted({pid for pid in (_staging_pid(d) for d in path.glob(STAGING_PREFIX + "*")) if pid not in (None, os.getpid()) and _alive(pid)})
        who = f" (process {', '.join(map(str, pids))})" if pids else ""
        raise InputError(f"another msis run{who} is writing into --out {path}; wait for it to end or choose another --out") from None
    except OSError as exc:
        raise InputError(f"cannot write into --out {path}: {exc.strerror or exc}") from None
    return lock


def _staging_pid(folder: Path) -> int | None:
    try:
        return int(folder.name[len(STAGING_PREFIX):].split("-")[0])
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(path: Path) -> None:
    """Staging folders of runs that were killed (their process is gone); called while holding the lock."""
    for d in path.glob(STAGING_PREFIX + "*"):
        pid = _staging_pid(d)
        if str(d) in _OPEN_STAGING or pid is None:
            continue
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder) -> None:
    """Make renames into `folder` durable (not possible on every platform: then a no-op)."""
    try:
        _fsync(Path(folder))
    except OSError:
        pass


def written_by_msis(path) -> bool:
    """Whether a file is a JSON object with a top-level "msis_version", as the JSON files msis writes are."""
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > 50_000_000:
            return False
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "msis_version" in data


def check_output_file(path, option: str, replace_own: bool = True, ours=written_by_msis) -> Path:
    """Refuse, before the work, a single output file that exists and that msis may not replace (any file
    with replace_own=False; else one msis did not write: `ours(path)` tells, by default a JSON file of msis)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {p} is a folder; give a file name")
    if (p.exists() or p.is_symlink()) and not (replace_own and ours(p)):
        raise InputError(f"{p} already exists and was not written by msis; choose another {option} or move it")
    return p


def write_output_file(path, option: str, write, replace_own: bool = True, ours=written_by_msis) -> Path:
    """write(tmp) into a temporary file beside `path`, check it, then put it in place in one step (see
    _write_whole): never a partial file at `path`, never over a file msis may not replace (see
    check_output_file; checked before the work and again as the file is put in place)."""
    p = check_output_file(path, option, replace_own, ours)
    return _write_whole(p, write, may_replace=lambda q: check_output_file(q, option, replace_own, ours))


def write_json_output(path, data: dict, option: str) -> Path:
    """A JSON result file (marked with "msis_version", so that a later run may replace it), atomically."""
    from .. import __version__

    text = json.dumps({"msis_version": __version__, **data}, indent=2, default=str) + "\n"
    return write_output_file(path, option, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_csv_rows(path, rows: list[dict]) -> None:
    """A CSV table of dict rows, the union of their keys as columns in first-seen order (into a staged or temporary path)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def atomic_write(path, data) -> Path:
    """Write a file whole or not at all, replacing whatever is at `path` (see _write_whole): `data` is the
    bytes, or a function write(tmp) that writes the file at the temporary path it is given. A kill at any
    moment leaves either the old file or the new one (and at worst a stale hidden `.NAME.msis-*`). For a
    path where a user's own file may be, check first (check_output_file) or use write_output_file."""
    write = data if callable(data) else (lambda tmp: Path(tmp).write_bytes(data))
    return _write_whole(Path(path), write)


def _write_whole(p: Path, write, may_replace=None) -> Path:
    """The one atomic write of the project. write(tmp) into a new temporary file beside p, check it (not
    empty; an image: every byte its header promises, as SimpleITK returns normally after writing part of
    one on a full disk), fsync, then put it at p in one step and make the new name durable.
    may_replace(p), when given, raises InputError to keep a file at p; it is asked just before, and the
    file is then put in place with a hard link, which fails rather than replace a file that appears in
    between. An error of the writer or the file system is one InputError naming p; the temporary file
    never stays."""
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(p)
        write(tmp)
        if tmp.stat().st_size == 0:
            raise OSError(f"nothing was written to {p}")
        if _image_suffix(p):
            from .complete import verify_complete

            shown, folder = _published_as(p)
            try:
                verify_complete(tmp, "output", shown=shown)
            except InputError as exc:
                raise InputError(f"{exc}; the disk may be full" + (f". Nothing was changed in {folder}" if folder else "")) from None
        _fsync(tmp)
        if may_replace is None:
            os.replace(tmp, p)
        else:
            may_replace(p)
            try:
                os.link(tmp, p)
            except FileExistsError:  # appeared since may_replace was asked
                may_replace(p)
                os.replace(tmp, p)
            except OSError:  # no hard links on this file system
                os.replace(tmp, p)
        fsync_folder(p.parent)  # make the new name durable
    except InputError:
        raise
    except (OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK's and torch's write errors
        shown, folder = _published_as(p)
        raise _cannot_write(shown, _reason(exc), folder) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return p


def _image_suffix(p: Path) -> str:
    return next((s for s in IMAGE_SUFFIXES if p.name.lower().endswith(s)), "")


def _temporary_beside(p: Path) -> Path:
    """A new empty hidden file `.NAME.msis-XXXXXXXX` + the output's suffix, beside p. The suffix: writers
    that choose the format by the name (SimpleITK, matplotlib, numpy) write the same as to p. Created with
    the default permissions (umask), as a plain open() would, not mkstemp's owner-only ones."""
    suffix = _image_suffix(p) or p.suffix
    for _ in range(100):
        tmp = p.with_name(f".{p.name}.msis-{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(p))


def _published_as(p: Path) -> tuple[Path, Path | None]:
    """The path the user will see for p, and the --out folder when p is staged in an OutputFolder of
    this process (messages name the output, not the hidden staging folder)."""
    if str(p.parent) in _OPEN_STAGING:
        return p.parent.parent / p.name, p.parent.parent
    return p, None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


def _cannot_write(target, reason: str, folder=None) -> InputError:
    return InputError(f"cannot write {target}: {reason}; the disk may be full" + (f". Nothing was changed in {folder}" if folder else ""))


def table_lock(path):
    """Context manager holding PATH.lock (filelock: an OS lock that dies with its process, so a kill
    leaves no stale lock) while PATH is written. Non-blocking: a second writer is refused at once with
    an InputError naming the first one's pid. Stale temporary files of killed writers are removed."""
    return _TableLock(Path(path))


class _TableLock:
    def __init__(self, path: Path):
        self.path = path
        self.lock_path = Path(str(path) + ".lock")

    def __enter__(self):
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.lock_path))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            pid = self._pid()
            who = f" (pid {pid})" if pid else ""
            raise InputError(f"{self.path} is being written by another msis process{who}; wait for it to end, or choose another --out") from None
        try:
            self._set_pid(os.getpid())
            temporaries = (f".{self.path.name}.msis-", f".{self.path.name}.json.msis-")  # of atomic_write
            for t in self.path.parent.glob(".*.msis-*"):  # left by a writer killed while it wrote
                if t.name.startswith(temporaries):
                    t.unlink(missing_ok=True)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self._set_pid(None)
        self.lock.release()
        return False

    def _pid(self):
        try:
            text = self.lock_path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def _set_pid(self, pid):
        """The holder's pid in the lock file, for the message to a second writer; only where the file is
        empty or holds a pid (a lock file holding anything else belongs to filelock's fallback)."""
        try:
            text = self.lock_path.read_text().strip()
            if text and not text.isdigit():
                return
            with open(self.lock_path, "r+") as f:
                f.truncate(0)
                if pid is not None:
                    f.write(f"{pid}\n")
        except (OSError, UnicodeDecodeError):
            pass
