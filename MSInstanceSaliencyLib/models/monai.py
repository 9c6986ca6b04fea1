"""model.json folders: a MONAI network named by a JSON spec plus a plain state_dict (base.py has the spec).

A model folder holds `model.json` and the weights it names (a plain state_dict, read with
`torch.load(..., weights_only=True)`: nothing is ever unpickled). The spec names a MONAI network
class and its arguments, the input channel order, the pre-processing, the sliding-window settings,
the threshold and the default Grad-CAM++ layer, so a user can point `--model DIR` at their own
network without code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from .base import (LoadedModel, ModelSpec, SPEC_FILE, check_state_dict, checked_channels, freeze, load_weights, probe_network,
                   read_json_file, unwrap_state_dict)


def build_network(spec: ModelSpec):
    """Instantiate the spec's MONAI network (only classes from monai.networks.nets)."""
    import inspect

    import torch
    from monai.networks import nets

    cls = getattr(nets, spec.network_class, None) if not spec.network_class.startswith("_") else None
    if cls is None or not isinstance(cls, type):
        raise InputError(f"network class {spec.network_class!r} is not in monai.networks.nets")
    if not issubclass(cls, torch.nn.Module):
        raise InputError(f"{spec.network_class!r} in monai.networks.nets is not a network (a torch.nn.Module); name a network "
                         "class such as UNet, SegResNet or SwinUNETR")
    args = dict(spec.network_args)
    if "img_size" in args and "img_size" not in inspect.signature(cls.__init__).parameters:
        del args["img_size"]  # SwinUNETR before MONAI 1.5 took the input size; later versions accept any multiple of 32
    try:
        return cls(**args)
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
    return ModelSpec.from_dict(read_json_file(f, "model spec"), source=str(f))


def load_msis_model(model_dir, device="cpu", channels=None) -> LoadedModel:
    d = Path(model_dir)
    spec = read_spec(d)
    if channels is not None:
        spec.input_channels = checked_channels(channels, len(spec.input_channels), str(d / SPEC_FILE))
    net = build_network(spec)
    wpath = d / spec.weights
    if not wpath.is_file():
        raise InputError(f"weights file {wpath} named in {d / SPEC_FILE} does not exist")
    if not wpath.resolve().is_relative_to(d.resolve()):  # a symbolic link may lead out of the folder
        raise InputError(f"weights file {wpath} named in {d / SPEC_FILE} is {wpath.resolve()}, outside the model folder; "
                         "copy the weights into the folder")
    state = unwrap_state_dict(load_weights(wpath), wpath)
    check_state_dict(state, wpath)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"weights {wpath} do not fit {spec.network_class}{spec.network_args}: {str(exc).splitlines()[0][:300]}") from None
    freeze(net)
    net.to(device)
    probe_network(net, spec, device, source=str(d / SPEC_FILE))
    return LoadedModel(net, spec, d)


def save_model(network, spec: ModelSpec, out_dir: str | os.PathLike) -> Path:
    """Write a model folder: the spec as JSON and the weights as a plain state_dict, each file whole (a
    failed save, e.g. a checkpoint on a full disk, keeps the earlier file)."""
    import torch

    from ..io.outputs import atomic_write

    d = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    atomic_write(d / spec.weights, lambda tmp: torch.save(state, str(tmp)))
    atomic_write(d / SPEC_FILE, (json.dumps(spec.to_dict(), indent=2) + "\n").encode("utf-8"))
    return d
