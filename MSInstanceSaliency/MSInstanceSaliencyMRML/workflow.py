"""The lesion workflow that every face of the module shares: segment -> lesion table -> select a lesion
-> explain it -> overlay -> TP probability -> remove unlikely lesions.

No Qt, no slicer.app and no slicer.modules here: the Slicer module (MSInstanceSaliency.py) and the web
app drive the same steps on the same MRML nodes through the same worker session, and pytest runs
them with slicer-core and a real worker (Testing/Python/test_workflow.py). What only a face can do
stays in the face: moving its slice views (select_lesion returns the RAS point to jump to), showing
the layers and the colour legend (explain returns the overlay node and its title), dialogs,
installing packages.

The state is anything with the fields of `WorkflowState`: the Slicer face passes its parameter node
(MSInstanceSaliencyParameterNode, which has the same field names and defaults and is saved with the
scene), the web face a plain WorkflowState. Every step checks the state first and raises InputError
(a ValueError) with one line saying what to do, before the worker starts or works.

The steps that need the worker are generators (`segment_steps()`, `explain_steps()`, `score_steps(ids)`,
`score_all_steps()`, `layers_steps()`, `worker_info_steps()`; worker_session.py says how they yield
requests): one body of MRML code for the Slicer face, which blocks (`segment(progress)` is
`run(segment_steps(), progress)`), and for the asyncio web face, which keeps its event loop free and
touches MRML only on the loop's thread (`await run_async(segment_steps(), progress, cancel)`). The
checks run when the generator is first advanced, before any request and before a session is made.
"""

from __future__ import annotations

import dataclasses

from MSInstanceSaliencyLib import dependencies
from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.io.volumes import check_distinct_inputs

from . import (highlight_lesion, labels_follow_segmentation, lesion_id_at_ras, lesion_table_rows, mark_labels_current, segment_id_of_lesion,
               tp_note, voxels_and_grid)
from . import remove_lesions as remove_lesions_everywhere
from .worker_session import WorkerSession, check_display_channel, known_tp_probability, model_channels, reference_volume

METHODS = ["SmoothGrad max", "SmoothGrad mean", "Grad-CAM++"]
CHANNELS = ["FLAIR", "MPRAGE"]
DEVICES = ["auto", "cuda", "cpu"]
CONTEXTS = ["patch", "full"]
# the allowed values of the settings; the Slicer parameter node declares the same (Choice, WithinRange)
CHOICES = {"method": METHODS, "displayChannel": CHANNELS, "device": DEVICES, "context": CONTEXTS}
RANGES = {"threshold": (0.01, 0.99), "minLesionVolume": (0.0, 10000.0), "nSamples": (1, 1000), "maxOmegaVoxels": (0, 100000),
          "sigma": (0.0, 1.0), "overlayOpacity": (0.0, 1.0), "pruneBelow": (0.0, 1.0)}

# what a saliency volume shows, kept on the node itself (saved with the scene, also for earlier maps)
SHOWS_LESION, SHOWS_REGION, SHOWS_METHOD, SHOWS_CHANNEL = (f"MSInstanceSaliency.Shows{k}" for k in ("Lesion", "Region", "Method", "Channel"))


@dataclasses.dataclass
class WorkflowState:
    """The workflow's state: inputs, settings and the nodes it made. camelCase because these are the
    field names of the Slicer module's parameter node, which is the state in Slicer."""

    flairVolume: object = None
    mprageVolume: object = None  # optional for a FLAIR-only model
    registerFlair: bool = False  # rigid FLAIR-to-MPRAGE registration before resampling (inputs not already aligned)
    modelPath: str = ""  # empty: the bundled demo model
    device: str = "auto"
    threshold: float = 0.3
    minLesionVolume: float = 5.0
    lesionSegmentation: object = None
    lesionTable: object = None
    lesionLabels: object = None  # instance label map: a voxel's value is its lesion id (picking, the worker's Ω)
    probabilityVolume: object = None
    selectedLesion: int = 0  # 0: none
    useCustomRegion: bool = False
    customRegionSegmentation: object = None
    customRegionSegmentId: str = ""
    method: str = "SmoothGrad max"
    nSamples: int = 50
    maxOmegaVoxels: int = 0  # 0: the max over all lesion voxels
    sigma: float = 0.05
    displayChannel: str = "FLAIR"
    context: str = "patch"
    gradcamLayer: str = ""  # empty: the model's default layer
    keepEarlierMaps: bool = True
    saliencyVolume: object = None  # the map made last (saliency_shown says what it shows)
    overlayOpacity: float = 0.5
    pruneBelow: float = 0.5


