"""nnU-Net trained-model folders that are broken or malformed are refused at load with one line (issue 24:
items 1, 6, 10, 11): non-finite weights, folds whose checkpoint cannot be read, badly typed or out-of-range
dataset.json / plans.json / checkpoint fields, and datasets with an `ignore` label.

The folders are small and written here in nnU-Net v2's layout (plans.json as nnU-Net's ExperimentPlanner
writes it, checkpoints holding the real PlainConvUNet's state_dict as nnUNetTrainer saves it) so that each
load takes a fraction of a second; test_nnunet_model.py checks the loader against a folder nnU-Net itself
trained. Each bad variant is a copy of a good folder with one field or tensor changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import _no_debug, files, one_error, run  # noqa: F401  (fixtures used by name)

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.models.loading import load_model

CHECKPOINT = "checkpoint_final.pth"
ARCH_KWARGS = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def _plans(patch, spacing) -> dict:
    """plans.json as nnU-Net 2.8.1's ExperimentPlanner writes it (3d_fullres only, a tiny PlainConvUNet)."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset502_MSISRefusals", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [20, 25, 21],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": [20, 25, 21], "spacing": list(spacing),
            "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": ARCH_KWARGS, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            c: {"max": 900.0, "mean": 400.0, "median": 410.0, "min": 0.0, "percentile_00_5": 20.0, "percentile_99_5": 800.0,
                "std": 120.0} for c in ("0", "1")},
    }


def write_nnunet_folder(d: Path, *, folds=(0, 1), labels=None, patch=(32, 32, 32), spacing=(8.0, 8.0, 8.0)) -> Path:
    """A trained-model folder in nnU-Net v2's layout with randomly initialised folds of a tiny PlainConvUNet (on the
    2 mm phantom the 8 mm grid is one patch: a segmentation takes seconds)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    labels = labels or {"background": 0, "lesion": 1}
    heads = len([k for k in labels if k != "ignore"])
    d.mkdir(parents=True)
    (d / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": labels, "numTraining": 4,
                                                "file_ending": ".nii.gz"}))
    plans = _plans(patch, spacing)
    (d / "plans.json").write_text(json.dumps(plans))
    kwargs = {**ARCH_KWARGS, "conv_op": torch.nn.Conv3d, "norm_op": torch.nn.InstanceNorm3d, "nonlin": torch.nn.LeakyReLU}
    for f in folds:
        torch.manual_seed(f)
        net = PlainConvUNet(input_channels=2, num_classes=heads, deep_supervision=True, **kwargs)
        (d / f"fold_{f}").mkdir()
        torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                    "logging": {"epoch_end_timestamps": [1.0]}, "_best_ema": None, "current_epoch": 1,
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": f, "dataset_json": {},
                                  "device": "cpu"},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
                   d / f"fold_{f}" / CHECKPOINT)
    return d


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_nnunet_folder(tmp_path_factory.mktemp("nnunet_small") / "nnUNetTrainer__nnUNetPlans__3d_fullres")


def variant(good: Path, dst: Path, *, dataset=None, plans=None, checkpoint=None, fold=0) -> Path:
    """A copy of the good folder with dataset.json, plans.json or one fold's checkpoint changed in place."""
    shutil.copytree(good, dst, symlinks=True)
    for name, change in (("dataset.json", dataset), ("plans.json", plans)):
        if change is not None:
            d = json.loads((dst / name).read_text())
            change(d)
            (dst / name).write_text(json.dumps(d))
    if checkpoint is not None:
        path = dst / f"fold_{fold}" / CHECKPOINT
        ckpt = torch.load(path, weights_only=False)
        checkpoint(ckpt)
        torch.save(ckpt, path)
    return dst


def segment_cli(capsys, files, model, out, *more):
    return run(capsys, "segment", files["flair"], files["mprage"], "--out", out, "--model", model, "--device", "cpu", *more)


# ----------------------------------------------------------------------------- 1. non-finite weights

def _first(state, prefix, suffix):
    return next(k for k in state if k.startswith(prefix) and k.endswith(suffix))


def _nan_in_encoder_conv(ckpt):
    key = _first(ckpt["network_weights"], "encoder.stages.0", "conv.weight")
    ckpt["network_weights"][key].view(-1)[5] = float("nan")
    return key


def _inf_in_seg_bias(ckpt):
    key = [k for k in ckpt["network_weights"] if k.startswith("decoder.seg_layers") and k.endswith("bias")][-1]
    ckpt["network_weights"][key][1] = float("inf")
    return key


