"""The module's side of the worker process: volumes from MRML to the worker, results back into MRML.

No Qt and no slicer.app here (slicer-core runs it in CI against a real worker process). `p` is the
module's parameter node, or anything with the same attributes (flairVolume, mprageVolume,
modelPath, device, lesionLabels, ...). The worker is sent only what it lacks: the model, the case
and the lesion labels are each re-sent when they changed, or when the worker was restarted.

Each step is written once, as a generator (`segment_steps(p)`, `explain_steps(p)`, ...) that holds all
its MRML code and yields a `Request` wherever it needs the worker; the answer comes back as the value
of the yield. Why: the Slicer face blocks while the worker works (its progress callback keeps the GUI
alive), while an asyncio face (the web app) must keep its event loop free during the tens of seconds a
request takes and may touch MRML and VTK only on the loop's thread (its renders are asyncio tasks
scheduled from MRML observers). One body of MRML code serves both through two drivers:
`run(steps, progress)` does every request on the caller's thread (segment(p, progress) and the other
plain methods are run(segment_steps(p), progress)); `await run_async(steps, progress, cancel)` runs the
generator on the loop's thread and each request in a worker thread.

Stages: each request carries a `label` ("Starting the worker (loading torch)…", "Loading the model…",
...), and the steps yield a Request(STAGE, label=...) before blocking work of their own (writing the
input volumes). Both drivers call the session's `on_stage(label)` (when set) as each begins, on the
thread that runs the steps, so a face can say what is going on; at a STAGE the blocking driver also
calls progress(None, None), and False cancels there (Cancelled is thrown into the steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from typing import Callable

import slicer

from MSInstanceSaliencyLib.errors import Cancelled, InputError

from . import (add_saliency_volume, add_volume, array_from_volume_node, fill_lesion_table, ijk_to_ras, image_from_volume_node,
               labels_to_segmentation, lesion_table_rows, mark_labels_current, segment_mask, set_tp_probability, set_volume_from_array)


def volume_key(node):
    """Changes whenever the voxels or the geometry of a volume node change."""
    image = node.GetImageData()
    return (node.GetID(), image.GetMTime() if image is not None else 0, tuple(ijk_to_ras(node).ravel().round(6)))


def reference_volume(p):
    """The volume whose grid every output lies on: the MPRAGE, or the FLAIR for a FLAIR-only model without one."""
    return p.mprageVolume or p.flairVolume


def method_arguments(p) -> dict:
    """The worker's explain arguments for the module's method settings."""
    return dict(method="gradcampp" if p.method == "Grad-CAM++" else "smoothgrad", n_samples=int(p.nSamples), sigma=float(p.sigma),
                aggregation="max" if p.method == "SmoothGrad max" else "mean", context=p.context, layer=p.gradcamLayer or None,
                max_omega_voxels=int(p.maxOmegaVoxels) or None)


START = "__start__"  # a Request's cmd: start the worker process (it blocks for seconds, so the drivers do it like a request)
STAGE = "__stage__"  # a Request's cmd: no work, only its label for on_stage (before the steps block on work of their own)

LABELS = {START: "Starting the worker (loading torch)…", "info": "Asking the worker what it sees (torch, GPU)…",
          "load_model": "Loading the model…", "prepare": "Preparing the case…", "set_labels": "Sending the lesion labels to the worker…",
          "segment": "Segmenting…", "explain": "Computing the saliency map…", "score": "Computing TP probabilities…"}


@dataclasses.dataclass
class Request:
    """What a step needs from the worker: `cmd` with `arguments` (WorkerClient.request), or cmd START,
    or STAGE (nothing to do). on_message(msg) gets the request's streamed messages (score's lesions);
    the drivers call it on the thread that runs the steps, so it may write MRML. `label`: what the face
    may show while it runs (by default the command's entry in LABELS)."""

    cmd: str
    arguments: dict = dataclasses.field(default_factory=dict)
    on_message: Callable | None = None
    label: str = ""

    def __post_init__(self):
        self.label = self.label or LABELS.get(self.cmd, "")


class TPScores(dict):
    """What scoring returns: {lesion id: P(TP), or None where it could not be computed}, and `errors`
    {lesion id: why not} for those (the same text is in the table's TP note column)."""

    def __init__(self, *args, errors=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors = dict(errors or {})


class WorkerSession:
    """One worker process (started on first use) and what it holds."""

    def __init__(self, python=None, env=None, log=None, on_stage=None):
        self._options = dict(python=python, env=env, log=log or (lambda line: logging.info(f"[worker] {line}")))
        self._client = None
        self._running_steps = False
        self.on_stage = on_stage  # on_stage(label) as each request or stage begins (the module docstring)

    @property
    def client(self):
        from MSInstanceSaliencyLib.worker_client import WorkerClient

        if self._client is None:
            self._client = WorkerClient(**self._options)
        return self._client

    @property
    def running(self) -> bool:
        return self._client is not None and self._client.alive

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def request(self, cmd, progress=None, on_message=None, **arguments):
        return self.client.request(cmd, progress=progress, on_message=on_message, **arguments)

    # -- the drivers: run a step's generator to its end, doing the requests it yields

    def run(self, steps, progress=None, first=None):
        """Runs `steps` on this thread, every request blocking here with progress(done, total) as
        WorkerClient.request has it (returning False cancels); returns what the generator returns.
        An exception of a request is thrown into the generator where it yielded, so its try/finally
        and except clauses work as around a plain call; unhandled, it comes out of run.
        `first`: the request `steps` already yielded (LesionWorkflow advances its steps once, to check
        the state before it makes a session)."""
        def execute(request):
            self._stage(request)
            if request.cmd == STAGE:
                if progress is not None and progress(None, None) is False:
                    raise Cancelled("cancelled")
                return None
            return self._execute(request, progress, request.on_message)

        with self._one_run(steps):
            return _drive(steps, first, execute)

    async def run_async(self, steps, progress=None, cancel=None, first=None):
        """Like run, for an asyncio face: the generator (all MRML code, on_message included) runs on
        the event loop's thread, each request in a worker thread, so the loop stays free meanwhile.
        progress(done, total) is called on the loop's thread with each new value (False cancels, as in
        run); `cancel` (a threading.Event, or anything with is_set()) cancels the running request when
        set: it raises Cancelled, after the worker stopped at its next progress step, or killed after
        the client's cancel_grace_s (a worker still starting is killed at once). Cancelling the task
        cancels the request too (and waits until it ended, so that the next step finds the worker free).
        The requests always carry a progress callback, so the client's silence timeout does not apply;
        the session's `log` is called on the request's thread (it must not touch MRML); on_stage on the loop's."""
        async def execute(request):
            self._stage(request)
            if request.cmd == STAGE:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                return None
            return await self._execute_async(request, progress, cancel)

        with self._one_run(steps):
            return await _drive_async(steps, first, execute)

    def _stage(self, request):
        if self.on_stage is not None and request.label:
            self.on_stage(request.label)

    @contextlib.contextmanager
    def _one_run(self, steps):
        # one client, one request at a time: a second step (another click in a web page) must not interleave its requests
        if self._running_steps:
            steps.close()
            raise RuntimeError("the worker is busy with another step: wait for it to end, or cancel it")
        self._running_steps = True
        try:
            yield
        finally:
            self._running_steps = False

    def _execute(self, request, progress=None, on_message=None):
        if request.cmd == START:
            self.client.start(progress)  # no-op when it runs; progress keeps the GUI alive, False kills the starting worker
            return None
        return self.client.request(request.cmd, progress=progress, on_message=on_message, **request.arguments)

    async def _execute_async(self, request, progress, cancel):
        """One request in a worker thread. The face's progress and the request's on_message run on the
        loop's thread, in the order they came; every message has run when this returns or raises."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()  # set on the loop's thread: the task was cancelled, or a callback failed or said stop
        failure = []  # the first exception of a callback: raised after the request, in place of its answer
        inbox = queue.SimpleQueue()
        last, ended = [None], threading.Event()

        def on_loop(call, *args):
            if failure or ended.is_set():  # a tick's progress that arrives after the request's end is stale
                return
            try:
                if call(*args) is False and call is progress:
                    stop.set()
            except BaseException as exc:  # raised where the step awaits, not lost in the loop's exception handler
                failure.append(exc)
                stop.set()

        def deliver():  # on the loop's thread: the messages that arrived so far, in order
            while True:
                try:
                    msg = inbox.get_nowait()
                except queue.Empty:
                    return
                on_loop(request.on_message, msg)

        def thread_progress(done, total):  # on the request's thread, every client tick
            if progress is not None and last[0] != (done, total):
                last[0] = (done, total)
                loop.call_soon_threadsafe(on_loop, progress, done, total)
            return not (stop.is_set() or (cancel is not None and cancel.is_set()))

        def thread_message(msg):  # on the request's thread: written into MRML by deliver, soon, on the loop's thread
            inbox.put(msg)
            loop.call_soon_threadsafe(deliver)

        future = loop.run_in_executor(None, self._execute, request, thread_progress, thread_message if request.on_message else None)
        try:
            try:
                return await asyncio.shield(future)  # shielded: cancelling the task must not forget the running request
            except asyncio.CancelledError:
                stop.set()
                with contextlib.suppress(Exception):
                    await future  # the thread cannot be killed: wait until the client has cancelled the request
                raise
        finally:
            deliver()  # what is left (a cancelled score keeps the lesions already done)
            ended.set()
            if failure:
                raise failure[0]

    # -- what the worker holds

    def model_info(self) -> dict | None:
        """What the loaded model is and expects (its describe()), None before a model is loaded."""
        return self._client.synced.get("model_info") if self.running else None

    def info_steps(self, device="auto"):
        """The worker's torch build, GPUs and packages (asked once per worker process)."""
        client = self.client
        if not client.alive:
            yield Request(START)  # a new worker starts with empty `synced`
        if "info" not in client.synced:
            info = yield Request("info", dict(device=device))
            client.synced["info"] = info
        return client.synced["info"]

    def info(self, device="auto", progress=None) -> dict:
        return self.run(self.info_steps(device), progress)

    def case_warnings(self) -> list:
        """What the user must know about the inputs the worker holds (e.g. a FLAIR covering part of the MPRAGE)."""
        return self._client.synced.get("case_warnings", []) if self.running else []

    def last_info(self):
        return self._client.synced.get("info") if self.running else None

    def sync_model_steps(self, p):
        yield from self.info_steps(p.device)
        synced = self.client.synced
        key = (p.modelPath or "", p.device)
        if synced.get("model") != key:
            synced.pop("model", None)
            synced["model_info"] = yield Request("load_model", dict(model=p.modelPath or None, device=p.device))
            synced["model"] = key
            synced.pop("case", None)  # prepared for the previous model's channels and normalisation
        return synced["model_info"]

    def sync_model(self, p, progress=None) -> dict:
        return self.run(self.sync_model_steps(p), progress)

    def sync_steps(self, p, labels=True):
        """Model, case (p.registerFlair: FLAIR rigidly registered to the MPRAGE first) and labels, where the
        worker lacks them; returns the model's info."""
        import SimpleITK as sitk

        from MSInstanceSaliencyLib.worker import save_array

        info = yield from self.sync_model_steps(p)
        if not p.flairVolume:
            raise ValueError("Select the FLAIR volume.")
        if not p.mprageVolume and "mprage" in info.get("input_channels", ["mprage"]):
            raise ValueError("This model needs the MPRAGE (T1) as well: select it.")
        synced, client = self.client.synced, self.client
        register = bool(getattr(p, "registerFlair", False)) and bool(p.mprageVolume)
        key = (volume_key(p.flairVolume), volume_key(p.mprageVolume) if p.mprageVolume else None, register)
        if synced.get("case") != key:
            synced.pop("case", None)
            synced.pop("labels", None)
            files = {}
            yield Request(STAGE, label="Writing the volumes for the worker…")  # seconds for large volumes
            for name, node in (("flair", p.flairVolume), ("mprage", p.mprageVolume)):
                if node is None:
                    continue
                files[name] = client.path(f"{name}.nrrd")
                sitk.WriteImage(image_from_volume_node(node), files[name])
            prepared = yield Request("prepare", dict(files, register=register),
                                     label="Registering the FLAIR to the MPRAGE…" if register else "")
            synced["case_warnings"] = prepared.get("warnings", [])
            synced["case"] = key
        if labels and p.lesionLabels and synced.get("labels") != volume_key(p.lesionLabels):
            path = save_array(client.path("labels.npy"), array_from_volume_node(p.lesionLabels).astype("int32"))
            yield Request("set_labels", dict(path=path))
            synced["labels"] = volume_key(p.lesionLabels)
        return info

    def sync(self, p, progress=None, labels=True) -> None:
        return self.run(self.sync_steps(p, labels), progress)

    # -- the work

    def segment_steps(self, p):
        """Probability, labels, one segment per lesion and the lesion table, into p's nodes (created when missing)."""
        from MSInstanceSaliencyLib.worker import load_array

        yield from self.sync_steps(p, labels=False)
        result = yield Request("segment", dict(threshold=float(p.threshold), min_volume_mm3=float(p.minLesionVolume)))
        prob, labels = load_array(result["probability"], remove=True), load_array(result["labels"], remove=True)
        ref = reference_volume(p)
        if p.lesionLabels:
            set_volume_from_array(p.lesionLabels, labels, ref)
        else:
            # kept (and saved with the scene) to map a clicked RAS point to its lesion id
            p.lesionLabels = add_volume(labels, ref, "MS lesion labels", "vtkMRMLLabelMapVolumeNode")
        self.client.synced["labels"] = volume_key(p.lesionLabels)  # the worker made them
        if p.probabilityVolume:
            set_volume_from_array(p.probabilityVolume, prob, ref)
        else:
            p.probabilityVolume = add_volume(prob, ref, "MS lesion probability")
        p.lesionSegmentation = labels_to_segmentation(labels, ref, p.lesionSegmentation)
        mark_labels_current(p.lesionLabels, p.lesionSegmentation)  # edits of the segments are taken back later (workflow)
        if not p.lesionTable:
            p.lesionTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "MS lesions")
        fill_lesion_table(p.lesionTable, result["table"])
        p.selectedLesion = 0
        return result["table"]

    def segment(self, p, progress=None) -> list:
        return self.run(self.segment_steps(p), progress)

    def explain_steps(self, p, on_partial=None, partial_interval_s=2.0):
        """The map of the picked lesion (or of the custom region) as a volume on the MPRAGE geometry:
        {"node", "tp_probability" (when the map was made with the classifier's settings), "tp_note"}.
        on_partial(node, copies_done, n_samples) (SmoothGrad): the map so far, as the noisy copies arrive
        (the mean over the copies so far is itself a SmoothGrad with fewer samples), at most every
        partial_interval_s seconds; it is shown in the node the final map then overwrites."""
        from MSInstanceSaliencyLib.worker import load_array, save_array

        info = yield from self.sync_steps(p)
        arguments = method_arguments(p)
        if arguments["method"] != "gradcampp":
            check_display_channel(p.displayChannel, info)  # before the SmoothGrad, not after it
        if p.useCustomRegion:
            if not p.customRegionSegmentation or not p.customRegionSegmentId:
                raise ValueError("Choose the segment to explain in 'Custom region'.")
            mask = segment_mask(p.customRegionSegmentation, p.customRegionSegmentId, reference_volume(p))
            if not mask.any():
                raise ValueError("The region to explain is empty on the MPRAGE (or FLAIR-only) grid.")
            arguments["mask"] = save_array(self.client.path("region.npy"), mask)
            name = p.customRegionSegmentation.GetSegmentation().GetSegment(p.customRegionSegmentId).GetName()
        else:
            if not p.selectedLesion:
                raise ValueError("Pick a lesion first (table row or click in a view).")
            arguments["lesion_id"] = int(p.selectedLesion)
            name = f"Lesion {p.selectedLesion}"
        gradcam = arguments["method"] == "gradcampp"
        title = f"{name} Grad-CAM++" if gradcam else f"{name} SmoothGrad {p.displayChannel}"
        replace = None if p.keepEarlierMaps or not p.saliencyVolume else p.saliencyVolume
        partial = [replace]  # the node the partial maps go to, then the final one

        def received(msg):
            if msg.get("type") != "partial" or p.displayChannel.lower() not in msg["maps"]:
                return
            done, n = int(msg["copies_done"]), int(msg["n_samples"])
            shown = load_array(msg["maps"][p.displayChannel.lower()])  # rewritten whole by the worker for the next one
            partial[0] = add_saliency_volume(shown, reference_volume(p), f"{title} ({done}/{n} copies)", replace=partial[0])
            on_partial(partial[0], done, n)

        if on_partial is not None and not gradcam:
            arguments.update(partial_every=1, partial_interval_s=float(partial_interval_s))
        result = yield Request("explain", arguments, on_message=received if on_partial is not None and not gradcam else None)
        maps = {key: load_array(path, remove=True) for key, path in result["maps"].items()}
        shown = maps["gradcampp"] if gradcam else maps[p.displayChannel.lower()]
        p.saliencyVolume = add_saliency_volume(shown, reference_volume(p), title, replace=partial[0])
        if result["tp_probability"] is not None:
            set_tp_probability(p.lesionTable, int(p.selectedLesion), result["tp_probability"], note="")
        return {"node": p.saliencyVolume, "tp_probability": result["tp_probability"], "tp_note": result["tp_note"]}

    def explain(self, p, progress=None) -> dict:
        return self.run(self.explain_steps(p), progress)

    def score_steps(self, p, lesion_ids):
        """TPScores {lesion id: P(TP) or None} with .errors {lesion id: why not}; each result goes into the
        table as soon as it arrives (a failure as NaN with its reason in the TP note column), so a cancelled
        run keeps the lesions already done."""
        yield from self.sync_steps(p)
        probs = TPScores()

        def received(msg):
            lid, prob, error = int(msg["lesion_id"]), msg["tp_probability"], msg.get("error") or ""
            probs[lid] = prob
            if prob is None:
                error = error or "the TP probability could not be computed"
                probs.errors[lid] = error
                logging.warning(error)
            set_tp_probability(p.lesionTable, lid, prob, note=error)

        yield Request("score", dict(lesion_ids=[int(i) for i in lesion_ids]), on_message=received,
                      label=f"Computing the TP probability of {len(lesion_ids)} lesion(s)…")
        return probs

    def score(self, p, lesion_ids, progress=None) -> dict:
        return self.run(self.score_steps(p, lesion_ids), progress)

    def layers_steps(self, p):
        """(the model's Grad-CAM++ layer names, its default layer)"""
        info = yield from self.sync_model_steps(p)
        return info["layers"], info["gradcam_layer"]

    def layers(self, p, progress=None) -> tuple[list, str]:
        return self.run(self.layers_steps(p), progress)


def _resume(steps, answer, error):
    """Sends a request's answer into `steps` (or throws its error in): (the next request, False), or
    (the generator's result, True) when it ended."""
    try:
        return (steps.send(answer) if error is None else steps.throw(error)), False
    except StopIteration as done:
        return done.value, True


def _drive(steps, request, execute):
    """The loop of run: `request` is the one `steps` already yielded, or None to start it."""
    answer, error = None, None
    while True:
        if request is None:
            request, ended = _resume(steps, answer, error)
            if ended:
                return request
        answer, error = None, None
        try:
            answer = execute(request)
        except BaseException as exc:  # Cancelled, a worker error, Ctrl-C: the generator decides
            error = exc
        request = None


async def _drive_async(steps, request, execute):
    """The loop of run_async; the same as _drive, with the requests awaited."""
    answer, error = None, None
    while True:
        if request is None:
            request, ended = _resume(steps, answer, error)
            if ended:
                return request
        answer, error = None, None
        try:
            answer = await execute(request)
        except BaseException as exc:  # asyncio.CancelledError as well: thrown in, and out again unless caught
            error = exc
        request = None


def model_channels(model_info) -> list:
    """The display names (FLAIR, MPRAGE) of a model's input channels, in the order of the module's choice."""
    have = [c.lower() for c in model_info.get("input_channels", [])]
    return [name for name in ("FLAIR", "MPRAGE") if name.lower() in have]


def check_display_channel(channel, model_info) -> None:
    """The SmoothGrad channel to show must be one the model takes (a FLAIR-only model has no MPRAGE map)."""
    if model_info and str(channel).lower() not in [c.lower() for c in model_info.get("input_channels", [])]:
        raise InputError(f"This model takes {' + '.join(model_channels(model_info))} only: set 'Show channel' to one of them "
                         f"(not {channel}).")


def known_tp_probability(table_node, lesion_id):
    """A lesion's TP probability as the table holds it (also after reopening a scene), or None."""
    if table_node is None:
        return None
    for row in lesion_table_rows(table_node):
        if int(row["Lesion"]) == int(lesion_id):
            value = row["TP probability"]
            return None if value != value else value  # NaN: not computed
    return None
