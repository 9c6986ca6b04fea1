"""Model files that must be refused with one line, exit 2, before anything is built or downloaded, and
model identities that tell apart what changes the output (issue 24, round 2: items 1, 5, 10 and 12).

LST-AI checkpoints are written in lst_ai/weights.py's format ({"config", "state_dict"}) from this
package's own LST-AI network (its layer names are lst_ai's, test_lstai_model.py compares the two);
nnU-Net folders are written by hand from dynamic-network-architectures (nnU-Net's own training, in
nnunet_reference.py, takes a minute); model.json folders as conftest's tiny model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec
from test_bad_inputs import _no_debug, one_error, run, subprocess_msis  # noqa: F401  (_no_debug: an autouse fixture)

from MSInstanceSaliencyLib.models.formats import LSTAI_STEMS
from MSInstanceSaliencyLib.models.lstai import build_lstai_network
from MSInstanceSaliencyLib.models.base import ModelSpec
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.classifier.scoring import model_identity

ROOT = Path(__file__).resolve().parents[2]
LSTAI_CONFIG = dict(in_channels=2, n_conv_blocks=2, n_filters=2, n_classes=1, ds_layers=[-2])


def _segment(capsys, phantom_files, model, tmp_path):
    """`msis segment FLAIR MPRAGE --model MODEL` in this process: (exit code, stdout, stderr)."""
    return run(capsys, "segment", phantom_files["flair"], phantom_files["mprage"], "--model", model, "--out", tmp_path / "out",
               "--device", "cpu")


def _lstai_folder(d: Path, members=1, config=None, change=None) -> Path:
    """LST-AI members saved as lst_ai/weights.py saves them; change(i, config, state) edits member i before saving."""
    d.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(LSTAI_STEMS[:members]):
        torch.manual_seed(i)
        cfg = dict(config or LSTAI_CONFIG)
        state = build_lstai_network(dict(LSTAI_CONFIG)).state_dict()
        if change is not None:
            change(i, cfg, state)
        torch.save({"config": cfg, "state_dict": state}, d / f"{stem}.pt")
    return d


def _model_json_folder(tiny_model_dir, d: Path, **changes) -> Path:
    shutil.copytree(tiny_model_dir, d)
    spec = json.loads((d / "model.json").read_text())
    spec.update(changes)
    (d / "model.json").write_text(json.dumps(spec))
    return d


# ----------------------------------------------------------------------------- 1. non-finite LST-AI weights

@pytest.mark.parametrize("member, key, value", [(0, "out_seg.bias", float("nan")), (2, "stem.block.0.weight", float("inf")),
                                                (1, "dec_conv.1.block.1.weight", float("-inf"))])
def test_lstai_members_with_non_finite_weights_are_refused(phantom_files, tmp_path, capsys, member, key, value):
    def poison(i, cfg, state):
        if i == member:
            state[key].view(-1)[0] = value

    d = _lstai_folder(tmp_path / "lstai", members=3, change=poison)
    one_error(_segment(capsys, phantom_files, d, tmp_path), f"{LSTAI_STEMS[member]}.pt", key, "NaN or Inf")


def test_lstai_nan_bias_through_the_command_line(phantom_files, tmp_path):
    d = _lstai_folder(tmp_path / "lstai", change=lambda i, cfg, state: state["out_seg.bias"].fill_(float("nan")))
    res = subprocess_msis("segment", phantom_files["flair"], phantom_files["mprage"], "--model", d, "--out", tmp_path / "o",
                          "--device", "cpu")
    one_error((res.returncode, res.stdout, res.stderr), "out_seg.bias", "NaN or Inf")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 10. malformed fields, bounded files

@pytest.mark.parametrize("change, fragment", [
    ({"n_filters": "abc"}, "n_filters"),
    ({"n_filters": -4}, "n_filters"),
    ({"n_filters": 4.5}, "n_filters"),
    ({"n_filters": 2048}, "n_filters"),  # 6 GB per tensor were allocated before the weights were compared
    ({"n_filters": True}, "n_filters"),
    ({"n_conv_blocks": 0}, "n_conv_blocks"),
    ({"n_conv_blocks": 7}, "n_conv_blocks"),  # the 192^3 crop halves at most 6 times
    ({"ds_layers": [99]}, "ds_layers"),
    ({"ds_layers": "-2"}, "ds_layers"),
    ({"in_channels": 3}, "in_channels"),
    ({"n_classes": 0}, "n_classes"),
    ({"bottleneck_filters": [8]}, "bottleneck_filters"),
    ({"n_filters": 3}, "stem.block.0.weight"),  # in range, but not the checkpoint's network: refused before it is built
    ({"ds_layers": []}, "unexpected"),
])
def test_malformed_lstai_configs_are_refused(phantom_files, tmp_path, capsys, change, fragment):
    d = _lstai_folder(tmp_path / "lstai", change=lambda i, cfg, state: cfg.update(change))
    one_error(_segment(capsys, phantom_files, d, tmp_path), LSTAI_STEMS[0], fragment)


@pytest.mark.parametrize("name, args", [
    ("FlexUNetEncoderRegister", {}),  # built without complaint, then it has no load_state_dict: an internal error
    ("BlockArgs", dict(num_repeat=1, kernel_size=3, stride=1, expand_ratio=1, input_filters=2, output_filters=2, id_skip=True,
                       se_ratio=None)),
])
def test_model_json_naming_a_class_that_is_not_a_network(phantom_files, tiny_model_dir, tmp_path, capsys, name, args):
    d = _model_json_folder(tiny_model_dir, tmp_path / name, network_class=name, network_args=args, input_channels=["flair", "mprage"])
    one_error(_segment(capsys, phantom_files, d, tmp_path), name, "not a network")


@pytest.mark.parametrize("content, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nests"),  # RecursionError in json
    ('{"training": ' + "[" * 500 + "]" * 500 + "}", "nests"),  # parses, but copying and hashing it would recurse
    ('{"name": "caf\xe9"}'.encode("latin-1"), "UTF-8"),
])
def test_model_json_that_is_too_deep_or_not_utf8(phantom_files, tiny_model_dir, tmp_path, capsys, content, fragment):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    one_error(_segment(capsys, phantom_files, d, tmp_path), "model.json", fragment)


@pytest.mark.parametrize("spacing", [[0.01] * 3, [1.0, 1.0, 0.0001], [1.0, 1.0, 1e6]])
def test_model_json_target_spacing_out_of_range(phantom_files, tiny_model_dir, tmp_path, capsys, spacing):
    d = _model_json_folder(tiny_model_dir, tmp_path / "model", target_spacing=spacing)
    one_error(_segment(capsys, phantom_files, d, tmp_path), "target_spacing")


def test_gigabyte_json_files_are_not_read(phantom_files, tiny_model_dir, tmp_path, capsys):
    # sparse files: instant to make, and a read of the whole would take 3 GB
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(3 * 2**30)
    res = subprocess_msis("segment", phantom_files["flair"], phantom_files["mprage"], "--model", big, "--out", tmp_path / "o",
                          "--device", "cpu", timeout=60)
    one_error((res.returncode, res.stdout, res.stderr), "big.json")
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    with open(d / "model.json", "r+b") as fh:
        fh.truncate(3 * 2**30)
    for model in (d, d / "model.json"):
        one_error(_segment(capsys, phantom_files, model, tmp_path), "model.json", "MiB")


# ----------------------------------------------------------------------------- 12. nothing from outside the folder

@pytest.mark.parametrize("network_class, args, key", [
    ("HoVerNet", {"pretrained_url": "file:///etc/hostname", "in_channels": 2, "out_classes": 2}, "pretrained_url"),
    ("FlexUNet", {"in_channels": 2, "out_channels": 2, "backbone": "efficientnet-b0", "pretrained": True, "spatial_dims": 3},
     "pretrained"),
    ("HoVerNet", {"pretrained_url": "http://127.0.0.1:9/hovernet.pt", "in_channels": 2, "out_classes": 2}, "pretrained_url"),
    ("UNet", {**tiny_spec().network_args, "download": "yes"}, "download"),
    ("UNet", {**tiny_spec().network_args, "act": ["PRELU", {"init": "https://example.org/x.pt"}]}, "https://example.org"),
    ("TorchVisionFCModel", {"model_name": "resnet18", "weights": "DEFAULT"}, "weights"),
])
def test_network_args_that_download_are_refused(phantom_files, tiny_model_dir, tmp_path, capsys, monkeypatch, network_class, args,
                                                key):
    hub = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = _model_json_folder(tiny_model_dir, tmp_path / "model", network_class=network_class, network_args=args)
    one_error(_segment(capsys, phantom_files, d, tmp_path), key, "folder's own")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.relative_to(tmp_path).parts[0] in ("torch_home", "cache")]


def test_pretrained_false_and_gradient_checkpointing_are_still_accepted():
    args = {"in_channels": 2, "out_channels": 2, "backbone": "efficientnet-b0", "pretrained": False, "spatial_dims": 3}
    assert ModelSpec.from_dict(tiny_spec(network_class="FlexUNet", network_args=args).to_dict()).network_args["pretrained"] is False
    swin = {"in_channels": 2, "out_channels": 2, "feature_size": 12, "use_checkpoint": True}
    assert ModelSpec.from_dict(tiny_spec(network_class="SwinUNETR", network_args=swin).to_dict()).network_args == swin


def test_weights_outside_the_model_folder_are_refused(phantom_files, tiny_model_dir, tmp_path, capsys):
    shutil.copy(tiny_model_dir / "weights.pt", tmp_path / "x.pt")
    d = _model_json_folder(tiny_model_dir, tmp_path / "model", weights="../x.pt")
    one_error(_segment(capsys, phantom_files, d, tmp_path), "weights", "inside the model folder")
    # a symbolic link inside the folder that leads out of it
    d = _model_json_folder(tiny_model_dir, tmp_path / "linked")
    (d / "weights.pt").unlink()
    (d / "weights.pt").symlink_to(tmp_path / "x.pt")
    one_error(_segment(capsys, phantom_files, d, tmp_path), "weights.pt", "outside the model folder")
    # a linked folder inside the model folder that leads out of it
    d = _model_json_folder(tiny_model_dir, tmp_path / "linked_dir", weights="sub/x.pt")
    (d / "sub").symlink_to(tmp_path, target_is_directory=True)
    one_error(_segment(capsys, phantom_files, d, tmp_path), "x.pt", "outside the model folder")
    # weights in a subfolder of the model folder are fine
    d3 = _model_json_folder(tiny_model_dir, tmp_path / "nested", weights="w/weights.pt")
    (d3 / "w").mkdir()
    (d3 / "weights.pt").rename(d3 / "w" / "weights.pt")
    assert load_model(d3).spec.weights == "w/weights.pt"


# ----------------------------------------------------------------------------- 5. identity covers the configuration

def test_demo_model_identity_is_the_one_its_classifier_and_tables_record():
    recorded = set()
    for p in (ROOT / "Resources").rglob("*.json"):
        text = p.read_text(errors="replace")
        if "model_sha256" in text:
            recorded |= {line.split('"model_sha256"')[1].split('"')[1] for line in text.splitlines() if '"model_sha256"' in line}
    clf = json.loads((ROOT / "Resources" / "Models" / "demo_unet" / "tp_classifier.json").read_text())
    assert recorded and recorded == {clf["trained_for"]["model_sha256"]}
    assert model_identity(load_model())["model_sha256"] == clf["trained_for"]["model_sha256"]


def _nnunet_folder(d: Path, *, spacing=(1.0, 1.0, 1.0), normalization="ZScoreNormalization", mirror_axes=(0, 1, 2)) -> Path:
    """A minimal nnU-Net v2 trained-model folder (one fold, PlainConvUNet of 2 stages) with random weights."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    arch_kwargs = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                   "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
                   "n_conv_per_stage_decoder": [1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": [16, 16, 16], "median_image_size_in_voxels": [40, 44, 36], "spacing": list(spacing),
              "normalization_schemes": [normalization] * 2, "use_mask_for_norm": [False, False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
              "batch_dice": False}
    plans = {"dataset_name": "Dataset501_MSISTest", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [40, 44, 36], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {}}
    dataset = {"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 4,
               "file_ending": ".nii.gz"}
    torch.manual_seed(0)
    from torch import nn

    d = d / "nnUNetTrainer__nnUNetPlans__3d_fullres"  # the same name everywhere: nnU-Net models are versioned by it

    net = unet.PlainConvUNet(input_channels=2, num_classes=2, deep_supervision=False, **{
        **arch_kwargs, "conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU})
    (d / "fold_0").mkdir(parents=True)
    (d / "plans.json").write_text(json.dumps(plans))
    (d / "dataset.json").write_text(json.dumps(dataset))
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres", "fold": 0},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": list(mirror_axes)},
               d / "fold_0" / "checkpoint_final.pth")
    return d


def test_nnunet_identity_covers_plans_dataset_and_mirroring(tmp_path):
    base = model_identity(load_model(_nnunet_folder(tmp_path / "base")))["model_sha256"]
    assert model_identity(load_model(_nnunet_folder(tmp_path / "same")))["model_sha256"] == base  # same files, same model
    variants = {
        "spacing": load_model(_nnunet_folder(tmp_path / "spacing", spacing=(2.0, 1.0, 1.0))),
        "no normalisation": load_model(_nnunet_folder(tmp_path / "nonorm", normalization="NoNormalization")),
        "mirroring off": load_model(_nnunet_folder(tmp_path / "mirror"), mirroring=False),
        "other mirror axes": load_model(_nnunet_folder(tmp_path / "axes", mirror_axes=(0, 1))),
    }
    relabelled = _nnunet_folder(tmp_path / "labels")
    dataset = json.loads((relabelled / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "wmh": 1}
    (relabelled / "dataset.json").write_text(json.dumps(dataset))
    variants["dataset.json"] = load_model(relabelled)
    shas = {name: model_identity(m)["model_sha256"] for name, m in variants.items()}
    assert base not in shas.values() and len(set(shas.values())) == len(shas), shas


def test_lstai_identity_covers_its_input_crop(tmp_path):
    model = load_model(_lstai_folder(tmp_path / "lstai", members=2))
    full = model_identity(model)["model_sha256"]
    assert model_identity(load_model(tmp_path / "lstai"))["model_sha256"] == full
    cropped = copy.copy(model)
    cropped.input_shape = (48, 48, 48)  # what the network sees, and so its output
    assert model_identity(cropped)["model_sha256"] != full
    assert model.identity_extras()["configs"][0]["n_filters"] == LSTAI_CONFIG["n_filters"]