@pytest.mark.parametrize("fold, poison", [(0, _nan_in_encoder_conv), (1, _inf_in_seg_bias)])
def test_non_finite_weights_are_refused_naming_file_and_tensor(good, files, tmp_path, capsys, fold, poison):
    keys = []
    d = variant(good, tmp_path / "m", checkpoint=lambda ckpt: keys.append(poison(ckpt)), fold=fold)
    line = one_error(segment_cli(capsys, files, d, tmp_path / "o"), f"fold_{fold}/{CHECKPOINT}", keys[0], "NaN or Inf")
    assert not (tmp_path / "o" / "msis_run.json").exists(), line
    with pytest.raises(InputError, match=keys[0].replace(".", r"\.")):
        load_model(d, folds=[fold])


# ----------------------------------------------------------------------------- 6. folds that cannot be read

def _broken_folds(good: Path, dst: Path) -> Path:
    """The good folds 0 and 1, and fold_2..fold_5 whose checkpoint is a folder, /dev/zero, a symlink loop, missing."""
    d = variant(good, dst)
    for f in (2, 3, 4, 5):
        (d / f"fold_{f}").mkdir()
    (d / "fold_2" / CHECKPOINT).mkdir()
    os.symlink("/dev/zero", d / "fold_3" / CHECKPOINT)  # torch.load would read it without end
    os.symlink(CHECKPOINT, d / "fold_4" / CHECKPOINT)  # a link to itself
    shutil.copy(d / "fold_0" / CHECKPOINT, d / "fold_5" / "checkpoint_latest.pth")  # training not finished
    return d


BROKEN = {2: "is a folder", 3: "not a regular file", 4: "symbolic links", 5: "does not exist"}


def test_broken_folds_are_named_in_the_output_and_msis_run_json(good, files, tmp_path, capsys):
    d = _broken_folds(good, tmp_path / "m")
    rc, _, err = segment_cli(capsys, files, d, tmp_path / "o")
    assert rc == 0, err
    steps = json.loads((tmp_path / "o" / "msis_run.json").read_text())["preprocessing"]
    folds_step = next(s for s in steps if s.startswith("nnU-Net folds 0, 1;"))
    for f, why in BROKEN.items():
        warning = [line for line in err.splitlines() if line.startswith(f"msis: warning: fold_{f}/{CHECKPOINT}")]
        assert len(warning) == 1 and why in warning[0] and f"fold {f} not used" in warning[0], err
        assert any(part.startswith(f"fold_{f}/{CHECKPOINT}") and why in part for part in folds_step.split("; ")), folds_step
    model = load_model(d)
    assert model.folds == [0, 1] and len(model.notes) == 4 and model.describe()["notes"] == model.notes


@pytest.mark.parametrize("fold", sorted(BROKEN))
def test_a_broken_fold_asked_for_is_refused(good, files, tmp_path, capsys, fold):
    d = _broken_folds(good, tmp_path / "m")
    one_error(segment_cli(capsys, files, d, tmp_path / "o", "--folds", f"0,{fold}"), f"fold {fold}", f"fold_{fold}/{CHECKPOINT}",
              BROKEN[fold])


def test_no_usable_fold_lists_why(good, tmp_path):
    d = _broken_folds(good, tmp_path / "m")
    for f in (0, 1):
        shutil.rmtree(d / f"fold_{f}")
    with pytest.raises(InputError, match="no fold has a usable.*fold_2/.*is a folder.*fold_3/.*not a regular file"):
        load_model(d)


# ----------------------------------------------------------------------------- 10. malformed fields

def _config(plans):
    return plans["configurations"]["3d_fullres"]


def _set(key, value):
    def change(d):
        d[key] = value
    return change


def _set_config(key, value):
    return lambda plans: _config(plans).__setitem__(key, value)


def _no_ct_properties(plans):
    _config(plans)["normalization_schemes"][1] = "CTNormalization"
    del plans["foreground_intensity_properties_per_channel"]["1"]


