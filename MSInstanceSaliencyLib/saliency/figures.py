"""Figures: three orthogonal slices through a lesion with its saliency map on top of FLAIR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.volumes import array_from_image


def _lps(img: sitk.Image) -> np.ndarray:
    """(x, y, z) array reoriented so that x -> Left, y -> Posterior, z -> Superior."""
    return array_from_image(sitk.DICOMOrient(img, "LPS"))


def pyplot():
    """matplotlib.pyplot on the Agg backend unless one was chosen: figures are written to files, also
    on machines without a display. Imported when a figure is made, so that `msis` starts light."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int) -> Path:
    """Write a figure whole (io.outputs.atomic_write: never a truncated PNG at `path`) and close it."""
    from ..io.outputs import atomic_write

    try:
        return atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=dpi))
    finally:
        pyplot().close(fig)


SMOOTHGRAD_LABEL = "saliency (∂ logit / ∂ input)"
GRADCAMPP_LABEL = "Grad-CAM++ (ReLU of the layer's weighted activations, upsampled)"


def colorbar_label(method: str) -> str:
    """What the colour bar of a map of this method shows."""
    return GRADCAMPP_LABEL if method == "gradcampp" else SMOOTHGRAD_LABEL


def saliency_figure(flair: sitk.Image, saliency: sitk.Image, omega: sitk.Image, path, title: str = "", vmax: float | None = None,
                    fov_mm: float | None = 90.0, label: str = SMOOTHGRAD_LABEL):
    """Axial, coronal and sagittal slices through Ω's centre: FLAIR in grey, the map in a diverging
    colormap symmetric around 0 (blue negative, red positive), Ω's outline, a colour bar. Radiological
    display (patient's right on the image's left); each view shows `fov_mm` around Ω (None: all)."""
    plt = pyplot()

    f = _lps(flair)
    s = _lps(saliency)
    m = _lps(omega) > 0
    sp = np.array(sitk.DICOMOrient(flair, "LPS").GetSpacing())
    c = np.round(np.argwhere(m).mean(0)).astype(int) if m.any() else np.array(f.shape) // 2
    if fov_mm:
        half = np.ceil(fov_mm / 2 / sp).astype(int)
        lo = np.maximum(c - half, 0)
        crop = tuple(slice(a, b) for a, b in zip(lo, np.minimum(c + half + 1, f.shape)))
        f_full = f
        f, s, m = f[crop], s[crop], m[crop]
        c = c - lo
    else:
        f_full = f
    vmax = float(vmax if vmax is not None else max(np.abs(s).max(), 1e-12))
    # show saliency where it is noticeable so the anatomy stays readable
    alpha_of = lambda a: np.clip(np.abs(a) / (0.1 * vmax), 0, 1) * 0.85  # noqa: E731
    views = [
        ("axial", f[:, :, c[2]].T, s[:, :, c[2]].T, m[:, :, c[2]].T, "upper", sp[1] / sp[0]),
        ("coronal", f[:, c[1], :].T, s[:, c[1], :].T, m[:, c[1], :].T, "lower", sp[2] / sp[0]),
        ("sagittal", f[c[0], :, :].T, s[c[0], :, :].T, m[c[0], :, :].T, "lower", sp[2] / sp[1]),  # anterior on the left
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), constrained_layout=True)
    lo, hi = np.percentile(f_full, [1, 99.5])
    for ax, (name, fl, sa, ma, origin, aspect) in zip(axes, views):
        ax.imshow(fl, cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=aspect, interpolation="nearest")
        rgba = plt.get_cmap("RdBu_r")((sa + vmax) / (2 * vmax))
        rgba[..., 3] = alpha_of(sa)
        ax.imshow(rgba, origin=origin, aspect=aspect, interpolation="nearest")
        if ma.any():
            # no origin here: contour follows the axes imshow already oriented
            ax.contour(ma.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    sm = plt.cm.ScalarMappable(cmap="RdBu_r", norm=plt.Normalize(-vmax, vmax))
    cb = fig.colorbar(sm, ax=axes, shrink=0.8, label=label)
    cb.ax.tick_params(labelsize=8)
    axes[0].text(0.01, 0.01, "R", color="w", transform=axes[0].transAxes)
    axes[0].text(0.97, 0.01, "L", color="w", transform=axes[0].transAxes)
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=110)
    return path
