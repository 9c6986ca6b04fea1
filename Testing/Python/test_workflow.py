"""The shared lesion workflow (MSInstanceSaliencyMRML.workflow) on real MRML nodes (slicer-core) with a real
worker process and the demo model on the 2 mm phantom: what the Slicer module and the web app both do,
segment -> table -> pick -> explain -> overlay -> score -> remove, and the errors on bad state; and the
same steps through the asyncio driver (run_async), as the web app runs them."""

import ast
import asyncio
import dataclasses
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MSInstanceSaliency"))

import MSInstanceSaliencyMRML as mrml  # noqa: E402
from MSInstanceSaliencyMRML.colors import saliency_color_node  # noqa: E402
from MSInstanceSaliencyMRML.worker_session import volume_key  # noqa: E402
from MSInstanceSaliencyMRML.workflow import CHOICES, LesionWorkflow, WorkflowState  # noqa: E402

from MSInstanceSaliencyLib import dependencies  # noqa: E402
from MSInstanceSaliencyLib.errors import Cancelled, InputError  # noqa: E402
from MSInstanceSaliencyLib.io.volumes import array_from_image  # noqa: E402
from MSInstanceSaliencyLib.segmentation.instances import label_instances, lesion_table  # noqa: E402

from conftest import make_image  # noqa: E402
from test_mrml_adapter import scene  # noqa: E402,F401  (the slicer-core scene fixture)
from test_worker_session import session  # noqa: E402,F401  (one worker for the module's tests)


@pytest.fixture()
def workflow(scene, small_phantom, session):  # noqa: F811
    """A web-face-like state (a plain WorkflowState) on the phantom; every test shares the one worker."""
    state = WorkflowState(flairVolume=mrml.add_volume(array_from_image(small_phantom.flair), small_phantom.flair, "FLAIR"),
                          mprageVolume=mrml.add_volume(array_from_image(small_phantom.mprage), small_phantom.mprage, "MPRAGE"),
                          device="cpu", nSamples=2)
    return LesionWorkflow(state, session_factory=lambda: session)


def ras_of_voxel(node, ijk):
    return (mrml.ijk_to_ras(node) @ np.array([*ijk, 1.0]))[:3]


def by_size(workflow):
    """Lesion ids, smallest first."""
    labels = mrml.array_from_volume_node(workflow.state.lesionLabels)
    sizes = np.bincount(labels.ravel())
    return sorted(workflow.lesion_ids(), key=lambda lid: (sizes[lid], lid))


