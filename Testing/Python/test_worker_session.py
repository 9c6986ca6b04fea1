"""The module's worker session on real MRML nodes (slicer-core) and a real worker process: what the
Slicer module does on Segment, Explain, Score and Remove, minus the Qt widgets."""

import asyncio
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MSInstanceSaliency"))

import MSInstanceSaliencyMRML as mrml  # noqa: E402
from MSInstanceSaliencyMRML.worker_session import Request, WorkerSession, known_tp_probability  # noqa: E402

from MSInstanceSaliencyLib.errors import Cancelled, InputError  # noqa: E402
from MSInstanceSaliencyLib.saliency.explain import explain  # noqa: E402
from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.segmentation.pipeline import segment  # noqa: E402
from MSInstanceSaliencyLib.io.volumes import array_from_image  # noqa: E402

from test_mrml_adapter import scene  # noqa: E402,F401  (the slicer-core scene fixture)


def parameters(flair, mprage, **overrides):
    """The module's parameter node fields, with their defaults."""
    p = SimpleNamespace(flairVolume=flair, mprageVolume=mprage, modelPath="", device="cpu", threshold=0.3, minLesionVolume=5.0,
                        lesionLabels=None, probabilityVolume=None, lesionSegmentation=None, lesionTable=None, selectedLesion=0,
                        useCustomRegion=False, customRegionSegmentation=None, customRegionSegmentId="", method="SmoothGrad max",
                        nSamples=2, sigma=0.05, maxOmegaVoxels=0, displayChannel="FLAIR", context="patch", gradcamLayer="",
                        keepEarlierMaps=True, saliencyVolume=None)
    for k, v in overrides.items():
        setattr(p, k, v)
    return p


@pytest.fixture(scope="module")
def session():
    s = WorkerSession()
    yield s
    s.close()


@pytest.fixture()
def case(scene, small_phantom):  # noqa: F811
    flair = mrml.add_volume(array_from_image(small_phantom.flair), small_phantom.flair, "FLAIR")
    mprage = mrml.add_volume(array_from_image(small_phantom.mprage), small_phantom.mprage, "MPRAGE")
    return parameters(flair, mprage)


def test_segment_fills_the_nodes_like_the_library(session, case):
    p = case
    rows = session.segment(p)
    expected = segment(mrml.image_from_volume_node(p.flairVolume), mrml.image_from_volume_node(p.mprageVolume), load_model(device="cpu"),
                       device="cpu")
    np.testing.assert_array_equal(mrml.array_from_volume_node(p.lesionLabels), expected.labels)
    np.testing.assert_allclose(mrml.array_from_volume_node(p.probabilityVolume), expected.probability, atol=1e-5)
    np.testing.assert_allclose(mrml.ijk_to_ras(p.lesionLabels), mrml.ijk_to_ras(p.mprageVolume))
    assert [int(r["Lesion"]) for r in mrml.lesion_table_rows(p.lesionTable)] == [r["lesion_id"] for r in rows] == \
        [r["lesion_id"] for r in expected.table]
    assert p.lesionSegmentation.GetSegmentation().GetNumberOfSegments() == len(rows)
    assert session.last_info()["device"] == "cpu"
    assert session.case_warnings() == []


def test_a_flair_slab_is_reported(session, scene, small_phantom):  # noqa: F811
    nz = small_phantom.flair.GetSize()[2]
    slab = small_phantom.flair[:, :, nz // 8: nz // 8 + (7 * nz) // 10]
    p = parameters(mrml.add_volume(array_from_image(slab), slab, "FLAIR slab"),
                   mrml.add_volume(array_from_image(small_phantom.mprage), small_phantom.mprage, "MPRAGE"))
    session.segment(p)
    assert len(session.case_warnings()) == 1 and "covers" in session.case_warnings()[0]


def test_explain_a_lesion_and_a_custom_region(session, case):
    p = case
    rows = session.segment(p)
    lesion = min(rows, key=lambda r: r["voxels"])["lesion_id"]
    p.selectedLesion = lesion
    result = session.explain(p)
    node = result["node"]
    assert node.GetName() == f"Lesion {lesion} SmoothGrad FLAIR"
    np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(p.mprageVolume))
    model = load_model(device="cpu")
    from MSInstanceSaliencyLib.models.preprocessing import prepare_case

    prepared = prepare_case(mrml.image_from_volume_node(p.flairVolume), mrml.image_from_volume_node(p.mprageVolume), model.spec)
    labels = mrml.array_from_volume_node(p.lesionLabels)
    ref = explain(model, prepared.image, labels == lesion, "smoothgrad", n_samples=2, device="cpu")
    np.testing.assert_allclose(mrml.array_from_volume_node(node), ref.maps["flair"], rtol=1e-5, atol=1e-7)
    assert result["tp_probability"] is None and result["tp_note"]  # N = 2 is not the classifier's N
    # the same lesion drawn as a segment of another segmentation ("Custom region")
    seg = mrml.labels_to_segmentation((labels == lesion).astype(np.int32), p.mprageVolume)
    p.useCustomRegion, p.customRegionSegmentation, p.customRegionSegmentId = True, seg, seg.GetSegmentation().GetNthSegmentID(0)
    region = session.explain(p)["node"]
    np.testing.assert_array_equal(mrml.array_from_volume_node(region), mrml.array_from_volume_node(node))
    p.useCustomRegion, p.method = False, "Grad-CAM++"
    cam = session.explain(p)["node"]
    assert cam.GetName() == f"Lesion {lesion} Grad-CAM++" and float(mrml.array_from_volume_node(cam).min()) >= 0.0


