"""The papers' experiments as functions (METHOD.md, "Sanity checks and experiments").

They reuse the engine: the model and its preprocessing, the saliency functions, the instance
labelling and the lesion-wise evaluation. Each returns plain rows (for CSV) and a summary (for
JSON); the CLI adds progress and the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..segmentation.instances import dilation_steps


# ----------------------------------------------------------------------------- contextual information

def _network_window(model, omega_on_network):
    """The model's roi centred on Ω on the network's grid (the only sliding windows whose output covers Ω's
    neighbourhood), aligned to the network's size divisor as SmoothGrad's patch is."""
    from ..saliency.context import context_box
    from ..saliency.common import _divisor

    return context_box(omega_on_network, "patch", tuple(model.spec.roi_size), _divisor(model, model.spec))


def context_experiment(model, image: np.ndarray, omega: np.ndarray, *, n_steps: int = 34, threshold: float | None = None,
                       spacing=(1.0, 1.0, 1.0), device="auto", batch: int = 8, grid=None, progress=None) -> list[dict]:
    """Zero every network-input voxel except Ω, then restore the original intensities in rings grown by
    18-connected dilation; per step, the mean lesion probability over Ω and whether any voxel of Ω
    exceeds the threshold. The steps run through the network in batches on the model's roi around Ω.

    image: the network input (C, ...) on the network's grid; omega: Ω on the reference grid, where the
    rings are grown; grid (models.grids; default: the reference grid itself) takes Ω and each ring to the
    network's grid. Zero is the value of the z-scored network input (the image mean). Distance of step
    k: k voxels times the mean reference voxel spacing in mm (exact for isotropic grids).
    progress(done, total) counts the steps run through the network.
    """
    import torch

    from ..models.device import resolve_device
    from ..models.grids import SameGrid
    from ..progress import report
    from ..saliency.context import _crop_pad

    grid = grid or SameGrid()
    omega = np.asarray(omega, bool)
    if not omega.any():
        raise InputError("the lesion (Ω) is empty")
    thr = model.spec.threshold if threshold is None else float(threshold)
    dev = resolve_device(device)
    om_net = np.asarray(grid.to_network(omega), bool)
    box = _network_window(model, om_net)
    masks = dilation_steps(omega, n_steps)
    x_full = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    om = _crop_pad(torch.from_numpy(om_net), box)
    net = model.network.to(dev).eval()
    step_mm = float(np.mean(spacing))
    rows = []
    with torch.no_grad():
        for start in range(0, len(masks), batch):
            chunk = masks[start:start + batch]
            report(progress, start, len(masks))
            xs = torch.stack([_crop_pad(x_full * torch.from_numpy(np.asarray(grid.to_network(m), bool))[None], box) for m in chunk]).to(dev)
            prob = model.probability(net(xs)).float().cpu()
            for i, p in enumerate(prob):
                k = start + i
                vals = p[om]
                rows.append({"step": k, "distance_mm": round(k * step_mm, 3), "restored_voxels": int(chunk[i].sum()),
                             "mean_probability": float(vals.mean()), "max_probability": float(vals.max()),
                             "detected": bool((vals > thr).any())})
    report(progress, len(masks), len(masks))
    return rows


def summarize_context(per_lesion: dict, plateau_tol: float = 0.02) -> dict:
    """Across lesions: per-step detected count, mean and SD of the mean probability; the distance from
    which every lesion stays detected, and the plateau distance (the first at which the mean score comes
    within plateau_tol of its maximum over all distances)."""
    ids = list(per_lesion)
    if not ids:
        raise InputError("no lesions in the context experiment")
    n_steps = len(per_lesion[ids[0]])
    steps = []
    for k in range(n_steps):
        scores = np.array([per_lesion[i][k]["mean_probability"] for i in ids])
        steps.append({"step": k, "distance_mm": per_lesion[ids[0]][k]["distance_mm"],
                      "detected": int(sum(per_lesion[i][k]["detected"] for i in ids)),
                      "mean_score": float(scores.mean()), "sd_score": float(scores.std(ddof=1)) if len(ids) > 1 else 0.0})
    all_detected = None
    for k in range(n_steps):
        if all(s["detected"] == len(ids) for s in steps[k:]):
            all_detected = steps[k]["distance_mm"]
            break
    best = max(s["mean_score"] for s in steps)
    plateau = next(s["distance_mm"] for s in steps if s["mean_score"] >= best - plateau_tol)
    return {"n_lesions": len(ids), "steps": steps, "all_detected_from_mm": all_detected, "plateau_mm": plateau,
            "plateau_tolerance": plateau_tol}


def context_figure(summary: dict, path, title: str = "Contextual information"):
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    steps = summary["steps"]
    d = np.array([s["distance_mm"] for s in steps])
    m = np.array([s["mean_score"] for s in steps])
    sd = np.array([s["sd_score"] for s in steps])
    det = np.array([s["detected"] for s in steps])
    fig, ax1 = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax1.plot(d, m, color="tab:red", label="mean lesion probability")
    ax1.fill_between(d, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color="tab:red", alpha=0.2, label="±1 SD")
    ax1.set_xlabel("context restored around the lesion (mm)")
    ax1.set_ylabel("mean probability over the lesion")
    ax1.set_ylim(0, 1.02)
    ax2 = ax1.twinx()
    ax2.step(d, det, where="post", color="tab:blue", label="lesions detected")
    ax2.set_ylabel("lesions detected")
    ax2.set_ylim(0, summary["n_lesions"] * 1.05 + 0.5)
    for key, style in (("all_detected_from_mm", ":"), ("plateau_mm", "--")):
        if summary.get(key) is not None:
            ax1.axvline(summary[key], color="gray", ls=style, lw=1)
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="lower right", fontsize=8)
    ax1.set_title(f"{title} ({summary['n_lesions']} lesions; all detected from {summary['all_detected_from_mm']} mm, "
                  f"plateau {summary['plateau_mm']} mm)", fontsize=9)
    save_figure(fig, path, dpi=110)
    return path


# ----------------------------------------------------------------------------- control regions

def sphere_mask(shape, centre, volume_mm3: float, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels whose centres lie within the sphere of the given volume around `centre` (voxel indices)."""
    r = (3 * volume_mm3 / (4 * math.pi)) ** (1 / 3)
    sp = np.asarray(spacing, float)
    half = np.ceil(r / sp).astype(int) + 1
    c = np.asarray(centre, int)
    lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, shape)
    grid = np.indices(tuple(hi - lo)).reshape(3, -1).T + lo
    inside = grid[(((grid - c) * sp) ** 2).sum(1) <= r * r]
    m = np.zeros(shape, bool)
    m[tuple(inside.T)] = True
    return m


