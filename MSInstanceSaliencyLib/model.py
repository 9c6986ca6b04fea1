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
    except TypeError as exc:
        raise InputError(f"cannot build {spec.network_class} with {spec.network_args}: {exc}") from None


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
    except Exception as exc:  # unpickling refused or corrupt file
        raise InputError(f"cannot load weights {wpath} safely (weights_only=True): {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"weights {wpath} do not fit {spec.network_class}{spec.network_args}: {str(exc).splitlines()[0][:300]}") from None
    freeze(net)
    net.to(device)
    return LoadedModel(net, spec, d)


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
