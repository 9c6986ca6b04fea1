"""MRML side of the module: volumes, lesion segments, the lesion table, the saliency overlay.

Only MRML classes, slicer.util, vtk, numpy and SimpleITK are used here (no Qt, no slicer.app, no
slicer.modules), so pytest exercises every function on real MRML nodes with slicer-core.

Conventions: the library's arrays are (x, y, z) = (I, J, K); slicer.util.arrayFromVolume is
(K, J, I). Slicer is RAS; SimpleITK is LPS (x and y negated).
"""

from __future__ import annotations

import numpy as np

import slicer
import vtk

LESION_ID_TAG = "MSInstanceSaliency.LesionId"
TP_NOTE = "TP note"  # why a lesion has no TP probability (the scoring's error), empty otherwise
TABLE_COLUMNS = ("Lesion", "Volume (mm3)", "R", "A", "S", "Max probability", "TP probability", TP_NOTE)
# on the label map: the state of the lesion segments it was made from (segmentation_state)
SEGMENTATION_STATE = "MSInstanceSaliency.SegmentationState"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- geometry

def ijk_to_ras_from_image(image) -> np.ndarray:
    """4x4 IJK-to-RAS of a SimpleITK image (its direction, spacing and origin are LPS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    m = np.eye(4)
    m[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    m[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin())
    return m


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def image_from_volume_node(node):
    """SimpleITK image (float32 unless the node holds integers) with the node's geometry in LPS."""
    import SimpleITK as sitk

    if node is None or node.GetImageData() is None:
        raise ValueError("the volume node has no image data; load a volume first")
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"volume '{node.GetName()}' is under a transform; harden the transform first (Data module)")
    kji = slicer.util.arrayFromVolume(node)
    img = sitk.GetImageFromArray(np.ascontiguousarray(kji))  # SimpleITK's (z, y, x) is Slicer's (K, J, I)
    m = ijk_to_ras(node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction_lps = _LPS_TO_RAS @ (m[:3, :3] / spacing)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(d) for d in direction_lps.ravel()))
    img.SetOrigin(tuple(float(o) for o in _LPS_TO_RAS @ m[:3, 3]))
    return img


def array_from_volume_node(node) -> np.ndarray:
    """(x, y, z) copy of a volume node's voxels."""
    return np.ascontiguousarray(slicer.util.arrayFromVolume(node).transpose(2, 1, 0))


def set_volume_from_array(node, array_xyz: np.ndarray, reference) -> None:
    """Voxels from an (x, y, z) array, geometry from `reference` (a volume node or a SimpleITK image)."""
    a = np.asarray(array_xyz)
    if a.dtype == np.int64 or a.dtype == np.uint64:  # updateVolumeFromArray rejects 64-bit integers
        a = a.astype(np.int32)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(a.transpose(2, 1, 0)))
    if hasattr(reference, "GetIJKToRASMatrix"):
        node.CopyOrientation(reference)
    else:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_image(reference)))


def voxels_and_grid(node):
    """(voxels (K, J, I), IJK-to-RAS) of a volume node, for io.volumes.check_distinct_inputs; no copy."""
    if node is None or node.GetImageData() is None:
        return None
    return slicer.util.arrayFromVolume(node), ijk_to_ras(node)


def remove_node_and_display(scene, node) -> None:
    """Removes a temporary node with its display nodes (RemoveNode leaves them in the scene, saved with it)."""
    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display in displays:
        if display is not None and display.GetScene() is scene:
            scene.RemoveNode(display)


def add_volume(array_xyz, reference, name: str, class_name: str = "vtkMRMLScalarVolumeNode", scene=None):
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    set_volume_from_array(node, array_xyz, reference)
    node.CreateDefaultDisplayNodes()
    return node


def ras_to_ijk(node, ras) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(m)
    p = slicer.util.arrayFromVTKMatrix(m) @ np.array([ras[0], ras[1], ras[2], 1.0])
    return p[:3]