def healthy_white_matter_sphere(white_matter: np.ndarray, avoid: np.ndarray, volume_mm3: float = 93.0, spacing=(1.0, 1.0, 1.0),
                                margin_mm: float = 10.0, seed: int = 0) -> np.ndarray:
    """A sphere of the given volume fully in white matter (probability > 0.9), at least margin_mm from `avoid`."""
    rng = np.random.default_rng(seed)
    r = (3 * volume_mm3 / (4 * math.pi)) ** (1 / 3)
    dist_avoid = ndimage.distance_transform_edt(~np.asarray(avoid, bool), sampling=spacing)
    dist_wm = ndimage.distance_transform_edt(np.asarray(white_matter) > 0.9, sampling=spacing)
    cand = np.argwhere((dist_avoid > r + margin_mm) & (dist_wm > r + 1.0))
    if len(cand) == 0:
        raise InputError("no healthy white matter far enough from the lesions for a control sphere")
    return sphere_mask(white_matter.shape, cand[rng.integers(len(cand))], volume_mm3, spacing)


def map_stats(maps: np.ndarray, omega: np.ndarray, channels=("flair", "mprage")) -> dict:
    """Peak values of each channel's map (max, min, max |.|) and inside-Ω means."""
    out = {}
    for i, c in enumerate(channels):
        m = maps[i]
        out[c] = {"max": float(m.max()), "min": float(m.min()), "max_abs": float(np.abs(m).max()),
                  "mean_in_omega": float(m[omega].mean())}
    return out


def control_regions_figure(flair, reference, regions: dict, maps: dict, path):
    """One row per region: axial slice through Ω's centre, FLAIR map on a colour scale shared by all rows."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    from ..io.volumes import array_from_image

    f = array_from_image(flair)
    flo, fhi = np.percentile(f, [1, 99.5])  # one grey scale for every panel
    vmax = max(float(np.abs(m[0]).max()) for m in maps.values()) or 1.0
    fig, axes = plt.subplots(1, len(regions), figsize=(4.2 * len(regions), 4.4), constrained_layout=True)
    for ax, (name, om) in zip(np.atleast_1d(axes), regions.items()):
        c = np.round(np.argwhere(om).mean(0)).astype(int)
        lo = np.maximum(c - 30, 0)
        sl = (slice(lo[0], c[0] + 30), slice(lo[1], c[1] + 30), c[2])
        ax.imshow(f[sl].T, cmap="gray", origin="lower", vmin=flo, vmax=fhi)
        s = maps[name][0][sl].T
        rgba = plt.get_cmap("RdBu_r")((s + vmax) / (2 * vmax))
        rgba[..., 3] = np.clip(np.abs(s) / (0.05 * vmax), 0, 1) * 0.85
        ax.imshow(rgba, origin="lower")
        if om[sl].any():
            ax.contour(om[sl].T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{name}\nFLAIR peak |map| {np.abs(maps[name][0]).max():.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(plt.cm.ScalarMappable(cmap="RdBu_r", norm=plt.Normalize(-vmax, vmax)), ax=axes, shrink=0.8, label="SmoothGrad (FLAIR)")
    save_figure(fig, path, dpi=110)
    return path


# ----------------------------------------------------------------------------- synthetic lesions

def head_region(image: np.ndarray) -> np.ndarray:
    """Foreground of the case: SimpleITK's Otsu threshold on the channel mean, largest component, holes filled."""
    import SimpleITK as sitk

    mean = np.ascontiguousarray(image.mean(0), dtype=np.float32)
    fg = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.GetImageFromArray(mean), 0, 1)) > 0
    lab, n = ndimage.label(fg)
    if n > 1:
        fg = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2))