def check_settings(state) -> None:
    """Each choice among its allowed values and each number within its range (a web form checks nothing)."""
    for name, allowed in CHOICES.items():
        value = getattr(state, name)
        if value not in allowed:
            raise InputError(f"setting {name} = {value!r} is not one of: {', '.join(allowed)}")
    for name, (low, high) in RANGES.items():
        value = getattr(state, name)
        try:
            inside = not isinstance(value, bool) and low <= float(value) <= high
        except (TypeError, ValueError):
            inside = False
        if not inside:
            raise InputError(f"setting {name} = {value!r} is not a number from {low} to {high}")


def lesion_id(value) -> int:
    """A lesion id from an int, a whole float (the table holds doubles) or a digit string."""
    try:
        lid = int(float(value))
        whole = lid == float(value) and not isinstance(value, bool)
    except (TypeError, ValueError):
        lid, whole = 0, False
    if lid <= 0 or not whole:
        raise InputError(f"{value!r} is not a lesion id (a whole number from 1, as in the table's Lesion column)")
    return lid


class LesionWorkflow:
    """The steps on one state, with one worker session (started on first use, kept between steps so
    the model and the case stay loaded). `session_factory` makes the WorkerSession: Slicer starts the
    worker with PythonSlicer, other faces with their own Python."""

    def __init__(self, state=None, session_factory=WorkerSession):
        self.state = WorkflowState() if state is None else state
        self._session_factory = session_factory
        self._session = None
        # on_stage(text): called as each stage of a step begins ("Starting the worker (loading torch)…",
        # "Loading the model…", ...; worker_session's docstring), on the thread that runs the steps
        self.on_stage = None

    # -- the worker

    @property
    def session(self) -> WorkerSession:
        if self._session is None:
            self._session = self._session_factory()
        self._session.on_stage = self.on_stage
        return self._session

    def shutdown(self) -> None:
        """Stop the worker; the next step starts a new one."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def run(self, steps, progress=None):
        """Runs a step's generator to its end, blocking (WorkerSession.run); returns its result."""
        request, result = _advanced(steps)
        return result if request is None else self.session.run(steps, progress, first=request)

    async def run_async(self, steps, progress=None, cancel=None):
        """Runs a step's generator on the event loop's thread, its requests in a worker thread
        (WorkerSession.run_async: progress on the loop's thread, `cancel` an Event that cancels)."""
        request, result = _advanced(steps)
        return result if request is None else await self.session.run_async(steps, progress, cancel, first=request)

    def worker_info_steps(self, device=None):
        return (yield from self.session.info_steps(device or getattr(self.state, "device", "auto")))

    def worker_info(self, start=True, progress=None, device=None):
        """What the worker sees (torch build, GPU, pyradiomics); None when none runs and start is False."""
        if not start:
            return self._session.last_info() if self._session else None
        return self.run(self.worker_info_steps(device), progress)

    def model_info(self):
        """What the loaded model is and expects; None before one is loaded."""
        return self._session.model_info() if self._session else None

    def channels(self) -> list:
        """The channels 'Show channel' may take: the loaded model's inputs (["FLAIR"] for a FLAIR-only
        model), all of CHANNELS before a model is loaded (Explain checks it once the model is there)."""
        info = self.model_info()
        return model_channels(info) if info else list(CHANNELS)

    def case_warnings(self) -> list:
        """What the user must know about the inputs the worker holds (e.g. a FLAIR covering part of the MPRAGE)."""
        return self._session.case_warnings() if self._session else []

    def layers_steps(self):
        """(the model's Grad-CAM++ layer names, its default layer)"""
        check_settings(self.state)
        return (yield from self.session.layers_steps(self.state))

    def layers(self, progress=None):
        return self.run(self.layers_steps(), progress)

    # -- checks of the state, before any work

    def _inputs_ready(self):
        s = self.state
        check_settings(s)
        if not s.flairVolume:
            raise InputError("Select the FLAIR volume first (input 'FLAIR').")
        if s.mprageVolume:  # the same node, or two nodes with the same voxels on the same grid
            check_distinct_inputs(voxels_and_grid(s.flairVolume), voxels_and_grid(s.mprageVolume))
        return s

    def _labels_current(self):
        """The label map made again from the lesion segments when they were edited (Segment Editor) since
        it was made, so picking, Explain and Score follow the edit."""
        s = self._lesions_ready()
        reference = reference_volume(s) if s.flairVolume else s.lesionLabels
        labels_follow_segmentation(s.lesionLabels, s.lesionSegmentation, reference)
        return s

    def _lesions_ready(self):
        s = self.state
        if not (s.lesionLabels and s.lesionSegmentation and s.lesionTable):
            raise InputError("Segment first: there are no lesions yet (or their label map, segmentation or table was deleted).")
        return s

    def _segment_of(self, lid: int) -> str:
        sid = segment_id_of_lesion(self._lesions_ready().lesionSegmentation, lid)
        if sid is None:
            raise InputError(f"Lesion {lid} does not exist (it may have been removed): pick another one in the table.")
        return sid

    def lesion_ids(self) -> list:
        """The lesions of the table, in its order."""
        return [int(r["Lesion"]) for r in lesion_table_rows(self._lesions_ready().lesionTable)]

    # -- segment, select

    def segment_steps(self):
        """Fills (or makes) the label map, probability volume, segmentation and table; the lesion rows.
        Any earlier selection is cleared."""
        state = self._inputs_ready()  # before the session: a bad state must not start a worker
        return (yield from self.session.segment_steps(state))

    def segment(self, progress=None) -> list:
        return self.run(self.segment_steps(), progress)

    def select_lesion(self, lesion) -> tuple:
        """Makes `lesion` the region to explain and highlights it; returns its centre (RAS) for the
        face to move its views to."""
        lid = lesion_id(lesion)
        sid = self._segment_of(lid)
        s = self.state
        s.selectedLesion, s.useCustomRegion = lid, False
        highlight_lesion(s.lesionSegmentation, lid)
        return tuple(s.lesionSegmentation.GetSegmentCenterRAS(sid))

    def lesion_at_ras(self, ras):
        """The lesion id under a clicked RAS point, or None outside every lesion."""
        return lesion_id_at_ras(self._labels_current().lesionLabels, ras)

    # -- explain

    def explain_steps(self, on_partial=None):
        """The map of the selected lesion (or of the custom region) as a volume on the reference grid,
        with the transparent-near-0 diverging colours: {"node", "title" (for the legend),
        "tp_probability" (when made with the classifier's settings, else None), "tp_note" (why not)}.
        on_partial(node, copies_done, n_samples): SmoothGrad's map so far, for a face to show early."""
        s = self._inputs_ready()
        if s.useCustomRegion:
            if not s.customRegionSegmentation or not s.customRegionSegmentId:
                raise InputError("Choose the segment to explain in 'Custom region'.")
            segment = s.customRegionSegmentation.GetSegmentation().GetSegment(s.customRegionSegmentId)
            if segment is None:
                raise InputError(f"The custom region's segment {s.customRegionSegmentId!r} no longer exists: choose another one.")
            lid, region = 0, segment.GetName()
        else:
            if not s.selectedLesion:
                raise InputError("Pick a lesion first (a table row, or a click in a view).")
            lid = int(s.selectedLesion)
            self._segment_of(lid)
            region = f"Lesion {lid}"
        if s.method != "Grad-CAM++":
            check_display_channel(s.displayChannel, self.model_info())  # known when a model is loaded; else the session checks
        if s.lesionLabels and s.lesionSegmentation and s.lesionTable:
            self._labels_current()
        result = yield from self.session.explain_steps(s, on_partial)
        node = result["node"]
        gradcam = s.method == "Grad-CAM++"
        for key, value in ((SHOWS_LESION, str(lid)), (SHOWS_REGION, region), (SHOWS_METHOD, s.method),
                           (SHOWS_CHANNEL, "" if gradcam else s.displayChannel)):
            node.SetAttribute(key, value)
        if lid:
            highlight_lesion(s.lesionSegmentation, lid, overlay_shown=True)  # outline only: a filled lesion hides the map
        return {**result, "title": node.GetName()}

    def explain(self, progress=None) -> dict:
        return self.run(self.explain_steps(), progress)

    def saliency_shown(self) -> dict | None:
        """The map made last and what it shows: {"node", "title", "lesion" (0: a custom region), "region",
        "method", "channel" ("" for Grad-CAM++)}; None before any."""
        node = self.state.saliencyVolume
        if not node:
            return None
        return {"node": node, "title": node.GetName(), "lesion": int(node.GetAttribute(SHOWS_LESION) or 0),
                "region": node.GetAttribute(SHOWS_REGION) or "", "method": node.GetAttribute(SHOWS_METHOD) or "",
                "channel": node.GetAttribute(SHOWS_CHANNEL) or ""}

    # -- TP probability, removal

    def known_tp_probability(self, lesion=None):
        """A lesion's TP probability as the table holds it (also after reopening a scene), or None;
        by default the selected lesion's."""
        lid = self.state.selectedLesion if lesion is None else lesion
        return known_tp_probability(self.state.lesionTable, lesion_id(lid)) if lid else None

    def known_tp_note(self, lesion=None) -> str:
        """Why the table has no TP probability for a lesion (the scoring's error, also after reopening a
        scene), '' when there is none; by default the selected lesion's."""
        lid = self.state.selectedLesion if lesion is None else lesion
        return tp_note(self.state.lesionTable, lesion_id(lid)) if lid else ""

    def score_steps(self, lesions):
        """worker_session.TPScores: {lesion id: P(TP) or None} and .errors {lesion id: why not}, written into
        the table lesion by lesion (the errors in its TP note column; a cancelled run keeps what was done)."""
        self._inputs_ready()
        ids = [lesion_id(v) for v in lesions]
        unknown = sorted(set(ids) - set(self.lesion_ids()))
        if unknown:
            raise InputError(f"Not in the lesion table (removed?): lesion {', '.join(map(str, unknown))}; score lesions of the table.")
        if not dependencies.has_radiomics():
            raise InputError(dependencies.RADIOMICS_HINT)
        if not ids:
            return {}
        self._labels_current()
        return (yield from self.session.score_steps(self.state, ids))

    def score(self, lesions, progress=None) -> dict:
        return self.run(self.score_steps(lesions), progress)

    def score_all_steps(self):
        return (yield from self.score_steps(self.lesion_ids()))

    def score_all(self, progress=None) -> dict:
        return self.run(self.score_all_steps(), progress)

    def lesions_below(self, threshold=None) -> list:
        """The scored lesions whose TP probability is below `threshold` (by default the state's pruneBelow);
        lesions not scored are never listed."""
        threshold = self.state.pruneBelow if threshold is None else threshold
        try:
            valid = not isinstance(threshold, bool) and 0.0 <= float(threshold) <= 1.0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise InputError(f"TP probability threshold {threshold!r} is not a number from 0 to 1")
        probs = {int(r["Lesion"]): r["TP probability"] for r in lesion_table_rows(self._lesions_ready().lesionTable)}
        return [lid for lid, p in probs.items() if p == p and p < float(threshold)]  # p != p: NaN, not scored

    def remove_lesions(self, lesions) -> int:
        """Removes the lesions' segments, table rows and label voxels (the worker gets the new labels
        before its next use); returns how many segments were removed."""
        s = self._labels_current()  # edits made before the removal are kept
        ids = {lesion_id(v) for v in lesions}
        removed = remove_lesions_everywhere(ids, s.lesionSegmentation, s.lesionTable, s.lesionLabels)
        mark_labels_current(s.lesionLabels, s.lesionSegmentation)
        if int(s.selectedLesion) in ids:
            s.selectedLesion = 0
        return removed


def _advanced(steps):
    """Advances a step's generator to its first request, which runs its state checks (raising
    InputError) before the session, and so the worker, exists: (the request, None), or (None, its
    result) when it ended without needing the worker."""
    try:
        return next(steps), None
    except StopIteration as done:
        return None, done.value


def tp_verdict(probability: float) -> str:
    """What a TP probability means for the reader, in the words both faces show."""
    return "likely true lesion" if probability >= 0.5 else "possible false positive"
