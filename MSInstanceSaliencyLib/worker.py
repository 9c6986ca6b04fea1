"""A long-lived worker process that holds a model and a prepared case and runs the heavy work:
segmentation, saliency maps and TP probabilities.

The Slicer module starts it with Slicer's own Python (PythonSlicer) so that the GUI stays responsive,
Cancel really stops the work, and a crash of torch cannot take Slicer down; any Python can run it:

    python -m MSInstanceSaliencyLib.worker --workdir DIR

Protocol: one JSON object per line. Requests arrive on stdin as {"id": n, "cmd": name, ...arguments};
{"cmd": "cancel", "id": n} stops request n at its next progress step. Every answer on stdout carries
the request's id and a type: "progress" (done, total), "lesion" (one scored lesion, streamed),
"partial" (a SmoothGrad map so far, streamed when explain asks with partial_every), "result" (the request's answer) or "error" (kind: input | cancelled | internal, message). Arrays go
through files in the work folder (.npy for arrays, NRRD for images with their geometry), never
through the pipe. Nothing else is written to stdout: library prints go to stderr, the log.
Ids are integers or short names of letters, digits, _ and - (they name the answer's files); a line
that is no such request (not JSON, not an object, no cmd, a bad id, over MAX_REQUEST_BYTES) gets an
input error (id null when none could be read) and the worker reads on. When stdin closes, the
running request stops at its next progress step, queued ones are dropped, and the worker exits.
See worker_client.WorkerClient for the other end.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError

PROGRESS_INTERVAL_S = 0.1  # progress messages at most this often (backward passes can be thousands)
MAX_REQUEST_BYTES = 4 * 2**20  # a request line; arrays go through files, so anything longer is a mistake
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def save_array(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write an array so that a reader never sees a partial file (io.outputs.atomic_write; a full disk is
    an InputError naming the file)."""
    from .io.outputs import atomic_write

    return str(atomic_write(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array))))


def load_array(path: str | os.PathLike, remove: bool = False) -> np.ndarray:
    a = np.load(str(path), allow_pickle=False)
    if remove:
        os.unlink(path)
    return a