def test_segment_pick_and_explain(workflow, scene):  # noqa: F811
    s = workflow.state
    rows = workflow.segment()
    labels = mrml.array_from_volume_node(s.lesionLabels)
    in_labels = [int(v) for v in np.unique(labels) if v]
    assert len(in_labels) > 3
    assert sorted(workflow.lesion_ids()) == sorted(r["lesion_id"] for r in rows) == in_labels
    assert s.lesionSegmentation.GetSegmentation().GetNumberOfSegments() == len(in_labels)
    assert all(mrml.segment_id_of_lesion(s.lesionSegmentation, lid) for lid in in_labels)

    # picking: a voxel of each of a few lesions (first, middle and last voxel) gives its id, background none
    ids = by_size(workflow)
    for lid, k in ((ids[0], 0), (ids[len(ids) // 2], -1), (ids[-1], len(np.argwhere(labels == ids[-1])) // 2)):
        assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, np.argwhere(labels == lid)[k])) == lid
    assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, np.argwhere(labels == 0)[0])) is None

    # select: the views jump to the lesion's centre, which lies in it; it is highlighted
    small = ids[0]
    centre = workflow.select_lesion(str(small))  # a web form sends text
    assert s.selectedLesion == small and not s.useCustomRegion
    assert workflow.lesion_at_ras(centre) == small
    display, sid = s.lesionSegmentation.GetDisplayNode(), mrml.segment_id_of_lesion(s.lesionSegmentation, small)
    assert display.GetSegmentOpacity2DFill(sid) == pytest.approx(mrml.PICKED_FILL)

    result = workflow.explain()
    node = result["node"]
    assert node is s.saliencyVolume and result["title"] == node.GetName() == f"Lesion {small} SmoothGrad FLAIR"
    np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(s.flairVolume))  # on the FLAIR's grid
    assert node.GetImageData().GetDimensions() == s.flairVolume.GetImageData().GetDimensions()
    d = node.GetDisplayNode()
    assert d.GetColorNodeID() == saliency_color_node(scene).GetID()  # the project's table, transparent near 0
    assert d.GetWindowLevelMin() == pytest.approx(-d.GetWindowLevelMax()) and d.GetWindowLevelMax() > 0
    assert display.GetSegmentOpacity2DFill(sid) == 0.0  # outline only while the map is shown
    assert result["tp_probability"] is None and result["tp_note"]  # N = 2 is not the classifier's N
    assert {k: v for k, v in workflow.saliency_shown().items() if k != "node"} == {
        "title": node.GetName(), "lesion": small, "region": f"Lesion {small}", "method": "SmoothGrad max", "channel": "FLAIR"}

    # another lesion, method and channel, replacing the map (keepEarlierMaps off)
    s.method, s.displayChannel, s.keepEarlierMaps = "SmoothGrad mean", "MPRAGE", False
    workflow.select_lesion(ids[1])
    again = workflow.explain()
    assert again["node"] is node and again["title"] == f"Lesion {ids[1]} SmoothGrad MPRAGE"
    assert workflow.saliency_shown()["lesion"] == ids[1] and workflow.saliency_shown()["channel"] == "MPRAGE"
    s.method = "Grad-CAM++"
    cam = workflow.explain()
    assert cam["title"] == f"Lesion {ids[1]} Grad-CAM++" and workflow.saliency_shown()["method"] == "Grad-CAM++"
    assert workflow.saliency_shown()["channel"] == ""


def test_partial_maps_are_shown_in_the_node_the_final_map_then_fills_and_it_equals_the_map_in_one_go(workflow):
    s = workflow.state
    workflow.segment()
    workflow.select_lesion(by_size(workflow)[-1])
    s.method, s.displayChannel, s.nSamples, s.keepEarlierMaps = "SmoothGrad mean", "FLAIR", 6, True
    whole = mrml.array_from_volume_node(workflow.explain()["node"]).copy()
    seen = []

    def on_partial(node, done, n):
        seen.append((node, done, n, node.GetName(), mrml.array_from_volume_node(node).copy()))

    streamed = workflow.session.run(workflow.session.explain_steps(s, on_partial, partial_interval_s=0.0))
    done = [d for _, d, _, _, _ in seen]  # as the engine's batches of copies end
    assert done and done == sorted(set(done)) and done[-1] == 6 and all(n == 6 for _, _, n, _, _ in seen)
    assert all(node is streamed["node"] for node, *_ in seen)  # one node: partial maps, then the final one
    assert seen[0][3].endswith(f"({done[0]}/6 copies)") and streamed["node"].GetName().endswith("SmoothGrad FLAIR")
    np.testing.assert_array_equal(mrml.array_from_volume_node(streamed["node"]), whole)  # the final map is the map in one go
    np.testing.assert_array_equal(seen[-1][4], whole)  # and the last partial one is it too


