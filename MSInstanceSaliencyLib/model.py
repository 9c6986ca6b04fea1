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
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

SPEC_FILE = "model.json"
KNOWN_CHANNELS = ("flair", "mprage")

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
        n_out = self.network_args.get("out_channels")
        if n_out is not None and (not _is_int(n_out) or n_out < 2 or n_out <= self.lesion_class):
            raise InputError(f"{source}: network_args out_channels is {n_out!r}; the network must give one logit per class (background "
                             f"and lesion, softmax over them), so at least 2 and more than lesion_class ({self.lesion_class})")
        if not self.weights.strip() or Path(self.weights).is_absolute():
            raise InputError(f"{source}: weights must name a file inside the model folder, got {self.weights!r}")

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
    """A network in eval mode with frozen parameters, and the spec it came from."""

    network: object  # torch.nn.Module
    spec: ModelSpec
    path: Path | None = None

    def to(self, device):
        self.network.to(device)
        return self


def default_model_dir() -> Path:
    """The bundled demo model (override with MSIS_MODEL_DIR)."""
    env = os.environ.get("MSIS_MODEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / "demo_unet"


def build_network(spec: ModelSpec):
    """Instantiate the spec's MONAI network (only classes from monai.networks.nets)."""
    from monai.networks import nets

    cls = getattr(nets, spec.network_class, None)
    if cls is None or not isinstance(cls, type):
        raise InputError(f"network class {spec.network_class!r} is not in monai.networks.nets")
    try:
        return cls(**spec.network_args)
    except Exception as exc:  # wrong, missing or inconsistent arguments; optional packages the class needs
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot build {spec.network_class} with {spec.network_args}: {first}") from None


def read_spec(model_dir: str | os.PathLike) -> ModelSpec:
    d = Path(model_dir)
    f = d / SPEC_FILE
    if not d.is_dir():
        raise InputError(f"model folder {d} does not exist (it must hold {SPEC_FILE} and the weights)")
    if not f.is_file():
        raise InputError(f"model folder {d} has no {SPEC_FILE}")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{f} is not valid JSON: {exc}") from None
    return ModelSpec.from_dict(data, source=str(f))


def load_model(model_dir: str | os.PathLike | None = None, device="cpu") -> LoadedModel:
    """Load a model folder (default: the bundled demo model) in eval mode, parameters frozen."""
    import torch

    d = Path(model_dir) if model_dir is not None else default_model_dir()
    spec = read_spec(d)
    net = build_network(spec)
    wpath = d / spec.weights
    if not wpath.is_file():
        raise InputError(f"weights file {wpath} named in {d / SPEC_FILE} does not exist")
    try:
        state = torch.load(str(wpath), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, or a truncated or corrupt file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load weights {wpath} safely (weights_only=True): the file is truncated or corrupt, or holds more "
                         f"than tensors ({first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    check_state_dict(state, wpath)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"weights {wpath} do not fit {spec.network_class}{spec.network_args}: {str(exc).splitlines()[0][:300]}") from None
    freeze(net)
    net.to(device)
    probe_network(net, spec, device, source=str(d / SPEC_FILE))
    return LoadedModel(net, spec, d)


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


def probe_network(net, spec: ModelSpec, device="cpu", source: str = "model") -> None:
    """One forward pass of zeros of the shape every sliding window has, (1, channels, *roi_size): a
    network the pipeline cannot use (2D, a tuple output, too few output classes, a roi its
    down-sampling does not fit) is refused when it is loaded, not after minutes of work."""
    import torch

    shape = (1, len(spec.input_channels), *spec.roi_size)
    try:
        with torch.no_grad():
            out = net(torch.zeros(shape, device=device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:250] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source}: {spec.network_class} cannot run on the windows this tool gives it, shape {shape} "
                         f"(roi_size {spec.roi_size}): {first}") from None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 5 or tuple(out.shape[2:]) != tuple(spec.roi_size) or out.shape[0] != 1:
        raise InputError(f"{source}: {spec.network_class} gives {got} for input {shape}; the pipeline needs a tensor of per-voxel "
                         f"class logits, (1, classes, {', '.join(map(str, spec.roi_size))})")
    if out.shape[1] < 2 or out.shape[1] <= spec.lesion_class:
        raise InputError(f"{source}: {spec.network_class} gives {out.shape[1]} output channels; the pipeline needs at least 2 "
                         f"(background and lesion) and more than lesion_class ({spec.lesion_class}): set out_channels")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def freeze(net) -> None:
    """Eval mode and no parameter gradients: saliency needs input gradients only."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


def save_model(network, spec: ModelSpec, out_dir: str | os.PathLike) -> Path:
    """Write a model folder: the spec as JSON and the weights as a plain state_dict."""
    import torch

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    torch.save(state, str(d / spec.weights))
    (d / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return d


def resolve_device(device: str = "auto"):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)
