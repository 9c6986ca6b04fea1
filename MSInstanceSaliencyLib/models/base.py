"""Segmentation models as folders: a JSON spec plus a weights file.

A model folder holds `model.json` and the weights it names (a plain state_dict, read with
`torch.load(..., weights_only=True)`: nothing is ever unpickled). The spec names a MONAI network
class and its arguments, the input channel order, the pre-processing, the sliding-window settings,
the threshold and the default Grad-CAM++ layer, so a user can point `--model DIR` at their own
network without code.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

SPEC_FILE = "model.json"
KNOWN_CHANNELS = ("flair", "mprage")
# Other names of the two images this tool provides, as model specs and nnU-Net datasets spell them.
CHANNEL_ALIASES = {"flair": "flair", "t2flair": "flair", "t2_flair": "flair", "flair3d": "flair",
                   "mprage": "mprage", "t1": "mprage", "t1w": "mprage", "t1_mprage": "mprage", "mp_rage": "mprage"}
ACTIVATIONS = ("softmax", "sigmoid")
# Spec keys added after the first release: hashed into a model's identity only when they differ from
# these defaults, so models (and the feature tables and classifiers made with them) keep their identity.
LATER_KEYS = {"output_activation": "softmax", "target_spacing": None, "orientation": None}
# A model's JSON files are a few kB: larger ones are refused before they are read, deeper ones after
# parsing (deep nesting overflows the recursion of json, copy.deepcopy and json.dumps).
MAX_JSON_BYTES = 8 * 2**20
MAX_JSON_DEPTH = 64
# Resampling to a finer grid than this allocates more than any machine has (0.01 mm: 10^12 voxels per image).
TARGET_SPACING_RANGE_MM = (0.25, 16.0)
# network_args that make a network download (or read) pretrained weights from elsewhere when built:
# MONAI's pretrained / pretrained_url, torchvision's weights, Hugging Face's path_or_repo_id, ...
DOWNLOADING_ARG = re.compile(r"pretrain|url|download|repo_id|(^|_)weights?$|(^|_)path$|cache_dir|(^|_)hub")
URL_VALUE = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|file:)", re.IGNORECASE)


def channel_name(name: str) -> str | None:
    """'flair' or 'mprage' for a channel name or alias (case and separators ignored), else None."""
    key = "".join(ch for ch in str(name).lower() if ch.isalnum() or ch == "_").strip("_")
    return CHANNEL_ALIASES.get(key) or CHANNEL_ALIASES.get(key.replace("_", ""))


# The journal paper's U-Net (METHOD.md).
PAPER_UNET_ARGS = {
    "spatial_dims": 3,
    "in_channels": 2,
    "out_channels": 2,
    "channels": [32, 64, 128, 256, 512],
    "strides": [2, 2, 2, 2],
    "norm": "batch",
    "num_res_units": 0,
}
# The bundled demo model: same architecture family, 4x narrower, so it trains on a CPU.
DEMO_UNET_ARGS = {**PAPER_UNET_ARGS, "channels": [8, 16, 32, 64, 128]}


@dataclass
class ModelSpec:
    network_class: str = "UNet"  # a class of monai.networks.nets
    network_args: dict = field(default_factory=lambda: dict(PAPER_UNET_ARGS))
    input_channels: list = field(default_factory=lambda: list(KNOWN_CHANNELS))
    normalization: str = "zscore"  # per image, over all voxels ("zscore") or non-zero voxels ("zscore_nonzero")
    roi_size: list = field(default_factory=lambda: [96, 96, 96])
    overlap: float = 0.25
    blend_mode: str = "gaussian"
    threshold: float = 0.3
    min_lesion_mm3: float = 5.0
    lesion_class: int = 1
    output_activation: str = "softmax"  # softmax over classes, or sigmoid of the lesion channel
    target_spacing: list | None = None  # mm (x, y, z); inputs are resampled to it, outputs back
    orientation: str | None = None  # axis codes such as "RAS" (nibabel's convention); None: as the images come
    gradcam_layer: str = "model.1.submodule.2.conv"
    weights: str = "weights.pt"
    name: str = "unnamed"
    version: str = "0.0.0"
    description: str = ""
    training: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model spec") -> "ModelSpec":
        if not isinstance(d, dict):
            raise InputError(f"{source} must hold a JSON object ({{\"network_class\": ..., ...}}), not a JSON {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InputError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        spec = cls(**copy.deepcopy(d))
        if isinstance(spec.input_channels, list):
            spec.input_channels = [channel_name(c) or c for c in spec.input_channels]
        if isinstance(spec.orientation, str):
            spec.orientation = spec.orientation.upper()
        spec.validate(source)
        return spec

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__}

    def validate(self, source: str = "model spec") -> None:
        self._validate_types(source)
        bad = [c for c in self.input_channels if c not in KNOWN_CHANNELS]
        if bad:
            raise InputError(f"{source}: input channels {bad} unknown; this tool provides {list(KNOWN_CHANNELS)}")
        n_in = self.network_args.get("in_channels")
        if n_in is not None and n_in != len(self.input_channels):
            raise InputError(
                f"{source}: the network takes {n_in} input channels but input_channels lists "
                f"{len(self.input_channels)} ({self.input_channels}); they must match"
            )
        if self.normalization not in ("zscore", "zscore_nonzero", "none"):
            raise InputError(f"{source}: normalization must be zscore, zscore_nonzero or none")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise InputError(f"{source}: roi_size must be three positive integers")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"{source}: overlap must be in [0, 1)")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"{source}: threshold must be in (0, 1)")
        if not (math.isfinite(self.min_lesion_mm3) and self.min_lesion_mm3 >= 0):
            raise InputError(f"{source}: min_lesion_mm3 must be a finite number >= 0, got {self.min_lesion_mm3}")
        if self.blend_mode not in ("gaussian", "constant"):
            raise InputError(f"{source}: blend_mode must be gaussian or constant, got {self.blend_mode!r}")
        if len(set(self.input_channels)) != len(self.input_channels) or not self.input_channels:
            raise InputError(f"{source}: input_channels must name each channel once, got {self.input_channels}")
        dims = self.network_args.get("spatial_dims", 3)
        if dims != 3:
            raise InputError(f"{source}: network_args spatial_dims is {dims!r}; this tool runs 3D networks (spatial_dims 3) on 3D volumes")
        if self.output_activation not in ACTIVATIONS:
            raise InputError(f"{source}: output_activation must be softmax (one logit per class) or sigmoid (a lesion logit), "
                             f"got {self.output_activation!r}")
        n_out = self.network_args.get("out_channels")
        least = 2 if self.output_activation == "softmax" else 1
        if n_out is not None and (not _is_int(n_out) or n_out < least or n_out <= self.lesion_class):
            raise InputError(f"{source}: network_args out_channels is {n_out!r}; " + (
                "with softmax the network gives one logit per class (background and lesion), so at least 2" if least == 2 else
                "with sigmoid the network gives a lesion logit, so at least 1") + f" and more than lesion_class ({self.lesion_class})")
        lo, hi = TARGET_SPACING_RANGE_MM
        if self.target_spacing is not None and not (isinstance(self.target_spacing, list) and len(self.target_spacing) == 3 and all(
                _is_number(v) and math.isfinite(v) and lo <= v <= hi for v in self.target_spacing)):
            raise InputError(f"{source}: target_spacing must be null or three numbers from {lo:g} to {hi:g} (mm), "
                             f"got {self.target_spacing!r}")
        if self.orientation is not None and not (isinstance(self.orientation, str) and len(self.orientation) == 3 and _axis_codes_ok(
                self.orientation)):
            raise InputError(f"{source}: orientation must be null or three axis codes such as \"RAS\" or \"LPS\" (one of R/L, A/P, "
                             f"S/I each), got {self.orientation!r}")
        if not self.weights.strip() or Path(self.weights).is_absolute() or ".." in Path(self.weights).parts:
            raise InputError(f"{source}: weights must name a file inside the model folder, got {self.weights!r}")
        _refuse_downloading_args(self.network_args, source)

    def _validate_types(self, source: str) -> None:
        """JSON types of every field, so a wrong one is named instead of failing somewhere later."""
        def need(ok, key, what):
            if not ok:
                raise InputError(f"{source}: {key} must be {what}, got {json.dumps(getattr(self, key), default=repr)}")

        for key in ("network_class", "normalization", "blend_mode", "gradcam_layer", "weights", "name", "version", "description"):
            need(isinstance(getattr(self, key), str), key, "a string")
        for key in ("network_args", "training"):
            need(isinstance(getattr(self, key), dict), key, "a JSON object")
        need(isinstance(self.input_channels, list) and all(isinstance(c, str) for c in self.input_channels), "input_channels",
             f"a list of channel names from {list(KNOWN_CHANNELS)}")
        need(isinstance(self.roi_size, list) and len(self.roi_size) == 3 and all(_is_int(r) and r >= 1 for r in self.roi_size),
             "roi_size", "three positive integers")
        for key in ("overlap", "threshold", "min_lesion_mm3"):
            need(_is_number(getattr(self, key)), key, "a number")
        need(_is_int(self.lesion_class) and self.lesion_class >= 0, "lesion_class", "an integer >= 0 (the lesion's output channel)")


@dataclass
class LoadedModel:
    """A network in eval mode with frozen parameters, the spec of what it takes, and how to run it on a
    case. This class runs model.json folders (MONAI networks); models.nnunet and models.lstai subclass it
    for their formats' own pre-processing and prediction. Saliency needs only `network` (input on the
    network's grid -> per-voxel logits), `spec` and `lesion_logits`."""

    network: object  # torch.nn.Module
    spec: ModelSpec
    path: Path | None = None

    format = "msis"  # the model.json folder format

    def to(self, device):
        self.network.to(device)
        return self

    def identity_extras(self) -> dict:
        """What changes the model's output besides its spec and weights (scoring.model_identity hashes it
        in): a model.json spec says everything, so nothing here, and models keep their recorded identity."""
        return {}

    # -- running it on a case
    def prepare(self, flair, mprage=None, *, register: bool = False, n4: bool = False):
        """The case's images as the network's input (PreparedCase), on the network's grid."""
        from .preprocessing import prepare_case

        return prepare_case(flair, mprage, self.spec, register=register, n4=n4)

    def predict_probability(self, image, *, device="auto", progress=None, sw_batch_size: int = 1):
        """Lesion probability (X, Y, Z) float32 on the network's grid for a prepared image (C, X, Y, Z)."""
        from .sliding_window import sliding_window_probability

        return sliding_window_probability(self, image, device=device, progress=progress, sw_batch_size=sw_batch_size)

    def predict_case(self, prepared, *, device="auto", progress=None):
        """Lesion probability (X, Y, Z) float32 on the case's reference grid, 0 where the FLAIR is missing."""
        prob = self.predict_probability(prepared.image, device=device, progress=progress)
        return prepared.only_where_valid(prepared.to_reference(prob))

    def lesion_logits(self, out):
        """The lesion logit (B, X, Y, Z) from the network's output (B, K, X, Y, Z): what saliency explains."""
        return out[:, self.spec.lesion_class]

    def probability(self, out):
        """The lesion probability (B, X, Y, Z) from the network's output."""
        import torch

        if self.spec.output_activation == "sigmoid":
            return torch.sigmoid(out[:, self.spec.lesion_class])
        return torch.softmax(out, dim=1)[:, self.spec.lesion_class]

    @property
    def size_divisor(self) -> int:
        """Input sizes the network accepts are multiples of this."""
        return size_divisor(self.spec)

    def default_classifier(self) -> Path | None:
        """The TP/FP classifier shipped in the model's folder, if any."""
        if self.path is None or not Path(self.path).is_dir():
            return None
        p = Path(self.path) / "tp_classifier.json"
        return p if p.is_file() else None

    def describe(self) -> dict:
        """What the model is and expects, for logs, the worker's `info` and the Slicer module."""
        spec = self.spec
        return {"format": self.format, "name": spec.name, "version": spec.version, "path": str(self.path) if self.path else None,
                "input_channels": list(spec.input_channels), "output_activation": spec.output_activation,
                "lesion_class": spec.lesion_class, "target_spacing": spec.target_spacing, "orientation": spec.orientation,
                "roi_size": list(spec.roi_size), "threshold": spec.threshold, "min_lesion_mm3": spec.min_lesion_mm3,
                "gradcam_layer": spec.gradcam_layer, "expects": self.expects()}

    def expects(self) -> str:
        """One line for the user: the images the model takes and what is done to them."""
        names = " + ".join({"flair": "FLAIR", "mprage": "MPRAGE (T1)"}[c] for c in self.spec.input_channels)
        grid = f", resampled to {'x'.join(f'{v:g}' for v in self.spec.target_spacing)} mm" if self.spec.target_spacing else ""
        orient = f", reoriented to {self.spec.orientation}" if self.spec.orientation else ""
        return f"{names}{grid}{orient}; {self.spec.normalization} per image; {self.spec.output_activation} output"


