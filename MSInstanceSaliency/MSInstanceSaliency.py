import contextlib
import logging
import os
import sys
from typing import Annotated

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

METHODS = ["SmoothGrad max", "SmoothGrad mean", "Grad-CAM++"]
CHANNELS = ["FLAIR", "MPRAGE"]
DEVICES = ["auto", "cuda", "cpu"]
CONTEXTS = ["patch", "full"]
# Python packages the module needs besides what Slicer ships (numpy, SimpleITK, vtk).
REQUIRED_PACKAGES = {"monai": "monai>=1.3", "sklearn": "scikit-learn>=1.3", "scipy": "scipy", "nibabel": "nibabel",
                     "nilearn": "nilearn", "matplotlib": "matplotlib", "radiomics": "pyradiomics"}


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
to red (positive), symmetric around 0.<br>
The bundled model is a demonstration model trained on synthetic phantoms: not for clinical use.
See <a href="https://github.com/MSInstanceSaliency/MSInstanceSaliency#use-in-3d-slicer">the documentation</a>.
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
    """Everything the module remembers with the scene."""

    flairVolume: vtkMRMLScalarVolumeNode
    mprageVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""  # empty: the bundled demo model
    device: Annotated[str, Choice(DEVICES)] = "auto"
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.3
    minLesionVolume: Annotated[float, WithinRange(0.0, 10000.0)] = 5.0
    lesionSegmentation: vtkMRMLSegmentationNode
    lesionTable: vtkMRMLTableNode
    lesionLabels: vtkMRMLLabelMapVolumeNode
    probabilityVolume: vtkMRMLScalarVolumeNode
    selectedLesion: int = 0
    useCustomRegion: bool = False
    customRegionSegmentation: vtkMRMLSegmentationNode
    customRegionSegmentId: str = ""
    method: Annotated[str, Choice(METHODS)] = "SmoothGrad max"
    nSamples: Annotated[int, WithinRange(1, 1000)] = 50
    maxOmegaVoxels: Annotated[int, WithinRange(0, 100000)] = 0  # 0: the max over all lesion voxels
    sigma: Annotated[float, WithinRange(0.0, 1.0)] = 0.05
    displayChannel: Annotated[str, Choice(CHANNELS)] = "FLAIR"
    context: Annotated[str, Choice(CONTEXTS)] = "patch"
    gradcamLayer: str = ""
    keepEarlierMaps: bool = True
    saliencyVolume: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    pruneBelow: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# MSInstanceSaliencyWidget
#


class MSInstanceSaliencyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pickObservers = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MSInstanceSaliency.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MSInstanceSaliencyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.scoreAllButton.connect("clicked(bool)", self.onScoreAll)
        self.ui.removeBelowButton.connect("clicked(bool)", self.onRemoveBelow)
        self.ui.refreshLayersButton.connect("clicked(bool)", self.onRefreshLayers)
        self.ui.pickLesionButton.connect("toggled(bool)", self.onPickToggled)
        self.ui.lesionTableView.connect("selectionChanged()", self.onTableSelection)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.customRegionSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onCustomRegionChanged)
        self.ui.customRegionSelector.connect("currentSegmentChanged(QString)", self.onCustomRegionChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.layerComboBox.connect("currentTextChanged(QString)", self.onLayerChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onPickToggled(False)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.onPickToggled(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
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
            self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p:
            return
        self.ui.segmentButton.enabled = bool(p.flairVolume and p.mprageVolume)
        hasLesions = bool(p.lesionLabels)
        self.ui.lesionTableView.setMRMLTableNode(p.lesionTable)
        customReady = bool(p.useCustomRegion and p.customRegionSegmentation and p.customRegionSegmentId)
        self.ui.explainButton.enabled = bool(p.flairVolume and p.mprageVolume) and (customReady or (hasLesions and p.selectedLesion > 0))
        self.ui.scoreAllButton.enabled = hasLesions
        self.ui.removeBelowButton.enabled = hasLesions
        self.ui.pickLesionButton.enabled = hasLesions
        self.ui.selectedLesionLabel.text = _("Lesion {id}").format(id=p.selectedLesion) if p.selectedLesion else _("none")
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath

    # -- actions (each wrapped so errors reach the user as a message, not a traceback)

    def onSegment(self) -> None:
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True), self._progress(_("Segmenting lesions")) as progress:
            self.logic.segment(self._parameterNode, progress=progress)
            self.ui.tpProbabilityLabel.text = ""
            self._updateGUI()

    def onExplain(self) -> None:
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Explaining the lesion failed."), waitCursor=True):
            with self._progress(_("Computing the saliency map")) as progress:
                node = self.logic.explain(self._parameterNode, progress=progress)
            if node is None:
                return
            self.logic.showOverlay(self._parameterNode, node)
            if self._parameterNode.method != "Grad-CAM++" and not self._parameterNode.useCustomRegion:
                self._showTpProbability(self.logic.tpProbabilityOfSelected(self._parameterNode))

    def onScoreAll(self) -> None:
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Scoring the lesions failed."), waitCursor=True), self._progress(_("TP probability of every lesion")) as progress:
            self.logic.scoreAllLesions(self._parameterNode, progress=progress)

    def onRemoveBelow(self) -> None:
        p = self._parameterNode
        ids = self.logic.lesionsBelow(p, p.pruneBelow)
        if not ids:
            slicer.util.infoDisplay(_("No scored lesion has a TP probability below {p:.2f}. Score the lesions first.").format(p=p.pruneBelow))
            return
        if not slicer.util.confirmOkCancelDisplay(_("Remove {n} lesion segments with TP probability below {p:.2f}?").format(n=len(ids), p=p.pruneBelow)):
            return
        with slicer.util.tryWithErrorDisplay(_("Removing lesions failed."), waitCursor=True):
            self.logic.removeLesions(p, ids)

    def onTableSelection(self) -> None:
        view, p = self.ui.lesionTableView, self._parameterNode
        indexes = view.selectionModel().selectedIndexes() if view.selectionModel() else []
        if not indexes or not p or not p.lesionTable:
            return
        row = view.tableModel().mrmlTableRowIndex(view.sortFilterProxyModel().mapToSource(indexes[0]))
        if row < 0:
            return
        self._selectLesion(int(p.lesionTable.GetTable().GetValue(row, 0).ToInt()))

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

    def onLayerChanged(self, name) -> None:
        if self._parameterNode and name:
            self._parameterNode.gradcamLayer = name

    def onCustomRegionChanged(self, *_args) -> None:
        p = self._parameterNode
        if not p:
            return
        p.customRegionSegmentation = self.ui.customRegionSelector.currentNode()
        p.customRegionSegmentId = self.ui.customRegionSelector.currentSegmentID() or ""

    def _selectLesion(self, lesionId) -> None:
        with slicer.util.tryWithErrorDisplay(_("Selecting the lesion failed.")):
            self.logic.selectLesion(self._parameterNode, lesionId)
            self._showTpProbability(self.logic.knownTpProbability(self._parameterNode, lesionId))

    def onPickToggled(self, on) -> None:
        """While on, a click in a slice view (crosshair position) picks the lesion under it."""
        for interactor, tag in self._pickObservers:
            interactor.RemoveObserver(tag)
        self._pickObservers = []
        if not on:
            return
        lm = slicer.app.layoutManager()
        for name in lm.sliceViewNames():
            interactor = lm.sliceWidget(name).sliceView().interactorStyle().GetInteractor()
            tag = interactor.AddObserver(vtk.vtkCommand.LeftButtonReleaseEvent, lambda caller, event, n=name: self._onSliceClick(n))
            self._pickObservers.append((interactor, tag))

    def _onSliceClick(self, viewName) -> None:
        p = self._parameterNode
        if not p or not p.lesionLabels:
            return
        sliceWidget = slicer.app.layoutManager().sliceWidget(viewName)
        xy = sliceWidget.sliceView().interactorStyle().GetInteractor().GetEventPosition()
        ras = sliceWidget.sliceLogic().GetSliceNode().GetXYToRAS().MultiplyPoint([xy[0], xy[1], 0, 1])[:3]
        lesionId = mrml.lesion_id_at_ras(p.lesionLabels, ras)
        if lesionId:
            self._selectLesion(lesionId)

    def onOpacityChanged(self, value) -> None:
        for name in slicer.app.layoutManager().sliceViewNames():
            slicer.app.layoutManager().sliceWidget(name).sliceLogic().GetSliceCompositeNode().SetForegroundOpacity(value)

    def onRefreshLayers(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Listing the model's layers failed."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            layers = self.logic.layerNames(self._parameterNode)
            self.ui.layerComboBox.clear()
            self.ui.layerComboBox.addItems(layers)

    def _showTpProbability(self, probability) -> None:
        if probability is None:
            self.ui.tpProbabilityLabel.text = _("TP probability: not computed (press Explain with SmoothGrad, or Score all lesions)")
            return
        verdict = _("likely true lesion") if probability >= 0.5 else _("possible false positive")
        self.ui.tpProbabilityLabel.text = _("TP probability: {p:.2f} ({v})").format(p=probability, v=verdict)

    @contextlib.contextmanager
    def _progress(self, title):
        """A progress dialog with Cancel for the duration; yields the Lib's (done, total) callback,
        which returns False once the user cancels."""
        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=100)

        def callback(done, total):
            dialog.setValue(int(100 * done / max(total, 1)))
            dialog.labelText = f"{title}: {done} / {total}"
            slicer.app.processEvents()
            return not dialog.wasCanceled

        try:
            yield callback
        finally:
            dialog.close()


#
# MSInstanceSaliencyLogic
#


class MSInstanceSaliencyLogic(ScriptedLoadableModuleLogic):
    """All processing, callable without the GUI. Numerics live in MSInstanceSaliencyLib; MRML in
    MSInstanceSaliencyMRML."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}
        self._prepared = {}
        self._lastExplanation = None  # (lesion id, Explanation) of the last SmoothGrad of a lesion

    def getParameterNode(self):
        return MSInstanceSaliencyParameterNode(super().getParameterNode())

    # -- dependencies

    @staticmethod
    def missingPackages():
        import importlib.util

        missing = [] if importlib.util.find_spec("torch") else ["torch"]
        return missing + [pip for mod, pip in REQUIRED_PACKAGES.items() if importlib.util.find_spec(mod) is None]

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """One confirmation, then torch via PyTorchUtils (right CUDA build) and the rest with pip."""
        missing = self.missingPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MS Instance Saliency needs these Python packages, which are not installed yet:\n{p}\n\n"
                  "Install them now? This can take several minutes.").format(p=", ".join(missing))):
            slicer.util.warningDisplay(_("Segmentation and saliency need {p}. Install them from this module when you are ready.").format(p=", ".join(missing)))
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("Install the PyTorch extension (Extensions Manager) first: it provides the torch build for your GPU."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.2") is None:
                slicer.util.errorDisplay(_("PyTorch could not be installed; see the Python console."))
                return False
        others = [p for p in missing if p not in ("torch", "pyradiomics")]
        if others:
            slicer.util.pip_install(others)
        if "pyradiomics" in missing:
            slicer.util.pip_install(["versioneer"])
            slicer.util.pip_install(["--no-build-isolation", "pyradiomics"])  # builds against Slicer's numpy
        return not self.missingPackages()

    # -- model and inputs

    def model(self, p):
        from MSInstanceSaliencyLib.model import load_model, resolve_device

        key = (p.modelPath or "", p.device)
        if key not in self._models:
            self._models[key] = load_model(p.modelPath or None, device=resolve_device(p.device))
        return self._models[key]

    def prepared(self, p):
        from MSInstanceSaliencyLib.preprocessing import prepare_case

        if not p.flairVolume or not p.mprageVolume:
            raise ValueError(_("Select the FLAIR and MPRAGE volumes."))
        key = (p.flairVolume.GetID(), p.mprageVolume.GetID(), p.flairVolume.GetMTime(), p.mprageVolume.GetMTime(), p.modelPath)
        if key not in self._prepared:
            self._prepared = {key: prepare_case(mrml.image_from_volume_node(p.flairVolume), mrml.image_from_volume_node(p.mprageVolume),
                                                self.model(p).spec)}
        return self._prepared[key]

    # -- segmentation

    def segment(self, p, progress=None):
        from MSInstanceSaliencyLib.instances import label_instances, lesion_table
        from MSInstanceSaliencyLib.inference import predict_probability

        model = self.model(p)
        case = self.prepared(p)
        prob = predict_probability(model, case.image, device=p.device, progress=progress)
        labels = label_instances(prob > p.threshold, spacing=case.spacing, min_volume_mm3=p.minLesionVolume)
        rows = lesion_table(labels, case.reference, prob)
        ref = p.mprageVolume
        if p.lesionLabels:
            mrml.set_volume_from_array(p.lesionLabels, labels.astype("int32"), ref)
        else:
            # kept (and saved with the scene) to map a clicked RAS point to its lesion id
            p.lesionLabels = mrml.add_volume(labels.astype("int32"), ref, "MS lesion labels", "vtkMRMLLabelMapVolumeNode")
        if p.probabilityVolume:
            mrml.set_volume_from_array(p.probabilityVolume, prob, ref)
        else:
            p.probabilityVolume = mrml.add_volume(prob, ref, "MS lesion probability")
        p.lesionSegmentation = mrml.labels_to_segmentation(labels, ref, p.lesionSegmentation)
        if not p.lesionTable:
            p.lesionTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "MS lesions")
        mrml.fill_lesion_table(p.lesionTable, rows)
        p.selectedLesion = 0
        self._lastExplanation = None  # lesion ids now name other lesions
        slicer.util.setSliceViewerLayers(background=p.flairVolume, foreground=None, label=None, fit=True)
        return rows

    # -- lesion selection

    def selectLesion(self, p, lesionId):
        lesionId = int(lesionId)
        if not p.lesionLabels:
            raise ValueError(_("Segment first."))
        sid = mrml.segment_id_of_lesion(p.lesionSegmentation, lesionId) if p.lesionSegmentation else None
        if sid is None:
            raise ValueError(_("Lesion {id} does not exist (it may have been removed).").format(id=lesionId))
        p.selectedLesion = lesionId
        p.useCustomRegion = False
        centre = p.lesionSegmentation.GetSegmentCenterRAS(sid)
        slicer.modules.markups.logic().JumpSlicesToLocation(centre[0], centre[1], centre[2], True)
        display = p.lesionSegmentation.GetDisplayNode()
        if display:  # highlight: the picked lesion opaque, the others faint
            seg = p.lesionSegmentation.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                other = seg.GetNthSegmentID(i)
                display.SetSegmentOpacity2DFill(other, 0.8 if other == sid else 0.15)
        return centre

    def omega(self, p):
        """Ω as an (x, y, z) mask on the MPRAGE grid, and its name for node names."""
        if p.useCustomRegion:
            if not p.customRegionSegmentation or not p.customRegionSegmentId:
                raise ValueError(_("Choose the segment to explain in 'Custom region'."))
            mask = mrml.segment_mask(p.customRegionSegmentation, p.customRegionSegmentId, p.mprageVolume)
            name = p.customRegionSegmentation.GetSegmentation().GetSegment(p.customRegionSegmentId).GetName()
        else:
            if not p.selectedLesion:
                raise ValueError(_("Pick a lesion first (table row or click in a view)."))
            mask = mrml.array_from_volume_node(p.lesionLabels) == p.selectedLesion
            name = f"Lesion {p.selectedLesion}"
        if not mask.any():
            raise ValueError(_("The region to explain is empty on the MPRAGE grid."))
        return mask, name

    # -- saliency

    def explain(self, p, progress=None):
        from MSInstanceSaliencyLib.errors import Cancelled
        from MSInstanceSaliencyLib.explain import explain

        model, case = self.model(p), self.prepared(p)
        mask, name = self.omega(p)
        gradcam = p.method == "Grad-CAM++"
        try:
            exp = explain(model, case.image, mask, "gradcampp" if gradcam else "smoothgrad", channels=case.channels,
                          n_samples=p.nSamples, sigma=p.sigma, aggregation="max" if p.method == "SmoothGrad max" else "mean",
                          context=p.context, layer=p.gradcamLayer or None, device=p.device, progress=progress,
                          max_omega_voxels=p.maxOmegaVoxels or None)
        except Cancelled:
            logging.info("Saliency computation cancelled")
            return None
        if gradcam:
            arr, title = exp.maps["gradcampp"], f"{name} Grad-CAM++"
        else:
            arr, title = exp.maps[p.displayChannel.lower()], f"{name} SmoothGrad {p.displayChannel}"
        # kept so that the TP probability can reuse it when it was made with the classifier's settings
        self._lastExplanation = None if gradcam or p.useCustomRegion else (int(p.selectedLesion), exp)
        replace = None if p.keepEarlierMaps or not p.saliencyVolume else p.saliencyVolume
        node = mrml.add_saliency_volume(arr, p.mprageVolume, title, replace=replace)
        p.saliencyVolume = node
        return node

    def showOverlay(self, p, node):
        slicer.util.setSliceViewerLayers(background=p.flairVolume, foreground=node, foregroundOpacity=p.overlayOpacity)
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(node)
        except Exception as exc:  # the legend is a convenience; the overlay is what matters
            logging.warning(f"No colour legend: {exc}")

    def layerNames(self, p):
        from MSInstanceSaliencyLib.saliency import list_layers

        return [name for name, _kind in list_layers(self.model(p))]

    # -- TP probability

    def classifier(self):
        from MSInstanceSaliencyLib.scoring import load_classifier

        if not hasattr(self, "_classifier"):
            self._classifier = load_classifier()
        return self._classifier

    def knownTpProbability(self, p, lesionId):
        """The lesion's TP probability as the table holds it (also after reopening a scene), or None."""
        if not p.lesionTable:
            return None
        for row in mrml.lesion_table_rows(p.lesionTable):
            if int(row["Lesion"]) == int(lesionId):
                value = row["TP probability"]
                return None if value != value else value  # NaN: not computed
        return None

    def tpProbabilityOfSelected(self, p):
        """From the map just computed when its settings are the classifier's, otherwise computed anew."""
        from MSInstanceSaliencyLib.radiomics import FeatureError
        from MSInstanceSaliencyLib.scoring import tp_probability_of_explanation

        lid = int(p.selectedLesion)
        last = self._lastExplanation
        prob = None
        if last and last[0] == lid:
            try:
                prob = tp_probability_of_explanation(self.classifier(), last[1], self.prepared(p).spacing)
            except FeatureError as exc:
                logging.warning(str(exc))
                return None
        if prob is None:
            return self.scoreLesions(p, [lid]).get(lid)
        mrml.set_tp_probability(p.lesionTable, lid, prob)
        return prob

    def scoreLesions(self, p, lesionIds, progress=None):
        from MSInstanceSaliencyLib.scoring import tp_probabilities

        labels = mrml.array_from_volume_node(p.lesionLabels)
        probs = tp_probabilities(self.model(p), self.prepared(p), labels, lesionIds, self.classifier(), device=p.device,
                                 progress=progress, on_error=lambda lid, msg: logging.warning(msg))
        for lid, prob in probs.items():
            if prob is not None:
                mrml.set_tp_probability(p.lesionTable, lid, prob)
        return probs

    def scoreAllLesions(self, p, progress=None):
        ids = [int(r["Lesion"]) for r in mrml.lesion_table_rows(p.lesionTable)]
        return self.scoreLesions(p, ids, progress)

    def lesionsBelow(self, p, threshold):
        return [int(r["Lesion"]) for r in mrml.lesion_table_rows(p.lesionTable)
                if r["TP probability"] == r["TP probability"] and r["TP probability"] < threshold]

    def removeLesions(self, p, lesionIds):
        return mrml.remove_lesion_segments(p.lesionSegmentation, lesionIds)


#
# MSInstanceSaliencyTest
#


class MSInstanceSaliencyTest(ScriptedLoadableModuleTest):
    """Each test_* stands alone (ctest runs them one by one): a phantom from the Lib, the demo model on CPU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            self.setUp()
            getattr(self, name)()

    def _phantomCase(self):
        self.assertTrue(MSInstanceSaliencyLogic().ensureDependencies(askConfirmation=False), "required Python packages are missing")
        from MSInstanceSaliencyLib.phantom import make_phantom
        from MSInstanceSaliencyLib.volumes import array_from_image

        ph = make_phantom(11800, patient=18)
        flair = mrml.add_volume(array_from_image(ph.flair), ph.flair, "FLAIR")
        mprage = mrml.add_volume(array_from_image(ph.mprage), ph.mprage, "MPRAGE")
        logic = MSInstanceSaliencyLogic()
        p = logic.getParameterNode()
        p.flairVolume, p.mprageVolume, p.device = flair, mprage, "cpu"
        return logic, p, ph

    def _segmented(self):
        logic, p, ph = self._phantomCase()
        rows = logic.segment(p)
        self.assertGreater(len(rows), 0)
        return logic, p, rows

    def test_segment_table_and_segments(self):
        logic, p, rows = self._segmented()
        table = mrml.lesion_table_rows(p.lesionTable)
        self.assertEqual([int(r["Lesion"]) for r in table], [r["lesion_id"] for r in rows])
        self.assertEqual(p.lesionSegmentation.GetSegmentation().GetNumberOfSegments(), len(rows))
        self.assertTrue(all(0.3 < r["Max probability"] <= 1.0 for r in table))

    def test_select_by_row_and_by_ras(self):
        logic, p, rows = self._segmented()
        logic.selectLesion(p, rows[0]["lesion_id"])
        self.assertEqual(p.selectedLesion, rows[0]["lesion_id"])
        target = rows[-1]
        labels = mrml.array_from_volume_node(p.lesionLabels)
        import numpy as np

        i, j, k = np.argwhere(labels == target["lesion_id"])[0]
        ras = mrml.ijk_to_ras(p.lesionLabels) @ np.array([i, j, k, 1.0])
        self.assertEqual(mrml.lesion_id_at_ras(p.lesionLabels, ras[:3]), target["lesion_id"])

    def test_smoothgrad_and_gradcampp_overlay(self):
        import numpy as np

        logic, p, rows = self._segmented()
        logic.selectLesion(p, min(rows, key=lambda r: r["voxels"])["lesion_id"])
        p.method, p.nSamples, p.maxOmegaVoxels = "SmoothGrad max", 2, 3
        node = logic.explain(p)
        np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(p.mprageVolume))
        d = node.GetDisplayNode()
        self.assertEqual(d.GetColorNodeID(), mrml.DIVERGING_COLOR_NODE_ID)
        self.assertAlmostEqual(d.GetWindowLevelMin(), -d.GetWindowLevelMax())
        p.method = "Grad-CAM++"
        cam = logic.explain(p)
        self.assertGreaterEqual(float(mrml.array_from_volume_node(cam).min()), 0.0)

    def test_tp_probability_range(self):
        logic, p, rows = self._segmented()
        lesion = min(rows, key=lambda r: r["voxels"])["lesion_id"]
        probs = logic.scoreLesions(p, [lesion])  # the bundled classifier
        self.assertTrue(0.0 <= probs[lesion] <= 1.0)
        shown = {int(r["Lesion"]): r["TP probability"] for r in mrml.lesion_table_rows(p.lesionTable)}
        self.assertAlmostEqual(shown[lesion], probs[lesion], places=5)

    def test_tp_probability_reuses_an_explanation_made_with_the_classifier_settings(self):
        logic, p, rows = self._segmented()
        lesion = min(rows, key=lambda r: r["voxels"])["lesion_id"]
        logic.selectLesion(p, lesion)
        s = logic.classifier().saliency
        p.method, p.nSamples, p.sigma, p.context, p.maxOmegaVoxels = "SmoothGrad max", s["n_samples"], s["sigma"], s["context"], s["max_omega_voxels"]
        logic.explain(p)
        reused = logic.tpProbabilityOfSelected(p)
        logic._lastExplanation = None
        fresh = logic.scoreLesions(p, [lesion])[lesion]
        self.assertAlmostEqual(reused, fresh, places=6)

    def test_parameter_node_survives_scene_save_and_reload(self):
        import tempfile

        logic, p, ph = self._phantomCase()
        p.nSamples, p.method, p.context, p.maxOmegaVoxels = 7, "SmoothGrad mean", "full", 128
        path = os.path.join(tempfile.mkdtemp(), "scene.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        q = MSInstanceSaliencyLogic().getParameterNode()
        self.assertEqual((q.nSamples, q.method, q.context, q.maxOmegaVoxels), (7, "SmoothGrad mean", "full", 128))
        self.assertIsNotNone(q.flairVolume)
