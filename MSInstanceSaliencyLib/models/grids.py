"""Where the network runs and how its arrays come back to the user's image.

Every output lies on the reference grid (the MPRAGE, or the FLAIR for a FLAIR-only case). A model
may run on another grid: a MONAI model with a target spacing or orientation (`ResampledGrid`), an
nnU-Net plan's cropped, transposed and resampled array (nnunet.NNUNetGrid). A grid maps a
lesion mask to the network's grid (saliency's Ω) and the network's arrays (probabilities, maps) back.
Arrays are (X, Y, Z) as everywhere in this package.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..io.volumes import array_from_image, image_from_array


class SameGrid:
    """The network runs on the reference grid itself."""

    same = True

    def to_reference(self, array: np.ndarray, kind: str = "linear") -> np.ndarray:
        return array

    def to_network(self, mask: np.ndarray) -> np.ndarray:
        return mask

    def describe(self) -> str:
        return "the reference grid"


class ResampledGrid:
    """The network's grid is a sitk image geometry covering the reference image (another spacing or
    axis order); arrays move between the two by resampling in physical space."""

    same = False

    def __init__(self, network: sitk.Image, reference: sitk.Image):
        self.network = network
        self.reference = reference

    @classmethod
    def for_spec(cls, reference: sitk.Image, spacing=None, orientation=None) -> "ResampledGrid | SameGrid":
        """The grid a spec asks for around `reference`: its axes permuted and flipped to `orientation`
        (nibabel axis codes such as "RAS", exact), then resampled to `spacing` mm over the same
        physical extent (voxel corners kept)."""
        grid = reference
        if orientation:
            grid = sitk.DICOMOrient(reference, orientation)
        if spacing is not None:
            old_sp = np.array(grid.GetSpacing())
            new_sp = np.array(spacing, dtype=float)
            size = np.maximum(np.round(np.array(grid.GetSize()) * old_sp / new_sp), 1).astype(int)
            direction = np.array(grid.GetDirection()).reshape(3, 3)
            corner = np.array(grid.GetOrigin()) - direction @ (old_sp / 2)
            origin = corner + direction @ (new_sp / 2)
            out = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
            out.SetSpacing(tuple(new_sp))
            out.SetDirection(grid.GetDirection())
            out.SetOrigin(tuple(origin))
            grid = out
        from ..io.volumes import same_grid

        if same_grid(grid, reference):
            return SameGrid()
        return cls(_geometry(grid), reference)

    def image_to_network(self, image: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
        return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), self.network, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)

    def to_reference(self, array: np.ndarray, kind: str = "linear") -> np.ndarray:
        interp = sitk.sitkLinear if kind == "linear" else sitk.sitkNearestNeighbor
        img = image_from_array(np.asarray(array, np.float32), reference=self.network)
        out = sitk.Resample(img, self.reference, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
        return array_from_image(out, np.float32)

    def to_network(self, mask: np.ndarray) -> np.ndarray:
        return mask_to_grid(mask, self.reference, self.network)

    def describe(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self.network.GetSpacing())
        return f"a {'x'.join(map(str, self.network.GetSize()))} grid of {sp} mm"


def mask_to_grid(mask: np.ndarray, source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """A voxel set on another grid: the target voxels whose centre lies in a source voxel of the set
    (nearest neighbour); a set too small to hold a target voxel centre keeps the one nearest its centroid."""
    img = image_from_array(np.asarray(mask, np.uint8), reference=source)
    out = array_from_image(sitk.Resample(img, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), np.uint8) > 0
    if out.any() or not np.any(mask):
        return out
    centre = np.argwhere(mask).mean(0)
    point = source.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre])
    idx = np.round(target.TransformPhysicalPointToContinuousIndex(point)).astype(int)
    idx = np.clip(idx, 0, np.array(target.GetSize()) - 1)
    out[tuple(idx)] = True
    return out


def _geometry(img: sitk.Image) -> sitk.Image:
    """An empty image with `img`'s geometry (what resampling needs, without its voxels)."""
    out = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    out.CopyInformation(img)
    return out