def lesion_id_at_ras(label_node, ras) -> int | None:
    """The lesion id under a RAS point (nearest voxel), or None outside every lesion and outside the volume."""
    ijk = np.round(ras_to_ijk(label_node, ras)).astype(int)
    kji = slicer.util.arrayFromVolume(label_node)
    dims = kji.shape[::-1]
    if np.any(ijk < 0) or np.any(ijk >= dims):
        return None
    value = int(kji[ijk[2], ijk[1], ijk[0]])
    return value or None


# ----------------------------------------------------------------------------- lesion segments

def labels_to_segmentation(labels_xyz: np.ndarray, reference_node, segmentation_node=None, scene=None):
    """One segment per lesion ("Lesion k", tagged with its id) from an instance label array."""
    scene = scene or slicer.mrmlScene
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName("MS lesions"))
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation_node.GetSegmentation().RemoveAllSegments()
    label_node = add_volume(labels_xyz.astype(np.int32), reference_node, "lesion labels (temporary)", "vtkMRMLLabelMapVolumeNode", scene)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, segmentation_node)
        if not ok:
            raise RuntimeError("importing the lesion label map into the segmentation failed")
    finally:
        remove_node_and_display(scene, label_node)
    seg = segmentation_node.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        lesion_id = int(segment.GetLabelValue())
        segment.SetName(f"Lesion {lesion_id}")
        segment.SetTag(LESION_ID_TAG, str(lesion_id))
    return segmentation_node


def lesion_id_of_segment(segment) -> int:
    """The lesion id a segment was made for, 0 for a segment the user added."""
    tag = vtk.mutable("")
    return int(str(tag)) if segment.GetTag(LESION_ID_TAG, tag) and str(tag).isdigit() else 0


def segmentation_state(segmentation_node) -> str:
    """Changes whenever a segment is added, removed or edited (the Segment Editor modifies the segments'
    labelmaps): the segment ids and the modification times of their source representations."""
    seg = segmentation_node.GetSegmentation()
    source = seg.GetSourceRepresentationName()
    parts = []
    for i in range(seg.GetNumberOfSegments()):
        rep = seg.GetNthSegment(i).GetRepresentation(source)
        parts.append(f"{seg.GetNthSegmentID(i)}:{rep.GetMTime() if rep is not None else 0}")
    return ";".join(parts)


def mark_labels_current(label_node, segmentation_node) -> None:
    """Records that the label map matches the lesion segments as they are now."""
    label_node.SetAttribute(SEGMENTATION_STATE, segmentation_state(segmentation_node))


def labels_follow_segmentation(label_node, segmentation_node, reference_node) -> bool:
    """The label map (what picking, Explain and Score use) made again from the lesion segments when they
    changed since it was made (e.g. edited in the Segment Editor): each lesion segment's voxels get its
    lesion id, on the reference grid; segments without a lesion id are left out. True when re-made."""
    if label_node.GetAttribute(SEGMENTATION_STATE) == segmentation_state(segmentation_node):
        return False
    seg = segmentation_node.GetSegmentation()
    ids, lesion_ids = vtk.vtkStringArray(), [0]
    for i in range(seg.GetNumberOfSegments()):
        lid = lesion_id_of_segment(seg.GetNthSegment(i))
        if lid:
            ids.InsertNextValue(seg.GetNthSegmentID(i))
            lesion_ids.append(lid)
    labels = np.zeros(tuple(reference_node.GetImageData().GetDimensions()), np.int32)
    if lesion_ids[1:]:
        # the exported values are 1, 2, ... in the order of `ids` (overlaps: the later wins)
        labels = np.asarray(lesion_ids, np.int32)[exported_segments(segmentation_node, ids, reference_node)]
    set_volume_from_array(label_node, labels, reference_node)
    mark_labels_current(label_node, segmentation_node)
    return True


