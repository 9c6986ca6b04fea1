"""The papers' experiments as functions (METHOD.md, "Sanity checks and experiments").

They reuse the engine: the model and its preprocessing, the saliency functions, the instance
labelling and the lesion-wise evaluation. Each returns plain rows (for CSV) and a summary (for
JSON); the CLI adds progress and the figures.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError
from .instances import CONNECTIVITY_STRUCTURES

STRUCT18 = CONNECTIVITY_STRUCTURES[18]


# ----------------------------------------------------------------------------- contextual information

def dilation_steps(omega: np.ndarray, n_steps: int) -> list[np.ndarray]:
    """[Ω, D(Ω), D(D(Ω)), ...]: n_steps + 1 masks, D = binary dilation with the 18-connectivity element."""
    out = [np.asarray(omega, bool)]
    for _ in range(n_steps):
        out.append(ndimage.binary_dilation(out[-1], structure=STRUCT18))
    return out


def _network_window(model, omega):
    """The model's roi centred on Ω (the only sliding windows whose output covers Ω's neighbourhood)."""
    from .saliency import context_box, size_divisor

    return context_box(omega, "patch", tuple(model.spec.roi_size), size_divisor(model.spec))


def context_experiment(model, image: np.ndarray, omega: np.ndarray, *, n_steps: int = 34, threshold: float | None = None,
                       spacing=(1.0, 1.0, 1.0), device="auto", batch: int = 8) -> list[dict]:
    """Zero every network-input voxel except Ω, then restore the original intensities in rings grown by
    18-connected dilation; per step, the mean lesion probability over Ω and whether any voxel of Ω
    exceeds the threshold. The steps run through the network in batches on the model's roi around Ω.

    Zero is the value of the z-scored network input (the image mean). Distance of step k: k voxels
    times the mean voxel spacing in mm (exact for isotropic grids).
    """
    import torch

    from .model import resolve_device
    from .saliency import _crop_pad

    omega = np.asarray(omega, bool)
    if not omega.any():
        raise InputError("the lesion (Ω) is empty")
    thr = model.spec.threshold if threshold is None else float(threshold)
    dev = resolve_device(device)
    box = _network_window(model, omega)
    masks = dilation_steps(omega, n_steps)
    x_full = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    om = _crop_pad(torch.from_numpy(omega), box)
    net = model.network.to(dev).eval()
    step_mm = float(np.mean(spacing))
    rows = []
    with torch.no_grad():
        for start in range(0, len(masks), batch):
            chunk = masks[start:start + batch]
            xs = torch.stack([_crop_pad(x_full * torch.from_numpy(m)[None], box) for m in chunk]).to(dev)
            prob = torch.softmax(net(xs), dim=1)[:, model.spec.lesion_class].cpu()
            for i, p in enumerate(prob):
                k = start + i
                vals = p[om]
                rows.append({"step": k, "distance_mm": round(k * step_mm, 3), "restored_voxels": int(chunk[i].sum()),
                             "mean_probability": float(vals.mean()), "max_probability": float(vals.max()),
                             "detected": bool((vals > thr).any())})
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .volumes import array_from_image

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
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    present = [g for g in groups if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "flair_max", "positive peak (max)"), (axes[1], "flair_min", "negative peak (min)")):
        data = [[r[key] for r in rows if r["group"] == g] for g in present]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks(range(1, len(present) + 1))
        ax.set_xticklabels([f"{g}\n(n={len(d)})" for g, d in zip(present, data)])
        ax.set_title(f"FLAIR SmoothGrad {title}")
    fig.savefig(str(violin_path), dpi=110)
    plt.close(fig)
    keys = [k for k in rows[0] if k.startswith(("flair_inside", "flair_ring", "mprage_inside", "mprage_ring"))]
    fig, ax = plt.subplots(figsize=(11, 4), constrained_layout=True)
    ax.boxplot([[r[k] for r in rows if r["group"] in ("TP", "FP", "FN")] for k in keys], showfliers=False)
    ax.set_xticks(range(1, len(keys) + 1))
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title("FLAIR vs MPRAGE contribution inside the lesion and in its 3-voxel ring (|value| >= 0.1; TP, FP, FN)")
    fig.savefig(str(box_path), dpi=110)
    plt.close(fig)
