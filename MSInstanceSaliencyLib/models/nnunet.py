"""nnU-Net v2 trained-model folders (dataset.json, plans.json, fold_N/checkpoint_final.pth).

Runs what nnunetv2's predictor runs (nnunetv2 2.8.1, default 3d_fullres plans), without nnunetv2:
transpose -> crop to the non-zero box -> per-channel normalisation -> resampling to the plan's spacing
-> sliding window (step 0.5, Gaussian weights, float16 accumulation as nnU-Net does on the CPU) with
test-time mirroring -> fold average of the logits -> logits resampled back -> softmax -> uncropped,
transposed back. Testing/Python/test_nnunet_model.py compares it with nnunetv2's own predictor on a
folder nnU-Net itself trained. Only the networks' weights are read from the checkpoints (weights_only,
an allow-list of the numpy types they hold), and the network is built with dynamic-network-
architectures from an allow-list of classes; nothing named in a file is imported blindly.

Saliency runs on the network's grid (the preprocessed array) with the plan's patch as context and one
network whose logits are the mean of the folds' logits (what the predictor averages); Ω goes there
and the maps come back with the grid (`NNUNetGrid`).
"""

from __future__ import annotations

import itertools
import json
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import report
from .base import (LoadedModel, ModelSpec, _is_int, _is_number, channel_name, check_state_dict, checked_channels, freeze, load_weights,
                   mean_of_members, probe_network, read_json_file, unwrap_state_dict)

ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")  # dynamic_network_architectures.architectures.unet
# nnU-Net's trainer and the variants of it that change training only, not the network.
KNOWN_TRAINERS = {"nnUNetTrainer", "nnUNetTrainerNoMirroring", "nnUNetTrainer_onlyMirror01", "nnUNetTrainerNoDA",
                  "nnUNetTrainerDiceCELoss_noSmooth", "nnUNetTrainerCELoss", "nnUNetTrainerDiceLoss", "nnUNetTrainerTopk10Loss"}
KNOWN_TRAINER_PREFIXES = ("nnUNetTrainer_", "nnUNetTrainerNoDeepSupervision")  # nnUNetTrainer_250epochs, ... (schedule only)
ANISO_THRESHOLD = 3  # nnunetv2.configuration: separate-z resampling above this spacing ratio
CHECKPOINT = "checkpoint_final.pth"
NORMALIZATIONS = ("ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization", "CTNormalization")
CT_PROPERTIES = ("percentile_00_5", "percentile_99_5", "mean", "std")
# What a plans.json may make us allocate: nnU-Net's patches are some 100-200 voxels a side; a grid of
# 512^3 voxels is a 0.25 mm whole-head image, and the sliding window holds several arrays of its size.
MAX_PATCH_SIDE = 512
MAX_PATCH_VOXELS = 256**3
MAX_GRID_VOXELS = 512**3


def _torch_classes() -> dict:
    """The torch.nn classes plans may name for conv, norm, dropout and non-linearity, by every spelling nnU-Net writes."""
    from torch import nn

    out = {}
    for module, names in {"conv": ["Conv3d"], "instancenorm": ["InstanceNorm3d"], "batchnorm": ["BatchNorm3d"],
                          "dropout": ["Dropout3d", "Dropout"], "activation": ["LeakyReLU", "ReLU", "ELU", "GELU", "PReLU"]}.items():
        for n in names:
            cls = getattr(nn, n)
            out[f"torch.nn.{n}"] = out[f"torch.nn.modules.{module}.{n}"] = cls
    return out