def read_json_file(path, what: str):
    """A JSON file a model brings, read safely: its size bounded before reading, UTF-8, its nesting bounded."""
    p = Path(path)
    raw = b""
    try:
        size = p.stat().st_size
        if size <= MAX_JSON_BYTES:
            with open(p, "rb") as fh:
                raw = fh.read(MAX_JSON_BYTES + 1)  # a file that grows, or a device, is still read only this far
    except OSError as exc:
        raise InputError(f"{p} ({what}) cannot be read: {exc.strerror or exc}") from None
    if size > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{p} ({what}) is {max(size, len(raw)) / 2**20:.0f} MiB; a {what} is a few kB (at most "
                         f"{MAX_JSON_BYTES // 2**20} MiB are read): give the model's own file")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
        too_deep = _nesting_depth(data) > MAX_JSON_DEPTH
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} ({what}) is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON: {exc}") from None
    except RecursionError:  # nested deeper than Python's recursion limit
        too_deep = True
    if too_deep:
        raise InputError(f"{p} ({what}) nests lists or objects more than {MAX_JSON_DEPTH} deep; a {what} is a flat JSON object")
    return data


def _nesting_depth(data) -> int:
    """How deep lists and objects nest (iteratively: a deep one must not overflow the recursion it guards against)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _refuse_downloading_args(network_args: dict, source: str) -> None:
    """network_args that would fetch weights from the internet or a path outside the model folder when the
    network is built (MONAI downloads pretrained encoders into ~/.cache/torch/hub): the weights are the folder's."""
    todo = [("network_args", network_args)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if DOWNLOADING_ARG.search(str(k).lower()) and v not in (None, False, 0, "", [], {}):
                    raise InputError(f"{source}: {where}.{k} is {json.dumps(v, default=repr)[:100]}; building the network would "
                                     f"fetch pretrained weights from elsewhere. Set {k} to false or remove it: the weights are "
                                     "the model folder's own")
                todo.append((f"{where}.{k}", v))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str) and URL_VALUE.match(value):
            raise InputError(f"{source}: {where} is the URL {value[:100]!r}; nothing is downloaded, the weights are the model "
                             "folder's own. Remove it")