def test_remove_lesions_below_a_threshold(workflow):
    s = workflow.state
    workflow.segment()
    ids = workflow.lesion_ids()
    # TP probabilities as Score writes them into the table; the other lesions stay unscored (NaN)
    probs = {lid: (0.1, 0.45, 0.9)[i % 3] for i, lid in enumerate(ids[:6])}
    for lid, p in probs.items():
        mrml.set_tp_probability(s.lesionTable, lid, p)
    for threshold in (0.0, 0.2, 0.5, 1.0):
        assert workflow.lesions_below(threshold) == [lid for lid, p in probs.items() if p < threshold]
    s.pruneBelow = 0.5
    gone = workflow.lesions_below()
    assert len(gone) == 4
    labels_before = mrml.array_from_volume_node(s.lesionLabels)
    picked_voxel = ras_of_voxel(s.lesionLabels, np.argwhere(labels_before == gone[0])[0])
    workflow.select_lesion(gone[0])
    assert workflow.remove_lesions(gone) == len(gone)
    kept = [lid for lid in ids if lid not in gone]
    assert workflow.lesion_ids() == kept
    labels = mrml.array_from_volume_node(s.lesionLabels)
    assert [int(v) for v in np.unique(labels) if v] == sorted(kept)
    np.testing.assert_array_equal(labels[~np.isin(labels_before, gone)], labels_before[~np.isin(labels_before, gone)])
    assert all(mrml.segment_id_of_lesion(s.lesionSegmentation, lid) is None for lid in gone)
    assert s.lesionSegmentation.GetSegmentation().GetNumberOfSegments() == len(kept)
    assert s.selectedLesion == 0 and workflow.lesion_at_ras(picked_voxel) is None
    assert workflow.lesions_below() == []
    # a removed lesion is refused before the worker works on it
    s.selectedLesion = gone[0]
    with pytest.raises(InputError, match=f"Lesion {gone[0]} does not exist"):
        workflow.explain()
    with pytest.raises(InputError, match=f"Lesion {gone[1]} does not exist"):
        workflow.select_lesion(gone[1])


@pytest.mark.needs_radiomics
def test_score_fills_the_table(workflow):
    s = workflow.state
    workflow.segment()
    smallest, other = by_size(workflow)[:2]
    workflow.remove_lesions([lid for lid in workflow.lesion_ids() if lid not in (smallest, other)])  # scoring costs seconds a lesion
    first = workflow.score([smallest])
    assert list(first) == [smallest] and 0.0 <= first[smallest] <= 1.0
    assert workflow.known_tp_probability(smallest) == pytest.approx(first[smallest], abs=1e-9)
    assert workflow.known_tp_probability(other) is None and workflow.lesions_below(1.0) == [smallest]
    s.selectedLesion = smallest
    assert workflow.known_tp_probability() == pytest.approx(first[smallest], abs=1e-9)
    workflow.remove_lesions([other])
    again = workflow.score_all()
    assert list(again) == [smallest]
    assert again[smallest] == pytest.approx(first[smallest], abs=1e-6)  # the same map (seed 0), the same probability
    assert workflow.lesions_below(first[smallest]) == [] and workflow.lesions_below(1.0) == [smallest]
    # a lesion whose voxels were erased from the label map by hand (its segment kept): pyradiomics has nothing
    # to measure, and the reason reaches the caller and the table instead of a log line
    kji = slicer.util.arrayFromVolume(s.lesionLabels)
    kji[kji == smallest] = 0
    slicer.util.arrayFromVolumeModified(s.lesionLabels)
    failed = workflow.score([smallest])
    assert failed[smallest] is None and f"lesion {smallest}" in failed.errors[smallest]
    assert workflow.known_tp_probability(smallest) is None and workflow.known_tp_note(smallest) == failed.errors[smallest]


# ----------------------------------------------------------------------------- the asyncio driver (the web face)

def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def table_array(table_node):
    return np.array([[row[c] for c in mrml.TABLE_COLUMNS if c != mrml.TP_NOTE] for row in mrml.lesion_table_rows(table_node)])


def record_mrml_writes(scene, nodes, threads):  # noqa: F811
    """The thread of every node added to the scene and of every modification of `nodes`."""
    def record(caller, event):
        threads.append(threading.current_thread())

    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, record)
    for node in nodes:
        node.AddObserver(vtk.vtkCommand.ModifiedEvent, record)


