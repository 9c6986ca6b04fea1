import contextlib
import logging
import os
import shutil
import sys
import traceback
from typing import Annotated

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

# Running from source ("Additional module paths" = this folder): the Lib sits one level up.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import MSInstanceSaliencyLib  # noqa: F401
except ImportError:
    if os.path.isdir(os.path.join(_REPO_ROOT, "MSInstanceSaliencyLib")) and _REPO_ROOT not in sys.path:
        sys.path.append(_REPO_ROOT)

import MSInstanceSaliencyMRML as mrml
from MSInstanceSaliencyMRML.workflow import CHANNELS, CONTEXTS, DEVICES, METHODS, RANGES, LesionWorkflow

from MSInstanceSaliencyLib import dependencies  # noqa: E402  (no heavy imports: torch and monai load in the worker)
from MSInstanceSaliencyLib.errors import Cancelled  # noqa: E402


#
# MSInstanceSaliency
#


class MSInstanceSaliency(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MS Instance Saliency")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MSInstanceSaliency developers"]
        self.parent.helpText = _("""
Segment multiple-sclerosis lesions from FLAIR and MPRAGE with a 3D U-Net, list every lesion, and
explain one lesion at a time with its own saliency map (instance-level SmoothGrad or Grad-CAM++).<br>
<b>Pick a lesion</b>: click its row in the lesion table, or turn on <i>Pick lesion in views</i> and
click the lesion in any slice view. The slice views jump to its centre and it becomes the region
explained (&Omega;). Any segment drawn with the Segment Editor can be used as &Omega; instead
(<i>Custom region</i>), for example a lesion the model missed.<br>
<b>Explain</b> computes the map (GPU when available) and shows it over the FLAIR in blue (negative)
to red (positive), symmetric around 0 and transparent near 0.<br>
The work runs in a separate Python process (the worker), so Slicer stays responsive and Cancel
stops it; the worker keeps the model and the case loaded between clicks.<br>
The bundled model is a demonstration model trained on synthetic phantoms: not for clinical use.
See <a href="https://github.com/MSInstanceSaliency/SlicerMSInstanceSaliency/blob/main/docs/SLICER.md">the Slicer guide</a> on
<a href="https://github.com/MSInstanceSaliency/SlicerMSInstanceSaliency">the project's page</a>.
""")
        self.parent.acknowledgementText = _("""
Method: F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
segmentation" (Sci Rep 2026, arXiv 2406.09335) and "Exploiting XAI maps to improve MS lesion
segmentation and detection in MRI" (MICCAI 2024 workshops). Phantom lesion geometry: Lesjak et al.,
"A novel public MR image dataset of multiple sclerosis patients with lesion segmentations based on
multi-rater consensus", Neuroinformatics 2018 (CC-BY). Anatomy: MNI ICBM152 2009 template.
""")


#
# MSInstanceSaliencyParameterNode
#


@parameterNodeWrapper
class MSInstanceSaliencyParameterNode:
    """Everything the module remembers with the scene: the state of the shared workflow
    (MSInstanceSaliencyMRML.workflow.WorkflowState has the same fields and defaults; test_workflow.py checks)."""

    flairVolume: vtkMRMLScalarVolumeNode
    mprageVolume: vtkMRMLScalarVolumeNode
    registerFlair: bool = False  # rigid FLAIR-to-MPRAGE registration first (inputs not already aligned)
    modelPath: str = ""  # empty: the bundled demo model
    device: Annotated[str, Choice(DEVICES)] = "auto"
    threshold: Annotated[float, WithinRange(*RANGES["threshold"])] = 0.3
    minLesionVolume: Annotated[float, WithinRange(*RANGES["minLesionVolume"])] = 5.0
    lesionSegmentation: vtkMRMLSegmentationNode
    lesionTable: vtkMRMLTableNode
    lesionLabels: vtkMRMLLabelMapVolumeNode
    probabilityVolume: vtkMRMLScalarVolumeNode
    selectedLesion: int = 0
    useCustomRegion: bool = False
    customRegionSegmentation: vtkMRMLSegmentationNode
    customRegionSegmentId: str = ""
    method: Annotated[str, Choice(METHODS)] = "SmoothGrad max"
    nSamples: Annotated[int, WithinRange(*RANGES["nSamples"])] = 50
    maxOmegaVoxels: Annotated[int, WithinRange(*RANGES["maxOmegaVoxels"])] = 0  # 0: the max over all lesion voxels
    sigma: Annotated[float, WithinRange(*RANGES["sigma"])] = 0.05
    displayChannel: Annotated[str, Choice(CHANNELS)] = "FLAIR"
    context: Annotated[str, Choice(CONTEXTS)] = "patch"
    gradcamLayer: str = ""  # empty: the model's default layer
    keepEarlierMaps: bool = True
    saliencyVolume: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(*RANGES["overlayOpacity"])] = 0.5
    pruneBelow: Annotated[float, WithinRange(*RANGES["pruneBelow"])] = 0.5


#
# MSInstanceSaliencyWidget
#


@contextlib.contextmanager
def showErrorAndGoOn(message, waitCursor=False):
    """slicer.util.tryWithErrorDisplay for a slot that must go on: it shows the error (traceback under
    Details) and then re-raises it (Base/Python/slicer/util.py, end of tryWithErrorDisplay, v5.10.0), which
    leaves a second copy in the Python console; this stops it there. In testing mode tryWithErrorDisplay
    shows nothing, so the error goes on to the test."""
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
            yield
    except Exception:
        if slicer.app.testingEnabled():
            raise
        # already shown in the error dialog: nothing more to do


class MSInstanceSaliencyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pickNode = None
        self._placePersistenceBeforePicking = None  # the user's "place multiple" setting, put back when picking stops
        self._customRegionSyncing = False  # the custom-region selector and the parameter node are being matched
        self._rowFollowingLesion = False  # the table's row is being moved to the selected lesion
        self._shownTableID = None
        self._taskRunning = False
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MSInstanceSaliency.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MSInstanceSaliencyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # a loaded scene's segments may arrive after its parameter node: show the saved custom region again
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._updateGUI)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.scoreLesionButton.connect("clicked(bool)", self.onScoreLesion)
        self.ui.scoreAllButton.connect("clicked(bool)", self.onScoreAll)
        self.ui.removeBelowButton.connect("clicked(bool)", self.onRemoveBelow)
        self.ui.refreshLayersButton.connect("clicked(bool)", self.onRefreshLayers)
        self.ui.restartWorkerButton.connect("clicked(bool)", self.onRestartWorker)
        self.ui.pickLesionButton.connect("toggled(bool)", self.onPickToggled)
        self.ui.lesionTableView.connect("selectionChanged()", self.onTableSelection)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.customRegionSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onCustomRegionChanged)
        self.ui.customRegionSelector.connect("currentSegmentChanged(QString)", self.onCustomRegionChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.layerComboBox.connect("currentIndexChanged(int)", self.onLayerChanged)
        self._channelToolTip = self.ui.channelComboBox.toolTip  # the .ui's; a one-channel model shows why the box is off

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopPicking()
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.ui.pickLesionButton.checked = False  # no click picking behind the user's back in other modules
        self._stopPicking()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True  # a task still running stops at its next progress step
        self.ui.pickLesionButton.checked = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._followModelChannels()
        self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p:
            self._showTable(None)
            return
        idle = not self._taskRunning
        inputs = bool(p.flairVolume)  # the MPRAGE too unless the model is FLAIR-only (the worker says so)
        hasLesions = bool(p.lesionLabels and p.lesionTable)
        customReady = bool(p.useCustomRegion and p.customRegionSegmentation and p.customRegionSegmentId)
        radiomics = dependencies.has_radiomics()
        self.ui.segmentButton.enabled = idle and inputs
        self.ui.registerFlairCheckBox.enabled = bool(p.mprageVolume)  # registration is onto the MPRAGE
        self.ui.explainButton.enabled = idle and inputs and (customReady or (hasLesions and p.selectedLesion > 0))
        # without pyradiomics the Score buttons stay enabled: a click offers the SlicerRadiomics extension
        self.ui.scoreLesionButton.enabled = idle and hasLesions and p.selectedLesion > 0
        self.ui.scoreAllButton.enabled = idle and hasLesions
        self.ui.removeBelowButton.enabled = idle and hasLesions
        self.ui.pickLesionButton.enabled = hasLesions
        self.ui.refreshLayersButton.enabled = idle
        self.ui.restartWorkerButton.enabled = idle
        for button in (self.ui.scoreLesionButton, self.ui.scoreAllButton):
            button.toolTip = "" if radiomics else dependencies.RADIOMICS_HINT
        self.ui.selectedLesionLabel.text = _("Lesion {id}").format(id=p.selectedLesion) if p.selectedLesion else _("none")
        self._showTable(p.lesionTable)
        self._showSelectedRow(p)
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        self._showCustomRegion(p)
        self._showLayer(p.gradcamLayer)

    def _showTable(self, tableNode) -> None:
        # qMRMLTableView.setMRMLTableNode always emits selectionChanged: call it only for another node
        newID = tableNode.GetID() if tableNode else None
        if newID != self._shownTableID:
            self._shownTableID = newID
            self.ui.lesionTableView.setMRMLTableNode(tableNode)

    def _lesionTableRow(self, tableNode, lesionId):
        """The vtkTable row of a lesion, or -1."""
        table = tableNode.GetTable()
        for row in range(table.GetNumberOfRows()):
            if table.GetValue(row, 0).ToInt() == int(lesionId):
                return row
        return -1

    def _lesionOfViewIndex(self, tableNode, viewIndex):
        """The lesion id in the table row under an index of the view (sorted through its proxy), or 0."""
        view = self.ui.lesionTableView
        # qMRMLTableModel.mrmlTableRowIndex is not reachable from Python: map the proxy index ourselves
        index = view.sortFilterProxyModel().mapToSource(viewIndex)
        row = mrml.table_row_of_model_index(tableNode, index.row(), index.column(), view.transposed)
        return tableNode.GetTable().GetValue(row, 0).ToInt() if 0 <= row < tableNode.GetNumberOfRows() else 0

    def _showSelectedRow(self, p) -> None:
        """The table's highlighted row follows the selected lesion, also when it was picked in a view, without
        picking it again (onTableSelection returns while _rowFollowingLesion is set)."""
        view = self.ui.lesionTableView
        tableNode = p.lesionTable
        if not tableNode or view.mrmlTableNode() is None or view.selectionModel() is None:
            return
        selected = view.selectionModel().selectedIndexes()
        shownLesion = self._lesionOfViewIndex(tableNode, selected[0]) if selected else 0
        if shownLesion == p.selectedLesion:
            return
        row = self._lesionTableRow(tableNode, p.selectedLesion) if p.selectedLesion else -1
        self._rowFollowingLesion = True
        try:
            if row < 0:
                view.clearSelection()
                return
            # the inverse of mrml.table_row_of_model_index: model row 0 holds the column names unless they are the header
            modelRow = row if tableNode.GetUseColumnTitleAsColumnHeader() else row + 1
            transposed = view.transposed
            source = view.tableModel().index(0, modelRow) if transposed else view.tableModel().index(modelRow, 0)
            shown = view.sortFilterProxyModel().mapFromSource(source)
            if transposed:
                view.selectColumn(shown.column())
            else:
                view.selectRow(shown.row())
        finally:
            self._rowFollowingLesion = False

    def _showCustomRegion(self, p) -> None:
        """The segment selector has no parameter-node connector: show the parameter node's region in it (scene
        reload). setCurrentNode emits currentNodeChanged at once (qMRMLSegmentSelectorWidget.cxx, init and
        setCurrentNode, v5.10.0), and onCustomRegionChanged would then write the selector's segment (none, or the
        first one) into the parameter node before the saved one is shown: read the saved values first and keep
        onCustomRegionChanged out while the selector follows them."""
        if self._customRegionSyncing:
            return
        savedNode, savedSegmentId = p.customRegionSegmentation, p.customRegionSegmentId
        selector = self.ui.customRegionSelector
        self._customRegionSyncing = True
        try:
            current = selector.currentNode()
            if savedNode and (current is None or current.GetID() != savedNode.GetID()):
                selector.setCurrentNode(savedNode)
            if savedSegmentId and selector.currentSegmentID() != savedSegmentId:
                selector.setCurrentSegmentID(savedSegmentId)
        finally:
            self._customRegionSyncing = False

    def _followModelChannels(self) -> None:
        """'Show channel' offers the loaded model's channels (all of them before a model is loaded). The items stay:
        the parameter node declares displayChannel with Choice(CHANNELS), and connectGui's QComboBoxToStringableConnector
        maps item index i to choice i (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, its read()), so removing
        an item would make it read the wrong channel. A value the model lacks becomes its first channel, and with one
        channel the box is disabled with a tooltip saying why."""
        p = self._parameterNode
        if not p or not self.logic:
            return
        channels = [c for c in self.logic.modelChannels(p) if c in CHANNELS] or list(CHANNELS)
        if p.displayChannel not in channels:
            p.displayChannel = channels[0]
        combo = self.ui.channelComboBox
        combo.enabled = len(channels) > 1
        combo.toolTip = self._channelToolTip if len(channels) > 1 else _(
            "This model takes {channel} only: its map is the one shown.").format(channel=channels[0])

    def _showLayer(self, layer) -> None:
        """Item 0 is the model's default layer (gradcamLayer empty); a layer restored from a scene is
        shown even before the list is filled from the model."""
        combo = self.ui.layerComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            if combo.count == 0:
                combo.addItem(_("(model default)"), "")
            index = combo.findData(layer) if layer else 0
            if index < 0:
                combo.addItem(layer, layer)
                index = combo.count - 1
            combo.currentIndex = index
        finally:
            combo.blockSignals(wasBlocked)

    # -- running work in the worker, with a modal progress dialog

    def _runTask(self, title, failureMessage, task):
        """task(progress) with the action buttons disabled and a modal progress dialog whose Cancel stops
        the worker; returns the task's result, or None when cancelled."""
        if self._taskRunning or not self._parameterNode:
            return None
        if not self.logic.ensureDependencies():
            return None
        self._taskRunning, self._cancelRequested = True, False
        self._updateGUI()
        # autoClose/autoReset off: the worker reports done == total before the task has ended (labelling, the
        # table, TP scoring follow), and Qt's default would hide the dialog there (and end the modality)
        dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), windowTitle=title, labelText=title, maximum=0,
                                                  windowModality=qt.Qt.ApplicationModal, autoClose=False, autoReset=False)

        stage = [title]

        def onStage(text):  # "Starting the worker (loading torch)…", "Loading the model…", ... (worker_session.LABELS)
            stage[0] = dialog.labelText = text
            slicer.app.processEvents()

        def progress(done, total):
            if done is not None and total:
                dialog.maximum = 100
                dialog.value = int(100 * done / total)
                dialog.labelText = f"{stage[0]}: {done} / {total}"
            slicer.app.processEvents()
            return not (dialog.wasCanceled or self._cancelRequested)

        workflow = self.logic.workflow(self._parameterNode)
        workflow.on_stage = onStage
        try:
            with showErrorAndGoOn(failureMessage):
                try:
                    return task(progress)
                except Cancelled:
                    slicer.util.showStatusMessage(_("Cancelled."), 5000)
            return None  # cancelled, or failed (the error was shown)
        finally:
            workflow.on_stage = None
            dialog.close()  # the task has ended: only now
            self._taskRunning = False
            self._showWorkerStatus()
            self._followModelChannels()  # the task may have loaded a model (or restarted the worker without one)
            self._updateGUI()

    def _showWorkerStatus(self) -> None:
        info = self.logic.workerInfo(start=False) if self.logic else None
        if not info:
            self.ui.workerStatusLabel.text = _("Worker: not started")
            return
        parts = [f"torch {info['torch']}", info.get("device_note", "")]
        parts.append(f"pyradiomics {info['radiomics']}" if info.get("radiomics") else _("no pyradiomics (TP probability off)"))
        text = _("Worker (pid {pid}): ").format(pid=info["pid"]) + "; ".join(x for x in parts if x)
        model = self.logic.modelInfo()
        if model:
            text += "\n" + _("Model {name} ({format}): {expects}").format(**model)
            if model.get("classifier"):
                text += "\n" + _("TP probability: {note}").format(note=model["classifier"])
        self.ui.workerStatusLabel.text = text

    # -- actions

    def onSegment(self) -> None:
        p = self._parameterNode
        self.ui.lesionTableView.clearSelection()
        if self._runTask(_("Segmenting lesions"), _("Segmentation failed."), lambda progress: self.logic.segment(p, progress=progress)) is not None:
            self.ui.tpProbabilityLabel.text = ""
            warnings = self.logic.caseWarnings()
            if warnings:
                slicer.util.warningDisplay("\n".join(warnings), windowTitle=_("MS Instance Saliency: inputs"))

    def onExplain(self) -> None:
        p = self._parameterNode
        result = self._runTask(_("Computing the saliency map"), _("Explaining the lesion failed."),
                               lambda progress: self.logic.explain(p, progress=progress))
        if result is None:
            return
        self.logic.showOverlay(p, result["node"])
        if result["tp_probability"] is not None:
            self._showTpProbability(result["tp_probability"])
        elif p.method != "Grad-CAM++" and not p.useCustomRegion:
            known = self.logic.knownTpProbability(p, p.selectedLesion)
            if known is not None:
                self._showTpProbability(known)
            else:
                self.ui.tpProbabilityLabel.text = _("TP probability: not computed. ") + result["tp_note"]

    def _radiomicsReady(self) -> bool:
        """pyradiomics is here; otherwise offer the SlicerRadiomics extension (it needs a restart)."""
        if dependencies.has_radiomics():
            return True
        self.logic.offerRadiomicsExtension()
        return False

    def onScoreLesion(self) -> None:
        if not self._radiomicsReady():
            return
        p = self._parameterNode
        lesionId = int(p.selectedLesion)
        probs = self._runTask(_("TP probability of lesion {id}").format(id=lesionId), _("Scoring the lesion failed."),
                              lambda progress: self.logic.scoreLesions(p, [lesionId], progress=progress))
        if probs is not None:
            # a failure's reason is also in the table's TP note column
            self._showTpProbability(probs.get(lesionId), getattr(probs, "errors", {}).get(lesionId) or self.logic.knownTpNote(p, lesionId))

    def onScoreAll(self) -> None:
        if not self._radiomicsReady():
            return
        p = self._parameterNode
        # lesions scored before a Cancel keep their probability: the table is filled lesion by lesion
        probs = self._runTask(_("TP probability of every lesion"), _("Scoring the lesions failed."),
                              lambda progress: self.logic.scoreAllLesions(p, progress=progress))
        if probs is None:
            return
        if p.selectedLesion:
            self._showTpProbability(self.logic.knownTpProbability(p, p.selectedLesion), self.logic.knownTpNote(p, p.selectedLesion))
        errors = getattr(probs, "errors", {})  # worker_session.TPScores; each reason is in the table's TP note column
        if errors:
            firstLesion, firstReason = next(iter(errors.items()))
            message = _("{n} of {total} lesions could not be scored (see the table's TP note column). Lesion {id}: {why}").format(
                n=len(errors), total=len(probs), id=firstLesion, why=firstReason)
            slicer.util.showStatusMessage(message, 10000)
            slicer.util.warningDisplay(message, windowTitle=_("MS Instance Saliency: TP probability"))

    def onRemoveBelow(self) -> None:
        p = self._parameterNode
        ids = self.logic.lesionsBelow(p, p.pruneBelow)
        if not ids:
            slicer.util.infoDisplay(_("No scored lesion has a TP probability below {p:.2f}. Score the lesions first.").format(p=p.pruneBelow))
            return
        if not slicer.util.confirmOkCancelDisplay(_("Remove {n} lesions with TP probability below {p:.2f}: their segments, "
                                                    "table rows and label-map voxels?").format(n=len(ids), p=p.pruneBelow)):
            return
        with showErrorAndGoOn(_("Removing lesions failed."), waitCursor=True):
            self.logic.removeLesions(p, ids)

    def onRefreshLayers(self) -> None:
        p = self._parameterNode
        found = self._runTask(_("Loading the model"), _("Listing the model's layers failed."), lambda progress: self.logic.layerNames(p, progress))
        if found is None:
            return
        layers, default = found
        combo = self.ui.layerComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(model default: {layer})").format(layer=default), "")
        for name in layers:
            combo.addItem(name, name)
        combo.blockSignals(wasBlocked)
        self._showLayer(p.gradcamLayer)

    def onRestartWorker(self) -> None:
        self.logic.shutdown()
        self._runTask(_("Starting the worker"), _("The worker could not start."), lambda progress: self.logic.workerInfo(p=self._parameterNode, progress=progress))

    def onTableSelection(self) -> None:
        view, p = self.ui.lesionTableView, self._parameterNode
        if self._rowFollowingLesion:  # the row was moved to the lesion already selected
            return
        indexes = view.selectionModel().selectedIndexes() if view.selectionModel() else []
        if not indexes or not p or not p.lesionTable:
            return
        lesionId = self._lesionOfViewIndex(p.lesionTable, indexes[0])
        if lesionId:
            self._selectLesion(lesionId)

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

    def onLayerChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.gradcamLayer = self.ui.layerComboBox.itemData(index) or ""

    def onCustomRegionChanged(self, *_args) -> None:
        p = self._parameterNode
        # not while the selector is made to show the parameter node's region, nor while a scene is loaded or
        # closed (the selector's node box loses and finds nodes then, with nobody choosing)
        if not p or self._customRegionSyncing or slicer.mrmlScene.IsBatchProcessing():
            return
        selector = self.ui.customRegionSelector
        node, segmentId = selector.currentNode(), selector.currentSegmentID() or ""
        self._customRegionSyncing = True  # after the node is written, _updateGUI must not push the old segment back
        try:
            p.customRegionSegmentation = node
            p.customRegionSegmentId = segmentId
        finally:
            self._customRegionSyncing = False

    def _selectLesion(self, lesionId) -> None:
        with showErrorAndGoOn(_("Selecting the lesion failed.")):
            self.logic.selectLesion(self._parameterNode, lesionId)
            self._showTpProbability(self.logic.knownTpProbability(self._parameterNode, lesionId),
                                    self.logic.knownTpNote(self._parameterNode, lesionId))

    # -- picking a lesion with a click in a slice view: a markups point in persistent place mode, so that
    # the click is not taken for window/level and lightbox panes are handled by Slicer itself

    def onPickToggled(self, on) -> None:
        self._stopPicking()
        if on:
            self._startPicking()

    def _startPicking(self) -> None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MS lesion pick")
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetPointLabelsVisibility(False)
        self._pickNode = node
        self.addObserver(node, node.PointPositionDefinedEvent, self._onPointPlaced)
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(node)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        # StartPlaceMode(True) sets PlaceModePersistence to 1 (vtkSlicerMarkupsLogic.cxx, StartPlaceMode) and
        # SwitchToViewTransformMode keeps it (vtkMRMLInteractionNode.cxx): remember the user's setting
        self._placePersistenceBeforePicking = interactionNode.GetPlaceModePersistence()
        markupsLogic.StartPlaceMode(True, interactionNode)
        self.addObserver(interactionNode, interactionNode.EndPlacementEvent, self._onPlacementEnded)

    def _stopPicking(self) -> None:
        interactionNode = slicer.app.applicationLogic().GetInteractionNode() if slicer.app.applicationLogic() else None
        if interactionNode:
            self.removeObserver(interactionNode, interactionNode.EndPlacementEvent, self._onPlacementEnded)
        node, self._pickNode = self._pickNode, None
        if node is None:
            return
        self.removeObserver(node, node.PointPositionDefinedEvent, self._onPointPlaced)
        if interactionNode and interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            interactionNode.SwitchToViewTransformMode()
        persistence, self._placePersistenceBeforePicking = self._placePersistenceBeforePicking, None
        if interactionNode and persistence is not None:
            interactionNode.SetPlaceModePersistence(persistence)
        if node.GetScene():
            slicer.mrmlScene.RemoveNode(node)

    def _onPointPlaced(self, caller, event) -> None:
        n = caller.GetNumberOfControlPoints()
        if n == 0:
            return
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(n - 1, ras)
        qt.QTimer.singleShot(0, caller.RemoveAllControlPoints)  # not from inside the markups event
        p = self._parameterNode
        lesionId = self.logic.lesionAtRAS(p, ras) if p and p.lesionLabels else None
        if lesionId:
            self._selectLesion(lesionId)
        else:
            slicer.util.showStatusMessage(_("No lesion at that point."), 3000)

    def _onPlacementEnded(self, caller, event) -> None:
        # the user left place mode (Escape, another mouse mode): the button follows
        self.ui.pickLesionButton.checked = False

    def onOpacityChanged(self, value) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def _showTpProbability(self, probability, note="") -> None:
        """note: why scoring failed (the table's TP note), shown when there is no probability."""
        if probability is None:
            if note:
                self.ui.tpProbabilityLabel.text = _("TP probability: not computed: ") + note
            else:
                self.ui.tpProbabilityLabel.text = (_("TP probability: not computed (press Score selected lesion)") if dependencies.has_radiomics()
                                                   else dependencies.RADIOMICS_HINT)
            return
        verdict = _("likely true lesion") if probability >= 0.5 else _("possible false positive")
        self.ui.tpProbabilityLabel.text = _("TP probability: {p:.2f} ({v})").format(p=probability, v=verdict)