def mean_of_members(members):
    """Ensemble members as one network whose logits are the mean of theirs (nnU-Net averages its folds'
    logits; saliency explains the mean lesion logit of an ensemble). Layers are named members.<i>.<name>."""
    import torch

    class MeanOfMembers(torch.nn.Module):
        def __init__(self, nets):
            super().__init__()
            self.members = torch.nn.ModuleList(nets)

        def forward(self, x):
            out = self.members[0](x)
            for m in self.members[1:]:
                out = out + m(x)
            return out / len(self.members) if len(self.members) > 1 else out

    return MeanOfMembers(members)


def checked_channels(channels, n: int, source: str) -> list:
    """User-given names of a network's input channels: each FLAIR or MPRAGE (or an alias) once, as many as it takes."""
    names = [c for c in (channels.split(",") if isinstance(channels, str) else channels)]
    mapped = [channel_name(c) for c in names]
    if None in mapped:
        bad = names[mapped.index(None)]
        raise InputError(f"channel {bad!r} is not an image this tool provides; name each input channel flair or mprage (t1)")
    if len(mapped) != n or len(set(mapped)) != n:
        raise InputError(f"{source} takes {n} input channel{'s' if n != 1 else ''}; give {n} distinct names from flair, mprage "
                         f"(got {','.join(names)})")
    return mapped