def test_run_async_gives_the_blocking_results_with_mrml_and_progress_on_the_loop_thread(workflow, scene):  # noqa: F811
    s = workflow.state
    rows = workflow.segment()
    lid = by_size(workflow)[0]
    workflow.select_lesion(lid)
    blocking_table, blocking_map = table_array(s.lesionTable), mrml.array_from_volume_node(workflow.explain()["node"])

    progress_threads, write_threads, ticks = [], [], []
    record_mrml_writes(scene, (s.lesionTable, s.lesionLabels, s.probabilityVolume, s.lesionSegmentation), write_threads)

    def progress(done, total):
        progress_threads.append(threading.current_thread())

    async def web_face():
        async def tick():  # runs only while the loop is free
            while True:
                ticks.append(1)
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        again = await workflow.run_async(workflow.segment_steps(), progress)
        workflow.select_lesion(lid)
        result = await workflow.run_async(workflow.explain_steps(), progress)
        ticker.cancel()
        return again, result

    again, result = asyncio.run(web_face())
    assert again == rows
    np.testing.assert_array_equal(table_array(s.lesionTable), blocking_table)
    # a new node beside the earlier map (keepEarlierMaps), hence a unique name
    assert result["title"].startswith(f"Lesion {lid} SmoothGrad FLAIR") and result["node"] is s.saliencyVolume
    assert np.array_equal(mrml.array_from_volume_node(result["node"]), blocking_map)
    assert progress_threads and all(t is threading.main_thread() for t in progress_threads)
    assert len(write_threads) > 5 and all(t is threading.main_thread() for t in write_threads)
    assert len(ticks) > 3  # the loop ran its other tasks while the worker worked


def test_cancel_stops_an_async_explain_promptly_and_the_next_step_works(workflow):
    s = workflow.state
    workflow.segment()
    workflow.select_lesion(by_size(workflow)[0])
    s.method, s.nSamples = "SmoothGrad mean", 1000  # minutes of work: only a cancel ends it in time
    pid = workflow.session.client.pid
    cancel, asked = threading.Event(), []

    def progress(done, total):
        assert on_main_thread()
        if done and not cancel.is_set():  # the worker is at it
            cancel.set()
            asked.append(time.monotonic())

    with pytest.raises(Cancelled):
        asyncio.run(workflow.run_async(workflow.explain_steps(), progress, cancel))
    assert time.monotonic() - asked[0] < 5.0
    assert workflow.session.client.pid == pid  # stopped at its next step, not killed

    # cancelling the task (a closed page) cancels the request as well
    async def closed_page():
        started = asyncio.Event()
        task = asyncio.create_task(workflow.run_async(workflow.explain_steps(), lambda done, total: done and started.set()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(closed_page())
    assert time.monotonic() - t0 < 30.0 and workflow.session.client.pid == pid

    s.nSamples = 2
    result = asyncio.run(workflow.run_async(workflow.explain_steps(), cancel=threading.Event()))
    assert result["title"].endswith("SmoothGrad FLAIR") and mrml.array_from_volume_node(result["node"]).any()


@pytest.mark.needs_radiomics
def test_score_through_run_async_fills_the_table_live_on_the_loop_thread(workflow):
    s = workflow.state
    workflow.segment()
    ids = by_size(workflow)[:2]
    workflow.remove_lesions([lid for lid in workflow.lesion_ids() if lid not in ids])  # scoring costs seconds a lesion
    events = []

    def table_written(caller, event):
        events.append(("write", on_main_thread()))

    s.lesionTable.AddObserver(vtk.vtkCommand.ModifiedEvent, table_written)
    probs = asyncio.run(workflow.run_async(workflow.score_all_steps(), lambda done, total: events.append(("progress", on_main_thread()))))
    assert sorted(probs) == sorted(ids) and all(0.0 <= p <= 1.0 for p in probs.values())
    assert all(workflow.known_tp_probability(lid) == pytest.approx(probs[lid], abs=1e-9) for lid in ids)
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    assert writes and all(main for _, main in events)
    assert any(kind == "progress" for kind, _ in events[writes[0]:])  # the first lesion was in the table while the worker scored the next


# ----------------------------------------------------------------------------- bad state: refused before any work

def _lesions_without_the_worker(scene):  # noqa: F811
    """A segmented state made directly (label map, segmentation, table), as a reopened scene has it."""
    img = make_image(shape=(20, 24, 28), spacing=(0.8, 1.1, 2.5))
    mask = np.zeros(img.GetSize(), bool)
    mask[2:6, 3:7, 4:8] = True
    mask[12:14, 15:18, 20:22] = True
    labels = label_instances(mask, spacing=img.GetSpacing(), min_volume_mm3=0)
    flair = mrml.add_volume(array_from_image(img), img, "FLAIR")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(table, lesion_table(labels, img))
    return WorkflowState(flairVolume=flair, lesionLabels=mrml.add_volume(labels, img, "labels", "vtkMRMLLabelMapVolumeNode"),
                         lesionSegmentation=mrml.labels_to_segmentation(labels, flair), lesionTable=table)


def test_bad_state_is_refused_with_a_clear_error_before_the_worker_starts(scene):  # noqa: F811
    started = []
    workflow = LesionWorkflow(WorkflowState(), session_factory=lambda: started.append(True))
    for step in (workflow.segment, workflow.explain, lambda: workflow.score([1])):
        with pytest.raises(InputError, match="Select the FLAIR volume"):
            step()
    for step in (workflow.score_all, lambda: workflow.select_lesion(1), lambda: workflow.lesion_at_ras((0, 0, 0)), lambda: workflow.lesions_below(0.5),
                 lambda: workflow.remove_lesions([1])):
        with pytest.raises(InputError, match="Segment first"):
            step()

    workflow.state = _lesions_without_the_worker(scene)
    s = workflow.state
    with pytest.raises(InputError, match="Pick a lesion first"):
        workflow.explain()
    s.useCustomRegion = True
    with pytest.raises(InputError, match="Custom region"):
        workflow.explain()
    s.customRegionSegmentation, s.customRegionSegmentId = s.lesionSegmentation, "no such segment"
    with pytest.raises(InputError, match="no longer exists"):
        workflow.explain()
    s.useCustomRegion, s.selectedLesion = False, 7
    with pytest.raises(InputError, match="Lesion 7 does not exist"):
        workflow.explain()
    for bad in (7, 0, -1, 2.5, "two", None, True):
        with pytest.raises(InputError, match="does not exist|not a lesion id"):
            workflow.select_lesion(bad)
    with pytest.raises(InputError, match="Not in the lesion table .*: lesion 5, 7;"):
        workflow.score([1, 7, 5])
    for threshold in (1.5, -0.1, "high"):
        with pytest.raises(InputError, match="threshold"):
            workflow.lesions_below(threshold)
    for field, value in (("nSamples", 0), ("method", "SmoothGrad"), ("sigma", "abc"), ("device", "gpu"), ("threshold", 1.0)):
        bad = dataclasses.replace(s, **{field: value})
        with pytest.raises(InputError, match=f"setting {field} = "):
            LesionWorkflow(bad, session_factory=lambda: started.append(True)).segment()
    assert started == []
    # what the state allows works without a worker too
    assert workflow.select_lesion(2.0) and s.selectedLesion == 2
    assert workflow.lesions_below(0.5) == []


@pytest.fixture(scope="module")
def flair_only_model(tmp_path_factory):
    import torch

    from MSInstanceSaliencyLib.models.monai import build_network, save_model

    from conftest import tiny_spec

    torch.manual_seed(0)
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 16], strides=[2, 2], norm="batch", num_res_units=0)
    spec = tiny_spec(network_args=args, input_channels=["flair"])
    folder = tmp_path_factory.mktemp("flair_only_model")
    save_model(build_network(spec), spec, folder)
    return folder


