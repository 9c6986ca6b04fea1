"""The module panel's behaviour that can be checked without Slicer: the .ui settings it relies on, the
Slicer behaviour its fixes answer (shown on slicer-core's real MRML and logic classes), and the one
logic helper that needs only MRML (the colour legend), run from the module's own source.
The rest of the widget is covered by the module's self-tests (MSInstanceSaliencyTest), which need Slicer."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[2]
MODULE_PY = ROOT / "MSInstanceSaliency" / "MSInstanceSaliency.py"
UI = ROOT / "MSInstanceSaliency" / "Resources" / "UI" / "MSInstanceSaliency.ui"


def _widget_property(name, prop):
    widget = next(w for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == name)
    return next(p for p in widget.findall("property") if p.get("name") == prop)[0].text


def test_mprage_may_be_empty_and_flair_may_not():
    """An empty MPRAGE is the FLAIR-only path; with noneEnabled off the first volume loaded filled both."""
    assert _widget_property("mprageSelector", "noneEnabled") == "true"
    assert _widget_property("flairSelector", "noneEnabled") == "false"


def test_register_flair_box_is_bound_and_says_it_needs_an_mprage():
    assert _widget_property("registerFlairCheckBox", "SlicerParameterName") == "registerFlair"
    assert "MPRAGE" in _widget_property("registerFlairCheckBox", "toolTip")


def test_channel_box_keeps_the_parameter_node_choices():
    """connectGui's QComboBoxToStringableConnector reads choices[currentIndex] (slicer/parameterNodeWrapper/
    guiConnectors.py): the module must never add or remove the channel box's items, only disable it."""
    source = MODULE_PY.read_text(encoding="utf-8")
    assert not re.search(r"channelComboBox\.(addItem|addItems|insertItem|removeItem|clear)\b", source)
    follow = ast.unparse(_method("MSInstanceSaliencyWidget", "_followModelChannels"))
    assert "modelChannels" in follow and "combo.enabled" in follow
    # after every task (segment, explain, layers, restart) and for a new parameter node
    assert "_followModelChannels" in ast.unparse(_method("MSInstanceSaliencyWidget", "_runTask"))
    assert "_followModelChannels" in ast.unparse(_method("MSInstanceSaliencyWidget", "setParameterNode"))


def test_custom_region_selector_does_not_pick_a_segmentation_by_itself():
    """With a "None" item the node box keeps None when a segmentation is added (qMRMLNodeComboBox selects the first
    node only when it has no None item): a saved custom region is not replaced by the first segmentation loaded."""
    assert _widget_property("customRegionSelector", "noneEnabled") == "true"


def test_help_links_the_extension_homepage():
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]+)', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)
    help_text = MODULE_PY.read_text(encoding="utf-8").split("self.parent.helpText", 1)[1].split('""")', 1)[0]
    links = re.findall(r'href="([^"]+)"', help_text)
    assert links and all(link.startswith(homepage) for link in links), links
    assert f'href="{homepage}"' in help_text


def _module_tree():
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _method(class_name, name):
    cls = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_progress_dialog_stays_until_the_task_ends():
    """slicer.util.createProgressDialog sets any QProgressDialog property given (Base/Python/slicer/util.py);
    Qt's autoClose/autoReset would hide it when the worker reports done == total."""
    calls = [n for n in ast.walk(_method("MSInstanceSaliencyWidget", "_runTask")) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "createProgressDialog"]
    assert len(calls) == 1
    keywords = {k.arg: getattr(k.value, "value", None) for k in calls[0].keywords}
    assert keywords["autoClose"] is False and keywords["autoReset"] is False


def test_widget_slots_do_not_let_a_shown_error_go_on_to_the_console():
    """tryWithErrorDisplay re-raises after its dialog: the widget uses it only through showErrorAndGoOn."""
    widget = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MSInstanceSaliencyWidget")
    direct = [n.lineno for n in ast.walk(widget) if isinstance(n, ast.Attribute) and n.attr == "tryWithErrorDisplay"]
    assert not direct, f"slicer.util.tryWithErrorDisplay used directly at lines {direct}"
    helper = next(n for n in _module_tree().body if isinstance(n, ast.FunctionDef) and n.name == "showErrorAndGoOn")
    assert any(isinstance(n, ast.Attribute) and n.attr == "tryWithErrorDisplay" for n in ast.walk(helper))


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer.mrmlScene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())  # Slicer's Colors module does this
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


def _map_node(scene, name):
    node = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), name=name)
    node.CreateDefaultDisplayNodes()
    return node


def test_slicer_keeps_a_legend_title_when_the_map_is_renamed(scene):
    """The defect: AddDefaultColorLegendDisplayNode titles a legend only when it creates it."""
    node = _map_node(scene, "Lesion 3 SmoothGrad FLAIR")
    first = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    node.SetName("Lesion 7 SmoothGrad FLAIR")  # "Keep earlier maps" off: the next map reuses the node
    again = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    assert again.GetID() == first.GetID()
    assert again.GetTitleText() == "Lesion 3 SmoothGrad FLAIR"


def _show_color_legend():
    """MSInstanceSaliencyLogic.showColorLegend, compiled from the module's source (the module itself needs Slicer's Qt)."""
    func = _method("MSInstanceSaliencyLogic", "showColorLegend")
    func.decorator_list = []
    namespace = {"slicer": slicer}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    return namespace["showColorLegend"]


def test_module_legend_title_follows_the_map(scene):
    show_color_legend = _show_color_legend()
    node = _map_node(scene, "Lesion 3 SmoothGrad FLAIR")
    first = show_color_legend(node, slicer.vtkSlicerColorLogic)
    assert first.GetTitleText() == "Lesion 3 SmoothGrad FLAIR"
    node.SetName("Lesion 7 SmoothGrad FLAIR")
    legend = show_color_legend(node, slicer.vtkSlicerColorLogic)
    assert legend.GetID() == first.GetID()  # one legend per map, retitled
    assert legend.GetTitleText() == "Lesion 7 SmoothGrad FLAIR"
    assert legend.GetName() == "Lesion 7 SmoothGrad FLAIR color legend"
    assert scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode").GetNumberOfItems() == 1


def test_slicer_leaves_place_multiple_on_after_picking(scene):
    """Why picking restores the user's PlaceModePersistence: StartPlaceMode(True) sets it to 1 and
    SwitchToViewTransformMode keeps it (vtkSlicerMarkupsLogic.cxx, vtkMRMLInteractionNode.cxx)."""
    scene.AddNode(slicer.vtkMRMLSelectionNode())
    interaction = scene.AddNode(slicer.vtkMRMLInteractionNode())
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    logic.SetActiveList(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))
    assert interaction.GetPlaceModePersistence() == 0
    assert logic.StartPlaceMode(True, interaction)
    assert interaction.GetPlaceModePersistence() == 1
    interaction.SwitchToViewTransformMode()
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    assert interaction.GetPlaceModePersistence() == 1  # still on: the module must put the user's 0 back
