import json
import pickle

import numpy as np
import pytest
import torch

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.models.base import PAPER_UNET_ARGS
from MSInstanceSaliencyLib.models.monai import build_network, read_spec, save_model
from MSInstanceSaliencyLib.models.base import ModelSpec
from MSInstanceSaliencyLib.models.loading import default_model_dir, load_model

from conftest import tiny_spec
from test_outputs import assert_failed_rewrite_keeps_the_file


def test_spec_round_trip_and_frozen_eval(tiny_model_dir):
    m = load_model(tiny_model_dir)
    assert m.spec == read_spec(tiny_model_dir)
    assert not m.network.training
    assert all(not p.requires_grad for p in m.network.parameters())


def test_paper_configuration_is_expressible(tmp_path):
    spec = ModelSpec(network_args=dict(PAPER_UNET_ARGS))
    net = build_network(spec)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs[:5]] == [32, 64, 128, 256, 512]  # the encoder
    # the scripts' Grad-CAM++ layer: a transposed conv back to 32 channels at half resolution
    layer = dict(net.named_modules())[spec.gradcam_layer]
    assert isinstance(layer, torch.nn.ConvTranspose3d) and layer.out_channels == 32
    save_model(net, spec, tmp_path / "paper")
    loaded = load_model(tmp_path / "paper")
    assert loaded.spec.roi_size == [96, 96, 96] and loaded.spec.threshold == 0.3
    y = loaded.network(torch.zeros(1, 2, 32, 32, 32))
    assert y.shape == (1, 2, 32, 32, 32)


def test_weights_are_never_unpickled(tmp_path, tiny_model_dir):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "model.json").write_text((tiny_model_dir / "model.json").read_text())

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(d / "weights.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(InputError, match="safely"):
        load_model(d)


def test_bad_specs_give_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing")
    spec = json.loads((tiny_model_dir / "model.json").read_text())
    spec["network_args"]["in_channels"] = 3
    d = tmp_path / "three"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="3 input channels"):
        read_spec(d)
    spec["network_args"]["in_channels"] = 2
    spec["network_class"] = "os.system"
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="not in monai.networks.nets"):
        load_model(d)
    spec["network_class"] = "UNet"
    spec["bogus"] = 1
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="unknown keys"):
        read_spec(d)


def test_weights_of_another_network_rejected(tmp_path, tiny_model_dir):
    spec = tiny_spec(network_args=dict(tiny_spec().network_args, channels=[8, 16, 32]))
    d = tmp_path / "mismatch"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(spec.to_dict()))
    (d / "weights.pt").write_bytes((tiny_model_dir / "weights.pt").read_bytes())
    with pytest.raises(InputError, match="do not fit"):
        load_model(d)


def test_bundled_demo_model_loads():
    m = load_model(default_model_dir())
    assert m.spec.input_channels == ["flair", "mprage"]
    assert m.spec.network_class == "UNet"


def test_a_failed_save_keeps_the_earlier_model_folder(tmp_path):
    """A checkpoint on a full disk (torch.save stops part-way): one InputError naming weights.pt, and the
    earlier weights and spec are still there whole, so the folder still loads."""
    torch.manual_seed(0)
    spec = tiny_spec()
    d = save_model(build_network(spec), spec, tmp_path / "m")
    weights = (d / spec.weights).read_bytes()
    torch.manual_seed(1)
    assert_failed_rewrite_keeps_the_file(d / spec.weights, lambda: save_model(build_network(spec), spec, d), n_bytes=len(weights) // 2)
    assert load_model(d, device="cpu").spec == spec
    # a spec that cannot be written after the new weights were: the earlier spec stays
    bigger = ModelSpec(**{**spec.to_dict(), "description": "x" * 2 * len(weights)})
    assert_failed_rewrite_keeps_the_file(d / "model.json", lambda: save_model(build_network(spec), bigger, d), n_bytes=len(weights) + 1000)
    assert read_spec(d) == spec