#
# MSInstanceSaliencyLogic
#


class MSInstanceSaliencyLogic(ScriptedLoadableModuleLogic):
    """Processing callable without the GUI. The steps are the shared, Qt-free workflow's
    (MSInstanceSaliencyMRML.workflow, on the parameter node; its heavy work runs in a worker process):
    this class adds the Slicer-only parts (PythonSlicer, installing packages, the slice views, the legend)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._workflow = LesionWorkflow(session_factory=self._newSession)

    def getParameterNode(self):
        return MSInstanceSaliencyParameterNode(super().getParameterNode())

    # -- dependencies: torch through PyTorch Utils, MONAI without touching what Slicer ships, and the
    # optional SlicerRadiomics extension (pyradiomics) through the Extensions Manager

    # one install at a time in this Slicer: pip and the Extensions Manager write into shared folders, and
    # both process events while they run (slicer.util.logProcessOutput, per output line), so a second
    # click would start a second install. On the class: every logic instance shares that Python.
    _installing = False

    @classmethod
    def _claimInstall(cls) -> bool:
        if cls._installing:
            slicer.util.showStatusMessage(_("An installation is running: please wait for it to end."), 5000)
            return False
        cls._installing = True
        return True

    @classmethod
    def _releaseInstall(cls) -> None:
        cls._installing = False

    @staticmethod
    def _installDialog(title):
        """A modal busy dialog (maximum 0) without Cancel (a running pip cannot be stopped safely halfway);
        autoClose/autoReset off so that it stays until it is closed."""
        dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), windowTitle=title, labelText=title, maximum=0,
                                                  autoClose=False, autoReset=False, windowModality=qt.Qt.ApplicationModal)
        dialog.setCancelButton(None)
        dialog.show()
        slicer.app.processEvents()
        return dialog

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """True when torch and MONAI are installed in versions that work together (installing or replacing
        them after one confirmation); False when declined, failed, or another installation is running."""
        if not self._claimInstall():  # checked and set before anything else
            return False
        try:
            return self._ensureDependencies(askConfirmation)
        finally:
            self._releaseInstall()

    def _ensureDependencies(self, askConfirmation) -> bool:
        # versions from the installed metadata: another extension may have left an old torch or MONAI
        problems = dependencies.installed_problems()
        if not problems:
            return True
        listed = "\n".join("- " + why for why in problems.values())
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MS Instance Saliency needs PyTorch and MONAI in versions that work with Slicer's numpy:\n{p}\n\n"
                  "PyTorch is installed by the PyTorch extension (the build that fits your GPU), MONAI with pip, "
                  "leaving what Slicer ships unchanged.\nInstall them now? This can take several minutes.").format(p=listed)):
            slicer.util.warningDisplay(_("Segmentation and saliency need:\n{p}\n\nInstall them from this module when you are ready.").format(p=listed))
            return False
        torchWasLoaded = "torch" in sys.modules  # by another module: it stays loaded in Slicer until a restart
        dialog = self._installDialog(_("Installing Python packages"))
        try:
            self.installDependencies(problems, dialog)
        except Exception as exc:
            dialog.close()
            slicer.util.errorDisplay(_("Installing the Python packages failed: {e}").format(e=exc), detailedText=traceback.format_exc())
            return False
        dialog.close()
        left = dependencies.installed_problems()
        if left:
            slicer.util.errorDisplay(_("The Python packages are still not usable:\n{p}").format(p="\n".join("- " + why for why in left.values())))
            return False
        self.shutdown()  # a running worker still has the old packages loaded; the next task starts a fresh one
        if "torch" in problems and torchWasLoaded:
            slicer.util.infoDisplay(_("PyTorch was updated. This module uses it at once; restart Slicer before using "
                                      "other modules that had loaded the old PyTorch."))
        return True

    @staticmethod
    def installDependencies(problems, dialog=None):
        """Install or replace what `problems` names (dependencies.installed_problems(): "torch", "monai")."""

        def step(text):
            if dialog is not None:
                dialog.labelText = text
            slicer.app.processEvents()

        if "torch" in problems:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension (View > Extensions Manager) and restart Slicer: it installs "
                                     "the torch build for your GPU.")) from None
            step(_("Installing PyTorch {r} (PyTorch Utils chooses the build for your GPU)...").format(r=dependencies.TORCH_REQUIREMENT))
            # an installed torch that does not satisfy the requirement is replaced; raises when the installation
            # fails, None only when a confirmation was declined (asked already, so not asked again)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT) is None:
                raise RuntimeError(_("PyTorch was not installed."))
        # MONAI is judged again against the torch installed now (raises with the reason if torch is still unusable)
        if "monai" not in dependencies.installed_problems():
            return
        requirement = dependencies.monai_requirement(dependencies.installed_version("torch"))
        step(_("Installing {r}...").format(r=requirement))
        try:
            import slicer.packaging as slicerPackaging  # Slicer 5.11 and later
        except ImportError:
            slicerPackaging = None
        if hasattr(slicerPackaging, "pip_ensure"):
            # installs without the packages named (its skip_packages installs with --no-deps and walks the rest)
            slicerPackaging.pip_ensure(requirement, skip_packages=list(dependencies.KEEP_AS_INSTALLED), prompt_install=False,
                                       requester="MS Instance Saliency")
        else:
            # --no-deps: pip must not replace torch, numpy, SimpleITK, requests or packaging in Slicer's Python
            slicer.util.pip_install(["--no-deps", requirement])

    def offerRadiomicsExtension(self) -> bool:
        """pyradiomics (the TP probability) comes from the optional SlicerRadiomics extension: offer to install
        it with the Extensions Manager, after a confirmation; it is loaded after a restart. True when installed now."""
        if not self._claimInstall():  # checked and set before anything else
            return False
        try:
            return self._offerRadiomicsExtension()
        finally:
            self._releaseInstall()

    def _offerRadiomicsExtension(self) -> bool:
        name = dependencies.RADIOMICS_EXTENSION
        how = _("To compute the TP probability, install the {e} extension with View > Extensions Manager and restart Slicer.").format(e=name)
        # no extensionsManagerModel in a Slicer built without the Extensions Manager
        manager = slicer.app.extensionsManagerModel() if hasattr(slicer.app, "extensionsManagerModel") else None
        if manager is None:
            slicer.util.infoDisplay(dependencies.RADIOMICS_HINT)
            return False
        if manager.isExtensionInstalled(name):
            # installed in this session (loaded at the next start), or installed but its pyradiomics does not import
            slicer.util.infoDisplay(_("The {e} extension is installed, but pyradiomics cannot be imported yet: restart Slicer "
                                      "to compute the TP probability.").format(e=name))
            return False
        if not slicer.util.confirmOkCancelDisplay(
                _("The TP probability needs pyradiomics, which comes from the {e} extension (segmentation and saliency maps "
                  "work without it).\n\nDownload and install {e} from the Slicer extensions server now? Slicer must be "
                  "restarted afterwards.").format(e=name)):
            slicer.util.showStatusMessage(how, 10000)
            return False
        dialog = self._installDialog(_("Installing the {e} extension").format(e=name))
        try:
            # what installExtensionFromServer does, without its own questions (asked above): fresh metadata,
            # then the download and install, waiting for both
            installed = (manager.updateExtensionsMetadataFromServer(True, True)
                         and manager.downloadAndInstallExtensionByName(name, True, True))
        finally:
            dialog.close()
        if not installed:
            slicer.util.errorDisplay(_("The {e} extension could not be installed: the extensions server may be unreachable, or "
                                       "it is not built for this platform (not for macOS since Slicer 5.3). Segmentation and "
                                       "saliency maps work without it.").format(e=name), detailedText=how)
            return False
        if slicer.util.confirmYesNoDisplay(_("The {e} extension is installed. Slicer must be restarted to use it. Restart now?").format(e=name)):
            slicer.util.restart()
        return True

    # -- the steps: MSInstanceSaliencyMRML.workflow does them on the parameter node (the web app shares
    # it); this adds what only Slicer does (PythonSlicer for the worker, the slice views, the colour legend)

    def workflow(self, p) -> LesionWorkflow:
        """The shared workflow, working on the parameter node `p` (the scene's state)."""
        self._workflow.state = p
        return self._workflow

    @staticmethod
    def _newSession():
        from MSInstanceSaliencyMRML.worker_session import WorkerSession

        python = shutil.which("PythonSlicer")
        if python is None:
            raise RuntimeError(_("PythonSlicer (Slicer's Python) was not found; it is needed to run the worker process."))
        return WorkerSession(python=python, env=slicer.util.startupEnvironment())

    def shutdown(self) -> None:
        self._workflow.shutdown()

    def workerInfo(self, p=None, start=True, progress=None):
        """What the worker sees (torch build, GPU, pyradiomics); None when none runs and start is False."""
        return self._workflow.worker_info(start, progress, device=p.device if p else "auto")

    def modelInfo(self):
        """What the loaded model is and expects (format, inputs, pre-processing, classifier note); None before one is loaded."""
        return self._workflow.model_info()

    def caseWarnings(self):
        return self._workflow.case_warnings()

    def modelChannels(self, p):
        """The channels 'Show channel' may take: the loaded model's inputs, every channel before a model is loaded."""
        return self.workflow(p).channels()

    def segment(self, p, progress=None):
        rows = self.workflow(p).segment(progress)
        slicer.util.setSliceViewerLayers(background=p.flairVolume, foreground=None, label=None, fit=True)
        return rows

    # -- lesion selection

    def selectLesion(self, p, lesionId):
        centre = self.workflow(p).select_lesion(lesionId)
        slicer.modules.markups.logic().JumpSlicesToLocation(centre[0], centre[1], centre[2], True)
        return centre

    def lesionAtRAS(self, p, ras):
        return self.workflow(p).lesion_at_ras(ras)

    # -- saliency

    def explain(self, p, progress=None):
        """{"node": the map as a volume, "title", "tp_probability": when made with the classifier's settings, "tp_note": why not}"""
        return self.workflow(p).explain(progress)

    def showOverlay(self, p, node):
        slicer.util.setSliceViewerLayers(background=p.flairVolume, foreground=node, foregroundOpacity=p.overlayOpacity)
        try:
            self.showColorLegend(node, slicer.modules.colors.logic())
        except Exception as exc:  # the legend is a convenience; the overlay is what matters
            logging.warning(f"No colour legend: {exc}")

    @staticmethod
    def showColorLegend(node, colorLogic):
        """The map's colour legend, titled with the map's current name. AddDefaultColorLegendDisplayNode
        titles a legend only when it creates it and otherwise returns the existing one unchanged
        (Modules/Loadable/Colors/Logic/vtkSlicerColorLogic.cxx, v5.10.0), while a map made with "Keep earlier
        maps" off reuses the node under a new name: so the title is set every time."""
        legend = colorLogic.AddDefaultColorLegendDisplayNode(node)
        if legend is None:
            raise RuntimeError(f"no legend could be made for {node.GetName()}")
        legend.SetTitleText(node.GetName())
        legend.SetName(f"{node.GetName()} color legend")  # as the logic names a new one
        return legend

    def layerNames(self, p, progress=None):
        """(Grad-CAM++ layer names of the model, its default layer)"""
        return self.workflow(p).layers(progress)

    # -- TP probability, removal

    def knownTpProbability(self, p, lesionId):
        return self.workflow(p).known_tp_probability(lesionId)

    def knownTpNote(self, p, lesionId):
        """Why scoring gave a lesion no TP probability (the table's TP note), '' when it did not fail."""
        return self.workflow(p).known_tp_note(lesionId)

    def scoreLesions(self, p, lesionIds, progress=None):
        """{lesion id: P(TP)}, written into the table lesion by lesion (a cancelled run keeps what was done)."""
        return self.workflow(p).score(lesionIds, progress)

    def scoreAllLesions(self, p, progress=None):
        return self.workflow(p).score_all(progress)

    def lesionsBelow(self, p, threshold):
        return self.workflow(p).lesions_below(threshold)

    def removeLesions(self, p, lesionIds):
        """Segments, table rows and label voxels; the worker gets the new labels before its next use."""
        return self.workflow(p).remove_lesions(lesionIds)


#
# MSInstanceSaliencyTest
#


class MSInstanceSaliencyTest(ScriptedLoadableModuleTest):
    """Each test_* stands alone (ctest runs them one by one; Reload and Test runs them all through the
    base class's runTest). The light tests need no torch: a small synthetic case in the scene. The
    heavy ones run the demo model in the worker on the CPU and skip, with a message, when torch,
    MONAI or the phantom's template (nilearn) are not installed: tests never install packages."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def tearDown(self):
        if getattr(self, "_logic", None):
            self._logic.shutdown()  # the worker process of this test

    # -- light: a synthetic case with three lesions, no model

    def _syntheticCase(self):
        import numpy as np

        from MSInstanceSaliencyLib.segmentation.instances import label_instances, lesion_table
        from MSInstanceSaliencyLib.io.volumes import image_from_array

        shape = (40, 44, 36)
        flair = np.random.default_rng(0).normal(100, 5, shape).astype("float32")
        lesions = np.zeros(shape, bool)
        for (i, j, k), r in (((10, 12, 10), 3), ((28, 30, 20), 2), ((20, 22, 28), 2)):
            x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
            lesions |= (x - i) ** 2 + (y - j) ** 2 + (z - k) ** 2 <= r * r
        flair[lesions] += 60
        image = image_from_array(flair, spacing=(1.0, 1.0, 1.2))
        labels = label_instances(lesions, spacing=image.GetSpacing(), min_volume_mm3=0)
        logic = self._logic = MSInstanceSaliencyLogic()
        p = logic.getParameterNode()
        p.flairVolume = mrml.add_volume(flair, image, "FLAIR")
        p.mprageVolume = mrml.add_volume(200 - flair, image, "MPRAGE")
        p.lesionLabels = mrml.add_volume(labels.astype("int32"), p.mprageVolume, "MS lesion labels", "vtkMRMLLabelMapVolumeNode")
        p.lesionSegmentation = mrml.labels_to_segmentation(labels, p.mprageVolume)
        p.lesionTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "MS lesions")
        mrml.fill_lesion_table(p.lesionTable, lesion_table(labels, image))
        return logic, p, labels

    def _moduleWidget(self):
        slicer.util.selectModule("MSInstanceSaliency")
        return slicer.util.getModuleWidget("MSInstanceSaliency")

    def test_widget_table_row_picks_its_lesion(self):
        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()
        widget.setParameterNode(p)
        view = widget.ui.lesionTableView
        ids = [int(r["Lesion"]) for r in mrml.lesion_table_rows(p.lesionTable)]
        view.selectRow(1)
        self.assertEqual(p.selectedLesion, ids[1])
        self.assertEqual(widget.ui.selectedLesionLabel.text, f"Lesion {ids[1]}")
        # a parameter change must not re-pick the highlighted row (it did: the custom-region box never stayed ticked)
        p.useCustomRegion = True
        p.nSamples = 7
        self.assertTrue(p.useCustomRegion)
        self.assertTrue(widget.ui.useCustomRegionCheckBox.checked)
        view.selectRow(2)
        self.assertEqual(p.selectedLesion, ids[2])

    def test_widget_pick_button_is_released_on_exit(self):
        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        # picking turns "place multiple" on; the user's own setting comes back when it stops
        for usersPersistence in (0, 1):
            widget.setParameterNode(p)
            interaction.SetPlaceModePersistence(usersPersistence)
            widget.ui.pickLesionButton.checked = True
            self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
            self.assertEqual(interaction.GetPlaceModePersistence(), 1)
            widget.exit()
            self.assertFalse(widget.ui.pickLesionButton.checked)
            self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.ViewTransform)
            self.assertEqual(interaction.GetPlaceModePersistence(), usersPersistence)
            self.assertEqual(slicer.mrmlScene.GetNodesByName("MS lesion pick").GetNumberOfItems(), 0)
        interaction.SetPlaceModePersistence(0)

    def test_widget_table_row_follows_a_lesion_picked_in_a_view(self):
        import qt

        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()
        widget.setParameterNode(p)
        view = widget.ui.lesionTableView
        view.sortFilterProxyModel().sort(0, qt.Qt.DescendingOrder)  # the view's rows differ from the table's
        widget.ui.pickLesionButton.checked = True
        try:
            for lesionId in (3, 1):
                centre = p.lesionSegmentation.GetSegmentCenterRAS(mrml.segment_id_of_lesion(p.lesionSegmentation, lesionId))
                widget._pickNode.AddControlPoint(list(centre))  # as a click in a slice view places it
                slicer.app.processEvents()
                self.assertEqual(p.selectedLesion, lesionId)
                selected = view.selectionModel().selectedIndexes()
                self.assertTrue(selected)
                self.assertEqual(widget._lesionOfViewIndex(p.lesionTable, selected[0]), lesionId)
        finally:
            widget.ui.pickLesionButton.checked = False
        p.selectedLesion = 0  # nothing selected: no row highlighted
        self.assertFalse(view.selectionModel().selectedIndexes())

    def test_widget_says_why_a_lesion_has_no_tp_probability(self):
        """A failed TP score's reason (the table's TP note) is shown when the lesion is picked."""
        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()
        widget.setParameterNode(p)
        mrml.set_tp_probability(p.lesionTable, 2, None, "no lesion voxel in the patch")
        widget._selectLesion(2)
        self.assertEqual(widget.ui.tpProbabilityLabel.text, "TP probability: not computed: no lesion voxel in the patch")
        mrml.set_tp_probability(p.lesionTable, 3, 0.75)
        widget._selectLesion(3)
        self.assertTrue(widget.ui.tpProbabilityLabel.text.startswith("TP probability: 0.75"))

    def test_widget_register_box_needs_an_mprage_and_channels_follow_the_model(self):
        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()
        widget.setParameterNode(p)
        self.assertTrue(widget.ui.registerFlairCheckBox.enabled)
        widget.ui.registerFlairCheckBox.checked = True
        self.assertTrue(p.registerFlair)  # bound through SlicerParameterName
        p.registerFlair = False
        mprage, p.mprageVolume = p.mprageVolume, None
        self.assertFalse(widget.ui.registerFlairCheckBox.enabled)
        p.mprageVolume = mprage
        # no model loaded: every channel may be shown, and the box keeps its items (the connector maps index to choice)
        p.displayChannel = "MPRAGE"
        widget._followModelChannels()
        self.assertEqual(p.displayChannel, "MPRAGE")
        self.assertTrue(widget.ui.channelComboBox.enabled)
        self.assertEqual(widget.ui.channelComboBox.count, len(CHANNELS))

    def test_legend_title_follows_the_map(self):
        """A map made with "Keep earlier maps" off reuses its node under a new name: the legend must follow."""
        import numpy as np

        logic, p, labels = self._syntheticCase()
        node = mrml.add_saliency_volume(np.zeros(labels.shape, "float32"), p.mprageVolume, "Lesion 3 SmoothGrad FLAIR")
        first = logic.showColorLegend(node, slicer.modules.colors.logic())
        self.assertEqual(first.GetTitleText(), "Lesion 3 SmoothGrad FLAIR")
        node.SetName("Lesion 7 SmoothGrad FLAIR")
        logic.showOverlay(p, node)
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(node)
        self.assertEqual(legend.GetID(), first.GetID())  # the same legend, retitled
        self.assertEqual(legend.GetTitleText(), "Lesion 7 SmoothGrad FLAIR")

    def test_select_lesion_jumps_the_views_to_it(self):
        """The shared workflow selects; the Slicer logic adds the jump (JumpSlicesToLocation), which pytest cannot run."""
        logic, p, labels = self._syntheticCase()
        centre = logic.selectLesion(p, 2)
        self.assertEqual(p.selectedLesion, 2)
        self.assertEqual(logic.lesionAtRAS(p, centre), 2)
        red = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if red is not None:  # no slice views with --no-main-window
            self.assertAlmostEqual(red.GetSliceToRAS().GetElement(2, 3), centre[2], places=3)  # centred jump: the plane's origin
        with self.assertRaises(ValueError):
            logic.selectLesion(p, 99)

    def test_remove_lesions_everywhere(self):
        import numpy as np

        logic, p, labels = self._syntheticCase()
        mrml.set_tp_probability(p.lesionTable, 2, 0.2)
        mrml.set_tp_probability(p.lesionTable, 3, 0.9)
        self.assertEqual(logic.lesionsBelow(p, 0.5), [2])
        p.selectedLesion = 2
        logic.removeLesions(p, [2])
        self.assertEqual([int(r["Lesion"]) for r in mrml.lesion_table_rows(p.lesionTable)], [1, 3])
        self.assertFalse(np.any(mrml.array_from_volume_node(p.lesionLabels) == 2))
        self.assertIsNone(mrml.segment_id_of_lesion(p.lesionSegmentation, 2))
        self.assertEqual(p.selectedLesion, 0)
        self.assertEqual(logic.lesionsBelow(p, 0.5), [])

    def test_parameter_node_survives_scene_save_and_reload(self):
        import tempfile

        logic, p, labels = self._syntheticCase()
        widget = self._moduleWidget()  # open during the reload, as in use: its selector must not overwrite what was saved
        widget.setParameterNode(p)
        p.nSamples, p.method, p.context, p.maxOmegaVoxels, p.gradcamLayer = 7, "SmoothGrad mean", "full", 128, "model.1.submodule.0"
        savedSegmentId = mrml.segment_id_of_lesion(p.lesionSegmentation, 2)  # not the first segment: the selector's fallback
        self.assertNotEqual(savedSegmentId, mrml.segment_id_of_lesion(p.lesionSegmentation, 1))
        p.customRegionSegmentation, p.customRegionSegmentId = p.lesionSegmentation, savedSegmentId
        savedSegmentationName = p.lesionSegmentation.GetName()
        path = os.path.join(tempfile.mkdtemp(), "scene.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        q = MSInstanceSaliencyLogic().getParameterNode()
        self.assertEqual((q.nSamples, q.method, q.context, q.maxOmegaVoxels, q.gradcamLayer),
                         (7, "SmoothGrad mean", "full", 128, "model.1.submodule.0"))
        self.assertIsNotNone(q.flairVolume)
        widget.setParameterNode(q)
        # compared with what was saved, not with the parameter node the widget may have written into
        self.assertEqual(q.customRegionSegmentId, savedSegmentId)
        self.assertEqual(q.customRegionSegmentation.GetName(), savedSegmentationName)
        self.assertEqual(widget.ui.customRegionSelector.currentNode().GetName(), savedSegmentationName)
        self.assertEqual(widget.ui.customRegionSelector.currentSegmentID(), savedSegmentId)
        self.assertEqual(widget.ui.layerComboBox.currentText, "model.1.submodule.0")

    # -- heavy: the demo model in the worker

    def _heavyReady(self):
        # versions too: an old torch or MONAI left by another extension would fail in the worker, not skip
        missing = list(dependencies.installed_problems().values())
        import importlib.util

        if importlib.util.find_spec("nilearn") is None:
            missing.append("nilearn is not installed (for the phantom)")
        if missing:
            self.delayDisplay(f"Skipped: {'; '.join(missing)} (install torch and MONAI from the module, or pip_install('nilearn'))")
            return False
        return True

    def _segmentedPhantom(self):
        from MSInstanceSaliencyLib.research.phantom import make_phantom
        from MSInstanceSaliencyLib.io.volumes import array_from_image

        ph = make_phantom(11800, patient=18, voxel_size=2.0)
        logic = self._logic = MSInstanceSaliencyLogic()
        p = logic.getParameterNode()
        p.flairVolume = mrml.add_volume(array_from_image(ph.flair), ph.flair, "FLAIR")
        p.mprageVolume = mrml.add_volume(array_from_image(ph.mprage), ph.mprage, "MPRAGE")
        p.device = "cpu"
        rows = logic.segment(p)
        self.assertGreater(len(rows), 0)
        return logic, p, rows

    def test_segment_explain_and_cancel_in_the_worker(self):
        if not self._heavyReady():
            return
        import numpy as np

        logic, p, rows = self._segmentedPhantom()
        table = mrml.lesion_table_rows(p.lesionTable)
        self.assertEqual([int(r["Lesion"]) for r in table], [r["lesion_id"] for r in rows])
        self.assertEqual(p.lesionSegmentation.GetSegmentation().GetNumberOfSegments(), len(rows))
        info = logic.workerInfo(p)
        self.assertNotEqual(info["pid"], os.getpid())  # the work ran in another process
        small = min(rows, key=lambda r: r["voxels"])["lesion_id"]
        logic.selectLesion(p, small)
        p.method, p.nSamples, p.maxOmegaVoxels = "SmoothGrad max", 2, 3
        node = logic.explain(p)["node"]
        np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(p.mprageVolume))
        self.assertAlmostEqual(node.GetDisplayNode().GetWindowLevelMin(), -node.GetDisplayNode().GetWindowLevelMax())
        # Cancel in the middle of a long SmoothGrad: the worker stops and stays
        p.nSamples, p.maxOmegaVoxels = 500, 0
        with self.assertRaises(Cancelled):
            logic.explain(p, progress=lambda done, total: done is None)
        self.assertEqual(logic.workerInfo(p)["pid"], info["pid"])
        p.method = "Grad-CAM++"
        cam = logic.explain(p)["node"]
        self.assertGreaterEqual(float(mrml.array_from_volume_node(cam).min()), 0.0)

    def test_tp_probability_in_the_worker(self):
        if not self._heavyReady():
            return
        if not dependencies.has_radiomics():
            self.delayDisplay("Skipped: " + dependencies.RADIOMICS_HINT)
            return
        logic, p, rows = self._segmentedPhantom()
        lesion = min(rows, key=lambda r: r["voxels"])["lesion_id"]
        probs = logic.scoreLesions(p, [lesion])
        self.assertTrue(0.0 <= probs[lesion] <= 1.0)
        self.assertAlmostEqual(logic.knownTpProbability(p, lesion), probs[lesion], places=5)
        # an explanation made with the classifier's settings gives the same probability, without a second map
        from MSInstanceSaliencyLib.classifier.scoring import DEFAULT_SETTINGS

        logic.selectLesion(p, lesion)
        p.method, p.nSamples, p.sigma, p.context, p.maxOmegaVoxels = ("SmoothGrad max", DEFAULT_SETTINGS["n_samples"], DEFAULT_SETTINGS["sigma"],
                                                                     DEFAULT_SETTINGS["context"], DEFAULT_SETTINGS["max_omega_voxels"])
        self.assertAlmostEqual(logic.explain(p)["tp_probability"], probs[lesion], places=6)
        # with other settings there is no silent second SmoothGrad: no probability, and a note saying why
        p.nSamples = 3
        result = logic.explain(p)
        self.assertIsNone(result["tp_probability"])
        self.assertIn("Score", result["tp_note"])