def place_copy(source: np.ndarray, allowed: np.ndarray, keep_away: np.ndarray | None, spacing, margin_mm: float = 0.0,
               away_mm: float = 10.0, seed: int = 0) -> np.ndarray:
    """Integer voxel shift that moves `source` (a mask, its exact shape) to where every voxel of it lies
    inside `allowed` (at least margin_mm from its edge) and at least away_mm from every voxel of keep_away."""
    from scipy.signal import correlate

    rng = np.random.default_rng(seed)
    idx = np.argwhere(source)
    lo, hi = idx.min(0), idx.max(0) + 1
    shape = source[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    good = ndimage.distance_transform_edt(allowed, sampling=spacing) > margin_mm
    if keep_away is not None and keep_away.any():
        good &= ndimage.distance_transform_edt(~keep_away, sampling=spacing) > away_mm
    # number of the shape's voxels that land on good voxels, for every corner position
    hits = correlate(good.astype(np.float32), shape, mode="valid", method="fft")
    cand = np.argwhere(hits > shape.sum() - 0.5)
    if len(cand) == 0:
        raise InputError(f"no place for the copy: nowhere does the whole lesion fit inside the target region "
                         f"{margin_mm} mm from its edge and {away_mm} mm from other lesions")
    return cand[rng.integers(len(cand))] - lo


def copy_region(image: np.ndarray, region: np.ndarray, shift) -> tuple[np.ndarray, np.ndarray]:
    """(new image, the copy's voxels): the voxels of `region` (all channels) pasted at region + shift."""
    src = np.argwhere(region)
    dst = src + np.asarray(shift)
    inside = np.all((dst >= 0) & (dst < region.shape), axis=1)
    src, dst = src[inside], dst[inside]
    out = image.copy()
    out[(slice(None),) + tuple(dst.T)] = image[(slice(None),) + tuple(src.T)]
    mask = np.zeros(region.shape, bool)
    mask[tuple(dst.T)] = True
    return out, mask


def synthetic_lesion_figure(cases: dict, path, vmax: float | None = None):
    """One row per case: network-input FLAIR, lesion probability and FLAIR SmoothGrad map, axial slice
    through the copy's centre; maps on one colour scale."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    vmax = vmax or max(float(np.abs(c["map"]).max()) for c in cases.values()) or 1.0
    fig, axes = plt.subplots(len(cases), 3, figsize=(10, 3.3 * len(cases)), constrained_layout=True, squeeze=False)
    for row, (name, c) in zip(axes, cases.items()):
        om = c["omega"]
        ctr = np.round(np.argwhere(om).mean(0)).astype(int)
        lo = np.maximum(ctr - 28, 0)
        sl = (slice(lo[0], ctr[0] + 28), slice(lo[1], ctr[1] + 28), ctr[2])
        row[0].imshow(c["flair"][sl].T, cmap="gray", origin="lower", vmin=-2, vmax=4)
        row[1].imshow(c["probability"][sl].T, cmap="magma", origin="lower", vmin=0, vmax=1)
        row[2].imshow(c["map"][sl].T, cmap="RdBu_r", origin="lower", vmin=-vmax, vmax=vmax)
        for ax in row:
            ax.contour(om[sl].T.astype(float), levels=[0.5], colors="lime", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=9)
        row[1].set_title(f"max probability {c['max_probability']:.2f}" + (" (segmented)" if c["detected"] else " (not segmented)"), fontsize=9)
        row[2].set_title(f"FLAIR map peaks {c['map'].max():.3g} / {c['map'].min():.3g}", fontsize=9)
    axes[0][0].set_title("network input (FLAIR)", fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(cmap="RdBu_r", norm=plt.Normalize(-vmax, vmax)), ax=axes[:, 2], shrink=0.6, label="SmoothGrad (FLAIR)")
    save_figure(fig, path, dpi=100)
    return path


# ----------------------------------------------------------------------------- peak statistics

def tn_spheres(region: np.ndarray, occupied: np.ndarray, volume_mm3: float, n: int = 10, spacing=(1.0, 1.0, 1.0), seed: int = 0) -> list[np.ndarray]:
    """n spheres of the given volume inside `region` (the head) that touch neither `occupied` (GT and
    predicted lesions) nor each other."""
    rng = np.random.default_rng(seed)
    r = (3 * volume_mm3 / (4 * math.pi)) ** (1 / 3)
    taken = np.asarray(occupied, bool).copy()
    inside = ndimage.distance_transform_edt(region, sampling=spacing) > r + 1.0
    spheres = []
    for _ in range(n):
        free = inside & (ndimage.distance_transform_edt(~taken, sampling=spacing) > r + 1.0)
        cand = np.argwhere(free)
        if len(cand) == 0:
            raise InputError(f"room for only {len(spheres)} TN spheres of {volume_mm3:.0f} mm^3")
        s = sphere_mask(region.shape, cand[rng.integers(len(cand))], volume_mm3, spacing)
        spheres.append(s)
        taken |= s
    return spheres


def median_ci(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Median with a 95% percentile bootstrap interval."""
    v = np.asarray(values, float)
    if v.size == 0:
        return {"n": 0, "median": None, "ci95": [None, None]}
    rng = np.random.default_rng(seed)
    boots = np.median(v[rng.integers(0, v.size, (n_boot, v.size))], axis=1)
    return {"n": int(v.size), "median": float(np.median(v)), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def pairwise_mannwhitney(groups: dict) -> dict:
    """Two-sided Mann-Whitney U (scipy) for every pair of non-empty groups: {"A vs B": {"U": .., "p": ..}}."""
    from itertools import combinations

    from scipy.stats import mannwhitneyu

    out = {}
    for a, b in combinations([g for g in groups if len(groups[g])], 2):
        res = mannwhitneyu(groups[a], groups[b], alternative="two-sided")
        out[f"{a} vs {b}"] = {"U": float(res.statistic), "p": float(res.pvalue)}
    return out


def modality_contribution(maps: np.ndarray, omega: np.ndarray, channels=("flair", "mprage"), ring_voxels: int = 3, cut: float = 0.1) -> dict:
    """Per channel, inside Ω and in its ring of `ring_voxels` 18-connected dilations: the mean of the
    positive and of the negative values, ignoring |value| < cut (the paper's cut)."""
    ring = dilation_steps(omega, ring_voxels)[-1] & ~omega
    out = {}
    for i, c in enumerate(channels):
        for where, m in (("inside", omega), ("ring", ring)):
            v = maps[i][m]
            pos, neg = v[v >= cut], v[v <= -cut]
            out[f"{c}_{where}_positive"] = float(pos.mean()) if pos.size else 0.0
            out[f"{c}_{where}_negative"] = float(neg.mean()) if neg.size else 0.0
    return out


def peaks_figures(rows: list[dict], violin_path, box_path, groups=("TN", "FN", "FP", "TP")):
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    present = [g for g in groups if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "flair_max", "positive peak (max)"), (axes[1], "flair_min", "negative peak (min)")):
        data = [[r[key] for r in rows if r["group"] == g] for g in present]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks(range(1, len(present) + 1))
        ax.set_xticklabels([f"{g}\n(n={len(d)})" for g, d in zip(present, data)])
        ax.set_title(f"FLAIR SmoothGrad {title}")
    save_figure(fig, violin_path, dpi=110)
    keys = [k for k in rows[0] if k.startswith(("flair_inside", "flair_ring", "mprage_inside", "mprage_ring"))]
    fig, ax = plt.subplots(figsize=(11, 4), constrained_layout=True)
    ax.boxplot([[r[k] for r in rows if r["group"] in ("TP", "FP", "FN")] for k in keys], showfliers=False)
    ax.set_xticks(range(1, len(keys) + 1))
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title("FLAIR vs MPRAGE contribution inside the lesion and in its 3-voxel ring (|value| >= 0.1; TP, FP, FN)")
    save_figure(fig, box_path, dpi=110)


# ----------------------------------------------------------------------------- the reference grid and the network's

# Every region of the experiments (lesions, copies, rings, spheres) and every map they report lies on the
# reference grid, where the labels, the ground truth and the white-matter map are. The network may run
# on another grid (a target spacing or orientation, nnU-Net's transposed and resampled array, LST-AI's
# crop): regions go there with prepared.to_network and arrays come back with prepared.to_reference, as
# `explain` does (saliency.explain.explain_case). On the reference grid itself both are the identity.

def reference_input(prepared) -> np.ndarray:
    """The network input (C, X, Y, Z) on the reference grid (itself when the network runs there)."""
    return np.stack([prepared.to_reference(c) for c in prepared.image])


def network_coverage(prepared) -> np.ndarray:
    """(X, Y, Z) bool on the reference grid: where the network's input lies (everywhere unless the
    network's grid is a crop, as LST-AI's and nnU-Net's are): regions are placed only where it sees them."""
    return prepared.to_reference(np.ones(prepared.image.shape[1:], np.float32)) > 0.5


def smoothgrad_on_reference(model, prepared, omega: np.ndarray, image: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """SmoothGrad (C, X, Y, Z) on the reference grid of Ω (reference grid), computed on the network's grid
    of `image` (default: the case's network input) by explain_case."""
    from dataclasses import replace

    from ..saliency.explain import explain_case

    case = prepared if image is None else replace(prepared, image=image)
    exp = explain_case(model, case, omega, "smoothgrad", **kwargs)
    return np.stack([exp.maps[c] for c in prepared.channels])


def probability_on_reference(model, prepared, image: np.ndarray, device="auto", progress=None) -> np.ndarray:
    """The lesion probability on the reference grid of a (modified) network input, as the model's format
    brings its prediction back (model.predict_case)."""
    from dataclasses import replace

    return model.predict_case(replace(prepared, image=image), device=device, progress=progress)


def network_shift(prepared, shift) -> np.ndarray:
    """The integer voxel shift on the network's grid with the physical displacement of `shift` reference
    voxels (rounded to whole network voxels)."""
    shift = np.asarray(shift, float)
    grid = prepared.grid
    if getattr(grid, "same", False) or hasattr(grid, "lo"):  # the reference grid itself, or a crop of it (LST-AI)
        return np.round(shift).astype(int)
    if hasattr(grid, "network"):  # ResampledGrid: a sitk geometry
        ref, net = grid.reference, grid.network
        physical = np.reshape(ref.GetDirection(), (3, 3)) @ (shift * np.array(ref.GetSpacing()))
        to_index = np.linalg.inv(np.reshape(net.GetDirection(), (3, 3)) @ np.diag(net.GetSpacing()))
        return np.round(to_index @ physical).astype(int)
    if hasattr(grid, "transpose_forward"):  # nnU-Net: (x, y, z) -> (z, y, x), transposed, resampled by new/old voxels per axis
        zyx = shift[::-1][list(grid.transpose_forward)]
        n = np.array(grid.shape_after_cropping, float)
        new = np.array([round(a / b * m) for a, b, m in zip(grid.spacing, grid.target_spacing, n)], float)
        return np.round(zyx * new / n).astype(int)
    raise InputError(f"the experiments cannot move a region on {grid.describe()}")


# ----------------------------------------------------------------------------- experiment runners (Python API)

@dataclass
class Case:
    """A segmented case with its ground truth (and, when known, a white-matter map and a head mask), all
    on the reference grid."""

    name: str
    result: object  # pipeline.SegmentationResult
    gt: np.ndarray
    white_matter: np.ndarray | None = None
    head: np.ndarray | None = None  # None: the foreground of the network input (head_region)


@dataclass
class CaseFiles:
    """One case's files, read and checked before anything is segmented."""

    name: str
    flair: object  # sitk.Image
    mprage: object | None
    gt: np.ndarray
    reference: object  # the grid the ground truth (and a white-matter map) must be on: the MPRAGE's, else the FLAIR's
    white_matter: np.ndarray | None = None
    derive_white_matter: bool = False  # needed and not given: derive_case_anatomy makes it from the MPRAGE
    anatomy: object | None = None  # research.anatomy.Anatomy, once derived


def read_case_files(flair, mprage, gt, wm=None, *, need_wm=False) -> CaseFiles:
    """The images, the ground truth and the white-matter map, read and checked (readable, on the
    reference grid): seconds, before the model runs. need_wm: the experiment places a region in white
    matter (white_matter_for decides what happens without --wm)."""
    from pathlib import Path

    from ..io.volumes import mask_from_image, read_image, same_grid

    if not gt:
        raise InputError("with files, give --gt (the experiments choose TP lesions from the ground truth)")
    flair_img = read_image(flair, "FLAIR")
    mprage_img = read_image(mprage, "MPRAGE") if mprage else None
    reference = mprage_img if mprage_img is not None else flair_img
    grid_name = "MPRAGE" if mprage_img is not None else "FLAIR"
    img = read_image(gt, "ground truth")
    if not same_grid(img, reference):
        raise InputError(f"the ground truth {gt} is not on the {grid_name} grid ({'x'.join(map(str, img.GetSize()))} voxels of "
                         f"{', '.join(f'{v:g}' for v in img.GetSpacing())} mm vs {'x'.join(map(str, reference.GetSize()))} of "
                         f"{', '.join(f'{v:g}' for v in reference.GetSpacing())} mm, or another origin or direction)")
    gt_mask = mask_from_image(img)  # every non-zero voxel is lesion (a cast would lose labels of 256 or 0.5)
    files = CaseFiles(Path(flair).name.split(".")[0], flair_img, mprage_img, gt_mask, reference)
    if wm or need_wm:
        files.white_matter = white_matter_for(files, wm)
        files.derive_white_matter = files.white_matter is None
    return files


def white_matter_for(case_files: CaseFiles, wm_path) -> np.ndarray | None:
    """The white-matter map of a case given by files: the user's --wm (checked to be on the reference
    grid). The one place that decides what happens without one: None when it can be derived from the
    MPRAGE (derive_case_anatomy, the registration's seconds, once the model has loaded), else a refusal,
    before any work."""
    from ..io.volumes import array_from_image, read_image, same_grid
    from .anatomy import checked_mprage

    if not wm_path:
        if case_files.mprage is None:
            raise InputError("this experiment places a region in healthy white matter, which msis derives from an MPRAGE: give "
                             "--mprage, or --wm, a white-matter mask or probability map on the FLAIR grid")
        checked_mprage(case_files.mprage)
        return None
    img = read_image(wm_path, "white-matter map")
    if not same_grid(img, case_files.reference):
        raise InputError(f"the white-matter map {wm_path} is not on the {'MPRAGE' if case_files.mprage is not None else 'FLAIR'} grid")
    return array_from_image(img)


def derive_case_anatomy(files: CaseFiles, progress=None):
    """The white matter (and head mask) of a case that needs one and has no --wm, derived from its MPRAGE by
    registering the MNI template (research.anatomy; progress(done, total)). Returns the Anatomy: its
    quality warning is the caller's to show, its maps are the caller's to write (write_anatomy)."""
    from .anatomy import derive_anatomy

    files.anatomy = derive_anatomy(files.mprage, progress)
    files.white_matter = files.anatomy.white_matter
    return files.anatomy


def segment_case_files(model, files: CaseFiles, *, device="auto", progress=None) -> Case:
    """Segment a checked case (progress: a factory, label -> progress callback). A derived anatomy gives
    the case its head mask too."""
    from ..segmentation.pipeline import segment

    if files.derive_white_matter and files.anatomy is None:
        derive_case_anatomy(files, progress(f"{files.name}: white matter from the MNI template") if progress else None)
    res = segment(files.flair, files.mprage, model, device=device, progress=progress(f"{files.name}: segmenting windows") if progress else None)
    head = files.anatomy.head_mask if files.anatomy is not None else None
    return Case(files.name, res, files.gt, files.white_matter, head)


def file_case(model, flair, mprage, gt, wm=None, device="auto", progress=None) -> Case:
    return segment_case_files(model, read_case_files(flair, mprage, gt, wm), device=device, progress=progress)


def phantom_cases(model, patients, device="auto", voxel_size: float = 1.0, progress=None):
    """Validation phantoms (seed 10000 + 100 * patient) with isotropic voxel_size mm voxels, segmented,
    one at a time. The experiments' sizes in mm (spheres, rings, distances) use the grid's spacing."""
    from .phantom import make_phantom
    from ..segmentation.pipeline import segment
    from .training import validation_seed
    from ..io.volumes import array_from_image, mask_from_image

    for pt in patients:
        ph = make_phantom(validation_seed(pt), patient=pt, voxel_size=voxel_size)
        name = f"phantom_p{int(pt):02d}"
        res = segment(ph.flair, ph.mprage, model, device=device, progress=progress(f"{name}: segmenting windows") if progress else None)
        yield Case(name, res, mask_from_image(ph.lesions), array_from_image(ph.white_matter))


def _noop(*_a, **_k):
    return None


def _head(case: Case) -> np.ndarray:
    """The case's head on the reference grid: its own mask when it has one, else the network input's foreground."""
    return case.head if case.head is not None else head_region(reference_input(case.result.prepared))


def run_context(model, cases, size_range=(90, 120), *, n_steps=34, device="auto", progress=None, warn=None) -> tuple[list, dict]:
    """The contextual-information experiment over the TP lesions of size_range voxels of the cases."""
    rows = []
    for case in cases:
        rows += context_rows(model, case, size_range, n_steps=n_steps, device=device, progress=progress, warn=warn)
    return rows, context_summary(rows, size_range)


def context_rows(model, case: Case, size_range=(90, 120), *, n_steps=34, device="auto", progress=None, warn=None) -> list[dict]:
    """One case's rows of the contextual-information experiment: a row per TP lesion of size_range voxels and step."""
    from ..segmentation.evaluation import classify_lesions

    warn = warn or _noop
    lo, hi = size_range
    res = case.result
    sizes = {r["lesion_id"]: r["voxels"] for r in res.table}
    chosen = [i for i in classify_lesions(res.labels, case.gt)["tp"] if lo <= sizes[i] <= hi]
    bar = progress(f"{case.name}: {len(chosen)} TP lesions of {lo}-{hi} voxels, {n_steps + 1} rings each") if progress else None
    rows = []
    for n, lid in enumerate(chosen):
        def rings(done, total, n=n):  # one bar over all the case's lesions and rings
            if bar:
                bar(n * total + done, len(chosen) * total)
        try:
            steps = context_experiment(model, res.prepared.image, res.labels == lid, n_steps=n_steps, spacing=res.prepared.spacing,
                                       device=device, grid=res.prepared.grid, progress=rings)
        except Exception as exc:  # one lesion failing is reported, not fatal
            warn(f"{case.name} lesion {lid}: {exc}")
            continue
        rows += [{"case": case.name, "lesion_id": int(lid), "voxels": int(sizes[lid]), **s} for s in steps]
    return rows


def context_summary(rows: list[dict], size_range=(90, 120)) -> dict:
    """summarize_context over the rows of any number of cases (context_rows)."""
    per_lesion = {}
    for r in rows:
        per_lesion.setdefault(f"{r['case']}/{r['lesion_id']}", []).append({k: v for k, v in r.items() if k not in ("case", "lesion_id", "voxels")})
    if not per_lesion:
        raise InputError(f"no TP lesion of {size_range[0]}-{size_range[1]} voxels in these cases; widen the size range or add cases")
    return summarize_context(per_lesion)


def _tp_lesion(case: Case, lesion_id, max_voxels, min_max_probability=0.0):
    from ..segmentation.evaluation import classify_lesions

    tps = classify_lesions(case.result.labels, case.gt)["tp"]
    rows = {r["lesion_id"]: r for r in case.result.table}
    if lesion_id:
        n = len(rows)
        if lesion_id not in rows:
            raise InputError(f"lesion {lesion_id} does not exist: {case.name} has {n} lesions (ids 1..{n}); TPs: {sorted(tps)[:20]}")
        if lesion_id not in tps:
            raise InputError(f"lesion {lesion_id} is not a true positive of {case.name} (TPs: {sorted(tps)[:20]})")
        return lesion_id
    ok = [i for i in tps if rows[i]["voxels"] <= max_voxels and rows[i]["max_probability"] >= min_max_probability]
    if not ok:
        raise InputError(f"no TP lesion of at most {max_voxels} voxels (max probability >= {min_max_probability}) in {case.name}; "
                         "choose a lesion or raise the size cap")
    return max(ok, key=lambda i: rows[i]["voxels"])


def _need_white_matter(case: Case, what: str) -> None:
    if case.white_matter is None:
        raise InputError(f"a white-matter map is needed to {what}: pass --wm")


CONTROL_REGIONS_PAPER = "healthy-WM saliency about 5x smaller than for TPs; one-voxel map concentrated near the voxel, inside the lesion"


def control_regions(case: Case, *, lesion_id=None, max_voxels=300, seed=0) -> tuple[int, dict]:
    """(TP lesion id, {"tp_lesion", "wm_sphere_93mm3", "single_voxel_at_tp_centre": masks}): a TP lesion,
    a 93 mm^3 healthy white-matter sphere (where the network sees it) and the single voxel at the
    lesion's centre of mass, on the reference grid."""
    _need_white_matter(case, "place the healthy control sphere")
    res = case.result
    lid = _tp_lesion(case, lesion_id, max_voxels)
    lesion = res.labels == lid
    one = np.zeros_like(lesion)
    one[tuple(np.round(np.argwhere(lesion).mean(0)).astype(int))] = True
    wm = np.where(network_coverage(res.prepared), case.white_matter, 0)
    sphere = healthy_white_matter_sphere(wm, (res.labels > 0) | (case.gt > 0), 93.0, res.prepared.spacing, seed=seed)
    return lid, {"tp_lesion": lesion, "wm_sphere_93mm3": sphere, "single_voxel_at_tp_centre": one}


def run_control_regions(model, case: Case, *, lesion_id=None, max_voxels=300, n_samples=50, seed=0, device="auto", progress=None,
                        max_omega_voxels=None):
    """SmoothGrad of the control regions (control_regions). Returns (rows, summary, regions, maps), maps on the reference grid.
    max_omega_voxels: the max over at most this many voxels of each region (explain's option; default all)."""
    res = case.result
    lid, regions = control_regions(case, lesion_id=lesion_id, max_voxels=max_voxels, seed=seed)
    lesion, one = regions["tp_lesion"], regions["single_voxel_at_tp_centre"]
    maps, rows = {}, []
    for region, om in regions.items():
        maps[region] = smoothgrad_on_reference(model, res.prepared, om, n_samples=n_samples, seed=seed, device=device, max_omega_voxels=max_omega_voxels,
                                               progress=progress(f"SmoothGrad {region}") if progress else None)
        rows += [{"case": case.name, "region": region, "voxels": int(om.sum()), "channel": c, **v}
                 for c, v in map_stats(maps[region], om, res.prepared.channels).items()]
    peak = {r["region"]: r["max_abs"] for r in rows if r["channel"] == "flair"}
    sv = np.abs(maps["single_voxel_at_tp_centre"][res.prepared.channels.index("flair")])
    near = dilation_steps(one, 3)[-1]
    summary = {"case": case.name, "lesion_id": int(lid), "samples": n_samples, "flair_peak": peak,
               "tp_over_wm_peak_ratio": peak["tp_lesion"] / peak["wm_sphere_93mm3"] if peak["wm_sphere_93mm3"] else None,
               "single_voxel_map_share_inside_lesion": float(sv[lesion].sum() / sv.sum()) if sv.sum() else None,
               "single_voxel_map_share_within_3_voxels": float(sv[near].sum() / sv.sum()) if sv.sum() else None,
               "paper": CONTROL_REGIONS_PAPER}
    return rows, summary, regions, maps


def run_synthetic_lesion(model, case: Case, *, lesion_id=None, max_voxels=300, n_samples=50, seed=0, device="auto", progress=None,
                         max_omega_voxels=None):
    """Copy a clearly visible TP lesion (both channels of the network input) into (a) healthy white matter
    10 mm from other lesions, (b) the background outside the head, (c) the background together with its
    3 mm surroundings; segment each and compute the copy's SmoothGrad map. Returns (rows, summary, panels).

    The copies are placed on the reference grid (a shift in its voxels) where the network sees them; the
    network input is changed on the network's grid by the same physical displacement (network_shift),
    and its probability and map are brought back to the reference grid."""
    from ..segmentation.instances import label_instances

    _need_white_matter(case, "place the copy in healthy white matter")
    res = case.result
    prepared = res.prepared
    lid = _tp_lesion(case, lesion_id, max_voxels, min_max_probability=0.9)
    sp, img = prepared.spacing, prepared.image
    lesion = res.labels == lid
    occupied = (res.labels > 0) | (case.gt > 0)
    seen = network_coverage(prepared)
    outside = ~ndimage.binary_dilation(_head(case), iterations=2) & seen
    ring3 = ndimage.distance_transform_edt(~lesion, sampling=sp) <= 3.0
    shift_wm = place_copy(lesion, (case.white_matter > 0.5) & seen, occupied, sp, margin_mm=0.0, away_mm=10.0, seed=seed)
    # the lesion and its 3 mm ring go where they are 2 mm clear of the head
    shift_bg = place_copy(ring3, outside, None, sp, margin_mm=2.0, away_mm=0.0, seed=seed)

    def copied(region, shift):
        """The network input with `region` (reference grid) copied by `shift` reference voxels, on the network's grid."""
        return copy_region(img, prepared.to_network(region), network_shift(prepared, shift))[0]

    def moved(region, shift):
        return copy_region(np.zeros((1,) + region.shape, np.float32), region, shift)[1]

    variants = {
        "original": (img, lesion),
        "a_white_matter": (copied(lesion, shift_wm), moved(lesion, shift_wm)),
        "b_background": (copied(lesion, shift_bg), moved(lesion, shift_bg)),
        "c_background_with_3mm": (copied(ring3, shift_bg), moved(lesion, shift_bg)),
    }
    flair = prepared.channels.index("flair")
    thr = model.spec.threshold
    panels, rows = {}, []
    for name, (image, omega) in variants.items():
        prob = probability_on_reference(model, prepared, image, device=device, progress=progress(f"segmenting {name}") if progress else None)
        maps = smoothgrad_on_reference(model, prepared, omega, image=image, n_samples=n_samples, seed=seed, device=device,
                                       max_omega_voxels=max_omega_voxels,
                                       progress=progress(f"SmoothGrad {name}") if progress else None)
        # segmented = a lesion instance of the usual post-processing (threshold, 18-connectivity, minimum volume) touches the copy
        inst = label_instances(prob > thr, spacing=sp, min_volume_mm3=model.spec.min_lesion_mm3)
        fl = maps[flair]
        c = {"detected": bool((inst[omega] > 0).any()), "any_voxel_above_threshold": bool((prob[omega] > thr).any()),
             "voxels_above_threshold": int((prob[omega] > thr).sum()), "mean_probability": float(prob[omega].mean()),
             "max_probability": float(prob[omega].max()), "map_max": float(fl.max()), "map_min": float(fl.min()),
             "map_max_abs": float(np.abs(fl).max())}
        rows.append({"case": case.name, "lesion_id": int(lid), "variant": name, "voxels": int(omega.sum()), **c})
        panels[name] = {**c, "omega": omega, "probability": prob, "map": fl, "flair": prepared.to_reference(image[flair])}
    by = {r["variant"]: r for r in rows}
    checks = {
        "a_segmented": by["a_white_matter"]["detected"],
        "b_not_segmented": not by["b_background"]["detected"],
        "c_not_segmented": not by["c_background_with_3mm"]["detected"],
        "c_higher_peak_than_b": by["c_background_with_3mm"]["map_max_abs"] > by["b_background"]["map_max_abs"],
    }
    summary = {"case": case.name, "lesion_id": int(lid), "samples": n_samples, "shift_white_matter": shift_wm.tolist(),
               "shift_background": shift_bg.tolist(), "results": by, "paper_expectation_met": checks}
    return rows, summary, panels


CONTROL_REGION_MEASURES = ("tp_over_wm_peak_ratio", "single_voxel_map_share_inside_lesion", "single_voxel_map_share_within_3_voxels")


def control_regions_set_summary(per_case: list[dict]) -> dict:
    """The control regions over a set of cases (one run_control_regions summary each): the median of each measure with its CI."""
    return {"n_cases": len(per_case),
            "medians": {k: median_ci([s[k] for s in per_case if s.get(k) is not None]) for k in CONTROL_REGION_MEASURES},
            "paper": CONTROL_REGIONS_PAPER,
            "cases": per_case}


def synthetic_lesion_set_summary(per_case: list[dict]) -> dict:
    """The synthetic-lesion check over a set of cases (one run_synthetic_lesion summary each): in how many cases each of the
    paper's expectations holds."""
    checks = list(per_case[0]["paper_expectation_met"]) if per_case else []
    met = {k: sum(bool(s["paper_expectation_met"][k]) for s in per_case) for k in checks}
    return {"n_cases": len(per_case), "expectation_met_in_cases": met,
            "share_of_cases": {k: met[k] / len(per_case) for k in checks}, "cases": per_case}


def sanity_set_figure(name: str, summary: dict, path):
    """The whole set at a glance: the control regions' FLAIR peaks per case, or the share of cases meeting each expectation."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    if name == "control_regions":
        regions = ("tp_lesion", "wm_sphere_93mm3", "single_voxel_at_tp_centre")
        for s in summary["cases"]:
            ax.plot(range(len(regions)), [s["flair_peak"][r] for r in regions], "o-", alpha=0.6, label=s["case"])
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels(["TP lesion", "healthy WM sphere", "one voxel at the TP's centre"])
        ax.set_ylabel("FLAIR |SmoothGrad| peak")
        ax.set_title(f"Control regions, {summary['n_cases']} cases")
        if summary["n_cases"] <= 12:
            ax.legend(fontsize=7)
    else:
        share = summary["share_of_cases"]
        ax.bar(range(len(share)), [100 * v for v in share.values()])
        ax.set_xticks(range(len(share)))
        ax.set_xticklabels([k.replace("_", " ") for k in share], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of cases")
        ax.set_title(f"Synthetic lesion: the paper's expectations, {summary['n_cases']} cases")
    save_figure(fig, path, dpi=110)


PAPER_MEDIAN_POSITIVE_PEAK = {"TN": 0.465, "FN": 1.202, "FP": 1.630, "TP": 1.997}


def run_peaks(model, cases, *, n_samples=50, seed=0, max_per_group=None, tn_volume_mm3=None, device="auto", progress=None, warn=None,
              max_omega_voxels=None, tn_per_case=10):
    """SmoothGrad peaks of TP, FP, FN lesions and tn_per_case TN spheres per case (the paper's ten), their medians with CIs, pairwise
    Mann-Whitney U, and the FLAIR vs MPRAGE contribution (FLAIR only for a FLAIR-only model). Regions and
    maps on the reference grid. Returns (rows, summary)."""
    cases = list(cases)
    tn_volume = tn_volume_mm3 or mean_lesion_volume([v for c in cases for v in gt_lesion_volumes(c.gt, c.result.prepared.spacing)])
    rows = []
    for case in cases:
        rows += peaks_rows(model, case, tn_volume, n_samples=n_samples, seed=seed, max_per_group=max_per_group, device=device,
                           progress=progress, warn=warn, max_omega_voxels=max_omega_voxels, tn_per_case=tn_per_case)
    return rows, peaks_summary(rows, n_samples, tn_volume, [c.name for c in cases])


def gt_lesion_volumes(gt: np.ndarray, spacing) -> list[float]:
    """The volumes in mm^3 of the ground truth's lesions (18-connected, as classify_lesions counts them)."""
    from ..segmentation.instances import label_instances

    labels = label_instances(np.asarray(gt) != 0, min_volume_mm3=0.0, connectivity=18)
    return [float(v) * float(np.prod(spacing)) for v in np.bincount(labels.ravel())[1:]]


def mean_lesion_volume(volumes) -> float:
    """The TN spheres' default volume: the mean ground-truth lesion volume of the whole set (93 mm^3 without lesions)."""
    return float(np.mean(volumes)) if len(volumes) else 93.0


def peaks_rows(model, case: Case, tn_volume_mm3: float, *, n_samples=50, seed=0, max_per_group=None, device="auto", progress=None,
               warn=None, max_omega_voxels=None, tn_per_case=10) -> list[dict]:
    """One case's rows of run_peaks: its TP, FP, FN lesions (at most max_per_group of each, seeded) and TN spheres of tn_volume_mm3."""
    from ..segmentation.evaluation import classify_lesions

    warn = warn or _noop
    res = case.result
    cat = classify_lesions(res.labels, case.gt)
    rng = np.random.default_rng(seed)

    def pick(ids):
        return sorted(rng.choice(ids, size=max_per_group, replace=False).tolist()) if max_per_group and len(ids) > max_per_group else list(ids)

    regions = [("TP", i, res.labels == i) for i in pick(cat["tp"])] + [("FP", i, res.labels == i) for i in pick(cat["fp"])]
    regions += [("FN", i, cat["gt_labels"] == i) for i in pick(cat["fn"])]
    try:
        head = _head(case) & network_coverage(res.prepared)
        spheres = tn_spheres(head, (res.labels > 0) | (case.gt > 0), tn_volume_mm3, tn_per_case, res.prepared.spacing, seed=seed)
        regions += [("TN", k + 1, s) for k, s in enumerate(spheres)]
    except InputError as exc:
        warn(f"{case.name}: {exc}")
    bar = progress(f"{case.name}: SmoothGrad of {len(regions)} regions") if progress else None
    ch = res.prepared.channels
    rows = []
    for n, (group, rid, om) in enumerate(regions):
        try:
            maps = smoothgrad_on_reference(model, res.prepared, om, n_samples=n_samples, seed=seed, device=device,
                                           max_omega_voxels=max_omega_voxels)
        except Exception as exc:  # one region failing is reported, not fatal
            warn(f"{case.name} {group} {rid}: {exc}")
            continue
        peaks = {f"{c}_{k}": float(getattr(maps[ch.index(c)], k)()) for c in ("flair", "mprage") if c in ch for k in ("max", "min")}
        rows.append({"case": case.name, "group": group, "region_id": int(rid), "voxels": int(om.sum()), **peaks,
                     **modality_contribution(maps, om, ch)})
        if bar:
            bar(n + 1, len(regions))
    return rows


def peaks_summary(rows: list[dict], n_samples: int, tn_volume_mm3: float, case_names: list) -> dict:
    """The whole set's statistics of run_peaks' rows: medians with CIs per group, pairwise Mann-Whitney U."""
    if not rows:
        raise InputError("no region could be analysed")
    groups = ("TN", "FN", "FP", "TP")
    return {"samples": n_samples, "tn_volume_mm3": tn_volume_mm3, "cases": list(case_names),
            "medians_positive_peak": {g: median_ci([r["flair_max"] for r in rows if r["group"] == g]) for g in groups},
            "medians_negative_peak": {g: median_ci([r["flair_min"] for r in rows if r["group"] == g]) for g in groups},
            "mannwhitney_positive_peak": pairwise_mannwhitney({g: [r["flair_max"] for r in rows if r["group"] == g] for g in groups}),
            "mannwhitney_negative_peak": pairwise_mannwhitney({g: [r["flair_min"] for r in rows if r["group"] == g] for g in groups}),
            "paper_medians_positive_peak": PAPER_MEDIAN_POSITIVE_PEAK}
