"""What the saliency overlay looks like in a Slicer slice view (slicer-core's slice logic, offscreen).

The scene is the module's: FLAIR background, the saliency map as the foreground at opacity 0.5, lesion
segments. The blended layers come from vtkMRMLSliceLogic itself (no OpenGL); the segments need a
render window and are checked where offscreen OpenGL works (slice_rendering.opengl_available).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML and logic libraries) is not installed")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MSInstanceSaliency"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import SimpleITK as sitk  # noqa: E402
from scipy import ndimage  # noqa: E402

import MSInstanceSaliencyMRML as mrml  # noqa: E402
import slice_rendering as sr  # noqa: E402
from MSInstanceSaliencyMRML import colors  # noqa: E402

N = 64
LESION_1 = (40, 30, 32)  # ijk centres; lesion 1 is the explained one
LESION_2 = (20, 40, 32)
NEGATIVE_SPOT = (40, 39, 32)
WEAK_SPOT = (49, 30, 32)


@pytest.fixture()
def app():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())
    app = sr.setup_application_logic(slicer.mrmlScene)
    yield app
    slicer.mrmlScene.Clear(1)


def _ball(centre, radius):
    x, y, z = np.mgrid[:N, :N, :N]
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius ** 2


def _case():
    """A head-ish FLAIR (brain ellipsoid with smooth texture in a dark background), two lesions, and a
    saliency map: strongly positive in lesion 1, a strongly negative spot and a weaker positive one
    beside it, a faint negative rim around it (5 % of the window), exactly 0 everywhere else."""
    rng = np.random.default_rng(0)
    x, y, z = np.mgrid[:N, :N, :N]
    brain = ((x - 32) / 27.0) ** 2 + ((y - 32) / 30.0) ** 2 + ((z - 32) / 26.0) ** 2 <= 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal((N, N, N)), 2.0)
    flair = np.where(brain, 300.0 + 400.0 * texture, 0.0).astype(np.float32)
    labels = np.zeros((N, N, N), np.int32)
    labels[_ball(LESION_1, 4)] = 1
    labels[_ball(LESION_2, 3)] = 2
    flair[labels > 0] = 600.0  # FLAIR-bright lesions
    sal = np.zeros((N, N, N), np.float32)
    sal[_ball(LESION_1, 4)] = 1.0
    sal[_ball(LESION_1, 6) & ~_ball(LESION_1, 4)] = -0.05  # faint rim: inside the transparent band
    sal[_ball(NEGATIVE_SPOT, 1.5)] = -0.8
    sal[_ball(WEAK_SPOT, 1.5)] = 0.25
    image = sitk.GetImageFromArray(flair.transpose(2, 1, 0))
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    return flair, labels, sal, image


def _scene(app):
    flair, labels, sal, image = _case()
    flair_node = mrml.add_volume(flair, image, "FLAIR")
    seg = mrml.labels_to_segmentation(labels, flair_node)
    sal_node = mrml.add_saliency_volume(sal, flair_node, "Lesion 1 SmoothGrad FLAIR")
    label_node = mrml.add_volume(labels, flair_node, "labels", "vtkMRMLLabelMapVolumeNode")
    lesion_ras = mrml.ijk_to_ras(flair_node) @ np.array([*LESION_1, 1.0])
    return flair_node, sal_node, seg, label_node, lesion_ras[:3]


def _axial(app, flair_node, sal_node, lesion_ras, size=(160, 160)):
    view = sr.SliceView(app, "Axial", size)
    view.set_layers(flair_node, sal_node, 0.5)
    view.jump_to(lesion_ras)
    return view


def test_saliency_color_table(app, tmp_path):
    node = colors.saliency_color_node()
    assert colors.saliency_color_node() is node  # one per scene, found again
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") > 1  # the defaults + ours
    assert node.GetNumberOfColors() == 256 and node.GetSaveWithScene()
    rgba = np.array([node.GetLookupTable().GetTableValue(i) for i in range(256)])
    assert set(rgba[:, 3]) == {0.0, 1.0}  # slice views use alpha as on/off only (test below)
    assert np.all(rgba[115:141, 3] == 0.0)  # |value| < 10 % of the window, value 0 (entries 127, 128) among them
    assert np.all(rgba[:115, 3] == 1.0) and np.all(rgba[141:, 3] == 1.0)
    assert rgba[0, 2] > rgba[0, 0] + 0.4 and rgba[255, 0] > rgba[255, 2] + 0.4  # blue at -max, red at +max
    assert np.all(rgba[120:136, :3] > 0.75)  # white-ish around 0
    np.testing.assert_allclose(rgba[:, 3], rgba[::-1, 3])  # symmetric
    # the saliency volumes use it
    flair_node, sal_node, *_ = _scene(app)
    assert sal_node.GetDisplayNode().GetColorNodeID() == node.GetID()
    # saved with the scene and found again (not duplicated) after loading it
    assert app.SaveSceneToSlicerDataBundleDirectory(str(tmp_path), None)
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(next(tmp_path.glob("*.mrml"))))
    assert loaded.Import()
    again = colors.saliency_color_node(loaded)
    assert loaded.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1 and again.GetNumberOfColors() == 256
    np.testing.assert_allclose([again.GetLookupTable().GetTableValue(i) for i in range(256)], rgba, atol=1e-6)
    loaded.Clear(1)
    # a stale copy (older version) is rebuilt in place, not duplicated
    node.SetAttribute(colors.SALIENCY_COLOR_ATTRIBUTE, "0")
    node.SetNumberOfColors(2)
    assert colors.saliency_color_node() is node and node.GetNumberOfColors() == 256


def test_overlay_colours_in_the_slice_view(app):
    flair_node, sal_node, seg, label_node, lesion_ras = _scene(app)
    view = _axial(app, flair_node, sal_node, lesion_ras)
    try:
        over = view.blended_rgba()[..., :3].astype(int)
        view.set_layers(flair_node, None, fit=False)
        flair_only = view.blended_rgba()[..., :3].astype(int)
        view.set_layers(flair_node, sal_node, 0.5, fit=False)

        ras = view.pixel_ras()
        sal = sr.sample_nearest(sal_node, ras, outside=0.0)
        # pixel/voxel boundaries: a margin of 2 pixels (the view shows ~2.5 pixels per voxel)
        lesion_core = ndimage.binary_erosion(sal == 1.0, iterations=2)
        blue_core = ndimage.binary_erosion(np.isclose(sal, -0.8), iterations=1)
        weak_core = ndimage.binary_erosion(np.isclose(sal, 0.25), iterations=1)
        rim = ndimage.binary_erosion(np.isclose(sal, -0.05), iterations=2)
        far = ~ndimage.binary_dilation(np.abs(sal) > 0.1, iterations=2)  # 0 or inside the transparent band
        zero = far & (sal == 0)
        assert lesion_core.sum() > 50 and blue_core.sum() > 4 and weak_core.sum() > 4 and rim.sum() > 20
        assert zero.mean() > 0.8

        # (a) the explained lesion is red: R above G and B, and redder than the FLAIR alone
        r, g, b = over[lesion_core].T
        assert np.all(r > g + 40) and np.all(r > b + 40)
        d = over[lesion_core] - flair_only[lesion_core]
        assert np.all(d[:, 0] > d[:, 1] + 40) and np.all(d[:, 0] > d[:, 2] + 40)
        # a clearly negative spot is blue; a weaker positive one shows (a paler red)
        r, g, b = over[blue_core].T
        assert np.all(b > r + 40) and np.all(b > g + 20)
        assert np.all(np.abs(over[weak_core] - flair_only[weak_core]).max(axis=1) > 20)
        assert np.all(over[weak_core][:, 0] > over[weak_core][:, 2])
        # (b) where the saliency is 0, or within 10 % of the window, the view is exactly the FLAIR-only view
        np.testing.assert_array_equal(over[far], flair_only[far])
        np.testing.assert_array_equal(over[rim], flair_only[rim])
        assert over[far].max() > 100  # and that is brain, not empty background

        # (c) an opaque diverging table (Slicer's DivergingBlueRed behaviour) fails (b): it washes the FLAIR out
        opaque = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "opaque diverging")
        colors.fill_color_table(opaque, colors.saliency_rgba_table(opaque=True))
        sal_node.GetDisplayNode().SetAndObserveColorNodeID(opaque.GetID())
        washed = view.blended_rgba()[..., :3].astype(int)
        changed = np.any(washed[zero] != flair_only[zero], axis=1)
        assert changed.mean() > 0.95
        assert washed[zero].mean() > flair_only[zero].mean() + 30  # brighter everywhere: the wash-out
    finally:
        view.close()


def test_slice_view_alpha_is_on_off(app):
    """Why the colour table has a transparent band and no alpha ramp: a slice view draws every entry
    with alpha > 0 fully opaque (vtkMRMLScalarVolumeDisplayNode), blended only by the layer opacity."""
    flair_node, sal_node, seg, label_node, lesion_ras = _scene(app)
    view = _axial(app, flair_node, sal_node, lesion_ras)
    try:
        view.set_layers(flair_node, sal_node, 1.0, fit=False)
        graded = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "graded")
        colors.fill_color_table(graded, [(1.0, 0.0, 0.0, 0.0)] * 128 + [(1.0, 0.0, 0.0, 0.05)] * 128)
        sal_node.GetDisplayNode().SetAndObserveColorNodeID(graded.GetID())
        over = view.blended_rgba()[..., :3].astype(int)
        sal = sr.sample_nearest(sal_node, view.pixel_ras(), outside=0.0)
        core = ndimage.binary_erosion(sal == 1.0, iterations=2)
        np.testing.assert_array_equal(over[core], np.tile([255, 0, 0], (core.sum(), 1)))  # alpha 0.05 drawn as 1
    finally:
        view.close()


@pytest.mark.skipif(not sr.opengl_available(),
                    reason=f"no offscreen OpenGL for VTK (EGL); on Debian/Ubuntu: apt-get install {sr.OPENGL_PACKAGES}")
def test_segments_drawn_over_the_overlay(app):
    flair_node, sal_node, seg, label_node, lesion_ras = _scene(app)
    view = _axial(app, flair_node, sal_node, lesion_ras)
    try:
        display = seg.GetDisplayNode()
        display.SetVisibility(False)
        plain = view.render().astype(int)
        np.testing.assert_array_equal(plain, view.blended_rgba()[..., :3])  # the window shows the slice image 1:1
        display.SetVisibility(True)
        ids = {lid: mrml.segment_id_of_lesion(seg, lid) for lid in (1, 2)}
        display.SetSegmentOpacity2DFill(ids[1], 0.8)
        display.SetSegmentOpacity2DFill(ids[2], 0.15)
        shown = view.render().astype(int)

        lesion = sr.sample_nearest(label_node, view.pixel_ras(), outside=0)
        changed = np.any(shown != plain, axis=2)
        for lid in (1, 2):
            core = ndimage.binary_erosion(lesion == lid, iterations=2)
            assert changed[core].mean() > 0.9, f"lesion {lid}'s fill is not drawn"
        # segments are drawn near the lesions only
        around = ndimage.binary_dilation(lesion > 0, iterations=3)
        assert not changed[~around].any()
        # the picked lesion (fill 0.8) hides more than lesion 2 (fill 0.15)
        d1 = np.abs(shown - plain)[ndimage.binary_erosion(lesion == 1, iterations=2)].mean()
        d2 = np.abs(shown - plain)[ndimage.binary_erosion(lesion == 2, iterations=2)].mean()
        assert d1 > d2
    finally:
        view.close()
