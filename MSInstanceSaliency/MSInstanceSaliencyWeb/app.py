"""`msis view`: the lesion workflow in a browser, on Slicer's own core (trame-slicer).

The page drives the same LesionWorkflow (MSInstanceSaliencyMRML/workflow.py), worker process and MRML
adapter as the Slicer module: segment -> lesion table -> pick a lesion (table row or a click in a view)
-> explain -> overlay and TP probability -> score all / remove unlikely lesions. The views are
slicer-core's slice views rendered here and streamed to the page as images.

Threads: MRML and VTK are touched on the event loop's thread only (trame-slicer schedules its renders
as asyncio tasks from MRML observers); only the blocking worker requests run in a thread
(LesionWorkflow.run_async). One scene per server process, so one user session: a second page is told so.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path

import slicer  # slicer-core: the same MRML classes as in Slicer
from trame.app import TrameApp
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_server.utils import asynchronous
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageLayout

import MSInstanceSaliencyMRML as mrml
from MSInstanceSaliencyLib.errors import Cancelled, InputError, WorkerError
from MSInstanceSaliencyLib.io.volumes import array_from_image, check_distinct_inputs, read_image
from MSInstanceSaliencyMRML.colors import saliency_rgba_table
from MSInstanceSaliencyMRML.workflow import CHOICES, LesionWorkflow, WorkflowState, tp_verdict

from .access import DataFolder
from .picking import connect_picker

log = logging.getLogger("msis.view")

LAYOUT_ID = "Axial Sagittal Coronal"
BUNDLED_MODEL = "bundled demo model"
# the page's settings: the workflow state's fields of the same name (checked by check_settings before each step)
SETTINGS = {"device": str, "threshold": float, "minLesionVolume": float, "method": str, "nSamples": int, "sigma": float,
            "displayChannel": str, "context": str, "overlayOpacity": float, "pruneBelow": float, "maxOmegaVoxels": int}
TABLE_HEADERS = [("id", "Lesion"), ("volume", "Volume (mm³)"), ("max_prob", "Max p"), ("tp", "P(TP)")]


def _number(value):
    """A table cell as the page shows it: NaN (not computed) as None."""
    return None if value != value else round(float(value), 3)


class MSISViewApp(TrameApp):
    def __init__(self, server=None, *, flair=None, mprage=None, model="", data=None, demo=None, results_dir=None,
                 session_factory=None):
        """flair/mprage: files to open at start (or `demo`: a phantom (flair, mprage) pair of SimpleITK images);
        model: what `--model` takes ('' = bundled); data: the folder the page may open files from;
        results_dir: where the downloads are written (served at /results)."""
        super().__init__(server=server, client_type="vue3")
        self.data = DataFolder(data)
        self.results_dir = Path(results_dir) if results_dir else None
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        slicer.mrmlScene = self.scene  # the MRML adapter's defaults and slicer.util use it
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view()]))
        self._picker = connect_picker(self.scene, self.on_pick)

        kwargs = {} if session_factory is None else {"session_factory": session_factory}
        self.workflow = LesionWorkflow(WorkflowState(modelPath=model or ""), **kwargs)
        self.workflow.on_stage = self._stage  # called on the event loop, which runs the steps
        self._stage_text = ""
        self._cancel = threading.Event()
        self._clients = 0  # pages connected now
        self._init_state(model)
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT_ID)
        self.ctrl.on_client_connected.add(self._client_connected)
        self.ctrl.on_client_exited.add(self._client_exited)
        self.state.change(*SETTINGS)(self._settings_changed)
        self.state.change("overlayOpacity")(self._opacity_changed)
        if self.results_dir is not None:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            self.server.enable_module({"serve": {"results": str(self.results_dir)}})

        if demo is not None:
            self._show_inputs(self._volume_from_image(demo[0], "FLAIR"), self._volume_from_image(demo[1], "MPRAGE"))
        elif flair:
            self._show_inputs(self._volume_from_file(flair, "FLAIR"), self._volume_from_file(mprage, "MPRAGE") if mprage else None)

    # -- state and page

    def _init_state(self, model):
        s, w = self.state, self.workflow.state
        for name in SETTINGS:
            s[name] = getattr(w, name)
        s.choices = {k: list(v) for k, v in CHOICES.items()}
        s.busy = ""  # the running step's name
        s.progress = 0
        s.progress_text = ""
        s.message = ""
        s.message_error = False
        s.inputs_text = "No volumes loaded."
        s.volume_files = self.data.volumes()
        s.model_files = [BUNDLED_MODEL, *self.data.models()]
        s.flair_file = s.mprage_file = None
        s.model_file = model or BUNDLED_MODEL
        s.lesion_rows = []
        s.sort_key, s.sort_desc = "id", False
        s.selected_lesion = 0
        s.last_pick = None  # {"view", "ras", "lesion" (0: none)} of the last click in a view
        s.tp_text = ""
        s.partial_maps, s.first_map_s = 0, None  # the partial SmoothGrad maps shown during the last Explain
        s.legend = None  # {"title", "max", "gradient"}
        s.worker_text = "Worker not started."
        s.downloads = []
        s.second_client = False
        s.headers = [{"key": k, "title": t} for k, t in TABLE_HEADERS]

    def _client_connected(self, *_args, **_kwargs):
        self._count_clients(+1)

    def _client_exited(self, *_args, **_kwargs):
        self._count_clients(-1)

    def _count_clients(self, change):
        self._clients = max(0, self._clients + change)
        with self.state:
            self.state.second_client = self._clients > 1

    def _say(self, text, error=False):
        self.state.message, self.state.message_error = text, error

    # -- volumes

    def _volume_from_file(self, path, name):
        image = read_image(path, name)  # one clear line on a bad file
        return self._volume_from_image(image, name)

    def _volume_from_image(self, image, name):
        array = array_from_image(image, dtype="float32")
        return mrml.add_volume(array, image, name, scene=self.scene)

    def _show_inputs(self, flair, mprage):
        w = self.workflow.state
        for old in (w.flairVolume, w.mprageVolume):
            if old is not None and old not in (flair, mprage):
                self.scene.RemoveNode(old)
        w.flairVolume, w.mprageVolume = flair, mprage
        self._clear_results()
        self.slicer_app.display_manager.show_volume_in_slice_background(flair)
        self.slicer_app.display_manager.reset_views()
        dims = flair.GetImageData().GetDimensions()
        spacing = ", ".join(f"{v:.2g}" for v in flair.GetSpacing())
        self.state.inputs_text = (f"FLAIR {dims[0]}×{dims[1]}×{dims[2]} ({spacing} mm)" +
                                  (", MPRAGE loaded" if mprage is not None else ", no MPRAGE (FLAIR-only models)"))

    def _clear_results(self):
        w = self.workflow.state
        for name in ("lesionSegmentation", "lesionTable", "lesionLabels", "probabilityVolume", "saliencyVolume"):
            node = getattr(w, name)
            if node is not None:
                self.scene.RemoveNode(node)
                setattr(w, name, None)
        w.selectedLesion = 0
        self.state.lesion_rows, self.state.selected_lesion, self.state.tp_text, self.state.legend = [], 0, "", None
        self.state.downloads = []

    def load_inputs(self):
        """The FLAIR and MPRAGE chosen in the page, from the data folder."""
        if self.state.busy:
            return self._say("Wait for the running step to end (or cancel it) before loading other volumes.", True)
        try:
            flair_path = self.data.resolve(self.state.flair_file or "")
            mprage_path = self.data.resolve(self.state.mprage_file) if self.state.mprage_file else None
            check_distinct_inputs(flair_path, mprage_path)  # before either is loaded
            flair = self._volume_from_file(flair_path, "FLAIR")
            mprage = self._volume_from_file(mprage_path, "MPRAGE") if mprage_path else None
        except InputError as exc:
            return self._say(str(exc), True)
        self._show_inputs(flair, mprage)
        self._say("Volumes loaded: press Segment.")

    def set_model(self):
        if self.state.busy:
            return self._say("Wait for the running step to end before changing the model.", True)
        choice = self.state.model_file
        try:
            self.workflow.state.modelPath = "" if choice == BUNDLED_MODEL else str(self.data.resolve(choice))
        except InputError as exc:
            return self._say(str(exc), True)
        self._clear_results()
        self._say(f"Model: {choice}. Press Segment.")

    def _settings_changed(self, **_):
        for name, kind in SETTINGS.items():
            value = self.state[name]
            try:
                value = kind(value)
            except (TypeError, ValueError):
                pass  # check_settings names it when a step starts
            setattr(self.workflow.state, name, value)

    def _opacity_changed(self, **_):
        """Only the overlay's opacity: the map shown (a partial one during Explain, too) stays."""
        try:
            opacity = float(self.state.overlayOpacity)
        except (TypeError, ValueError):
            return
        for view in self.slicer_app.view_manager.get_slice_views():
            if view.get_foreground_volume_id():
                view.set_foreground_opacity(opacity)

    # -- the steps

    def _start(self, name, make_steps, done):
        """Runs a workflow step on the event loop (its worker requests in a thread); one at a time."""
        if self.state.busy:
            self._say(f"{self.state.busy} is running: wait for it or press Cancel.", True)
            return None
        self._cancel.clear()
        self.state.busy, self.state.progress, self.state.progress_text = name, 0, f"{name} ..."
        self._stage_text = ""
        self._say("")
        return asynchronous.create_task(self._run(name, make_steps, done))

    async def _run(self, name, make_steps, done):
        t0 = time.monotonic()
        try:
            self._settings_changed()
            result = await self.workflow.run_async(make_steps(), progress=self._progress, cancel=self._cancel)
            with self.state:
                done(result)
                self.state.progress_text = f"{name}: done in {time.monotonic() - t0:.1f} s"
        except Cancelled:
            with self.state:
                self._say(f"{name} cancelled.")
        except (InputError, WorkerError, ValueError) as exc:
            with self.state:
                self._say(str(exc), True)
        except Exception as exc:  # the page must stay usable: say it, keep the details in the log
            log.exception("%s failed", name)
            with self.state:
                self._say(f"{name} failed: {type(exc).__name__}: {exc}", True)
        finally:
            with self.state:
                self.state.busy = ""
                self._show_worker_info()
                self._follow_model_channels()

    def _stage(self, text):
        """A stage of the running step begins ("Starting the worker (loading torch)…", "Loading the model…", ...)."""
        with self.state:
            self._stage_text = text
            self.state.progress = None  # no count until the stage reports one
            self.state.progress_text = f"{self.state.busy}: {text}"

    def _progress(self, done, total):
        with self.state:
            self.state.progress = round(100.0 * done / total) if total else None
            what = f"{self.state.busy}: {self._stage_text}" if self._stage_text else self.state.busy
            self.state.progress_text = f"{what} {done}/{total}" if total else f"{what} ..."

    def _follow_model_channels(self):
        """'Show channel' offers the loaded model's channels (every channel before a model is loaded)."""
        channels = self.workflow.channels()
        if list(self.state.choices.get("displayChannel", [])) != channels:
            self.state.choices = {**self.state.choices, "displayChannel": channels}
        if self.state.displayChannel not in channels:
            self.state.displayChannel = channels[0]

    def cancel(self):
        if self.state.busy:
            self._cancel.set()
            self.state.progress_text = f"{self.state.busy}: cancelling ..."

    def _show_worker_info(self):
        info = self.workflow.worker_info(start=False)
        if info:
            gpus = ", ".join(info.get("gpus") or []) or "no GPU"
            self.state.worker_text = f"torch {info.get('torch', '?')} ({info.get('device', '?')}; {gpus})"

    def segment(self):
        self._start("Segment", self.workflow.segment_steps, self._segmented)

    def _segmented(self, rows):
        self._refresh_table()
        self.state.selected_lesion, self.state.tp_text, self.state.legend = 0, "", None
        self._show_overlay()
        n = len(rows)
        self._say(f"{n} lesion{'s' if n != 1 else ''} found: pick one (a row, or a click on it in a view), then Explain." if n else
                  "No lesion found at this threshold.")

    def _refresh_table(self):
        w = self.workflow.state
        rows = [] if not w.lesionTable else mrml.lesion_table_rows(w.lesionTable)
        items = [{"id": int(r["Lesion"]), "volume": _number(r["Volume (mm3)"]), "max_prob": _number(r["Max probability"]),
                  "tp": _number(r["TP probability"])} for r in rows]
        key, desc = self.state.sort_key, self.state.sort_desc
        items.sort(key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0), reverse=desc)
        self.state.lesion_rows = items

    def sort_by(self, key):
        if key not in dict(TABLE_HEADERS):
            return
        self.state.sort_desc = (not self.state.sort_desc) if self.state.sort_key == key else False
        self.state.sort_key = key
        self._refresh_table()

    def select_lesion(self, lesion, jump=True):
        if self.state.busy:
            return self._say(f"{self.state.busy} is running: wait for it or press Cancel.", True)
        try:
            centre = self.workflow.select_lesion(lesion)
        except InputError as exc:
            return self._say(str(exc), True)
        lid = int(self.workflow.state.selectedLesion)
        if jump:
            for view in self.slicer_app.view_manager.get_slice_views():
                view.get_view_node().JumpSliceByCentering(*centre)
        self.state.selected_lesion = lid
        failed = self.workflow.known_tp_note(lid)  # a failed score's reason
        self._show_tp(self.workflow.known_tp_probability(lid), f"TP probability not computed: {failed}" if failed else
                      "TP probability not computed yet: Explain with the classifier's settings, or Score all")
        self._say(f"Lesion {lid} picked: press Explain.")

    def on_pick(self, view_name, ras):
        """A left click in a slice view: the lesion under it becomes the selected one."""
        with self.state:
            try:
                lid = self.workflow.lesion_at_ras(ras)
            except InputError as exc:
                return self._say(str(exc), True)
            self.state.last_pick = {"view": view_name, "ras": [round(float(c), 2) for c in ras[:3]], "lesion": int(lid or 0)}
            if not lid:
                return self._say(f"No lesion at R {ras[0]:.1f} A {ras[1]:.1f} S {ras[2]:.1f} ({view_name}): click inside a lesion outline.")
            self.select_lesion(lid, jump=False)

    def explain(self):
        self._explain_started = time.monotonic()
        self.state.partial_maps, self.state.first_map_s = 0, None
        self._start("Explain", lambda: self.workflow.explain_steps(on_partial=self._partial_map), self._explained)

    def _partial_map(self, node, done, n):
        """SmoothGrad's map over the copies so far: shown at once, refined until the final one replaces it."""
        with self.state:
            self.state.partial_maps += 1
            if self.state.first_map_s is None:
                self.state.first_map_s = round(time.monotonic() - self._explain_started, 1)
            self._show_overlay(node)

    def _explained(self, result):
        if self.state.first_map_s is not None:
            self.state.progress_text += f" (first map after {self.state.first_map_s:g} s)"
        self._show_overlay()
        self._refresh_table()
        self._show_tp(result["tp_probability"], result["tp_note"])

    def _show_tp(self, probability, note=""):
        lid = self.state.selected_lesion
        if probability is None:
            self.state.tp_text = f"Lesion {lid}: {note}" if lid else ""
        else:
            self.state.tp_text = f"Lesion {lid}: TP probability {probability:.2f} ({tp_verdict(probability)})"

    def _show_overlay(self, partial=None):
        """The map made last (or a partial one) over the FLAIR, with the opacity slider's value, and its legend."""
        shown = {"node": partial, "title": partial.GetName()} if partial is not None else self.workflow.saliency_shown()
        views = self.slicer_app.view_manager.get_slice_views()
        for view in views:
            view.set_foreground_volume_id(shown["node"].GetID() if shown else None)
            view.set_foreground_opacity(float(self.workflow.state.overlayOpacity) if shown else 0.0)
        if not shown:
            self.state.legend = None
            return
        top = shown["node"].GetDisplayNode().GetWindowLevelMax()
        stops = ", ".join(f"rgba({int(255 * r)}, {int(255 * g)}, {int(255 * b)}, {a:.2f})" for r, g, b, a in saliency_rgba_table(17))
        self.state.legend = {"title": shown["title"], "max": f"{top:.3g}", "gradient": f"linear-gradient(to right, {stops})"}

    def score_all(self):
        self._start("Score all", self.workflow.score_all_steps, self._scored)

    def _scored(self, probs):
        self._refresh_table()
        failed = [lid for lid, p in probs.items() if p is None]
        errors = getattr(probs, "errors", {})  # worker_session.TPScores: why each failed
        first = f" (lesion {failed[0]}: {errors[failed[0]]})" if failed and errors.get(failed[0]) else ""
        self._say(f"{len(probs) - len(failed)} lesion(s) scored" + (f"; not scored: {', '.join(map(str, failed))}{first}" if failed else "") + ".",
                  bool(failed))
        lid = self.state.selected_lesion
        if lid:
            note = self.workflow.known_tp_note(lid)
            self._show_tp(self.workflow.known_tp_probability(lid), f"TP probability not computed: {note}" if note else "TP probability not computed")

    def remove_below(self):
        if self.state.busy:
            return self._say(f"{self.state.busy} is running: wait for it or press Cancel.", True)
        try:
            below = self.workflow.lesions_below()
            removed = self.workflow.remove_lesions(below) if below else 0
        except InputError as exc:
            return self._say(str(exc), True)
        self._refresh_table()
        if not self.workflow.state.selectedLesion:
            self.state.selected_lesion, self.state.tp_text = 0, ""
        self._say(f"Removed {removed} lesion(s) with TP probability below {self.workflow.state.pruneBelow:g}." if removed else
                  "No scored lesion is below the threshold (Score all first).")

    def prepare_downloads(self):
        """lesions.csv, the label map and the map shown, written to the results folder served at /results."""
        w = self.workflow.state
        if self.results_dir is None:
            return self._say("Downloads are off (no results folder).", True)
        if not w.lesionTable:
            return self._say("Segment first: there is nothing to download yet.", True)
        import SimpleITK as sitk

        files = []
        with open(self.results_dir / "lesions.csv", "w", newline="") as f:
            rows = mrml.lesion_table_rows(w.lesionTable)
            writer = csv.DictWriter(f, fieldnames=list(mrml.TABLE_COLUMNS))
            writer.writeheader()
            writer.writerows({k: "" if v != v else int(v) if k == "Lesion" else v for k, v in r.items()} for r in rows)  # NaN: not computed
        files.append("lesions.csv")
        sitk.WriteImage(mrml.image_from_volume_node(w.lesionLabels), str(self.results_dir / "lesion_labels.nii.gz"))
        files.append("lesion_labels.nii.gz")
        if w.saliencyVolume:
            sitk.WriteImage(mrml.image_from_volume_node(w.saliencyVolume), str(self.results_dir / "saliency.nii.gz"))
            files.append("saliency.nii.gz")
        self.state.downloads = [{"name": n, "url": f"results/{n}?v={time.time_ns()}"} for n in files]

    # -- the page

    def _build_ui(self):
        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("MSInstanceSaliency")
            with self.ui.toolbar:
                v3.VSpacer()
                html.Div("{{ worker_text }}", id="worker-text", style="font-size: 0.8em; margin-right: 12px;")
            with self.ui.content:
                # a fixed height under the toolbar: the panel scrolls on its own, the views keep the window's height
                with html.Div(style="display: flex; height: calc(100vh - 64px - 24px); overflow: hidden;"):
                    with html.Div(style="flex: 0 0 380px; overflow-y: auto; padding: 8px; font-size: 0.9em;", id="panel"):
                        self._build_panel()
                    with html.Div(style="flex: 1 1 auto; position: relative; min-width: 0; height: 100%;", id="views"):
                        self.layout_manager.initialize_layout_grid(self.ui)

    def _build_panel(self):
        v3.VAlert("Another page is connected to this server: one scene serves one user; close the other page.",
                  v_if="second_client", type="warning", density="compact", id="second-client")
        html.Div("{{ inputs_text }}", id="inputs-text")
        with html.Div(v_if="volume_files.length"):
            v3.VSelect(label="FLAIR", v_model=("flair_file",), items=("volume_files",), density="compact", id="flair-file")
            v3.VSelect(label="MPRAGE (T1)", v_model=("mprage_file",), items=("volume_files",), clearable=True, density="compact",
                       id="mprage-file")
            v3.VBtn("Load", click=self.load_inputs, disabled=("!!busy",), size="small", id="load")
        with html.Div(style="display: flex; align-items: center; gap: 4px;"):
            v3.VSelect(label="Model", v_model=("model_file",), items=("model_files",), density="compact", id="model-file",
                       update_modelValue=self.set_model)
            v3.VSelect(label="Device", v_model=("device",), items=("choices.device",), density="compact", style="max-width: 100px;")
        with html.Div(style="display: flex; gap: 4px;"):
            v3.VTextField(label="Threshold", v_model=("threshold",), type="number", step="0.05", density="compact")
            v3.VTextField(label="Min volume (mm³)", v_model=("minLesionVolume",), type="number", density="compact")
        with html.Div(style="display: flex; gap: 4px; margin-bottom: 8px;"):
            v3.VBtn("Segment", click=self.segment, disabled=("!!busy",), color="primary", id="segment")
            v3.VBtn("Cancel", click=self.cancel, disabled=("!busy",), id="cancel")
        v3.VProgressLinear(model_value=("progress",), indeterminate=("progress === null",), v_if="busy", height=6)
        html.Div("{{ progress_text }}", id="progress-text", style="min-height: 1.2em;")
        v3.VAlert("{{ message }}", v_if="message", type=("message_error ? 'error' : 'info'",), density="compact", id="message")

        # the lesion table: a row picks the lesion and moves the views to it; a header sorts
        with html.Table(id="lesion-table", style="width: 100%; border-collapse: collapse; margin: 6px 0;", v_if="lesion_rows.length"):
            with html.Tr():
                html.Th("{{ h.title }}{{ sort_key === h.key ? (sort_desc ? ' ▼' : ' ▲') : '' }}", v_for="h in headers", key="h.key",
                        click=(self.sort_by, "[h.key]"), style="cursor: pointer; text-align: left; border-bottom: 1px solid #888;")
            with html.Tr(v_for="row in lesion_rows", key="row.id", click=(self.select_lesion, "[row.id]"), classes="lesion-row",
                         raw_attrs=[':data-lesion="row.id"',
                                    ':style="{cursor: \'pointer\', background: row.id === selected_lesion ? \'#ffe0b2\' : \'transparent\'}"']):
                for cell in ("row.id", "row.volume", "row.max_prob", "row.tp === null ? '' : row.tp"):
                    html.Td(f"{{{{ {cell} }}}}")

        with html.Div(style="display: flex; gap: 4px;"):
            v3.VSelect(label="Method", v_model=("method",), items=("choices.method",), density="compact")
            v3.VTextField(label="N", v_model=("nSamples",), type="number", density="compact", style="max-width: 80px;", id="n-samples")
        with html.Div(style="display: flex; gap: 4px;"):
            v3.VTextField(label="σ", v_model=("sigma",), type="number", step="0.01", density="compact")
            v3.VTextField(label="Max Ω voxels", v_model=("maxOmegaVoxels",), type="number", density="compact",
                          title="at most this many lesion voxels get a backward pass (0: all)")
        with html.Div(style="display: flex; gap: 4px;"):
            v3.VSelect(label="Show channel", v_model=("displayChannel",), items=("choices.displayChannel",), density="compact")
            v3.VSelect(label="Context", v_model=("context",), items=("choices.context",), density="compact")
        with html.Div(style="display: flex; gap: 4px; margin-bottom: 6px;"):
            v3.VBtn("Explain", click=self.explain, disabled=("busy || !selected_lesion",), color="primary", id="explain")
            v3.VBtn("Score all", click=self.score_all, disabled=("busy || !lesion_rows.length",), id="score-all")
        html.Div("{{ tp_text }}", id="tp-text", style="font-weight: bold; min-height: 1.2em;")
        with html.Div(v_if="legend", id="legend", style="margin: 6px 0;"):
            html.Div("{{ legend.title }}", id="legend-title")
            html.Div(raw_attrs=[':style="{height: \'12px\', background: legend.gradient, border: \'1px solid #aaa\'}"'])
            with html.Div(style="display: flex; justify-content: space-between; font-size: 0.8em;"):
                html.Span("−{{ legend.max }}")
                html.Span("0")
                html.Span("+{{ legend.max }}")
            v3.VSlider(label="Opacity", v_model=("overlayOpacity",), min=0, max=1, step=0.05, density="compact", hide_details=True,
                       id="opacity")
        with html.Div(style="display: flex; gap: 4px; align-items: center;"):
            v3.VTextField(label="Remove below P(TP)", v_model=("pruneBelow",), type="number", step="0.05", density="compact")
            v3.VBtn("Remove", click=self.remove_below, disabled=("busy || !lesion_rows.length",), id="remove-below")
        with html.Div(style="margin-top: 6px;"):
            v3.VBtn("Prepare downloads", click=self.prepare_downloads, disabled=("busy || !lesion_rows.length",), size="small",
                    id="downloads")
            html.A("{{ d.name }}", v_for="d in downloads", key="d.name", raw_attrs=[':href="d.url"', ':download="d.name"'],
                   style="margin-left: 8px;")