def test_a_flair_only_model_offers_only_its_channel_and_refuses_mprage_before_the_smoothgrad(workflow, flair_only_model):
    s = workflow.state
    s.modelPath, s.mprageVolume = str(flair_only_model), None
    workflow.layers()  # loads the model
    assert workflow.channels() == ["FLAIR"]
    region = np.zeros(s.flairVolume.GetImageData().GetDimensions(), np.int32)
    region[38:42, 45:49, 38:42] = 1
    s.useCustomRegion, s.customRegionSegmentation = True, mrml.labels_to_segmentation(region, s.flairVolume)
    s.customRegionSegmentId = s.customRegionSegmentation.GetSegmentation().GetNthSegmentID(0)
    s.displayChannel = "MPRAGE"
    stages = []
    workflow.on_stage = stages.append
    with pytest.raises(InputError, match="This model takes FLAIR only: set 'Show channel'"):
        workflow.explain()
    assert stages == []  # refused before any request
    # the session checks too (a face that did not load the model first): after preparing, before the SmoothGrad
    with pytest.raises(InputError, match="This model takes FLAIR only"):
        workflow.session.explain(s)
    assert "Preparing the case…" in stages and "Computing the saliency map…" not in stages
    s.displayChannel = "FLAIR"
    workflow.explain()
    assert workflow.saliency_shown()["channel"] == "FLAIR"


