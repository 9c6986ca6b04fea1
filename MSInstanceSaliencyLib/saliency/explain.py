"""Explaining one lesion of a case: choose Ω, compute its maps, write NIfTI and a figure."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.volumes import array_from_image, image_from_array, same_grid, write_image

METHODS = ("smoothgrad", "gradcampp")
CHOICES = {"method": METHODS, "sigma_mode": ("range", "absolute"), "aggregation": ("max", "mean"), "context": ("patch", "full"),
           "precision": ("fp32", "bf16", "fp16")}
# SmoothGrad work no entry point starts without being told how to bound it: backward passes (N x |Ω|
# for the max over Ω, N x K with max_omega_voxels K, N for the mean). 10^6 passes of the demo model on
# a CPU are days of work; every paper setting (N = 50, lesions of thousands of voxels) stays below.
MAX_BACKWARD_PASSES = 10**6


def check_explain_args(method="smoothgrad", *, n_samples=50, sigma=0.05, sigma_mode="range", aggregation="max", context="patch",
                       seed=0, precision="fp32", max_omega_voxels=None, lesion_id=None, omega=None, names=None) -> dict:
    """The explain arguments of every entry point (CLI, worker, cohort), checked before any work: an
    InputError naming the argument as the caller knows it (`names`: argument -> e.g. its CLI flag).
    With Ω (a mask, any grid): SmoothGrad above MAX_BACKWARD_PASSES is refused too. Returns the
    arguments normalised (ints as int, sigma as float) for `explain`."""
    names = names or {}

    def name(arg):
        return names.get(arg, arg)

    def given(arg, value):
        return f"{name(arg)} {value}" if name(arg).startswith("--") else f"{name(arg)}={value!r}"

    def integer(arg, value, lo):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
            raise InputError(f"{name(arg)} must be an integer >= {lo}, got {value!r}")
        return int(value)

    for arg, value in (("method", method), ("sigma_mode", sigma_mode), ("aggregation", aggregation), ("context", context),
                       ("precision", precision)):
        if not isinstance(value, str) or value not in CHOICES[arg]:
            raise InputError(f"{name(arg)} must be one of {', '.join(CHOICES[arg])}, got {value!r}")
    if method == "gradcampp" and precision != "fp32":
        raise InputError(f"{given('precision', precision)} applies to SmoothGrad only; Grad-CAM++ runs in fp32 "
                         f"(drop {name('precision')})")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"{name('sigma')} must be a finite number >= 0, got {sigma!r}")
    args = dict(method=method, n_samples=integer("n_samples", n_samples, 1), sigma=float(sigma), sigma_mode=sigma_mode,
                aggregation=aggregation, context=context, seed=integer("seed", seed, 0), precision=precision,
                max_omega_voxels=None if max_omega_voxels is None else integer("max_omega_voxels", max_omega_voxels, 1))
    if lesion_id is not None:
        args["lesion_id"] = integer("lesion_id", lesion_id, 1)
    if method == "smoothgrad":
        n = args["n_samples"]
        n_omega = None if omega is None else int(np.count_nonzero(omega))
        cap = args["max_omega_voxels"]
        per_copy = 1 if aggregation == "mean" or n_omega is None else min(n_omega, cap) if cap else n_omega
        if n * per_copy > MAX_BACKWARD_PASSES:
            what = f" of {n_omega} voxels" if n_omega is not None else ""
            raise InputError(
                f"SmoothGrad ({aggregation}){what} with {given('n_samples', n)} needs {n * per_copy:,} backward passes, more than the "
                f"{MAX_BACKWARD_PASSES:,} msis starts (days of work or more); bound it with {name('max_omega_voxels')} K (the max "
                f"over K sampled voxels: {n} x K passes), use fewer {name('n_samples')}, {name('aggregation')} mean ({n} passes) "
                "or a smaller region")
    return args


@dataclass
class Explanation:
    method: str
    maps: dict  # name -> (X, Y, Z) float32 array ("flair", "mprage" for SmoothGrad; "gradcampp")
    omega: np.ndarray
    label: str  # "lesion3" or "mask"
    params: dict = field(default_factory=dict)


def omega_from_lesion(labels: np.ndarray, lesion_id: int) -> np.ndarray:
    n = int(labels.max())
    if not 1 <= int(lesion_id) <= n or not np.any(labels == int(lesion_id)):
        raise InputError(f"lesion {lesion_id} does not exist: this case has {n} lesions (ids 1..{n}, as in lesions.csv)")
    return labels == int(lesion_id)


def omega_from_mask(mask: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A user's voxel set as Ω on the reference grid (resampled, nearest neighbour, when needed)."""
    if not same_grid(mask, reference):
        from ..io.volumes import overlap_fraction

        if overlap_fraction(mask, reference) == 0.0:
            raise InputError("the mask does not overlap the MPRAGE volume in physical space")
        mask = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    om = array_from_image(mask, np.float32) > 0
    if not om.any():
        raise InputError("the mask is empty on the MPRAGE grid: Ω needs at least one voxel")
    return om


