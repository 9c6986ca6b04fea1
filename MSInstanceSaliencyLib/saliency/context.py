"""The context box: the part of the image a saliency map is computed on (the network's patch centred on
Ω, or the full image), as crops padded to the network's size divisor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

DEFAULT_ROI = (96, 96, 96)


# ----------------------------------------------------------------------------- context boxes

@dataclass
class ContextBox:
    """Where the network looks: a box of the volume (slices) and zero padding at its far ends."""

    slices: tuple
    pad: tuple  # per axis, voxels of padding after the box

    @property
    def shape(self):
        return tuple(s.stop - s.start for s in self.slices)

    @property
    def padded_shape(self):
        return tuple(n + p for n, p in zip(self.shape, self.pad))


def context_box(omega: np.ndarray, context: str, roi=DEFAULT_ROI, divisor: int = 16) -> ContextBox:
    """The network's input box for `omega`.

    patch: about the roi centred on Ω's bounding box, grown when Ω is larger, on the network's grid:
    its origin and size are multiples of `divisor` (the network's total down-sampling), so the
    network computes on the patch what it computes there on the whole volume, up to what lies beyond
    the patch (strided convolutions are not shift-equivariant; an off-grid patch measured map
    correlations of 0.52-0.82 with the whole-volume map, on-grid 0.99: docs/PERFORMANCE.md).
    full: the whole volume. Both are zero-padded at the far ends to multiples of `divisor`, as the
    whole volume is, so a patch reaching the volume's end sees the same padding.
    """
    shape = omega.shape
    if context == "full":
        slices = tuple(slice(0, n) for n in shape)
    elif context == "patch":
        idx = np.argwhere(omega)
        lo, hi = idx.min(0), idx.max(0)
        slices = tuple(_grid_slice(int(lo[a]), int(hi[a]), int(n), int(roi[a]), divisor) for a, n in enumerate(shape))
    else:
        raise InputError(f"context must be 'patch' or 'full', got {context!r}")
    pad = tuple(int(math.ceil((s.stop - s.start) / divisor) * divisor) - (s.stop - s.start) for s in slices)
    return ContextBox(slices, pad)


def _grid_slice(lo: int, hi: int, n: int, roi: int, d: int) -> slice:
    """Along one axis: a window with origin and size multiples of d, about `roi` long (at least
    covering lo..hi), centred on lo..hi as nearly as the grid allows, inside the padded axis."""
    padded = int(math.ceil(n / d) * d)
    size = int(math.ceil(max(roi, hi - lo + 1) / d) * d)
    while True:
        if size >= padded:
            return slice(0, n)
        start = int(round(((lo + hi + 1) / 2 - size / 2) / d)) * d
        start = min(max(start, 0), padded - size)
        start = min(start, lo // d * d)  # Ω's first voxel inside
        if hi < start + size:
            return slice(start, min(start + size, n))
        size += d  # Ω straddles a grid line the window cannot cover: one more cell


def _crop_pad(t, box: ContextBox):
    """Crop a (..., X, Y, Z) tensor to the box and zero-pad it at the far ends."""
    import torch.nn.functional as F

    x = t[(Ellipsis,) + box.slices]
    if any(box.pad):
        x = F.pad(x, (0, box.pad[2], 0, box.pad[1], 0, box.pad[0]))
    return x


def _uncrop(acc: np.ndarray, box: ContextBox, image_shape) -> np.ndarray:
    """A (C, *padded box) map back on the image's grid (C, X, Y, Z), zero outside the box."""
    result = np.zeros(image_shape, np.float32)
    result[(slice(None),) + box.slices] = acc[(slice(None),) + tuple(slice(0, n) for n in box.shape)]
    return result