def test_the_same_volume_as_flair_and_mprage_is_refused_before_the_worker_starts(scene):  # noqa: F811
    started = []
    img = make_image(shape=(20, 24, 28), spacing=(0.8, 1.1, 2.5))
    flair = mrml.add_volume(array_from_image(img), img, "FLAIR")
    copy = mrml.add_volume(array_from_image(img), img, "FLAIR copy")
    for mprage in (flair, copy):  # the same node (both selectors on the first volume loaded), or a copy of it
        workflow = LesionWorkflow(WorkflowState(flairVolume=flair, mprageVolume=mprage), session_factory=lambda: started.append(True))
        with pytest.raises(InputError, match="FLAIR and MPRAGE are the same volume"):
            workflow.segment()
    assert started == []


def test_edited_lesion_segments_reach_the_label_map_that_picking_uses(scene):  # noqa: F811
    workflow = LesionWorkflow(_lesions_without_the_worker(scene), session_factory=lambda: None)
    s = workflow.state
    labels = mrml.array_from_volume_node(s.lesionLabels)
    inside_2, elsewhere = np.argwhere(labels == 2)[0], (15, 4, 6)
    assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, inside_2)) == 2
    np.testing.assert_array_equal(mrml.array_from_volume_node(s.lesionLabels), labels)  # made again from the segments: the same
    # lesion 2 redrawn elsewhere, as the Segment Editor does it (its segment's labelmap replaced)
    moved = np.zeros_like(labels, dtype=np.uint8)
    moved[14:17, 3:6, 5:8] = 1
    paint = mrml.add_volume(moved, s.lesionLabels, "paint", "vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(mrml.segment_id_of_lesion(s.lesionSegmentation, 2))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(paint, s.lesionSegmentation, ids)
    assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, elsewhere)) == 2
    assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, inside_2)) is None
    now = mrml.array_from_volume_node(s.lesionLabels)
    np.testing.assert_array_equal(now == 2, moved > 0)
    np.testing.assert_array_equal(now == 1, labels == 1)  # the other lesion untouched
    key = volume_key(s.lesionLabels)  # what the worker session compares to re-send the labels
    assert workflow.lesion_at_ras(ras_of_voxel(s.lesionLabels, elsewhere)) == 2
    assert volume_key(s.lesionLabels) == key  # nothing edited since: not made again, not re-sent


@pytest.mark.skipif(dependencies.has_radiomics(), reason="pyradiomics is installed here")
def test_score_without_pyradiomics_says_how_to_get_it(scene):  # noqa: F811
    started = []
    workflow = LesionWorkflow(_lesions_without_the_worker(scene), session_factory=lambda: started.append(True))
    with pytest.raises(InputError, match="SlicerRadiomics"):
        workflow.score_all()
    assert started == []


def test_the_slicer_parameter_node_has_the_state_fields_and_defaults():
    """In Slicer the parameter node is the state (saved with the scene): same fields, same defaults, and its
    choices and ranges are the workflow's."""
    tree = ast.parse((ROOT / "MSInstanceSaliency" / "MSInstanceSaliency.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MSInstanceSaliencyParameterNode")
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign)]
    declared = {n.target.id: (ast.literal_eval(n.value) if n.value else None) for n in fields}
    assert declared == {f.name: f.default for f in dataclasses.fields(WorkflowState)}
    constants = {"method": "METHODS", "displayChannel": "CHANNELS", "device": "DEVICES", "context": "CONTEXTS"}
    assert set(constants) == set(CHOICES)
    for n in fields:
        annotation = ast.unparse(n.annotation)
        if "Choice" in annotation:
            assert annotation == f"Annotated[str, Choice({constants[n.target.id]})]"
        if "WithinRange" in annotation:
            assert annotation.endswith(f"WithinRange(*RANGES['{n.target.id}'])]")