def explain(model, image: np.ndarray, omega: np.ndarray, method: str = "smoothgrad", *, label="lesion", channels=("flair", "mprage"),
            n_samples=50, sigma=0.05, sigma_mode="range", aggregation="max", context="patch", seed=0, layer=None,
            alpha="paper", device="auto", progress=None, precision="fp32", max_omega_voxels=None, partial=None, partial_every=1,
            partial_interval_s=None) -> Explanation:
    """The maps of Ω by `method`. SmoothGrad only: partial(copies_done, maps) receives the map so far as
    {channel: (X, Y, Z)} as the noisy copies arrive, last the final maps (smoothgrad's `partial`)."""
    if partial is not None and method != "smoothgrad":
        raise InputError(f"partial maps (partial_every) are SmoothGrad's, map so far over its noisy copies; {method} computes "
                         "its map in one pass: drop partial_every")
    if method == "smoothgrad":
        from .smoothgrad import smoothgrad

        def by_channel(done, m):
            partial(done, {c: m[i] for i, c in enumerate(channels)})

        maps = smoothgrad(model, image, omega, n_samples=n_samples, sigma=sigma, sigma_mode=sigma_mode, aggregation=aggregation,
                          context=context, seed=seed, device=device, progress=progress, precision=precision,
                          max_omega_voxels=max_omega_voxels, partial=by_channel if partial is not None else None,
                          partial_every=partial_every, partial_interval_s=partial_interval_s)
        params = dict(n_samples=n_samples, sigma=sigma, sigma_mode=sigma_mode, aggregation=aggregation, context=context, seed=seed,
                      precision=precision, max_omega_voxels=max_omega_voxels if aggregation == "max" else None)
        return Explanation(method, {c: maps[i] for i, c in enumerate(channels)}, omega, label, params)
    if method == "gradcampp":
        from .gradcampp import gradcampp

        m = gradcampp(model, image, omega, layer=layer, alpha=alpha, device=device, context=context)
        if progress is not None:
            progress(1, 1)
        return Explanation(method, {"gradcampp": m}, omega, label, dict(layer=layer or model.spec.gradcam_layer, alpha=alpha, context=context))
    raise InputError(f"method must be one of {METHODS}, got {method!r}")


def explain_case(model, prepared, omega: np.ndarray, method: str = "smoothgrad", partial=None, **kwargs) -> Explanation:
    """`explain` for a prepared case with Ω on its reference grid: Ω is taken to the network's grid,
    the maps are computed there and brought back (identity when the network runs on the reference grid),
    the partial maps too."""
    if partial is not None and not prepared.grid.same:
        on_network_grid = partial

        def partial(done, maps):
            on_network_grid(done, {name: prepared.to_reference(m) for name, m in maps.items()})

    exp = explain(model, prepared.image, prepared.to_network(omega), method, channels=prepared.channels, partial=partial, **kwargs)
    if not prepared.grid.same:
        exp.maps = {name: prepared.to_reference(m) for name, m in exp.maps.items()}
    exp.omega = omega
    return exp


def write_explanation(exp: Explanation, reference: sitk.Image, flair_on_reference: sitk.Image, out) -> dict:
    """One NIfTI per map on the reference geometry, and the three-slice PNG of the FLAIR (or only) map."""
    from .figures import colorbar_label, saliency_figure

    paths = {}
    for name, arr in exp.maps.items():
        suffix = f"smoothgrad_{name}" if exp.method == "smoothgrad" else "gradcampp"
        paths[name] = out.file(f"saliency_{exp.label}_{suffix}.nii.gz")
        write_image(image_from_array(arr.astype(np.float32), reference=reference), paths[name])
    shown = "flair" if "flair" in exp.maps else next(iter(exp.maps))
    png = out.file(f"saliency_{exp.label}_{exp.method}.png")
    omega_img = image_from_array(exp.omega.astype(np.uint8), reference=reference)
    title = f"{exp.label}: {exp.method}" + (f" ({exp.params.get('aggregation')}, N={exp.params.get('n_samples')}) w.r.t. {shown.upper()}" if exp.method == "smoothgrad" else "")
    saliency_figure(flair_on_reference, image_from_array(exp.maps[shown], reference=reference), omega_img, png, title,
                    label=colorbar_label(exp.method))
    paths["png"] = png
    return paths
