"""Slicer's slice views without Slicer: slicer-core's slice logic and displayable managers, offscreen.

What a Slicer slice view shows is made of two parts, and both are available here:

1. the volume layers: vtkMRMLSliceLogic reslices the background, foreground and label volumes along
   the slice node's plane, maps each through its display node (window/level, colour table, the
   table's alpha) and blends them (foreground opacity) into one RGBA image, GetImageDataConnection().
   A Slicer view draws that image 1:1 as its bottom 2D actor. This part is plain VTK image
   processing: no OpenGL, so `SliceView.blended_rgba()` works on any machine;
2. everything else (segments, markups, ...) is drawn on top by displayable managers, into a
   renderer. `SliceView.render()` sets up a render window with the slice image actor and the
   segmentations displayable manager (vtkMRMLSegmentationsDisplayableManager2D: segment fill and
   outline), renders it offscreen and reads the pixels back. That needs OpenGL: VTK's EGL window
   (libEGL with Mesa's software driver is enough, no display and no GPU:
   Debian/Ubuntu packages libegl1, libegl-mesa0, libgl1-mesa-dri). `opengl_available()` checks it in a
   child process, because a missing driver can crash the process instead of raising.

Arrays are (rows, columns, channels) uint8 with row 0 at the top of the view, as in a screenshot.
Orientation presets are Slicer's defaults (radiological: patient right on the left of the screen).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# before vtk creates its first render window: offscreen EGL instead of X (there is no display here)
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

VIEW_NAMES = {"Axial": "Red", "Sagittal": "Yellow", "Coronal": "Green"}  # Slicer's conventional layout names

OPENGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"

_PROBE = """
import os
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
import vtk
w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)
r = vtk.vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
f = vtk.vtkWindowToImageFilter(); f.SetInput(w); f.Update()
assert f.GetOutput().GetPointData().GetScalars().GetTuple(0)[0] == 255
"""


def opengl_available() -> bool:
    """True when an offscreen VTK render window renders here (checked once, in a child process)."""
    global _opengl
    if _opengl is None:
        try:
            p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=60)
            _opengl = p.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _opengl = False
    return _opengl


_opengl = None


def image_to_array(image) -> np.ndarray:
    """vtkImageData (2D, uint8, n components) -> (rows, cols, n) with row 0 at the top."""
    w, h, _ = image.GetDimensions()
    a = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
    return np.ascontiguousarray(a[::-1])


def setup_application_logic(scene=None):
    """What Slicer's application sets up and the slice views rely on: the application logic with the
    scene, the default colour tables (e.g. Grey for scalar volumes; the file-based tables such as
    DivergingBlueRed are not in slicer-core), the slice orientation presets, and a collection of
    slice logics. Call before adding volumes, so their display nodes find their colour tables."""
    scene = scene or slicer.mrmlScene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        colors.AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app)
    return app


class SliceView:
    """One slice view (slice node, composite node, slice logic) of `size` = (width, height) pixels."""

    def __init__(self, app, orientation: str = "Axial", size=(400, 400), name: str | None = None):
        self.app = app
        self.scene = app.GetMRMLScene()
        self.size = (int(size[0]), int(size[1]))
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app)
        self.logic.SetMRMLScene(self.scene)
        app.GetSliceLogics().AddItem(self.logic)
        layout_name = name or VIEW_NAMES.get(orientation, orientation)
        # one slice node per view name and scene, as in Slicer (AddSliceNode does not hand back an existing one)
        existing = self.scene.GetSingletonNode(layout_name, "vtkMRMLSliceNode")
        if existing is not None:
            self.logic.SetSliceNode(existing)
            self.slice_node = existing
        else:
            self.slice_node = self.logic.AddSliceNode(layout_name)
        self.slice_node.SetOrientation(orientation)
        self.composite = self.logic.GetSliceCompositeNode()
        self.logic.ResizeSliceNode(*self.size)
        self._window = None

    # -- what the view shows

    def set_layers(self, background=None, foreground=None, foreground_opacity: float = 0.5, label=None,
                   label_opacity: float = 1.0, fit: bool = True) -> None:
        """As slicer.util.setSliceViewerLayers: volume nodes (or None) for the three layers."""
        c = self.composite
        c.SetBackgroundVolumeID(background.GetID() if background else None)
        c.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        c.SetForegroundOpacity(float(foreground_opacity))
        c.SetLabelVolumeID(label.GetID() if label else None)
        c.SetLabelOpacity(float(label_opacity))
        if fit:
            self.fit()

    def fit(self) -> None:
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()

    def zoom(self, factor: float) -> None:
        """Field of view divided by `factor` (> 1 zooms in), about the view's centre."""
        fov = self.slice_node.GetFieldOfView()
        self.slice_node.SetFieldOfView(fov[0] / factor, fov[1] / factor, fov[2])

    def jump_to(self, ras, center: bool = False) -> None:
        """Move the slice plane through the RAS point; `center` also pans the view to it (as
        markups logic JumpSlicesToLocation(..., True) does in Slicer)."""
        r, a, s = (float(v) for v in ras[:3])
        if center:
            self.slice_node.JumpSliceByCentering(r, a, s)
        else:
            self.slice_node.JumpSliceByOffsetting(r, a, s)

    def pixel_ras(self) -> np.ndarray:
        """(height, width, 3) RAS of each pixel of the view (row 0 at the top), from the slice node's XY-to-RAS."""
        w, h = self.size
        m = slicer.util.arrayFromVTKMatrix(self.slice_node.GetXYToRAS())
        y, x = np.mgrid[h - 1:-1:-1, 0:w]
        xy = np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)]).astype(float)
        return (m @ xy)[:3].T.reshape(h, w, 3)

    # -- pixels

    def blended_rgba(self) -> np.ndarray:
        """The blended volume layers (no OpenGL): (height, width, 4) uint8, what the view's image actor shows."""
        self.logic.UpdatePipeline()
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        return image_to_array(producer.GetOutputDataObject(0))

    def render(self) -> np.ndarray:
        """Offscreen render of the whole view (volume layers + segments): (height, width, 3) uint8."""
        if self._window is None:
            self._setup_window()
        self.logic.UpdatePipeline()
        self._mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self._group.RequestRender()
        self._window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self._window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        return image_to_array(grab.GetOutput())

    def _setup_window(self) -> None:
        w = vtk.vtkRenderWindow()
        w.SetOffScreenRendering(1)
        w.SetSize(*self.size)
        w.SetMultiSamples(0)
        renderer = vtk.vtkRenderer()
        renderer.SetBackground(0.0, 0.0, 0.0)
        renderer.GetActiveCamera().ParallelProjectionOn()
        w.AddRenderer(renderer)
        # displayable managers reach for the interactor: without one, SetMRMLDisplayableNode crashes
        interactor = vtk.vtkGenericRenderWindowInteractor()
        interactor.SetRenderWindow(w)
        interactor.Initialize()
        # the slice image, drawn 1:1 (window 255 / level 127.5 leaves the RGBA bytes as they are), behind everything
        self._mapper = vtk.vtkImageMapper()
        self._mapper.SetColorWindow(255.0)
        self._mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self._mapper)
        actor.GetProperty().SetDisplayLocationToBackground()
        renderer.AddViewProp(actor)
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in ("vtkMRMLSegmentationsDisplayableManager2D",):
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        group = slicer.vtkMRMLDisplayableManagerGroup()
        group.Initialize(factory, renderer)
        group.SetMRMLDisplayableNode(self.slice_node)
        self._window, self._renderer, self._interactor, self._group, self._actor = w, renderer, interactor, group, actor

    def close(self) -> None:
        """Let go of the render window and of the scene (call before clearing the scene)."""
        if self._window is not None:
            self._renderer.RemoveAllViewProps()
            self._window.Finalize()
            self._window = self._group = self._renderer = self._interactor = self._actor = None
        self.app.GetSliceLogics().RemoveItem(self.logic)
        self.logic.DeleteSliceModel()  # the logic's "<name> Volume Slice" model nodes; a new view makes its own
        self.logic.SetMRMLScene(None)