def environment_info(device: str = "auto") -> dict:
    """What the worker sees: the torch build, the GPUs and the packages (GPU-not-detected is the most
    common trouble with AI extensions, so say exactly why)."""
    import platform

    import torch

    from . import __version__

    info = {"msis": __version__, "python": platform.python_version(), "executable": sys.executable, "pid": os.getpid(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": bool(torch.cuda.is_available()),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
            "threads": torch.get_num_threads()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError as exc:
        info["monai"] = None
        info["monai_error"] = str(exc)
    info["radiomics"] = radiomics_version()
    if info["cuda_available"]:
        info["device_note"] = f"GPU: {', '.join(info['gpus'])}"
    elif info["torch_cuda"] is None:
        info["device_note"] = "this torch is a CPU-only build: work runs on the CPU (install a CUDA build of torch to use a GPU)"
    else:
        info["device_note"] = (f"torch is built for CUDA {info['torch_cuda']} but sees no GPU (driver missing or too old, "
                               "or CUDA_VISIBLE_DEVICES hides it): work runs on the CPU")
    try:
        from .models.device import resolve_device

        info["device"] = str(resolve_device(device))
    except InputError as exc:
        info["device"] = None
        info["device_error"] = str(exc)
    return info


def radiomics_version() -> str | None:
    """pyradiomics' version, or None when it cannot be imported (in Slicer: the SlicerRadiomics extension)."""
    try:
        from .classifier.radiomics import _quiet_radiomics

        return str(_quiet_radiomics().__version__)
    except Exception:  # ImportError, or a broken build
        return None


class BadRequest(InputError):
    """A request line the worker cannot take; rid: its id where one could be read (else None)."""

    def __init__(self, message, rid=None):
        super().__init__(message)
        self.rid = rid


def valid_id(rid) -> bool:
    """Request ids name the files of their answers (r<id>_*.npy), so: an integer, or a short name of
    letters, digits, _ and -; never a path."""
    if isinstance(rid, int) and not isinstance(rid, bool):
        return abs(rid) < 2**63
    return isinstance(rid, str) and 0 < len(rid) <= 64 and set(rid) <= _ID_CHARS


def parse_request(line: bytes) -> dict:
    """One line from the client as a request {"id", "cmd", ...}, or BadRequest saying what is wrong with it."""
    if len(line) > MAX_REQUEST_BYTES:
        raise BadRequest(f"a request line of more than {MAX_REQUEST_BYTES:,} bytes was ignored; send arrays through files "
                         "in the work folder")
    try:
        msg = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"a request line is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise BadRequest("a request line is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise BadRequest(f"not a JSON request: {exc}") from None
    if not isinstance(msg, dict):
        raise BadRequest(f'a request is a JSON object {{"id": ..., "cmd": ...}}, got a JSON {type(msg).__name__}')
    rid = msg.get("id")
    readable = rid if valid_id(rid) or isinstance(rid, str) and len(rid) <= 200 else None
    if not isinstance(msg.get("cmd"), str):
        raise BadRequest('a request needs "cmd", the name of a command', readable)
    if not (valid_id(rid) or rid is None and msg["cmd"] == "cancel"):  # a cancel without id stops the running request
        raise BadRequest(f'request id {json.dumps(rid)[:80]}: an id is an integer or up to 64 letters, digits, _ and -', readable)
    return msg


def read_lines(stream, limit: int = MAX_REQUEST_BYTES):
    """The lines of a binary stream, each cut after limit + 1 bytes (the rest of a longer line is skipped)."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(limit)
                if not rest or rest.endswith(b"\n"):
                    break
        yield line.strip()


class Worker:
    """The request handlers and the state they share (model, prepared case, lesion labels)."""

    def __init__(self, workdir, send):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.send = send
        self.cancel_event = threading.Event()
        self.client_gone = threading.Event()  # stdin closed: stop what runs, run nothing more
        self.model = None
        self.model_key = None
        self.device = "auto"
        self.case = None
        self.labels = None
        self._classifier = None

    # -- plumbing

    def progress_callback(self, rid):
        last = [0.0]

        def callback(done, total):
            if self.cancel_event.is_set() or self.client_gone.is_set():
                return False
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or done >= total:
                last[0] = now
                self.send({"id": rid, "type": "progress", "done": int(done), "total": int(total)})
            return True

        return callback

    def partial_callback(self, rid, n_samples):
        """explain's partial(copies_done, maps): each map written whole to the request's partial files, then a message naming them."""

        def callback(done, maps):
            paths = {name: save_array(self.out_path(rid, f"partial_{name}"), m.astype(np.float32, copy=False)) for name, m in maps.items()}
            self.send({"id": rid, "type": "partial", "copies_done": int(done), "n_samples": int(n_samples), "maps": paths})

        return callback

    def out_path(self, rid, name) -> Path:
        path = (self.workdir / f"r{rid}_{name}.npy").resolve()
        if not valid_id(rid) or path.parent != self.workdir.resolve():  # ids are checked on arrival; never write elsewhere
            raise InputError(f"request id {rid!r} cannot name a file in the work folder")
        return path

    def need(self, what):
        if what == "model" and self.model is None:
            raise InputError("no model loaded: send load_model first")
        if what == "case" and self.case is None:
            raise InputError("no case prepared: send prepare first")
        if what == "labels" and self.labels is None:
            raise InputError("no lesion labels: segment first (or send set_labels)")

    def classifier(self):
        from .classifier.scoring import load_classifier

        if radiomics_version() is None:
            raise InputError("the TP probability needs pyradiomics, which is not installed: in 3D Slicer install the "
                             "SlicerRadiomics extension (Extensions Manager) and restart Slicer; elsewhere "
                             "`pip install --no-build-isolation pyradiomics`")
        if self._classifier is None:
            self._classifier = load_classifier(model=self.model)
        return self._classifier

    def _classifier_status(self) -> str:
        """'' when the model has a usable classifier, else why the TP probability stays empty."""
        try:
            self.classifier()
        except InputError as exc:
            return str(exc)
        return ""

    # -- requests

    def handle(self, request: dict):
        cmd = request.get("cmd")
        handler = getattr(self, f"cmd_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            raise InputError(f"unknown worker command {cmd!r}")
        args = {k: v for k, v in request.items() if k not in ("id", "cmd")}
        return handler(request.get("id"), **args)

    def cmd_ping(self, rid):
        return {"pid": os.getpid()}

    def cmd_info(self, rid, device="auto"):
        return environment_info(device)

    def cmd_load_model(self, rid, model=None, device="auto"):
        from .models.loading import load_model
        from .models.device import resolve_device
        from .saliency.common import list_layers

        dev = resolve_device(device)
        key = (model or None, str(dev))
        if key != self.model_key:
            self.model, self.model_key, self._classifier = None, None, None
            self.model = load_model(model or None, device=dev)
            self.model_key, self.device = key, str(dev)
            self.case = self.labels = None  # prepared for another model's channels and normalisation
        return {**self.model.describe(), "layers": [name for name, _kind in list_layers(self.model)], "device": self.device,
                "classifier": self._classifier_status()}

    def cmd_prepare(self, rid, flair, mprage=None, register=False, n4=False):
        from .io.volumes import read_inputs

        self.need("model")
        images = read_inputs(flair, mprage or None)  # unreadable or identical inputs: refused, the case held is kept
        self.case = self.labels = None
        self.case = self.model.prepare(*images, register=bool(register), n4=bool(n4))
        return {"shape": list(self.case.shape), "spacing": list(self.case.spacing), "channels": self.case.channels,
                "steps": self.case.steps, "warnings": self.case.warnings}

    def cmd_set_labels(self, rid, path):
        self.need("case")
        labels = load_array(path)
        if labels.shape != self.case.shape:
            raise InputError(f"the lesion labels have shape {labels.shape}, the case {self.case.shape}")
        self.labels = labels.astype(np.int32, copy=False)
        return {"n_lesions": int(np.count_nonzero(np.unique(self.labels)))}

    def cmd_segment(self, rid, threshold=None, min_volume_mm3=None):
        from .segmentation.instances import label_instances, lesion_table

        self.need("case")
        spec = self.model.spec
        thr = spec.threshold if threshold is None else float(threshold)
        min_vol = spec.min_lesion_mm3 if min_volume_mm3 is None else float(min_volume_mm3)
        if not 0.0 < thr < 1.0:
            raise InputError(f"threshold must be between 0 and 1, got {thr}")
        if not min_vol >= 0.0:
            raise InputError(f"minimum lesion volume must be >= 0 mm^3, got {min_vol}")
        prob = self.model.predict_case(self.case, device=self.device, progress=self.progress_callback(rid))
        labels = label_instances(prob > thr, spacing=self.case.spacing, min_volume_mm3=min_vol)
        self.labels = labels.astype(np.int32, copy=False)
        return {"probability": save_array(self.out_path(rid, "probability"), prob.astype(np.float32)),
                "labels": save_array(self.out_path(rid, "labels"), self.labels),
                "table": lesion_table(labels, self.case.reference, prob), "threshold": thr, "min_volume_mm3": min_vol}

    def cmd_explain(self, rid, lesion_id=None, mask=None, method="smoothgrad", layer=None, partial_every=None, partial_interval_s=None,
                    **saliency):
        """saliency: n_samples, sigma, sigma_mode, aggregation, context, seed, max_omega_voxels, precision
        (explain.check_explain_args, the checks of the CLI and the cohort too).
        partial_every (SmoothGrad; off when None): stream the map as the noisy copies arrive. Each partial
        map goes to r<id>_partial_<channel>.npy (rewritten whole each time, so it holds the newest) and a
        message {"type": "partial", "copies_done", "n_samples", "maps": {channel: path}} follows; at most
        every partial_every copies and partial_interval_s seconds (smoothgrad's rule), the last one with
        the final map. The answer is the same as without."""
        from .saliency.explain import check_explain_args, explain_case, omega_from_lesion

        unknown = set(saliency) - {"n_samples", "sigma", "sigma_mode", "aggregation", "context", "seed", "max_omega_voxels", "precision"}
        if unknown:
            raise InputError(f"explain does not take {', '.join(sorted(unknown))}")
        if mask is None and lesion_id is None:
            raise InputError("explain needs lesion_id or mask")
        args = check_explain_args(method, lesion_id=None if mask is not None else lesion_id, **saliency)  # before loading anything
        self.need("case")
        if mask is not None:
            omega = load_array(mask).astype(bool)
            if omega.shape != self.case.shape or not omega.any():
                raise InputError("the region to explain is empty or not on the MPRAGE grid")
            label = "region"
        else:
            self.need("labels")
            lesion_id = args.pop("lesion_id")
            omega, label = omega_from_lesion(self.labels, lesion_id), f"lesion{lesion_id}"
        check_explain_args(method, omega=omega, **saliency)  # the cost, now that Ω is known
        stream = {} if partial_every is None else dict(partial=self.partial_callback(rid, args["n_samples"]), partial_every=partial_every,
                                                        partial_interval_s=partial_interval_s)
        exp = explain_case(self.model, self.case, omega, label=label, layer=layer or None, device=self.device,
                           progress=self.progress_callback(rid), **stream, **args)
        maps = {name: save_array(self.out_path(rid, f"map_{name}"), m.astype(np.float32)) for name, m in exp.maps.items()}
        result = {"maps": maps, "params": exp.params, "method": exp.method, "tp_probability": None, "tp_note": ""}
        if method == "smoothgrad" and mask is None:
            result["tp_probability"], result["tp_note"] = self._tp_probability_of(exp)
        return result

    def _tp_probability_of(self, exp):
        """P(TP) from this explanation when it was made with the classifier's settings; else a note why not."""
        from .classifier.scoring import classifier_settings, tp_probability_of_explanation

        try:
            clf = self.classifier()
        except InputError as exc:
            return None, str(exc)
        p = tp_probability_of_explanation(clf, exp, self.case.spacing)
        if p is None:
            s = classifier_settings(clf)
            return None, (f"the TP probability needs a map made with the classifier's settings (SmoothGrad max of FLAIR, "
                          f"N = {s['n_samples']}, sigma = {s['sigma']}, context {s['context']}, at most {s['max_omega_voxels']} "
                          "lesion voxels): press Score to compute it")
        return p, ""

    def cmd_score(self, rid, lesion_ids):
        """TP probability of each lesion, streamed: a cancelled run keeps the lesions already sent."""
        from .classifier.scoring import iter_tp_probabilities

        self.need("labels")
        clf = self.classifier()
        errors = {}
        n = 0
        for lid, p in iter_tp_probabilities(self.model, self.case, self.labels, [int(i) for i in lesion_ids], clf, device=self.device,
                                            progress=self.progress_callback(rid), on_error=lambda i, m: errors.__setitem__(i, m)):
            self.send({"id": rid, "type": "lesion", "lesion_id": int(lid), "tp_probability": p, "error": errors.get(lid, "")})
            n += 1
        return {"scored": n}


# ----------------------------------------------------------------------------- main loop

def serve(workdir, stdin=None, stdout=None) -> int:
    """Answer requests until stdin closes or a shutdown request arrives."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    lock = threading.Lock()

    def send(msg: dict) -> None:
        line = json.dumps(msg, default=_json_default)
        with lock:
            try:
                out.write(line + "\n")
                out.flush()
            except (OSError, ValueError):  # the client is gone (broken pipe): nobody to answer, leave
                worker.client_gone.set()
                requests.put(None)

    worker = Worker(workdir, send)
    requests: queue.Queue = queue.Queue()
    current = {"id": None}
    cancelled_ids = set()  # a cancel may overtake its request while that still waits in the queue

    def take(line: bytes) -> None:
        try:
            msg = parse_request(line)
        except BadRequest as exc:
            send({"id": exc.rid, "type": "error", "kind": "input", "message": str(exc)})
            return
        if msg["cmd"] == "cancel":
            cancelled_ids.add(msg.get("id"))
            if msg.get("id") in (None, current["id"]):
                worker.cancel_event.set()
            return
        requests.put(msg)

    def read_requests():
        # A thread of its own, so that a cancel arrives while the main thread computes. Whatever a line
        # holds, this thread answers it and reads on: when it ends, the worker ends.
        try:
            for line in read_lines(getattr(stdin, "buffer", stdin)):
                if line:
                    try:
                        take(line)
                    except Exception as exc:  # noqa: BLE001 - a bug here must not stop the reading
                        send({"id": None, "type": "error", "kind": "internal", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            worker.client_gone.set()  # stop what runs at its next progress step, cancel what waits, leave
            requests.put(None)

    threading.Thread(target=read_requests, name="msis-worker-stdin", daemon=True).start()
    send({"id": None, "type": "ready", "pid": os.getpid()})
    while True:
        msg = requests.get()
        if worker.client_gone.is_set():
            return 0
        if msg is None or msg.get("cmd") == "shutdown":
            if msg is not None:
                send({"id": msg.get("id"), "type": "result"})
            return 0
        rid = msg.get("id")
        current["id"] = rid
        worker.cancel_event.clear()
        if rid in cancelled_ids:
            worker.cancel_event.set()
        try:
            result = worker.handle(msg)
            send({"id": rid, "type": "result", **(result or {})})
        except Cancelled:
            send({"id": rid, "type": "error", "kind": "cancelled", "message": "cancelled"})
        except InputError as exc:
            send({"id": rid, "type": "error", "kind": "input", "message": str(exc)})
        except Exception as exc:  # the worker survives whatever one request does
            send({"id": rid, "type": "error", "kind": "internal", "message": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()})
        finally:
            current["id"] = None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MSInstanceSaliencyLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="folder for the arrays exchanged with the client")
    args = parser.parse_args(argv)
    # stdout carries the protocol only: keep a private copy of it and send everything else to stderr
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    from .models.device import env_threads

    env_threads(leave_free=1)  # the client (Slicer, a web server) keeps a core for its own user interface
    return serve(args.workdir, stdout=protocol)


if __name__ == "__main__":
    sys.exit(main())
