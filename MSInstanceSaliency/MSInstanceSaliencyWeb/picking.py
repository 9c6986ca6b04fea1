"""Left clicks in a slice view, as an RAS point, through trame-slicer's layered displayable managers.

trame-slicer's own click tools (e.g. its islands effect) use this pattern: a pipeline per slice view,
created for one parameter node, that says it can take the event and is then handed it with its world
(RAS) position. Consuming the click keeps window/level from changing on a pick.
"""

from __future__ import annotations

from LayerDMLib import vtkMRMLLayerDMScriptedPipeline
from LayerDMLib.ScriptedPipelineSceneConnector import ScriptedPipelineSceneConnector
from vtkmodules.vtkCommonCore import vtkCommand

PICKER_NODE_NAME = "MSInstanceSaliencyWebPicker"


class ClickPickPipeline(vtkMRMLLayerDMScriptedPipeline):
    on_pick = None  # callable(view_name, ras), set by connect_picker

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


def connect_picker(scene, on_pick):
    """Calls on_pick(view_name, ras) for each left click in a slice view of `scene`. The connector must
    exist before its parameter node enters the scene: pipelines are created when the node is added."""
    connector = _PickerConnector(scene)
    connector.connect()
    ClickPickPipeline.on_pick = on_pick
    scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", PICKER_NODE_NAME)
    return connector