def segment_id_of_lesion(segmentation_node, lesion_id: int) -> str | None:
    seg = segmentation_node.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        tag = vtk.mutable("")
        if segment.GetTag(LESION_ID_TAG, tag) and int(str(tag)) == int(lesion_id):
            return seg.GetNthSegmentID(i)
    return None


def exported_segments(segmentation_node, segment_ids, reference_node) -> np.ndarray:
    """(x, y, z) label array of segments on the reference grid: 1, 2, ... in the order of `segment_ids`
    (a vtkStringArray), 0 elsewhere. The export's temporary nodes (label map, its display node, the
    colour table the export makes) are removed: they would pile up in the scene and be saved with it."""
    scene = segmentation_node.GetScene() or slicer.mrmlScene
    colours_before = {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
                      for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__exported segments__")
    try:
        # the logic class directly: slicer.util's helper goes through slicer.modules
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, segment_ids, label_node, reference_node):
            raise RuntimeError("exporting the segments to a label map failed")
        return array_from_volume_node(label_node)
    finally:
        remove_node_and_display(scene, label_node)
        added = [scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))]
        for node in added:
            if node.GetID() not in colours_before:
                scene.RemoveNode(node)


def segment_mask(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """(x, y, z) boolean mask of one segment on the reference volume's grid (e.g. a user-drawn Ω)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    return exported_segments(segmentation_node, ids, reference_node) > 0


PICKED_FILL, OTHER_FILL = 0.8, 0.15


def highlight_lesion(segmentation_node, lesion_id, overlay_shown: bool = False):
    """The picked lesion stands out, the others are faint. While a saliency map is shown the picked
    lesion keeps only its outline: a filled segment would hide the map inside it. Returns its segment id."""
    sid = segment_id_of_lesion(segmentation_node, lesion_id)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        seg = segmentation_node.GetSegmentation()
        for i in range(seg.GetNumberOfSegments()):
            other = seg.GetNthSegmentID(i)
            display.SetSegmentOpacity2DFill(other, (0.0 if overlay_shown else PICKED_FILL) if other == sid else OTHER_FILL)
    return sid


def remove_lesions(lesion_ids, segmentation_node=None, table_node=None, label_node=None) -> int:
    """Remove lesions everywhere the module keeps them: their segments, their table rows and their
    voxels in the label map (set to 0), so a removed lesion can be neither picked, nor scored, nor
    counted again. Returns how many segments were removed."""
    ids = {int(i) for i in lesion_ids}
    removed = 0
    if segmentation_node is not None:
        for lid in ids:
            sid = segment_id_of_lesion(segmentation_node, lid)
            if sid is not None:
                segmentation_node.GetSegmentation().RemoveSegment(sid)
                removed += 1
    if table_node is not None:
        table = table_node.GetTable()
        id_column = table.GetColumnByName(TABLE_COLUMNS[0])
        for r in reversed(range(table.GetNumberOfRows())):
            if int(id_column.GetValue(r)) in ids:
                table.RemoveRow(r)
        table.Modified()
        table_node.Modified()
    if label_node is not None and ids:
        kji = slicer.util.arrayFromVolume(label_node)
        kji[np.isin(kji, list(ids))] = 0
        slicer.util.arrayFromVolumeModified(label_node)
    return removed


# ----------------------------------------------------------------------------- lesion table

def fill_lesion_table(table_node, rows: list[dict]) -> None:
    """Columns: Lesion, Volume (mm3), R, A, S (centroid, RAS mm), Max probability, TP probability."""
    table = table_node.GetTable()
    table_node.RemoveAllColumns()
    keys = ("lesion_id", "volume_mm3", "centroid_r", "centroid_a", "centroid_s", "max_probability", "tp_probability", "tp_note")
    for title, key in zip(TABLE_COLUMNS, keys):
        col = vtk.vtkIntArray() if key == "lesion_id" else vtk.vtkStringArray() if key == "tp_note" else vtk.vtkDoubleArray()
        col.SetName(title)
        for r in rows:
            v = r.get(key)
            if key == "tp_note":
                col.InsertNextValue(str(v or ""))
            else:
                col.InsertNextValue(int(v) if key == "lesion_id" else (float("nan") if v in (None, "") else float(v)))
        table.AddColumn(col)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for title in TABLE_COLUMNS:
        table_node.SetColumnTitle(title, title)
    table_node.SetLocked(True)
    table_node.Modified()


def table_row_of_model_index(table_node, row: int, column: int, transposed: bool = False) -> int:
    """The vtkTable row shown at a (source) model index of a qMRMLTableView.

    qMRMLTableModel::mrmlTableRowIndex does this in C++ but is not exposed to Python (a plain public
    method); this follows qMRMLTableModel.cxx: with column titles as header the model row is the
    table row, otherwise model row 0 holds the editable column names; transposed views swap axes."""
    model_row = column if transposed else row
    return model_row if table_node.GetUseColumnTitleAsColumnHeader() else model_row - 1


def lesion_table_rows(table_node) -> list[dict]:
    """Read back the table as {column title: value}: numbers, and text for the TP note."""
    table = table_node.GetTable()
    columns = [(c, table.GetColumn(c).GetName(), isinstance(table.GetColumn(c), vtk.vtkStringArray)) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() if text else table.GetValue(r, c).ToDouble() for c, name, text in columns}
            for r in range(table.GetNumberOfRows())]


def set_tp_probability(table_node, lesion_id: int, probability, note: str = "") -> None:
    """A lesion's TP probability (None: not computed, NaN in the table) and its note (why it is missing)."""
    table = table_node.GetTable()
    ids = table.GetColumnByName(TABLE_COLUMNS[0])
    col = table.GetColumnByName("TP probability")
    notes = table.GetColumnByName(TP_NOTE)
    if notes is None:  # a table saved before the column existed
        notes = vtk.vtkStringArray()
        notes.SetName(TP_NOTE)
        notes.SetNumberOfValues(table.GetNumberOfRows())
        table.AddColumn(notes)
        table_node.SetColumnTitle(TP_NOTE, TP_NOTE)
    for r in range(table.GetNumberOfRows()):
        if int(ids.GetValue(r)) == int(lesion_id):
            col.SetValue(r, float("nan") if probability is None else float(probability))
            notes.SetValue(r, str(note or ""))
    table.Modified()
    table_node.Modified()


def tp_note(table_node, lesion_id: int) -> str:
    """Why the table has no TP probability for a lesion (the scoring's error), '' when there is none."""
    for row in lesion_table_rows(table_node) if table_node is not None else []:
        if int(row["Lesion"]) == int(lesion_id):
            return str(row.get(TP_NOTE, ""))
    return ""


# ----------------------------------------------------------------------------- saliency overlay

def show_saliency(node, window_max: float | None = None) -> float:
    """Diverging blue-white-red colours, transparent around 0 (colors.py: a whole-volume foreground must
    not wash out the background), window symmetric around 0 (±max |value| by default)."""
    from .colors import saliency_color_node

    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(saliency_color_node(node.GetScene()).GetID())
    m = float(window_max) if window_max else float(np.abs(slicer.util.arrayFromVolume(node)).max())
    m = m if m > 0 else 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-m, m)
    display.SetInterpolate(False)
    return m


def add_saliency_volume(map_xyz: np.ndarray, reference_node, name: str, scene=None, replace=None):
    """A scalar volume with the map on the reference geometry and the diverging display; `replace`
    (an earlier saliency node) is overwritten instead of adding a new node."""
    if replace is not None:
        set_volume_from_array(replace, map_xyz.astype(np.float32), reference_node)
        replace.SetName(name)
        node = replace
    else:
        node = add_volume(map_xyz.astype(np.float32), reference_node, name, scene=scene)
    show_saliency(node)
    return node
