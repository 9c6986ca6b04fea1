"""The saliency overlay's colour table: diverging blue-white-red, transparent around 0.

Slicer's own diverging table (vtkMRMLColorTableNodeFileDivergingBlueRed.txt) is opaque, and its
centre is white: a saliency map shown as the foreground layer over the whole volume then paints
every voxel with value ~0 white at the foreground opacity, which washes out the FLAIR everywhere.
This table has the same kind of colours (Moreland's cool-to-warm diverging map, interpolated by
VTK's "Diverging" colour space between blue at -max and red at +max, light grey-white at 0), and
a transparent band around 0:

    t     = entry centre in [-1, 1]  (the display window is -m..m, so t = value / m)
    alpha = 0 where |t| < 0.1, else 1

Why a band and not a ramp of alpha: Slicer's slice views use a colour table's alpha only as on/off.
vtkMRMLScalarVolumeDisplayNode ANDs the table's alpha with its threshold mask (vtkImageLogic, true
value 255), so every entry with alpha > 0 is drawn fully opaque and only the layer's opacity
(0.5 in the module) blends it with the background. A graded ramp would therefore show every
nonzero value as opaque as the peak (checked with slicer-core's slice logic in
Testing/Python/test_rendering.py). So:

- values within 10 % of the window around 0 (26 central entries of 256, among them the two that
  value 0 falls into) are fully transparent: voxels with value 0 (all outside the explained
  region's influence) and the low-level gradient noise around it leave the FLAIR exactly as it is;
- larger values get the diverging colours, blended at the layer's opacity;
- the band follows the window: narrowing the window in the Volumes module shows smaller values.

The node is created once per scene and reused: it is found again by its attribute, also after the
scene was saved and loaded again (it is saved with the scene, so a saved overlay keeps its colours).
It stays visible in node selectors, so the Volumes module shows and can re-select it.
"""

from __future__ import annotations

import slicer
import vtk

SALIENCY_COLOR_NODE_NAME = "MSInstanceSaliency BlueRed (transparent near 0)"
SALIENCY_COLOR_ATTRIBUTE = "MSInstanceSaliency.SaliencyColorTable"
SALIENCY_COLOR_VERSION = "2"  # bump when the table below changes: older copies in a scene are rebuilt

NUMBER_OF_COLORS = 256
TRANSPARENT_BELOW = 0.1  # |t| below this: alpha 0; from it on: alpha 1 (see the module docstring)

# end colours of Moreland's cool-to-warm diverging map (blue, red); the diverging interpolation puts
# a light neutral grey-white between them
_BLUE = (0.230, 0.299, 0.754)
_RED = (0.706, 0.016, 0.150)


def entry_positions(n: int = NUMBER_OF_COLORS) -> list[float]:
    """Centre of each table entry on [-1, 1] (entry i covers [-1 + 2i/n, -1 + 2(i+1)/n])."""
    return [-1.0 + (2.0 * i + 1.0) / n for i in range(n)]


def saliency_alpha(t: float) -> float:
    """Opacity of the entry at t in [-1, 1]: 0 inside the band around 0, else 1 (see the module docstring)."""
    return 0.0 if abs(t) < TRANSPARENT_BELOW else 1.0


def saliency_rgba_table(n: int = NUMBER_OF_COLORS, opaque: bool = False) -> list[tuple[float, float, float, float]]:
    """The n RGBA entries (0..1) from blue (-max) to red (+max); `opaque` gives alpha 1 everywhere
    (the behaviour of Slicer's own diverging table, kept for comparisons in tests)."""
    ctf = vtk.vtkColorTransferFunction()
    ctf.SetColorSpaceToDiverging()
    ctf.AddRGBPoint(-1.0, *_BLUE)
    ctf.AddRGBPoint(1.0, *_RED)
    return [(*ctf.GetColor(t), 1.0 if opaque else saliency_alpha(t)) for t in entry_positions(n)]


def fill_color_table(node, rgba) -> None:
    """Make `node` a user table holding the given RGBA entries."""
    was = node.StartModify()
    node.SetTypeToUser()
    node.SetNumberOfColors(len(rgba))
    node.GetLookupTable().SetTableRange(-1.0, 1.0)
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, r, g, b, a)
    node.SetAttribute("Category", "MSInstanceSaliency")
    node.EndModify(was)


def _is_current(node) -> bool:
    return (node.GetAttribute(SALIENCY_COLOR_ATTRIBUTE) == SALIENCY_COLOR_VERSION
            and node.GetNumberOfColors() == NUMBER_OF_COLORS)


def saliency_color_node(scene=None):
    """The scene's saliency colour table node (vtkMRMLColorTableNode), created on first use."""
    scene = scene or slicer.mrmlScene
    found = None
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(SALIENCY_COLOR_ATTRIBUTE) is not None:
            found = node
            break
    if found is not None and _is_current(found):
        return found
    node = found or scene.AddNewNodeByClass("vtkMRMLColorTableNode", SALIENCY_COLOR_NODE_NAME)
    fill_color_table(node, saliency_rgba_table())
    node.SetAttribute(SALIENCY_COLOR_ATTRIBUTE, SALIENCY_COLOR_VERSION)
    node.SetSaveWithScene(True)
    node.SetHideFromEditors(False)
    return node