MALFORMED = {  # name: (file, change, fragments of the one line)
    "channel_names list": ("dataset", _set("channel_names", ["FLAIR", "T1"]), ["channel_names"]),
    "channel_names unknown keys": ("dataset", _set("channel_names", {"0": "FLAIR", "flair2": "T1"}), ["channel_names"]),
    "label value x": ("dataset", _set("labels", {"background": 0, "lesion": "x"}), ["labels.lesion", '"x"']),
    "lesion label beyond the outputs": ("dataset", _set("labels", {"background": 0, "lesion": 2}), ["not consecutive", "[0, 2]"]),
    "transpose [0,0,5]": ("plans", _set("transpose_forward", [0, 0, 5]), ["transpose_forward", "[0, 0, 5]"]),
    "transpose_backward wrong": ("plans", _set("transpose_backward", [1, 0, 2]), ["transpose_backward"]),
    "spacing [-1,0,1]": ("plans", _set_config("spacing", [-1, 0, 1]), ["3d_fullres.spacing", "[-1, 0, 1]"]),
    "patch [0,0,0]": ("plans", _set_config("patch_size", [0, 0, 0]), ["3d_fullres.patch_size", "[0, 0, 0]"]),
    "patch [2048]*3": ("plans", _set_config("patch_size", [2048] * 3), ["3d_fullres.patch_size", "[2048, 2048, 2048]"]),
    "patch strides do not divide": ("plans", _set_config("patch_size", [27, 33, 31]), ["3d_fullres.patch_size", "27, 33, 31"]),
    # passes every field's check, and the network cannot run on it (a bottleneck of one voxel): the probe at load
    "patch the network cannot run on": ("plans", _set_config("patch_size", [4, 4, 4]), ["3d_fullres.patch_size", "cannot run"]),
    "patch 2D": ("plans", _set_config("patch_size", [32, 32]), ["3d_fullres.patch_size", "3D"]),
    "arch_kwargs list": ("plans", lambda p: _config(p)["architecture"].__setitem__("arch_kwargs", [1, 2]), ["arch_kwargs"]),
    "CTNormalization without properties": ("plans", _no_ct_properties, ["foreground_intensity_properties_per_channel.1"]),
    "fewer normalization schemes": ("plans", _set_config("normalization_schemes", ["ZScoreNormalization"]),
                                    ["normalization_schemes", "per input channel (2)"]),
    "unknown normalization": ("plans", _set_config("normalization_schemes", ["ZScoreNormalization", "Zscore"]),
                              ["normalization_schemes"]),
    "resampling order 9": ("plans", _set_config("resampling_fn_data_kwargs", {"order": 9}), ["resampling_fn_data_kwargs"]),
    "network_weights list": ("checkpoint", lambda c: c.__setitem__("network_weights", list(c["network_weights"].values())),
                             ["network_weights", "list"]),
    "mirroring axes (0,1,7)": ("checkpoint", _set("inference_allowed_mirroring_axes", (0, 1, 7)),
                               ["inference_allowed_mirroring_axes", "[0, 1, 7]"]),
}
FILES = {"dataset": "dataset.json", "plans": "plans.json", "checkpoint": CHECKPOINT}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_fields_are_refused_at_load_with_one_line(good, files, tmp_path, capsys, name):
    target, change, fragments = MALFORMED[name]
    d = variant(good, tmp_path / "m", **{target: change})
    one_error(segment_cli(capsys, files, d, tmp_path / "o"), FILES[target], *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spacing", [[0.001] * 3, [0.01, 0.5, 0.5]])
def test_a_spacing_that_would_resample_to_an_absurd_size_is_refused_before_resampling(good, files, tmp_path, capsys, spacing):
    d = variant(good, tmp_path / "m", plans=_set_config("spacing", spacing))
    one_error(segment_cli(capsys, files, d, tmp_path / "o"), "plans.json", f"spacing {spacing}", "would resample")


@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_a_gigabyte_json_is_refused_without_reading_it(good, tmp_path, name):
    d = variant(good, tmp_path / "m")
    os.truncate(d / name, 3 * 2**30)  # sparse: instant, and reading it whole would take 3 GB
    with pytest.raises(InputError, match=f"{name}.*MiB"):
        load_model(d, mirroring=False)


# ----------------------------------------------------------------------------- 11. labels as nnU-Net's LabelManager reads them

@pytest.mark.parametrize("labels, lesion", [({"background": 0, "lesion": 1, "ignore": 2}, 1),
                                            ({"background": 0, "edema": 1, "lesion": 2, "ignore": 3}, 2)])
def test_an_ignore_label_has_no_output_channel(tmp_path, small_phantom, labels, lesion):
    d = write_nnunet_folder(tmp_path / "m", folds=(0,), labels=labels)
    model = load_model(d, mirroring=False)
    assert model.spec.network_args["out_channels"] == len(labels) - 1 and model.spec.lesion_class == lesion
    prob = model.predict_case(model.prepare(small_phantom.flair, small_phantom.mprage), device="cpu")
    assert prob.shape == tuple(small_phantom.mprage.GetSize()) and 0 <= prob.min() and prob.max() <= 1


HIGHEST = "nnU-Net requires it to be the highest label value, next above the others"


@pytest.mark.parametrize("labels, fragments", [
    ({"background": 0, "ignore": 1, "lesion": 2}, ["the ignore label is 1", f"{HIGHEST} (3)"]),
    ({"background": 0, "lesion": 1, "ignore": 4}, ["the ignore label is 4", f"{HIGHEST} (2)"]),
    ({"background": 0, "lesion": [1, 2]}, ["region-based"]),
    ({"background": 1, "lesion": 0}, ["labels.background"]),
])
def test_labels_nnunet_would_not_accept_are_refused(good, tmp_path, labels, fragments):
    d = variant(good, tmp_path / "m", dataset=_set("labels", labels))
    with pytest.raises(InputError) as refused:
        load_model(d)
    assert all(f in str(refused.value) for f in [f"{d / 'dataset.json'}: ", *fragments]), refused.value
