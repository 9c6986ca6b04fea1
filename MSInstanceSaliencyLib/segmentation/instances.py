"""Lesion instances: connected components of the binary map and the lesion table.

Components use 18-connectivity (face and edge neighbours, METHOD.md); components smaller than a
minimum volume in mm^3 (from the voxel spacing, so anisotropic grids are handled) are dropped; as in the
authors' scripts a component must be strictly larger than the minimum (5 mm^3 drops 5-voxel lesions at 1 mm).
Lesions are numbered 1..K in the order of their first voxel in the array's (x, y, z) C order, which
makes ids stable for the same map.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

CONNECTIVITY_STRUCTURES = {
    6: ndimage.generate_binary_structure(3, 1),
    18: ndimage.generate_binary_structure(3, 2),
    26: ndimage.generate_binary_structure(3, 3),
}

TABLE_COLUMNS = [
    "lesion_id", "voxels", "volume_mm3",
    "centroid_i", "centroid_j", "centroid_k",
    "centroid_r", "centroid_a", "centroid_s",
    "bbox_i_min", "bbox_j_min", "bbox_k_min", "bbox_i_max", "bbox_j_max", "bbox_k_max",
    "max_probability", "mean_probability", "tp_probability",
]
TABLE_NOTE = (
    "centroid_i/j/k: voxel indices (x, y, z, 0-based) of the centre of mass; centroid_r/a/s: its physical "
    "position in mm in RAS (Slicer's convention; ITK/LPS is (-r, -a, s)); bbox: inclusive voxel index bounds; "
    "tp_probability: empty unless computed."
)


def label_instances(binary: np.ndarray, spacing=(1.0, 1.0, 1.0), min_volume_mm3: float = 5.0, connectivity: int = 18) -> np.ndarray:
    """Instance labels 1..K (int32) of a binary (X, Y, Z) map; components of volume <= min_volume_mm3 removed."""
    if connectivity not in CONNECTIVITY_STRUCTURES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    labels, n = ndimage.label(np.asarray(binary, bool), structure=CONNECTIVITY_STRUCTURES[connectivity])
    if n == 0:
        return labels.astype(np.int32)
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # The authors' scripts drop components of <= 5 voxels at 1 mm^3: keep volume > min.
    keep = sizes * voxel_mm3 > min_volume_mm3 * (1 + 1e-9)
    keep[0] = False
    new_ids = np.zeros(n + 1, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


def lesion_table(labels: np.ndarray, reference: sitk.Image, probability: np.ndarray | None = None) -> list[dict]:
    """One row per lesion (see TABLE_COLUMNS and TABLE_NOTE); `reference` gives the geometry."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    spacing = np.array(reference.GetSpacing())
    voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centroids = np.array(ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, ids)).reshape(n, 3)
    objects = ndimage.find_objects(labels, max_label=n)
    if probability is not None:
        pmax = ndimage.maximum(probability, labels, ids)
        pmean = ndimage.mean(probability, labels, ids)
    rows = []
    for idx in range(n):
        lps = reference.TransformContinuousIndexToPhysicalPoint(centroids[idx].tolist())
        sl = objects[idx]
        rows.append({
            "lesion_id": int(ids[idx]),
            "voxels": int(voxels[idx]),
            "volume_mm3": round(float(voxels[idx] * spacing.prod()), 3),
            "centroid_i": round(float(centroids[idx][0]), 2),
            "centroid_j": round(float(centroids[idx][1]), 2),
            "centroid_k": round(float(centroids[idx][2]), 2),
            "centroid_r": round(-lps[0], 2),
            "centroid_a": round(-lps[1], 2),
            "centroid_s": round(lps[2], 2),
            "bbox_i_min": sl[0].start, "bbox_j_min": sl[1].start, "bbox_k_min": sl[2].start,
            "bbox_i_max": sl[0].stop - 1, "bbox_j_max": sl[1].stop - 1, "bbox_k_max": sl[2].stop - 1,
            "max_probability": round(float(pmax[idx]), 4) if probability is not None else None,
            "mean_probability": round(float(pmean[idx]), 4) if probability is not None else None,
            "tp_probability": None,
        })
    return rows


def write_table(rows: list[dict], path: str | os.PathLike) -> Path:
    """The lesion table as CSV, written whole (io.outputs.atomic_write)."""
    from ..io.outputs import atomic_write

    columns = list(TABLE_COLUMNS) + [c for r in rows[:1] for c in r if c not in TABLE_COLUMNS]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

    return atomic_write(path, write)


def read_table(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: list[dict], max_rows: int = 50) -> str:
    """A fixed-width text table for the terminal."""
    cols = [("lesion_id", "id"), ("voxels", "voxels"), ("volume_mm3", "vol_mm3"), ("centroid_r", "R"), ("centroid_a", "A"),
            ("centroid_s", "S"), ("max_probability", "p_max"), ("mean_probability", "p_mean"), ("tp_probability", "tp_prob")]
    lines = [" ".join(f"{h:>8}" for _, h in cols)]
    for r in rows[:max_rows]:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append(f"{'':>8}" if v is None or v == "" else (f"{v:>8.3f}" if isinstance(v, float) else f"{v!s:>8}"))
        lines.append(" ".join(cells))
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more lesions in the CSV")
    lines.append(f"{len(rows)} lesions. Centroids in RAS mm (Slicer's convention).")
    return "\n".join(lines)


# Rings of context around Ω (the context experiment; training's lesion-context patches).
def dilation_steps(omega: np.ndarray, n_steps: int) -> list[np.ndarray]:
    """[Ω, D(Ω), D(D(Ω)), ...]: n_steps + 1 masks, D = binary dilation with the 18-connectivity element."""
    out = [np.asarray(omega, bool)]
    for _ in range(n_steps):
        out.append(ndimage.binary_dilation(out[-1], structure=CONNECTIVITY_STRUCTURES[18]))
    return out
