"""Models as researchers save them (issue 11): MONAI state_dicts from DataParallel, sigmoid outputs,
FLAIR-only inputs, a target spacing and orientation; what is refused; the classifier bound to its model."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tiny_spec

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.saliency.explain import explain_case, omega_from_lesion
from MSInstanceSaliencyLib.models.monai import build_network, save_model
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.segmentation.pipeline import segment
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad
from MSInstanceSaliencyLib.io.volumes import array_from_image


def _save(tmp_path, name, seed=0, state_transform=None, **spec_overrides):
    torch.manual_seed(seed)
    spec = tiny_spec(**spec_overrides)
    net = build_network(spec)
    d = tmp_path / name
    save_model(net, spec, d)
    if state_transform is not None:
        state = torch.load(d / spec.weights, weights_only=True)
        torch.save(state_transform(state), d / spec.weights)
    return d, net


def test_dataparallel_and_wrapped_checkpoints_load(tmp_path, tiny_model_dir):
    ref = load_model(tiny_model_dir)
    plain = torch.load(tiny_model_dir / "weights.pt", weights_only=True)
    for wrap in (lambda s: {f"module.{k}": v for k, v in s.items()},
                 lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3},
                 lambda s: {"net": {f"_orig_mod.{k}": v for k, v in s.items()}}):
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "model.json").write_text((tiny_model_dir / "model.json").read_text())
        torch.save(wrap(plain), d / "weights.pt")
        got = load_model(d)
        for k, v in ref.network.state_dict().items():
            assert torch.equal(got.network.state_dict()[k], v), k


def test_sigmoid_model_probability_and_saliency_target(tmp_path, small_phantom):
    args = dict(spatial_dims=3, in_channels=2, out_channels=1, channels=[4, 8, 16], strides=[2, 2], norm="batch", num_res_units=0)
    d, _ = _save(tmp_path, "sigmoid", network_args=args, output_activation="sigmoid", lesion_class=0)
    model = load_model(d)
    prepared = model.prepare(small_phantom.flair, small_phantom.mprage)
    prob = model.predict_probability(prepared.image)
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(prepared.image)[None], (32, 32, 32), 1, model.network, overlap=0.25,
                                          mode="gaussian")
    np.testing.assert_allclose(prob, torch.sigmoid(logits[0, 0]).numpy(), rtol=0, atol=1e-6)
    # the saliency of one voxel is the gradient of the single (lesion) logit there
    omega = np.zeros(prepared.image.shape[1:], bool)
    omega[40, 50, 41] = True
    sal = smoothgrad(model, prepared.image, omega, n_samples=1, sigma=0.0, context="full")
    x = torch.from_numpy(prepared.image)[None].requires_grad_(True)
    pad = [p for n in reversed(x.shape[2:]) for p in (0, -n % 4)]  # the network takes multiples of 4
    out = model.network(torch.nn.functional.pad(x, pad))
    (g,) = torch.autograd.grad(out[0, 0, 40, 50, 41], x)
    np.testing.assert_allclose(sal, g[0].numpy(), rtol=1e-5, atol=1e-7)


def test_spec_channel_aliases_and_activation_checked(tmp_path):
    d, _ = _save(tmp_path, "alias", input_channels=["FLAIR", "T1w"])
    assert load_model(d).spec.input_channels == ["flair", "mprage"]
    spec = json.loads((d / "model.json").read_text())
    spec["output_activation"] = "relu"
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="output_activation"):
        load_model(d)


def test_flair_only_model_runs_without_mprage(tmp_path, small_phantom):
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 16], strides=[2, 2], norm="batch", num_res_units=0)
    d, _ = _save(tmp_path, "flair_only", network_args=args, input_channels=["flair"], threshold=0.45)
    model = load_model(d)
    res = segment(small_phantom.flair, None, model)
    assert res.prepared.channels == ["flair"] and res.prepared.image.shape[0] == 1
    assert res.probability.shape == tuple(small_phantom.flair.GetSize())
    assert res.labels.max() >= 1
    exp = explain_case(model, res.prepared, omega_from_lesion(res.labels, 1), n_samples=2, max_omega_voxels=4)
    assert set(exp.maps) == {"flair"} and np.abs(exp.maps["flair"]).max() > 0
    # a two-channel model says it needs the MPRAGE
    d2, _ = _save(tmp_path, "two")
    with pytest.raises(InputError, match="MPRAGE"):
        segment(small_phantom.flair, None, load_model(d2))


def test_target_spacing_runs_on_the_model_grid_and_returns_on_the_reference(tmp_path, small_phantom):
    d, _ = _save(tmp_path, "coarse", target_spacing=[4.0, 4.0, 4.0], threshold=0.45)
    model = load_model(d)
    res = segment(small_phantom.flair, small_phantom.mprage, model)
    ref_shape = tuple(small_phantom.mprage.GetSize())  # 2 mm voxels
    assert res.prepared.image.shape[1:] == tuple(int(round(n / 2)) for n in ref_shape)
    assert res.probability.shape == ref_shape
    # the probability on the reference grid is the network-grid probability resampled linearly
    net_prob = model.predict_probability(res.prepared.image)
    grid = res.prepared.grid
    img = sitk.GetImageFromArray(net_prob.transpose(2, 1, 0))
    img.CopyInformation(grid.network)
    back = array_from_image(sitk.Resample(img, small_phantom.mprage, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    np.testing.assert_allclose(res.probability, back, atol=1e-6)
    assert res.labels.max() >= 1
    omega = omega_from_lesion(res.labels, 1)
    partials = []
    exp = explain_case(model, res.prepared, omega, n_samples=2, max_omega_voxels=4, partial=lambda k, maps: partials.append((k, maps)))
    assert exp.maps["flair"].shape == ref_shape and exp.omega is omega
    assert np.abs(exp.maps["flair"]).max() > 0
    # streamed maps come back to the reference grid too, the last one the answer
    assert [k for k, _ in partials] == [2]
    np.testing.assert_array_equal(partials[-1][1]["flair"], exp.maps["flair"])


def test_orientation_permutes_exactly(tmp_path, small_phantom):
    d, _ = _save(tmp_path, "lps", orientation="lps")
    model = load_model(d)
    assert model.spec.orientation == "LPS"
    prepared = model.prepare(small_phantom.flair, small_phantom.mprage)
    plain = load_model(_save(tmp_path, "plain")[0]).prepare(small_phantom.flair, small_phantom.mprage)
    # phantoms are RAS (nibabel's convention, as MNI images): LPS flips the first two axes, no interpolation
    # (the z-score's float32 sums run in another order, so the last bit may differ; interpolation would not)
    np.testing.assert_allclose(prepared.image, plain.image[:, ::-1, ::-1, :], rtol=0, atol=1e-6)
    lesion = np.zeros(prepared.shape, bool)
    lesion[10:13, 20:22, 30] = True
    np.testing.assert_array_equal(prepared.to_network(lesion), lesion[::-1, ::-1, :])
    np.testing.assert_array_equal(prepared.to_reference(prepared.to_network(lesion).astype(np.float32)), lesion.astype(np.float32))


def test_swinunetr_written_for_older_monai_builds(tmp_path):
    args = dict(img_size=[64, 64, 64], in_channels=2, out_channels=2, feature_size=12, spatial_dims=3, depths=[1, 1, 1, 1],
                num_heads=[1, 1, 1, 1])
    d, _ = _save(tmp_path, "swin", network_class="SwinUNETR", network_args=args, gradcam_layer="decoder1", roi_size=[64, 64, 64])
    model = load_model(d)
    assert type(model.network).__name__ == "SwinUNETR"


def test_torchscript_bundles_onnx_and_bare_weights_refused(tmp_path, tiny_model_dir):
    net = build_network(tiny_spec())
    ts = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(1, 2, 32, 32, 32)), str(ts))
    with pytest.raises(InputError, match="TorchScript"):
        load_model(ts)
    bundle = tmp_path / "spleen_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "UNet"}}))
    with pytest.raises(InputError, match="bundle"):
        load_model(bundle)
    with pytest.raises(InputError, match="bundle"):
        load_model(bundle / "configs" / "inference.json")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(InputError, match="ONNX"):
        load_model(onnx)
    with pytest.raises(InputError, match="model.json"):
        load_model(tiny_model_dir / "weights.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing")
    assert zipfile.is_zipfile(tiny_model_dir / "weights.pt")  # a torch.save archive is a zip too, and it is not refused


def test_classifier_is_bound_to_its_model(tmp_path, tiny_model_dir):
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier
    from MSInstanceSaliencyLib.classifier.scoring import load_classifier, model_identity

    demo = load_model()
    clf = load_classifier(model=demo)  # the bundled classifier records the demo model
    assert clf.trained_for["model_sha256"] == model_identity(demo)["model_sha256"]
    tiny = load_model(tiny_model_dir)
    with pytest.raises(InputError, match="no TP/FP classifier for the model tiny-test.*train-classifier"):
        load_classifier(model=tiny)
    with pytest.raises(InputError, match="trained on the maps of the model msis-demo-unet"):
        load_classifier(demo.default_classifier(), model=tiny)
    # one trained for the tiny model is accepted with it
    c = TPClassifier.load(demo.default_classifier())
    c.trained_for = model_identity(tiny)
    c.save(tmp_path / "clf.json")
    assert load_classifier(tmp_path / "clf.json", model=tiny).trained_for["model"] == "tiny-test"


def test_backward_that_cannot_fit_is_refused_before_the_work(tiny_model_dir):
    from MSInstanceSaliencyLib.saliency.common import GIB, backward_bytes, check_backward_fits

    model = load_model(tiny_model_dir)
    small = backward_bytes(model.network, (1, 2, 64, 64, 64))
    big = backward_bytes(model.network, (1, 2, 128, 128, 128))
    assert big == 8 * small  # activations scale with the voxel count
    check_backward_fits(model.network, (1, 2, 160, 160, 160), torch.device("cpu"))  # about 1 GiB: fits
    with pytest.raises(InputError, match=r"needs about [0-9.]+ GiB in fp32, but cpu has [0-9.]+ GiB free"):
        check_backward_fits(model.network, (1, 2, 2048, 2048, 1024), torch.device("cpu"))
    assert backward_bytes(model.network, (1, 2, 2048, 2048, 1024)) > 64 * GIB