def render_views(app, background, foreground=None, foreground_opacity: float = 0.5, label=None, ras=None,
                 orientations=("Axial", "Coronal", "Sagittal"), size=(400, 400), opengl: bool | None = None,
                 center: bool = False, zoom: float = 1.0) -> dict:
    """{orientation: image} of each view through `ras` (default: the middle of the background), fitted
    to the background, then zoomed by `zoom` and, with `center`, panned to `ras`.
    With OpenGL (default: when available) segments are drawn too and images are RGB; without,
    the blended volume layers alone, RGB as well (the alpha dropped)."""
    use_gl = opengl_available() if opengl is None else opengl
    out = {}
    for orientation in orientations:
        view = SliceView(app, orientation, size)
        try:
            view.set_layers(background, foreground, foreground_opacity, label)
            if zoom != 1.0:
                view.zoom(zoom)
            if ras is not None:
                view.jump_to(ras, center=center)
            out[orientation] = view.render() if use_gl else view.blended_rgba()[..., :3].copy()
        finally:
            view.close()
    return out


def sample_nearest(volume_node, ras: np.ndarray, outside=np.nan) -> np.ndarray:
    """The volume's value at the voxel nearest to each RAS point (..., 3); `outside` beyond the volume."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(m)
    m = slicer.util.arrayFromVTKMatrix(m)
    pts = np.asarray(ras, float).reshape(-1, 3)
    ijk = np.rint(pts @ m[:3, :3].T + m[:3, 3]).astype(int)
    kji = slicer.util.arrayFromVolume(volume_node)
    dims = np.array(kji.shape[::-1])
    inside = np.all((ijk >= 0) & (ijk < dims), axis=1)
    out = np.full(len(pts), outside, dtype=float)
    i, j, k = ijk[inside].T
    out[inside] = kji[k, j, i]
    return out.reshape(np.shape(ras)[:-1])


def save_png(array: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def side_by_side(images, gap: int = 4) -> np.ndarray:
    """Images of equal height next to each other, black gaps between them."""
    h = max(im.shape[0] for im in images)
    c = images[0].shape[2]
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(np.zeros((h, gap, c), np.uint8))
        pad = np.zeros((h, im.shape[1], c), np.uint8)
        pad[: im.shape[0]] = im
        parts.append(pad)
    return np.concatenate(parts, axis=1)