def load_weights(path: Path, allowed_globals=()):
    """torch.load with weights_only=True (nothing but tensors and plain containers is unpickled)."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, or a truncated or corrupt file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load weights {path} safely (weights_only=True): the file is truncated or corrupt, or holds more "
                         f"than tensors ({first})") from None


# Where checkpoints put the state_dict: PyTorch Lightning and most scripts ("state_dict"), the common
# training-loop pattern ("model_state_dict"), MONAI's CheckpointSaver ({"net": ...} as its save_dict
# is usually named), "model", and nnU-Net ("network_weights").
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "net", "model", "network", "network_weights")
# Prefixes wrappers add to every key: DataParallel/DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(state, source=None):
    """The plain state_dict inside a checkpoint, with wrapper prefixes removed."""
    import torch

    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    changed = True
    while changed and isinstance(state, dict) and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def check_state_dict(state, source) -> None:
    """A dict of parameter names to tensors whose floating values are all finite: a NaN or Inf
    weight makes every probability NaN (and so "no lesions") without any other sign."""
    import torch

    if not isinstance(state, dict) or not state:
        raise InputError(f"weights {source} hold {'an empty dict' if isinstance(state, dict) else 'a ' + type(state).__name__}, not a "
                         "state_dict (a dict of parameter names to tensors, as torch.save(network.state_dict(), ...) writes)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"weights {source}: entry {key!r} holds a {type(value).__name__}, not a tensor; a state_dict maps "
                             "parameter names to tensors")
    for key, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise InputError(f"weights {source}: {key} has {bad} NaN or Inf values (of {value.numel()}); the network would give "
                             "NaN probabilities everywhere. Use weights from a training run that did not diverge")


def probe_network(net, spec: ModelSpec, device="cpu", source: str = "model", window=None) -> None:
    """One forward pass of zeros of the shape every sliding window has, (1, channels, *roi_size): a
    network the pipeline cannot use (2D, a tuple output, too few output classes, a roi its
    down-sampling does not fit) is refused when it is loaded, not after minutes of work.
    window: a smaller input shape to probe with, for networks that run on a whole large crop."""
    import torch

    window = list(window or spec.roi_size)
    shape = (1, len(spec.input_channels), *window)
    try:
        with torch.no_grad():
            out = net(torch.zeros(shape, device=device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:250] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source}: {spec.network_class} cannot run on the windows this tool gives it, shape {shape} "
                         f"(roi_size {spec.roi_size}): {first}") from None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 5 or list(out.shape[2:]) != window or out.shape[0] != 1:
        raise InputError(f"{source}: {spec.network_class} gives {got} for input {shape}; the pipeline needs a tensor of per-voxel "
                         f"class logits, (1, classes, {', '.join(map(str, window))})")
    least = 2 if spec.output_activation == "softmax" else 1
    if out.shape[1] < least or out.shape[1] <= spec.lesion_class:
        need = "at least 2 (background and lesion, softmax)" if least == 2 else "at least 1 (the lesion logit, sigmoid)"
        raise InputError(f"{source}: {spec.network_class} gives {out.shape[1]} output channels; the pipeline needs {need} "
                         f"and more than lesion_class ({spec.lesion_class}): set out_channels")


def _axis_codes_ok(codes: str) -> bool:
    axes = [{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c) for c in codes.upper()]
    return None not in axes and sorted(axes) == [0, 1, 2]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def freeze(net) -> None:
    """Eval mode and no parameter gradients: saliency needs input gradients only."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


def size_divisor(spec) -> int:
    """Input sizes the network accepts are multiples of this (product of the down-sampling strides)."""
    if spec is None:
        return 16
    strides = spec.network_args.get("strides")
    if not strides:
        return 32 if "swin" in spec.network_class.lower() else 16
    d = 1
    for s in strides:
        d *= int(max(s) if isinstance(s, (list, tuple)) else s)
    return d
