"""The client side of the worker process (worker.py): start it, send requests, stream progress,
cancel, and restart it cleanly after a crash or a kill.

No Slicer or Qt here: the Slicer module passes a progress callback that keeps its GUI alive (it is
called every `tick_s` while a request runs, on the caller's thread, so it may touch the GUI).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import Cancelled, InputError, WorkerError

LIB_PARENT = str(Path(__file__).resolve().parent.parent)  # the folder that holds MSInstanceSaliencyLib/


class WorkerClient:
    """One worker process, started on first use and kept alive between requests.

    request(cmd, progress=..., on_message=..., **arguments) blocks until the answer and returns it as
    a dict. progress(done, total) is called with the worker's progress, and at least every tick_s
    with the last values (None, None before the first), so a GUI can process its events; when it
    returns False the request is cancelled: the worker stops at its next progress step and stays
    alive, or is killed after cancel_grace_s. on_message(msg) receives the streamed messages, in the
    order sent: "lesion" (score) and "partial" (explain with partial_every: the SmoothGrad map so far,
    in files the message names).
    `synced` is for the caller's bookkeeping of what the worker holds (model, case, labels): it is
    emptied whenever a new process starts, so a restarted worker is sent everything again.
    A request without a progress callback has nobody to cancel it: when the worker stays silent (no
    progress, no answer) for silence_timeout_s (default 600 s; request(..., timeout_s=T) for one
    request, with or without progress), it is taken for hung, killed, and WorkerError is raised.
    Once a cancel is sent, progress is still called every tick (its answer no longer matters) until the
    worker stops or is killed, so a GUI keeps processing its events meanwhile.
    start(progress) (request does it when no worker runs) takes the same callback: the worker imports
    torch before it is ready, which can take minutes on a cold disk, so with a callback there is no time
    limit, progress(None, None) is called every tick and returning False kills the starting worker and
    raises Cancelled; without one, a worker silent for start_timeout_s is taken for hung.
    """

    def __init__(self, python: str | None = None, workdir: str | None = None, env: dict | None = None, log=None,
                 cancel_grace_s: float = 10.0, tick_s: float = 0.05, start_timeout_s: float = 600.0,
                 silence_timeout_s: float = 600.0):
        self.python = python or sys.executable
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="msis-worker-"))
        self.env = env
        self.log = log or (lambda line: None)
        self.cancel_grace_s = cancel_grace_s
        self.tick_s = tick_s
        self.start_timeout_s = start_timeout_s
        self.silence_timeout_s = silence_timeout_s
        self.synced: dict = {}
        self.starts = 0
        self._proc = None
        self._messages: queue.Queue = queue.Queue()
        self._stderr_tail = collections.deque(maxlen=40)
        self._next_id = 0

    # -- process

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.alive else None

    def start(self, progress=None) -> None:
        if self.alive:
            return
        self.kill()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join([LIB_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        popen_kw = popen_options(os.name, subprocess)
        try:
            self._proc = subprocess.Popen([self.python, "-u", "-m", "MSInstanceSaliencyLib.worker", "--workdir", str(self.workdir)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                          text=True, encoding="utf-8", bufsize=1, **popen_kw)
        except OSError as exc:
            raise WorkerError(f"cannot start the worker with {self.python}: {exc}") from None
        self._messages = queue.Queue()
        self._stderr_tail.clear()
        self.synced = {}
        self.starts += 1
        proc, messages = self._proc, self._messages
        threading.Thread(target=self._read_stdout, args=(proc, messages), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc, messages), daemon=True).start()
        heard = time.monotonic()
        while True:
            try:
                msg = self._messages.get(timeout=self.tick_s)
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg.get("type") == "exit":
                    self._crashed("start")
                if msg.get("type") == "ready":
                    return
                heard = time.monotonic()
                self._dispatch_log(msg)
            if progress is not None:
                if not _keep_going(progress, None, None):
                    self.kill()
                    raise Cancelled("cancelled while the worker was starting")
            elif time.monotonic() - heard > self.start_timeout_s:
                self.kill()
                raise WorkerError(f"the worker sent nothing for {self.start_timeout_s:g} s while starting and was stopped")

    def kill(self) -> None:
        """Stop the worker now, whatever it is doing: its whole process group (or tree on Windows), since
        PythonSlicer is a launcher whose child is the real Python."""
        proc, self._proc = self._proc, None
        self.synced = {}
        if proc is None:
            return
        if proc.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
                    proc.kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except Exception:  # a broken pipe on close is of no interest any more
                pass

    def close(self) -> None:
        """Ask the worker to leave, kill it if it does not, and remove the work folder if it is ours."""
        if self.alive:
            try:
                self._send({"id": self._new_id(), "cmd": "shutdown"})
                self._proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired, WorkerError):  # its stdin closed, or it died meanwhile
                pass
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests

    def request(self, cmd: str, progress=None, on_message=None, timeout_s: float | None = None, **arguments) -> dict:
        if not self.alive:
            self.start(progress)
        rid = self._new_id()
        self._send({"id": rid, "cmd": cmd, **arguments})
        last = (None, None)
        cancel_deadline = None
        silence_s = timeout_s if timeout_s is not None else self.silence_timeout_s if progress is None else None
        heard = time.monotonic()
        while True:
            try:
                msg = self._messages.get(timeout=self.tick_s)
            except queue.Empty:
                msg = None
            if msg is not None and msg.get("type") == "exit":
                self._crashed(cmd)
            if msg is not None and msg.get("type") != "log":  # stderr lines may come from a thread of a hung worker
                heard = time.monotonic()
            elif silence_s is not None and time.monotonic() - heard > silence_s:
                self.kill()
                raise WorkerError(f"the worker sent nothing for {silence_s:g} s during '{cmd}' and was stopped (hung?); it will be "
                                  "restarted on the next request (pass timeout_s for work that is silent longer)")
            if msg is not None and msg.get("id") == rid:
                kind = msg.get("type")
                if kind == "result":
                    return {k: v for k, v in msg.items() if k not in ("id", "type")}
                if kind == "error":
                    self._raise(msg)
                if kind == "progress":
                    last = (msg["done"], msg["total"])
                elif on_message is not None:
                    on_message(msg)
            elif msg is not None:
                self._dispatch_log(msg)
            if cancel_deadline is not None:
                _keep_going(progress, *last)  # the GUI keeps its events while the worker stops; the answer is given
            elif progress is not None and not _keep_going(progress, *last):
                self._send({"id": rid, "cmd": "cancel"})
                cancel_deadline = time.monotonic() + self.cancel_grace_s
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                self.kill()  # it did not reach a progress step in time: the next request starts a fresh one
                raise Cancelled(f"cancelled (the worker did not stop within {self.cancel_grace_s:g} s and was restarted)")

    # -- files exchanged with the worker

    def path(self, name: str) -> str:
        return str(self.workdir / name)

    # -- internals

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, msg: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            self._crashed(msg.get("cmd"))

    def _raise(self, msg):
        kind, text = msg.get("kind"), msg.get("message", "")
        if kind == "cancelled":
            raise Cancelled(text)
        if kind == "input":
            raise InputError(text)
        detail = msg.get("traceback", "").strip().splitlines()
        raise WorkerError(f"the worker failed: {text}" + (f" ({detail[-2].strip()})" if len(detail) > 1 else ""))

    def _crashed(self, cmd):
        code = self._proc.poll() if self._proc is not None else None
        tail = " | ".join(list(self._stderr_tail)[-5:])
        self.kill()
        raise WorkerError(f"the worker process stopped unexpectedly during '{cmd}' (exit code {code}); it will be restarted "
                          f"on the next request" + (f". Its last messages: {tail}" if tail else ""))

    def _dispatch_log(self, msg):
        if msg.get("type") == "log":
            self.log(msg["line"])

    def _read_stdout(self, proc, messages):
        for line in proc.stdout:
            try:
                messages.put(json.loads(line))
            except json.JSONDecodeError:
                messages.put({"type": "log", "line": line.rstrip()})
        proc.wait()
        messages.put({"type": "exit", "code": proc.returncode})

    def _read_stderr(self, proc, messages):
        for line in proc.stderr:
            self._stderr_tail.append(line.rstrip())
            messages.put({"type": "log", "line": line.rstrip()})


def popen_options(os_name: str, sp=subprocess) -> dict:
    """Popen keyword arguments for the worker: its own process group (so kill reaches the launcher's
    child too) and, on Windows, no console window: PythonSlicer is a console program, and Slicer's
    slicer.util.launchConsoleProcess hides it the same way (STARTUPINFO, STARTF_USESHOWWINDOW, SW_HIDE).
    `sp` is the subprocess module (its Windows names exist only on Windows)."""
    if os_name != "nt":
        return {"start_new_session": True}
    info = sp.STARTUPINFO()
    info.dwFlags |= sp.STARTF_USESHOWWINDOW
    info.wShowWindow = sp.SW_HIDE
    return {"creationflags": sp.CREATE_NEW_PROCESS_GROUP, "startupinfo": info}


def _keep_going(progress, done, total) -> bool:
    try:
        return progress(done, total) is not False
    except Cancelled:
        return False
