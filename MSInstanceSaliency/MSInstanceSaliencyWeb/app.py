"""Spike of `msis view`: FLAIR (and MPRAGE, and an optional instance label map) in three server-rendered slice
views streamed to the browser, one button and a text area driven from Python, and left clicks in a slice view
reported as an RAS position and the label under it.

    python -m MSInstanceSaliencyWeb.app FLAIR [MPRAGE] [--labels LABELS] [--host 127.0.0.1] [--port N]
(with MSInstanceSaliency/ on sys.path; main() adds it when run from a source checkout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_MODULE_DIR = Path(__file__).resolve().parents[1]  # MSInstanceSaliency/, home of MSInstanceSaliencyMRML
for _p in (_MODULE_DIR, _MODULE_DIR.parent):  # running from source: the MRML adapter and the Lib
    if str(_p) not in sys.path:
        sys.path.append(str(_p))

import slicer  # noqa: E402  (slicer-core: the same MRML classes as in Slicer)
from LayerDMLib import vtkMRMLLayerDMScriptedPipeline  # noqa: E402
from LayerDMLib.ScriptedPipelineSceneConnector import ScriptedPipelineSceneConnector  # noqa: E402
from trame.app import TrameApp  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402
from trame_vuetify.ui.vuetify3 import SinglePageLayout  # noqa: E402
from vtkmodules.vtkCommonCore import vtkCommand  # noqa: E402

import MSInstanceSaliencyMRML as mrml  # noqa: E402
from MSInstanceSaliencyLib.io.volumes import array_from_image, read_image  # noqa: E402

LAYOUT_ID = "Axial Sagittal Coronal"
PICKER_NODE_NAME = "MSInstanceSaliencyWebPicker"


class ClickPickPipeline(vtkMRMLLayerDMScriptedPipeline):
    """Takes left clicks in a slice view (trame-slicer's pattern for its own click tools, e.g. the islands
    effect): the layer displayable manager hands the event over with its RAS position. Created once per slice
    view for the picker parameter node; consuming the click keeps window/level from changing on a pick."""

    on_pick = None  # set by the app: callable(view_name, ras)

    @classmethod
    def TryCreatePipeline(cls, view_node, node):
        if node is not None and node.GetName() == PICKER_NODE_NAME and view_node.IsA("vtkMRMLSliceNode"):
            return cls()
        return None

    def CanProcessInteractionEvent(self, event_data):
        return event_data.GetType() == vtkCommand.LeftButtonPressEvent, 0.0

    def ProcessInteractionEvent(self, event_data):
        if ClickPickPipeline.on_pick is not None:
            ClickPickPipeline.on_pick(self.GetViewNode().GetName(), tuple(event_data.GetWorldPosition()))
        return True


class _PickerConnector(ScriptedPipelineSceneConnector):
    def getPipelines(self):
        return [ClickPickPipeline]


class ViewerApp(TrameApp):
    def __init__(self, flair: str, mprage: str | None = None, labels: str | None = None, server=None):
        super().__init__(server=server, client_type="vue3")
        self.slicer_app = SlicerApp()
        scene = self.slicer_app.scene
        slicer.mrmlScene = scene  # one scene per server process: the MRML adapter's defaults and slicer.util use it
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view()]))

        # The picker must be connected before its parameter node enters the scene (pipelines are created on add)
        self._picker = _PickerConnector(scene)
        self._picker.connect()
        ClickPickPipeline.on_pick = self._on_pick
        scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", PICKER_NODE_NAME)

        self.volumes = {"FLAIR": self._add_volume(flair, "FLAIR", scene)}
        if mprage:
            self.volumes["MPRAGE"] = self._add_volume(mprage, "MPRAGE", scene)
        self.label_node = self._add_volume(labels, "Lesions", scene, "vtkMRMLLabelMapVolumeNode") if labels else None

        self.state.message = "Loaded: " + ", ".join(self.volumes) + "."
        self.state.click_count = 0
        self.state.click_text = "No click yet."
        self.state.click = None  # {"view", "ras", "label"} of the last click
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT_ID)
        self.slicer_app.display_manager.show_volume_in_slice_background(self.volumes["FLAIR"])
        if self.label_node is not None:  # trame-slicer's views set background/foreground only: the label layer in MRML
            composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
            for i in range(composites.GetNumberOfItems()):
                composites.GetItemAsObject(i).SetLabelVolumeID(self.label_node.GetID())
        self.slicer_app.display_manager.reset_views()

    @staticmethod
    def _add_volume(path: str, name: str, scene, class_name: str = "vtkMRMLScalarVolumeNode"):
        """Through the Lib's checked reader (one clear line on a bad file) and the MRML adapter the module uses."""
        image = read_image(path, name)
        integer = class_name == "vtkMRMLLabelMapVolumeNode"
        array = array_from_image(image, dtype="int32" if integer else "float32")
        return mrml.add_volume(array, image, name, class_name=class_name, scene=scene)

    def _on_pick(self, view_name: str, ras):
        label = mrml.lesion_id_at_ras(self.label_node, ras) if self.label_node is not None else None
        r, a, s = (round(float(c), 2) for c in ras[:3])
        with self.state:
            self.state.click_count += 1
            self.state.click = {"view": view_name, "ras": [r, a, s], "label": label}
            self.state.click_text = f"{view_name}: R {r} A {a} S {s}, lesion {label if label else 'none'}"

    def describe_scene(self):
        lines = []
        for name, node in self.volumes.items():
            dims = node.GetImageData().GetDimensions()
            lines.append(f"{name}: {dims[0]} x {dims[1]} x {dims[2]} voxels, spacing {tuple(round(s, 2) for s in node.GetSpacing())}")
        lines.append(f"Clicks so far: {self.state.click_count}")
        self.state.message = "\n".join(lines)

    def _build_ui(self):
        with SinglePageLayout(self.server) as self.ui:
            self.ui.title.set_text("MSInstanceSaliency")
            with self.ui.toolbar:
                v3.VSpacer()
                v3.VBtn("Describe scene", id="describe", click=self.describe_scene)
            with self.ui.content:
                with html.Div(style="display: flex; flex-direction: column; height: 100%;"):
                    with html.Div(style="flex: 1 1 auto; min-height: 360px; position: relative;", id="views"):
                        self.layout_manager.initialize_layout_grid(self.ui)
                    with html.Div(style="flex: 0 0 auto; padding: 8px;"):
                        html.Div("{{ click_text }}", id="click-text")
                        v3.VTextarea(v_model=("message",), id="message", readonly=True, rows=3, density="compact")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="MSInstanceSaliencyWeb.app", description=__doc__.splitlines()[0])
    parser.add_argument("flair")
    parser.add_argument("mprage", nargs="?")
    parser.add_argument("--labels", help="instance label map (0 background, k lesion k) on the FLAIR's grid")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        # headless server: straight to EGL instead of VTK's failed X connection and fallback
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    app = ViewerApp(args.flair, args.mprage, args.labels)
    app.server.start(host=args.host, port=args.port, open_browser=False, timeout=0)


if __name__ == "__main__":
    main()