def _checkpoint_globals() -> list:
    """The numpy types nnU-Net checkpoints hold besides tensors (np.float32 values in the training log)."""
    core = getattr(np, "_core", None) or np.core
    allowed = [np.dtype, core.multiarray.scalar]
    allowed += [getattr(np.dtypes, n) for n in ("Float32DType", "Float64DType", "Int64DType", "Int32DType", "BoolDType")
                if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return allowed


# ----------------------------------------------------------------------------- nnU-Net's resampling

def _resize(img: np.ndarray, shape, order: int) -> np.ndarray:
    """skimage.transform.resize(order, mode='edge', anti_aliasing=False) as nnU-Net calls it: a zoom with
    edge values and grid_mode, clipped to the input's range (equal, checked against skimage)."""
    from scipy import ndimage

    img = img.astype(np.float64)
    out = ndimage.zoom(img, [n / s for n, s in zip(shape, img.shape)], order=order, mode="nearest", grid_mode=True)
    return np.clip(out, img.min(), img.max())


def _separate_z_axis(current, new):
    """nnU-Net's choice: resample the low-resolution axis separately when either spacing is anisotropic (> 3x)."""
    for sp in (current, new):
        sp = np.asarray(sp, float)
        if sp.max() / sp.min() > ANISO_THRESHOLD:
            axes = np.where(sp.max() / sp == 1)[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


def resample(data: np.ndarray, new_shape, current_spacing, new_spacing, order: int, order_z: int = 0) -> np.ndarray:
    """nnU-Net's resample_data_or_seg_to_shape for data (C, ...): unchanged when the shape is; otherwise
    in float64, written into the input's dtype."""
    new_shape, shape = np.array(new_shape), np.array(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    d = data.astype(np.float64)
    axis = _separate_z_axis(current_spacing, new_spacing)
    for c in range(d.shape[0]):
        if axis is None:
            out[c] = _resize(d[c], new_shape, order)
            continue
        from scipy import ndimage

        inplane = [i for i in range(3) if i != axis]
        tmp_shape = new_shape.copy()
        tmp_shape[axis] = shape[axis]
        here = np.zeros(tmp_shape)
        for s in range(shape[axis]):
            idx = [slice(None)] * 3
            idx[axis] = s
            here[tuple(idx)] = _resize(d[c][tuple(idx)], new_shape[inplane], order)
        if shape[axis] != new_shape[axis]:
            grids = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(float)
            coords = np.array([(o / n) * (g + 0.5) - 0.5 for g, o, n in zip(grids, here.shape, new_shape)])
            out[c] = ndimage.map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            out[c] = here
    return out


def gaussian_weights(patch):
    """nnU-Net's tile weights: a Gaussian of sigma patch/8 peaking at 10, in float16, no zero."""
    import torch
    from scipy import ndimage

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g /= g.max() / 10
    g = torch.from_numpy(g).half()
    g[g == 0] = g[g != 0].min()
    return g


def tile_starts(size, patch, step: float = 0.5) -> list:
    out = []
    for n, p in zip(size, patch):
        k = int(np.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (k - 1) if k > 1 else 0
        out.append([int(np.round(stride * j)) for j in range(k)])
    return out


# ----------------------------------------------------------------------------- the grid

@dataclass
class NNUNetGrid:
    """The preprocessed array's grid: transposed, cropped to the non-zero box, resampled."""

    transpose_forward: list
    transpose_backward: list
    shape_before_cropping: tuple  # transposed order
    bbox: list  # [[lo, hi), ...] transposed order
    shape_after_cropping: tuple
    spacing: list  # the image's, transposed (z, y, x) order
    target_spacing: list
    probabilities_order: int = 1
    probabilities_order_z: int = 0
    same: bool = field(default=False)

    def _crop(self):
        return tuple(slice(lo, hi) for lo, hi in self.bbox)

    def back_to_crop(self, data: np.ndarray) -> np.ndarray:
        """(C, network grid) -> (C, cropped image grid), as nnU-Net brings its logits back."""
        return resample(data, self.shape_after_cropping, self.target_spacing, self.spacing, self.probabilities_order,
                        self.probabilities_order_z)

    def uncrop_to_reference(self, cropped: np.ndarray, outside: float = 0.0) -> np.ndarray:
        """(cropped image grid) -> (X, Y, Z) on the reference grid."""
        full = np.full(self.shape_before_cropping, outside, dtype=np.float32)
        full[self._crop()] = cropped
        return np.ascontiguousarray(full.transpose(self.transpose_backward).transpose(2, 1, 0))

    def to_reference(self, array: np.ndarray, kind: str = "linear") -> np.ndarray:
        back = self.back_to_crop(np.asarray(array, np.float32)[None])[0]
        if kind != "linear":
            back = back > 0.5
        return self.uncrop_to_reference(back.astype(np.float32))

    def to_network(self, mask: np.ndarray) -> np.ndarray:
        """A voxel set on the reference grid on the network grid (nnU-Net resamples masks linearly, > 0.5);
        a set too small to keep a voxel keeps the one nearest its centre."""
        zyx = np.asarray(mask, bool).transpose(2, 1, 0).transpose(self.transpose_forward)[self._crop()]
        shape = [int(round(a / b * n)) for a, b, n in zip(self.spacing, self.target_spacing, self.shape_after_cropping)]
        out = resample(zyx[None].astype(np.float32), shape, self.spacing, self.target_spacing, 1, 0)[0] > 0.5
        if not out.any() and zyx.any():
            centre = np.argwhere(zyx).mean(0) * np.array(shape) / np.array(zyx.shape)
            out[tuple(np.clip(np.floor(centre).astype(int), 0, np.array(shape) - 1))] = True
        return out

    def describe(self) -> str:
        return f"nnU-Net's preprocessed grid ({', '.join(f'{s:g}' for s in self.target_spacing)} mm, transposed {self.transpose_forward})"


# ----------------------------------------------------------------------------- the model

@dataclass
class NNUNetModel(LoadedModel):
    plans: dict = field(default_factory=dict)
    configuration: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)
    mirror_axes: tuple = ()
    trainer: str = "nnUNetTrainer"
    notes: list = field(default_factory=list)
    channel_order: list = field(default_factory=list)  # the dataset's channel i is this image

    format = "nnunet"

    @property
    def patch(self) -> list:
        return list(self.configuration["patch_size"])

    @property
    def size_divisor(self) -> int:
        d = 1
        for s in self.configuration["architecture"]["arch_kwargs"]["strides"]:
            d *= int(max(s) if isinstance(s, (list, tuple)) else s)
        return d

    def prepare(self, flair, mprage=None, *, register: bool = False, n4: bool = False):
        from .preprocessing import PreparedCase, align_inputs, n4_correct

        images, reference, steps, covered, valid, warnings = align_inputs(flair, mprage, self.spec.input_channels, register=register)
        flair_ref = images["flair"]
        if n4:
            images = {k: n4_correct(v) for k, v in images.items()}
            steps.append("N4 bias-field correction")
        data = np.stack([sitk.GetArrayFromImage(images[name]).astype(np.float32) for name in self.channel_order])
        if covered is not None:  # a FLAIR slab: outside it nnU-Net would see zeros, as in a cropped acquisition
            data[self.channel_order.index("flair")][~covered.transpose(2, 1, 0)] = 0
        x, grid = self.preprocess(data, list(reference.GetSpacing())[::-1])
        warnings += self.notes  # folds left out, a custom trainer: the user sees them and msis_run.json keeps them (steps)
        steps += [f"nnU-Net folds {', '.join(map(str, self.folds))}" + "".join(f"; {n}" for n in self.notes)]
        steps += [f"nnU-Net preprocessing: transpose {grid.transpose_forward}, crop to the non-zero box {grid.bbox}, "
                  f"{', '.join(self.configuration['normalization_schemes'])}, resampled to "
                  f"{', '.join(f'{s:g}' for s in grid.target_spacing)} mm ({'x'.join(map(str, x.shape[1:]))} voxels)"]
        return PreparedCase(x, reference, list(self.channel_order), flair_ref, steps, valid, warnings, grid)

    def preprocess(self, data: np.ndarray, spacing_zyx) -> tuple[np.ndarray, NNUNetGrid]:
        """nnU-Net's DefaultPreprocessor on (C, z, y, x) float32: the network input and its grid."""
        from scipy import ndimage

        tf = list(self.plans["transpose_forward"])
        tb = list(self.plans["transpose_backward"])
        data = data.transpose([0, *[i + 1 for i in tf]])
        sp = [float(abs(spacing_zyx[i])) for i in tf]
        shape_before = tuple(data.shape[1:])
        nonzero = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
        bbox = []
        for a in range(3):
            hit = np.where(np.any(nonzero, axis=tuple(j for j in range(3) if j != a)))[0]
            bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, shape_before[a]])
        crop = tuple(slice(lo, hi) for lo, hi in bbox)
        data = np.ascontiguousarray(data[(slice(None), *crop)])
        target = [float(s) for s in self.configuration["spacing"]]
        new_shape = [int(round(a / b * n)) for a, b, n in zip(sp, target, data.shape[1:])]
        if math.prod(new_shape) > MAX_GRID_VOXELS:  # before resampling allocates it
            raise InputError(f"{Path(self.path or '.') / 'plans.json'}: the plan's spacing {target} mm would resample this image "
                             f"({'x'.join(map(str, data.shape[1:]))} voxels of {', '.join(f'{v:g}' for v in sp)} mm) to "
                             f"{'x'.join(map(str, new_shape))} voxels, more than {MAX_GRID_VOXELS:.3g}; the plan's spacing does not "
                             "fit these images (or plans.json is damaged)")
        mask = nonzero[crop]
        for c, scheme in enumerate(self.configuration["normalization_schemes"]):
            data[c] = self._normalize(data[c], scheme, bool(self.configuration["use_mask_for_norm"][c]), mask, c)
        kw = self.configuration.get("resampling_fn_data_kwargs", {})
        x = resample(data, new_shape, sp, target, int(kw.get("order", 3)), int(kw.get("order_z", 0)))
        pkw = self.configuration.get("resampling_fn_probabilities_kwargs", {})
        grid = NNUNetGrid(tf, tb, shape_before, bbox, tuple(data.shape[1:]), sp, target, int(pkw.get("order", 1)), int(pkw.get("order_z", 0)))
        return np.ascontiguousarray(x, dtype=np.float32), grid

    def _normalize(self, image: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray, channel: int) -> np.ndarray:
        image = image.astype(np.float32, copy=False)
        if scheme == "ZScoreNormalization":
            if use_mask:
                mean, std = image[mask].mean(), image[mask].std()
                image[mask] = (image[mask] - mean) / max(std, 1e-8)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, 1e-8)
            return image
        if scheme == "NoNormalization":
            return image
        if scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=1e-8, a_max=None)
            return image
        if scheme == "CTNormalization":
            props = self.plans["foreground_intensity_properties_per_channel"][str(channel)]
            image = np.clip(image, props["percentile_00_5"], props["percentile_99_5"])
            image -= props["mean"]
            image /= max(props["std"], 1e-8)
            return image
        raise InputError(f"nnU-Net normalisation {scheme!r} is not supported (ZScore, NoNormalization, RescaleTo01, CT are)")

    # -- prediction
    def _fold_logits(self, x, net, progress=None, done=0, total=1):
        """nnU-Net's sliding window on one fold: (K, *x.shape[1:]) float16 logits."""
        import torch

        patch = self.patch
        diff = [max(p - s, 0) for p, s in zip(patch, x.shape[1:])]
        pads = [(d // 2, d // 2 + d % 2) for d in diff]
        xp = torch.nn.functional.pad(x, [v for p in pads[::-1] for v in p], "constant", 0)
        g = gaussian_weights(patch)
        k = self.spec.network_args["out_channels"]
        acc = torch.zeros((k, *xp.shape[1:]), dtype=torch.half)
        weight = torch.zeros(xp.shape[1:], dtype=torch.half)
        combos = [c for i in range(len(self.mirror_axes)) for c in itertools.combinations([a + 2 for a in self.mirror_axes], i + 1)]
        dev = next(net.parameters()).device
        for sx, sy, sz in itertools.product(*tile_starts(xp.shape[1:], patch)):
            report(progress, done, total)
            tile = (slice(sx, sx + patch[0]), slice(sy, sy + patch[1]), slice(sz, sz + patch[2]))
            t = xp[(slice(None), *tile)][None].to(dev)
            pred = net(t)
            for axes in combos:
                pred += torch.flip(net(torch.flip(t, axes)), axes)
            if combos:
                pred /= len(combos) + 1
            pred = pred[0].float().cpu() * g
            acc[(slice(None), *tile)] += pred
            weight[tile] += g
            done += 1
        torch.div(acc, weight, out=acc)
        return acc[(slice(None), *[slice(a, xp.shape[i + 1] - b) for i, (a, b) in enumerate(pads)])], done

    def predict_logits(self, image: np.ndarray, *, device="auto", progress=None):
        """Fold-averaged float16 logits (K, network grid) as nnU-Net's predictor computes them."""
        import torch

        from .device import resolve_device

        dev = resolve_device(device)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        n_tiles = math.prod(len(s) for s in tile_starts([max(p, n) for p, n in zip(self.patch, x.shape[1:])], self.patch))
        total, done, summed = n_tiles * len(self.network.members), 0, None
        self.network.to(dev)
        with torch.inference_mode():
            for net in self.network.members:
                logits, done = self._fold_logits(x, net, progress, done, total)
                summed = logits if summed is None else summed + logits
            if len(self.network.members) > 1:
                summed /= len(self.network.members)
        report(progress, total, total)
        return summed

    def predict_probability(self, image, *, device="auto", progress=None, sw_batch_size: int = 1):
        import torch

        logits = self.predict_logits(image, device=device, progress=progress)
        return torch.softmax(logits.float(), 0)[self.spec.lesion_class].numpy()

    def predict_case(self, prepared, *, device="auto", progress=None):
        """As nnU-Net exports: logits back to the image grid (order 1), softmax, lesion class; 0 outside the box."""
        import torch

        logits = self.predict_logits(prepared.image, device=device, progress=progress).numpy()
        back = prepared.grid.back_to_crop(logits)
        prob = torch.softmax(torch.from_numpy(back).float(), 0)[self.spec.lesion_class].numpy()
        return prepared.only_where_valid(prepared.grid.uncrop_to_reference(prob))

    def identity_extras(self) -> dict:
        # the spec names the architecture only: the preprocessing (spacing, normalisation), labels and ensemble are here
        return {"plans": self.plans, "dataset": self.dataset, "configuration": self.spec.training.get("configuration"),
                "folds": [str(f) for f in self.folds], "mirror_axes": [int(a) for a in self.mirror_axes]}

    def describe(self) -> dict:
        d = super().describe()
        d.update({"folds": list(self.folds), "mirroring": bool(self.mirror_axes), "trainer": self.trainer,
                  "configuration": self.spec.training.get("configuration"), "patch_size": self.patch,
                  "dataset_channels": self.dataset.get("channel_names"), "notes": list(self.notes)})
        return d

    def expects(self) -> str:
        names = " + ".join({"flair": "FLAIR", "mprage": "MPRAGE (T1)"}[c] for c in self.channel_order)
        return (f"{names} (nnU-Net channels {', '.join(f'{k}={v}' for k, v in self.dataset.get('channel_names', {}).items())}); "
                f"nnU-Net preprocessing to {'x'.join(f'{s:g}' for s in self.configuration['spacing'])} mm; folds "
                f"{','.join(map(str, self.folds))}, mirroring {'on' if self.mirror_axes else 'off'}")


# ----------------------------------------------------------------------------- loading

def _read_json(p: Path, what: str) -> dict:
    d = read_json_file(p, what)  # bounded in size and depth, UTF-8
    if not isinstance(d, dict):
        raise InputError(f"{p} ({what}) does not hold a JSON object")
    return d


def _need(ok: bool, source, key: str, value, what: str) -> None:
    """One line naming the file, the field, what it must be and what it holds."""
    if not ok:
        raise InputError(f"{source}: {key} must be {what}, got {json.dumps(value, default=lambda v: type(v).__name__)[:150]}")


def _ints(v, n=None, lo=None, hi=None) -> bool:
    return isinstance(v, (list, tuple)) and (n is None or len(v) == n) and all(
        _is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi) for x in v)


def _finite_numbers(v, n, positive=False) -> bool:
    return isinstance(v, list) and len(v) == n and all(_is_number(x) and math.isfinite(x) and (x > 0 or not positive) for x in v)


def _check_transpose(plans: dict, source) -> None:
    tf, tb = plans.get("transpose_forward"), plans.get("transpose_backward")
    _need(_ints(tf, 3) and sorted(tf) == [0, 1, 2], source, "transpose_forward", tf, "a permutation of [0, 1, 2]")
    inverse = [tf.index(i) for i in range(3)]
    _need(tb == inverse, source, "transpose_backward", tb, f"the inverse of transpose_forward, {inverse}")


def _configuration(plans: dict, name: str, source: Path) -> dict:
    configs = plans.get("configurations")
    _need(isinstance(configs, dict) and all(isinstance(c, dict) for c in configs.values()), source, "configurations", configs,
          "a JSON object of configuration names to JSON objects")
    if name not in configs:
        raise InputError(f"{source}: configuration {name!r} (from the checkpoint) is not in plans.json ({', '.join(configs)})")
    c = dict(configs[name])
    seen = {name}
    while "inherits_from" in c:  # nnU-Net's configurations may extend another one
        parent = c.pop("inherits_from")
        if not isinstance(parent, str) or parent in seen or parent not in configs:
            raise InputError(f"{source}: configuration {name!r} inherits from {parent!r}, which is missing or circular")
        seen.add(parent)
        c = {**configs[parent], **c}
    if c.get("previous_stage"):
        raise InputError(f"{source}: configuration {name!r} is a cascade stage (it needs {c['previous_stage']}'s segmentation); "
                         "use a 3d_fullres model")
    if "architecture" not in c:
        raise InputError(f"{source}: plans.json has no 'architecture' entry (plans from nnU-Net before 2.4?); "
                         "re-plan or re-export the model with nnU-Net >= 2.4")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if c.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            raise InputError(f"{source}: {key} {c[key]!r} is not supported (only nnU-Net's default resample_data_or_seg_to_shape)")
    return c


def _check_configuration(c: dict, name: str, n_in: int, plans: dict, source) -> None:
    """The types and ranges of every field the loader, the preprocessing and the sliding window read, before
    anything is built or allocated (a patch or a network sized by a damaged file is refused here)."""
    at = f"configurations.{name}."
    patch = c.get("patch_size")
    _need(_ints(patch, 3, 1, MAX_PATCH_SIDE) and math.prod(patch) <= MAX_PATCH_VOXELS, source, at + "patch_size", patch,
          f"three integers from 1 to {MAX_PATCH_SIDE}, at most {round(MAX_PATCH_VOXELS ** (1 / 3))}^3 voxels in all (this tool runs "
          "3D networks)")
    _need(_finite_numbers(c.get("spacing"), 3, positive=True), source, at + "spacing", c.get("spacing"),
          "three positive numbers (mm)")
    schemes, masks = c.get("normalization_schemes"), c.get("use_mask_for_norm")
    _need(isinstance(schemes, list) and len(schemes) == n_in and all(s in NORMALIZATIONS for s in schemes), source,
          at + "normalization_schemes", schemes, f"one of {', '.join(NORMALIZATIONS)} per input channel ({n_in})")
    _need(isinstance(masks, list) and len(masks) == n_in and all(isinstance(m, bool) for m in masks), source,
          at + "use_mask_for_norm", masks, f"true or false per input channel ({n_in})")
    for ch, scheme in enumerate(schemes):
        if scheme == "CTNormalization":  # clips and scales with the training set's foreground intensities
            props = plans.get("foreground_intensity_properties_per_channel")
            props = props.get(str(ch)) if isinstance(props, dict) else None
            _need(isinstance(props, dict) and all(_is_number(props.get(k)) and math.isfinite(props[k]) for k in CT_PROPERTIES), source,
                  f"foreground_intensity_properties_per_channel.{ch}", props,
                  f"the numbers {', '.join(CT_PROPERTIES)} (channel {ch} uses CTNormalization)")
    for key in ("resampling_fn_data_kwargs", "resampling_fn_probabilities_kwargs"):
        kw = c.get(key, {})
        orders = [kw[k] for k in ("order", "order_z") if k in kw] if isinstance(kw, dict) else None
        _need(orders is not None and _ints(orders, None, 0, 5), source, at + key, kw,
              "a JSON object whose order and order_z are spline orders from 0 to 5")
    arch = c["architecture"]
    _need(isinstance(arch, dict) and isinstance(arch.get("network_class_name"), str), source, at + "architecture", arch,
          "a JSON object with network_class_name and arch_kwargs")
    kwargs = arch.get("arch_kwargs")
    _need(isinstance(kwargs, dict), source, at + "architecture.arch_kwargs", kwargs, "a JSON object of the network's arguments")
    _need(isinstance(arch.get("_kw_requires_import", []), list), source, at + "architecture._kw_requires_import",
          arch.get("_kw_requires_import"), "a list of argument names")
    stages = kwargs.get("features_per_stage")
    _need(_ints(stages, None, 1) and stages, source, at + "architecture.arch_kwargs.features_per_stage", stages,
          "a list of positive integers")
    strides = kwargs.get("strides")
    _need(isinstance(strides, list) and len(strides) == len(stages) and all(_ints(s, 3, 1) or (_is_int(s) and s >= 1) for s in strides),
          source, at + "architecture.arch_kwargs.strides", strides, f"one stride (an integer or three) per stage ({len(stages)})")
    step = downsampling(c)
    _need(all(p % d == 0 for p, d in zip(patch, step)), source, at + "patch_size", patch,
          f"a multiple of the network's down-sampling, {step} voxels per axis (architecture.arch_kwargs.strides)")


def downsampling(configuration: dict) -> list:
    """Voxels per axis by which the plan's network down-samples (the product of its strides)."""
    strides = configuration["architecture"]["arch_kwargs"]["strides"]
    return [math.prod(s[a] if isinstance(s, list) else s for s in strides) for a in range(3)]


def build_nnunet_network(configuration: dict, n_in: int, n_out: int):
    """The plan's architecture with dynamic-network-architectures, from allow-listed classes only."""
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise InputError("nnU-Net models need the package dynamic-network-architectures: `pip install --no-deps "
                         "dynamic-network-architectures einops` (in 3D Slicer's Python console: slicer.util.pip_install("
                         "'--no-deps dynamic-network-architectures einops'); --no-deps keeps its timm from pulling another torch)") from None
    arch = configuration["architecture"]
    name = str(arch.get("network_class_name", ""))
    short = name.rsplit(".", 1)[-1]
    if short not in ARCHITECTURES or not name.startswith(("dynamic_network_architectures.", short)):
        raise InputError(f"nnU-Net architecture {name!r} is not one this tool builds ({', '.join(ARCHITECTURES)} from "
                         "dynamic_network_architectures)")
    kwargs = dict(arch.get("arch_kwargs", {}))
    classes = _torch_classes()
    for key in arch.get("_kw_requires_import", []):
        value = kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value not in classes:
            raise InputError(f"nnU-Net plans name {key} = {value!r}, which is not an allowed torch.nn class "
                             f"({', '.join(sorted({k.rsplit('.', 1)[-1] for k in classes}))})")
        kwargs[key] = classes[value]
    try:
        return getattr(unet, short)(input_channels=n_in, num_classes=n_out, deep_supervision=False, **kwargs)
    except Exception as exc:  # inconsistent arch_kwargs
        raise InputError(f"cannot build nnU-Net's {short} from plans.json: {str(exc).splitlines()[0][:200]}") from None


def dataset_channels(dataset: dict, channels, source) -> list:
    key = "modality" if "channel_names" not in dataset and "modality" in dataset else "channel_names"  # nnU-Net v1: modality
    names = dataset.get(key)
    _need(isinstance(names, dict) and names and set(names) == {str(i) for i in range(len(names))}
          and all(isinstance(v, str) for v in names.values()), source, key, names,
          'a JSON object naming the input channels from "0", e.g. {"0": "FLAIR", "1": "T1"}')
    keys = [str(i) for i in range(len(names))]
    if channels is not None:
        return checked_channels(channels, len(keys), f"{source} (channel_names {names})")
    mapped = [channel_name(names[k]) for k in keys]
    if None in mapped or len(set(mapped)) != len(mapped):
        raise InputError(f"{source}: cannot tell which of this tool's images each nnU-Net channel is ({names}); name them in "
                         "order with --model-channels, e.g. --model-channels flair,mprage")
    return mapped


def output_labels(dataset: dict, source) -> dict:
    """{name: value} of the labels the network has an output for, as nnunetv2's LabelManager reads dataset.json:
    background 0, the values consecutive (output channel i is label i), and an `ignore` label, when there is
    one, the highest value and no output of its own."""
    labels = dataset.get("labels")
    _need(isinstance(labels, dict) and labels, source, "labels", labels, 'a JSON object such as {"background": 0, "lesion": 1}')
    out = {}
    for name, value in labels.items():
        if isinstance(value, list) and len(value) == 1:  # nnU-Net reads a one-label list as that label
            value = value[0]
        if isinstance(value, (list, tuple)):
            raise InputError(f"{source}: region-based nnU-Net training (labels {labels}) is not supported; the tool needs one lesion label")
        _need(_is_int(value) and value >= 0, source, f"labels.{name}", value, "an integer label value >= 0")
        out[name] = value
    _need(out.get("background") == 0, source, "labels.background", labels.get("background"), "0 (nnU-Net's background label)")
    ignore = out.pop("ignore", None)
    values = sorted(set(out.values()))
    if ignore is not None and ignore != values[-1] + 1:
        raise InputError(f"{source}: the ignore label is {ignore}; nnU-Net requires it to be the highest label value, next above "
                         f"the others ({values[-1] + 1})")
    if values != list(range(len(values))):
        raise InputError(f"{source}: the label values {values} are not consecutive from 0 (nnU-Net's output channel i is label i); "
                         "dataset.json does not fit the network")
    return out


def lesion_label(dataset: dict, source) -> int:
    labels = dataset.get("labels")
    fg = {k: v for k, v in output_labels(dataset, source).items() if v != 0}
    if len(set(fg.values())) == 1:
        return next(iter(fg.values()))
    lesion = {v for k, v in fg.items() if any(w in k.lower() for w in ("lesion", "wmh", "ms"))}
    if len(lesion) == 1:
        return lesion.pop()
    raise InputError(f"{source}: the dataset has the labels {labels}; this tool explains one lesion label and cannot tell which")


def _checkpoint_problem(path: Path) -> str | None:
    """Why a fold's checkpoint cannot be loaded, asked before torch.load opens it (None: a regular file). A
    device such as /dev/zero would be read without end; a folder or a symlink loop is named, not skipped."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a link to a missing file" if path.is_symlink() else "does not exist"
    except OSError as exc:  # a symlink loop (ELOOP), a fold_N that is a file (ENOTDIR), no permission
        return f"cannot be opened ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, pipe or socket)"
    return None


def choose_folds(folder: Path, folds=None) -> tuple[list, list]:
    """The folds to load and, when they are found rather than asked for, a note on each fold_N not used."""
    problems = {int(d.name[5:]): _checkpoint_problem(d / CHECKPOINT) for d in folder.glob("fold_*") if d.name[5:].isdigit()}
    usable = sorted(f for f, p in problems.items() if p is None)
    if folds is None:
        notes = [f"fold_{f}/{CHECKPOINT} {p}: fold {f} not used" for f, p in sorted(problems.items()) if p]
        chosen = usable or (["all"] if _checkpoint_problem(folder / "fold_all" / CHECKPOINT) is None else [])
        if not chosen:
            raise InputError(f"{folder}: no fold has a usable {CHECKPOINT} ({'; '.join(notes) or 'there is no fold_N folder'}); "
                             "train one, or give the trained-model folder")
        return chosen, notes
    for f in folds:
        problem = _checkpoint_problem(folder / f"fold_{f}" / CHECKPOINT)
        if problem:
            raise InputError(f"{folder}: fold {f} cannot be used: fold_{f}/{CHECKPOINT} {problem} (usable folds: "
                             f"{', '.join(map(str, usable)) or 'none'}); train it or choose --folds")
    return list(folds), []


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state_dict, the checkpoint's other entries) of one fold, its weights finite."""
    ckpt = load_weights(path, _checkpoint_globals())
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise InputError(f"{path} is not an nnU-Net v2 checkpoint (no network_weights)")
    state = unwrap_state_dict(ckpt["network_weights"])
    check_state_dict(state, f"{path} (network_weights)")
    axes = ckpt.get("inference_allowed_mirroring_axes")
    _need(axes is None or (_ints(axes, None, 0, 2) and len(set(axes)) == len(axes)), path, "inference_allowed_mirroring_axes",
          axes, "null or distinct axes from 0 to 2")
    init = ckpt.get("init_args")
    _need(init is None or (isinstance(init, dict) and isinstance(init.get("configuration", ""), str)), path, "init_args",
          init, "a dict whose configuration is a name")
    _need(isinstance(ckpt.get("trainer_name", ""), str), path, "trainer_name", ckpt.get("trainer_name"), "a class name")
    return state, ckpt


def load_nnunet_model(folder, *, device="cpu", folds=None, mirroring: bool = True, channels=None) -> NNUNetModel:
    folder = Path(folder)
    dataset = _read_json(folder / "dataset.json", "nnU-Net dataset.json")
    plans = _read_json(folder / "plans.json", "nnU-Net plans.json")
    order = dataset_channels(dataset, channels, folder / "dataset.json")
    lesion = lesion_label(dataset, folder / "dataset.json")
    n_out = len(set(output_labels(dataset, folder / "dataset.json").values()))  # the ignore label has no output
    _check_transpose(plans, folder / "plans.json")
    folds, notes = choose_folds(folder, folds)
    states, meta = [], None
    for f in folds:
        state, ckpt = _read_checkpoint(folder / f"fold_{f}" / CHECKPOINT)
        meta = meta or ckpt
        states.append(state)
    init = meta.get("init_args") or {}
    config_name = init.get("configuration") or "3d_fullres"
    configuration = _configuration(plans, config_name, folder / "plans.json")
    _check_configuration(configuration, config_name, len(order), plans, folder / "plans.json")
    trainer = str(meta.get("trainer_name") or "nnUNetTrainer")
    custom = trainer not in KNOWN_TRAINERS and not trainer.startswith(KNOWN_TRAINER_PREFIXES)
    if custom:
        notes.append(f"trained with the custom trainer {trainer}: a custom trainer can change the network; it is built from "
                     "plans.json as nnUNetTrainer builds it")
    members = []
    for f, state in zip(folds, states):
        net = build_nnunet_network(configuration, len(order), n_out)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            hint = f" (the checkpoint was written by {trainer}, which may build another network)" if custom else ""
            raise InputError(f"fold_{f}/{CHECKPOINT} does not fit the network plans.json describes{hint}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        members.append(net)
    network = mean_of_members(members)
    freeze(network)
    network.to(device)
    axes = tuple(meta.get("inference_allowed_mirroring_axes") or ()) if mirroring else ()
    stages = len(configuration["architecture"]["arch_kwargs"]["features_per_stage"])
    spec = ModelSpec(network_class=configuration["architecture"]["network_class_name"].rsplit(".", 1)[-1],
                     network_args={"out_channels": n_out, "in_channels": len(order)}, input_channels=order,
                     normalization="nnunet", roi_size=list(configuration["patch_size"]), overlap=0.5, threshold=0.5,
                     min_lesion_mm3=0.0, lesion_class=lesion, gradcam_layer=f"members.0.decoder.stages.{max(stages - 3, 0)}",
                     weights=CHECKPOINT, name=str(plans.get("dataset_name", folder.parent.name)), version=folder.name,
                     description=f"nnU-Net v2 {config_name} ({trainer}), folds {', '.join(map(str, folds))}",
                     training={"configuration": config_name, "trainer": trainer, "folds": list(folds)})
    # One fold is enough: they share the architecture. A small window (two voxels at the bottleneck, where instance norm
    # needs more than one) keeps the probe to a fraction of a second; the patch itself is checked against the strides above.
    window = [min(p, 2 * d) for p, d in zip(configuration["patch_size"], downsampling(configuration))]
    field = "patch_size" if window == list(configuration["patch_size"]) else "architecture"
    probe_network(members[0], spec, device, source=f"{folder / 'plans.json'} (configurations.{config_name}.{field})", window=window)
    return NNUNetModel(network, spec, folder, plans=plans, configuration=configuration, dataset=dataset, folds=list(folds),
                       mirror_axes=axes, trainer=trainer, notes=notes, channel_order=order)
