"""The module's MRML adapter on real MRML nodes (slicer-core: Slicer's MRML, segmentations and slicer.util)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MSInstanceSaliency"))

import MSInstanceSaliencyMRML as mrml  # noqa: E402
from MSInstanceSaliencyMRML.colors import saliency_color_node  # noqa: E402

from MSInstanceSaliencyLib.segmentation.instances import label_instances, lesion_table  # noqa: E402
from MSInstanceSaliencyLib.io.volumes import array_from_image  # noqa: E402

from conftest import make_image  # noqa: E402


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule, slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


def oblique_image():
    return make_image(shape=(20, 24, 28), spacing=(0.8, 1.1, 2.5))


def test_array_node_array_round_trip_and_geometry(scene):
    img = oblique_image()
    a = array_from_image(img)
    node = mrml.add_volume(a, img, "oblique")
    np.testing.assert_array_equal(mrml.array_from_volume_node(node), a)
    # IJK-to-RAS equals the SimpleITK geometry converted to RAS, voxel by voxel
    m = mrml.ijk_to_ras(node)
    for ijk in [(0, 0, 0), (5, 7, 11), (19, 23, 27)]:
        lps = img.TransformIndexToPhysicalPoint(ijk)
        ras = m @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)
    back = mrml.image_from_volume_node(node)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(array_from_image(back), a)


def _lesions(img):
    m = np.zeros(img.GetSize(), bool)
    m[2:6, 3:7, 4:8] = True  # 64
    m[12:14, 15:18, 20:22] = True  # 12
    m[15:19, 3:5, 10:13] = True  # 24
    return label_instances(m, spacing=img.GetSpacing(), min_volume_mm3=0)


def test_labels_to_one_segment_per_lesion(scene):
    img = oblique_image()
    ref = mrml.add_volume(array_from_image(img), img, "ref")
    labels = _lesions(img)
    seg = mrml.labels_to_segmentation(labels, ref)
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == 3
    rows = {r["lesion_id"]: r for r in lesion_table(labels, img)}
    for lid in (1, 2, 3):
        sid = mrml.segment_id_of_lesion(seg, lid)
        assert s.GetSegment(sid).GetName() == f"Lesion {lid}"
        mask = mrml.segment_mask(seg, sid, ref)
        assert mask.sum() == (labels == lid).sum()
        np.testing.assert_array_equal(mask, labels == lid)
        centre = seg.GetSegmentCenterRAS(sid)
        # the segment centre (bounding-box based) lies within a voxel diagonal of the table's centre of mass
        r = rows[lid]
        assert np.linalg.norm(np.array(centre) - [r["centroid_r"], r["centroid_a"], r["centroid_s"]]) < 3.0
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_removed_lesions_are_gone_from_segments_table_and_labels(scene):
    img = oblique_image()
    ref = mrml.add_volume(array_from_image(img), img, "ref")
    labels = _lesions(img)
    seg = mrml.labels_to_segmentation(labels, ref)
    label_node = mrml.add_volume(labels.astype(np.int32), ref, "labels", "vtkMRMLLabelMapVolumeNode")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(table, lesion_table(labels, img))
    voxel = np.argwhere(labels == 2)[0]
    ras = mrml.ijk_to_ras(label_node) @ np.array([*voxel, 1.0])
    assert mrml.lesion_id_at_ras(label_node, ras[:3]) == 2
    assert mrml.remove_lesions([2], seg, table, label_node) == 1
    assert seg.GetSegmentation().GetNumberOfSegments() == 2 and mrml.segment_id_of_lesion(seg, 2) is None
    assert [int(r["Lesion"]) for r in mrml.lesion_table_rows(table)] == [1, 3]
    after = mrml.array_from_volume_node(label_node)
    assert not (after == 2).any()
    np.testing.assert_array_equal(after[labels != 2], labels[labels != 2])  # the others untouched
    assert mrml.lesion_id_at_ras(label_node, ras[:3]) is None  # no longer pickable


def test_table_row_of_model_index_follows_qmrmltablemodel(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(table, [{"lesion_id": i} for i in (4, 7, 9)])
    assert table.GetUseColumnTitleAsColumnHeader()  # fill_lesion_table shows titles as the header
    assert [mrml.table_row_of_model_index(table, r, 0) for r in range(3)] == [0, 1, 2]
    assert mrml.table_row_of_model_index(table, 0, 2, transposed=True) == 2
    table.SetUseColumnTitleAsColumnHeader(False)  # then model row 0 holds the editable column names
    assert mrml.table_row_of_model_index(table, 1, 0) == 0


def test_lesion_table_columns_and_values(scene):
    img = oblique_image()
    labels = _lesions(img)
    prob = np.where(labels > 0, 0.7, 0.0).astype(np.float32)
    rows = lesion_table(labels, img, prob)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(table, rows)
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(mrml.TABLE_COLUMNS)
    back = mrml.lesion_table_rows(table)
    assert [int(r["Lesion"]) for r in back] == [1, 2, 3]
    for r, src in zip(back, rows):
        assert r["Volume (mm3)"] == pytest.approx(src["volume_mm3"])
        assert (r["R"], r["A"], r["S"]) == pytest.approx((src["centroid_r"], src["centroid_a"], src["centroid_s"]))
        assert r["Max probability"] == pytest.approx(0.7, abs=1e-6)
        assert np.isnan(r["TP probability"])
    mrml.set_tp_probability(table, 2, 0.94)
    assert mrml.lesion_table_rows(table)[1]["TP probability"] == pytest.approx(0.94)


def test_saliency_node_display(scene):
    img = oblique_image()
    ref = mrml.add_volume(array_from_image(img), img, "ref")
    rng = np.random.default_rng(0)
    sal = (rng.standard_normal(img.GetSize()) * 0.1).astype(np.float32)
    sal[3, 4, 5] = -2.5
    node = mrml.add_saliency_volume(sal, ref, "Lesion 3 SmoothGrad FLAIR")
    assert node.GetName() == "Lesion 3 SmoothGrad FLAIR"
    np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(ref))
    d = node.GetDisplayNode()
    assert d.GetColorNodeID() == saliency_color_node(scene).GetID()  # transparent near 0 (test_rendering.py)
    assert not d.GetAutoWindowLevel()
    assert d.GetWindowLevelMin() == pytest.approx(-2.5) and d.GetWindowLevelMax() == pytest.approx(2.5)
    # replacing the overlay keeps one node
    again = mrml.add_saliency_volume(sal * 2, ref, "Lesion 4 SmoothGrad FLAIR", replace=node)
    assert again is node and d.GetWindowLevelMax() == pytest.approx(5.0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2


def test_ras_point_to_lesion_id(scene):
    img = oblique_image()
    labels = _lesions(img)
    lab_node = mrml.add_volume(labels, img, "labels", "vtkMRMLLabelMapVolumeNode")
    inside = np.argwhere(labels == 3)[5]
    lps = img.TransformIndexToPhysicalPoint([int(v) for v in inside])
    assert mrml.lesion_id_at_ras(lab_node, (-lps[0], -lps[1], lps[2])) == 3
    lps = img.TransformIndexToPhysicalPoint([0, 0, 0])
    assert mrml.lesion_id_at_ras(lab_node, (-lps[0], -lps[1], lps[2])) is None
    assert mrml.lesion_id_at_ras(lab_node, (1e4, 1e4, 1e4)) is None


def test_transformed_volume_is_refused(scene):
    img = oblique_image()
    node = mrml.add_volume(array_from_image(img), img, "moved")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(t.GetID())
    with pytest.raises(ValueError, match="harden the transform"):
        mrml.image_from_volume_node(node)


def test_segmenting_twice_leaves_no_temporary_node_or_display_node(scene):
    img = oblique_image()
    ref = mrml.add_volume(array_from_image(img), img, "ref")
    labels = _lesions(img)
    before = {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLDisplayNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLColorTableNode")}
    seg = mrml.labels_to_segmentation(labels, ref)
    mrml.labels_to_segmentation(labels, ref, seg)
    mrml.segment_mask(seg, seg.GetSegmentation().GetNthSegmentID(0), ref)
    # what stays is the segmentation and its one display node, nothing else (Slicer would save the rest with the scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLDisplayNode") == before["vtkMRMLDisplayNode"] + 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == before["vtkMRMLLabelMapVolumeNode"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == before["vtkMRMLColorTableNode"]  # the export's colour table too


def test_the_tp_note_says_why_a_lesion_has_no_probability(scene):
    img = oblique_image()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(table, lesion_table(_lesions(img), img))
    mrml.set_tp_probability(table, 2, None, note="lesion 2: pyradiomics failed: too small")
    mrml.set_tp_probability(table, 3, 0.4)
    rows = mrml.lesion_table_rows(table)
    assert [r[mrml.TP_NOTE] for r in rows] == ["", "lesion 2: pyradiomics failed: too small", ""]
    assert np.isnan(rows[1]["TP probability"]) and rows[2]["TP probability"] == pytest.approx(0.4)
    assert mrml.tp_note(table, 2).endswith("too small") and mrml.tp_note(table, 1) == ""
    mrml.set_tp_probability(table, 2, 0.7)  # scored later: the note goes
    assert mrml.tp_note(table, 2) == ""
    # a table saved before the column existed gets it on the first score
    old = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fill_lesion_table(old, lesion_table(_lesions(img), img))
    old.GetTable().RemoveColumnByName(mrml.TP_NOTE)
    mrml.set_tp_probability(old, 1, None, note="failed")
    assert mrml.tp_note(old, 1) == "failed" and mrml.tp_note(old, 3) == ""