def test_removed_lesions_reach_the_worker_and_a_killed_worker_gets_everything_again(session, case):
    p = case
    rows = session.segment(p)
    gone = rows[0]["lesion_id"]
    mrml.remove_lesions([gone], p.lesionSegmentation, p.lesionTable, p.lesionLabels)
    p.selectedLesion = gone
    with pytest.raises(InputError, match=f"lesion {gone} does not exist"):
        session.explain(p)  # the worker was sent the edited labels
    p.selectedLesion = rows[-1]["lesion_id"]
    before = mrml.array_from_volume_node(session.explain(p)["node"])
    first = session.client.pid
    session.client.kill()
    after = mrml.array_from_volume_node(session.explain(p)["node"])  # a new worker: model, case and labels sent again
    assert session.client.pid != first
    np.testing.assert_array_equal(before, after)


@pytest.mark.needs_radiomics
def test_score_fills_the_table(session, case):
    p = case
    rows = session.segment(p)
    ids = [r["lesion_id"] for r in sorted(rows, key=lambda r: r["voxels"])[:2]]
    probs = session.score(p, ids)
    assert set(probs) == set(ids)
    for lid in ids:
        assert 0.0 <= probs[lid] <= 1.0
        assert known_tp_probability(p.lesionTable, lid) == pytest.approx(probs[lid], abs=1e-9)
    others = [r["lesion_id"] for r in rows if r["lesion_id"] not in ids]
    assert all(known_tp_probability(p.lesionTable, lid) is None for lid in others)


def test_layers_and_bad_model_folder(session, case, tmp_path):
    layers, default = session.layers(case)
    assert default in layers
    with pytest.raises(InputError, match="does not exist"):
        session.layers(parameters(case.flairVolume, case.mprageVolume, modelPath=str(tmp_path / "nowhere")))


def test_a_failed_request_is_thrown_into_the_steps_and_a_second_step_waits_for_none(session):
    def steps():
        try:
            yield Request("explain", {})  # refused by the worker: neither a lesion nor a region
        except InputError as exc:
            refused = str(exc)
        info = yield Request("info", dict(device="cpu"))
        return refused, info

    refused, info = session.run(steps())
    assert "lesion_id or mask" in refused and "torch" in str(info)

    async def two_clicks():
        first, second = steps(), steps()
        return await asyncio.gather(session.run_async(first), session.run_async(second), return_exceptions=True), second

    (done, busy), second = asyncio.run(two_clicks())
    assert done[0] == refused
    assert isinstance(busy, RuntimeError) and "busy" in str(busy) and second.gi_frame is None  # refused, its generator closed
    assert session.run(steps())[0] == refused  # free again


def test_stages_are_announced_and_progress_can_cancel_at_each(session, case):
    stages = []
    session.on_stage = stages.append
    try:
        session.sync_model(case)
        stages.clear()
        with pytest.raises(Cancelled):  # at the stage before the input volumes are written
            session.sync(case, progress=lambda done, total: False)
        assert stages == ["Writing the volumes for the worker…"] and "case" not in session.client.synced
        session.segment(case)
        assert stages[1:] == ["Writing the volumes for the worker…", "Preparing the case…", "Segmenting…"]
    finally:
        session.on_stage = None
    # a worker that is starting (importing torch) is said so, and cancelled at once
    stages = []
    fresh = WorkerSession(on_stage=stages.append)
    try:
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            fresh.info(progress=lambda done, total: False)
        assert stages == ["Starting the worker (loading torch)…"] and not fresh.running and time.monotonic() - t0 < 5
    finally:
        fresh.close()
