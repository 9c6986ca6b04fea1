"""nnU-Net v2 trained-model folders against nnunetv2's own predictor, on a folder nnU-Net itself planned,
preprocessed and trained (nnunet_reference.py, about a minute), and saliency on nnU-Net networks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_reference

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.saliency.explain import explain_case, omega_from_lesion
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.segmentation.pipeline import segment
from MSInstanceSaliencyLib.saliency.common import list_layers


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    require_reference("nnunetv2")
    from nnunet_reference import make_nnunet_model

    # training images of 1.2 x 1 x 1 mm (x, y, z): nnunetv2's planner puts the largest spacing's axis first, so its plans
    # transpose nnU-Net's (z, y, x) arrays with transpose_forward [2, 0, 1] (PLANNED_TRANSPOSE)
    return make_nnunet_model(tmp_path_factory.mktemp("nnunet"), spacing=(1.2, 1.0, 1.0))


PLANNED_TRANSPOSE = [2, 0, 1]


def _case(ref, case):
    flair, t1 = (sitk.ReadImage(p) for p in ref["tests"][case]["channels"])
    return flair, t1


@pytest.fixture
def one_thread():
    """nnU-Net's run used one thread; so do we, so that every float32 sum is added in the same order and
    nnU-Net's float16 accumulation rounds alike (with 2 threads the probabilities differ by <= 3e-4)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("run", ["pred_mirror_f01", "pred_nomirror_f0"])
def test_probabilities_and_segmentation_equal_nnunet_predictor(nnunet, run, one_thread):
    settings = nnunet["predictions"][run]
    # every test case against nnU-Net without mirroring; mirrored 2-fold on the 2-tile and the padded case
    expected = {"pred_mirror_f01": {"test_native", "test_aniso"}, "pred_nomirror_f0": set(nnunet["tests"])}[run]
    assert set(settings["cases"]) == expected
    model = load_model(nnunet["model_folder"], folds=None if len(settings["folds"]) > 1 else settings["folds"],
                       mirroring=settings["use_mirroring"])
    assert model.format == "nnunet" and model.folds == settings["folds"]
    assert model.spec.input_channels == ["flair", "mprage"] and model.spec.lesion_class == 1
    # test_resampled: resampled there and back; test_native: the plan's spacing, 2 tiles; test_aniso: separate-z, padded
    for case, files in settings["cases"].items():
        flair, t1 = _case(nnunet, case)
        res = segment(flair, t1, model)
        theirs = np.load(files["probabilities"])["probabilities"]  # (C, z, y, x)
        np.testing.assert_array_equal(res.probability, theirs[1].transpose(2, 1, 0), err_msg=case)
        seg = sitk.ReadImage(files["seg"])
        assert seg.GetSize() == res.reference.GetSize()
        np.testing.assert_array_equal(res.labels > 0, sitk.GetArrayFromImage(seg).transpose(2, 1, 0) == 1, err_msg=case)


def test_saliency_on_nnunet_networks(nnunet):
    model = load_model(nnunet["model_folder"], mirroring=False)
    flair, t1 = _case(nnunet, "test_resampled")
    res = segment(flair, t1, model)
    assert res.labels.max() >= 1
    omega = omega_from_lesion(res.labels, 1)
    sg = explain_case(model, res.prepared, omega, n_samples=2, max_omega_voxels=8)
    assert set(sg.maps) == {"flair", "mprage"}
    assert sg.maps["flair"].shape == res.probability.shape and np.abs(sg.maps["flair"]).max() > 0
    layers = [n for n, _ in list_layers(model)]
    assert model.spec.gradcam_layer in layers and any(n.startswith("members.1.") for n in layers)
    cam = explain_case(model, res.prepared, omega, "gradcampp")
    assert cam.maps["gradcampp"].shape == res.probability.shape and cam.maps["gradcampp"].max() > 0
    # Ω on the network's grid is the lesion resampled there (nnU-Net's transposed, cropped, resampled array)
    assert res.prepared.to_network(omega).any() and res.prepared.image.shape[1:] != res.probability.shape


def test_unsafe_checkpoints_architectures_and_channels_refused(nnunet, tmp_path):
    src = Path(nnunet["model_folder"])
    d = tmp_path / "model"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("checkpoint_best.pth", "*.png", "*.txt"))
    # a checkpoint holding an object other than tensors and nnU-Net's numpy types is not unpickled
    ckpt = torch.load(d / "fold_1" / "checkpoint_final.pth", weights_only=False)
    ckpt["extra"] = Path("/etc/passwd")
    torch.save(ckpt, d / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(InputError, match="safely"):
        load_model(d, folds=[1])
    assert load_model(d, folds=[0]).folds == [0]
    with pytest.raises(InputError, match="fold 3"):
        load_model(d, folds=[3])
    plans = json.loads((d / "plans.json").read_text())
    bad = json.loads(json.dumps(plans))
    bad["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (d / "plans.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="not one this tool builds"):
        load_model(d, folds=[0])
    bad = json.loads(json.dumps(plans))
    bad["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "builtins.eval"
    (d / "plans.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="not an allowed torch.nn class"):
        load_model(d, folds=[0])
    (d / "plans.json").write_text(json.dumps(plans))
    dataset = json.loads((d / "dataset.json").read_text())
    dataset["channel_names"] = {"0": "FLAIR", "1": "T2"}
    (d / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(InputError, match="--model-channels"):
        load_model(d, folds=[0])
    assert load_model(d, folds=[0], channels="flair,t1").spec.input_channels == ["flair", "mprage"]
    (d / "dataset.json").write_text((src / "dataset.json").read_text())
    # the results folder above the trained model is accepted when it holds one; a fold's checkpoint is not
    assert load_model(d.parent, folds=[0]).format == "nnunet"
    with pytest.raises(InputError, match="one nnU-Net fold's checkpoint"):
        load_model(d / "fold_0" / "checkpoint_final.pth")


def _with_background(img, seed):
    """The image with low noise where it is 0, as an unstripped scan's background: nnU-Net's crop to the
    non-zero box then keeps the whole image, and the synthetic lesion has a background to be copied into."""
    a = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.where(a > 0, a, np.random.default_rng(seed).uniform(1, 5, a.shape)).astype(np.float32))
    out.CopyInformation(img)
    return out


def _plans_transposed(nnunet, tmp_path, transpose):
    """The nnU-Net folder (fold 0) as nnunetv2 planned it (transpose_forward [2, 0, 1], after nnU-Net's (z, y, x)), or
    with another transpose_forward `transpose` written into a copy of its plans."""
    folder = Path(nnunet["model_folder"])
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["transpose_forward"] == PLANNED_TRANSPOSE  # nnunetv2's own planning
    if transpose:
        folder = tmp_path / "model"
        shutil.copytree(nnunet["model_folder"], folder, ignore=shutil.ignore_patterns("checkpoint_best.pth", "*.png", "*.txt", "fold_1"))
        plans["transpose_forward"], plans["transpose_backward"] = transpose, [int(i) for i in np.argsort(transpose)]
        (folder / "plans.json").write_text(json.dumps(plans))
    return load_model(folder, folds=[0], mirroring=False)


@pytest.mark.parametrize("transpose", [None, [0, 1, 2]])
def test_a_shift_on_the_reference_grid_is_the_same_displacement_on_nnunet_grids(nnunet, tmp_path, transpose):
    from MSInstanceSaliencyLib.io.volumes import mask_from_image
    from MSInstanceSaliencyLib.research.experiments import copy_region, network_shift

    model = _plans_transposed(nnunet, tmp_path, transpose)
    test = nnunet["tests"]["test_resampled"]  # 1.1 x 0.9 x 1.5 mm, resampled to the plan's 1.2 x 1 x 1 mm
    prepared = model.prepare(*(sitk.ReadImage(p) for p in test["channels"]))
    assert prepared.grid.transpose_forward == (transpose or PLANNED_TRANSPOSE)
    lesion = mask_from_image(sitk.ReadImage(test["label"]))
    shift = np.array([6, -5, 3])  # 6.6, -4.5, 4.5 mm
    moved = copy_region(np.zeros((1,) + lesion.shape, np.float32), lesion, shift)[1]
    net_shift = network_shift(prepared, shift)
    # the displacement in mm, (z, y, x) and transposed as the plan's axes, in the plan's voxels (rounded)
    mm = (shift * np.array(test["spacing"]))[::-1][prepared.grid.transpose_forward]
    assert np.abs(net_shift - mm / np.array(prepared.grid.target_spacing)).max() <= 1.0 and np.abs(net_shift).min() >= 3
    on_network = copy_region(np.zeros((1,) + prepared.image.shape[1:], np.float32), prepared.to_network(lesion), net_shift)[1]
    target = prepared.to_network(moved)
    assert 2 * (on_network & target).sum() / (on_network.sum() + target.sum()) > 0.8  # the same place up to rounding


def test_experiments_on_an_nnunet_grid(nnunet, tmp_path):
    """The four experiments on nnU-Net's grid as nnunetv2 planned it, transposed ([2, 0, 1], after nnU-Net's (z, y, x)) and
    resampled (test_resampled: 1.1 x 0.9 x 1.5 mm to the plan's 1.2 x 1 x 1 mm). One variant only: nnU-Net's network is
    slow on a CPU."""
    from scipy import ndimage

    from MSInstanceSaliencyLib.io.volumes import array_from_image, mask_from_image
    from test_experiments import case_with_lesions_of, check_experiments_on_the_reference_grid

    model = _plans_transposed(nnunet, tmp_path, None)
    test = nnunet["tests"]["test_resampled"]
    flair, t1 = (_with_background(sitk.ReadImage(p), seed) for seed, p in enumerate(test["channels"]))
    res = segment(flair, t1, model, device="cpu")
    assert res.prepared.grid.transpose_forward == PLANNED_TRANSPOSE
    gt = mask_from_image(sitk.ReadImage(test["label"]))
    white_matter = (ndimage.binary_erosion(array_from_image(flair) > 5, iterations=2) & ~gt).astype(np.float32)
    check_experiments_on_the_reference_grid(model, case_with_lesions_of(res, gt, white_matter), max_omega_voxels=1)


def test_peaks_and_context_over_a_manifest_on_an_nnunet_grid(nnunet, tmp_path):
    """`stats peaks --manifest` and `context --manifest` over the three test cases with the nnU-Net folder as nnunetv2 planned it (transposed; fold 0, no mirroring) on a
    local cluster of one worker, which loads the folder itself: every case has its rows, the ground truth's lesions
    with their voxel counts on the reference grid (the test cases' own grids: resampled, native, anisotropic)."""
    pytest.importorskip("distributed")
    import pandas as pd
    from conftest import msis_in_process

    from MSInstanceSaliencyLib.segmentation.instances import label_instances

    _plans_transposed(nnunet, tmp_path, None)
    lines = ["case_id,flair,mprage,gt"] + [f"{name},{t['channels'][0]},{t['channels'][1]},{t['label']}" for name, t in nnunet["tests"].items()]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    r = msis_in_process("stats", "peaks", "--manifest", tmp_path / "m.csv", "--model", nnunet["model_folder"], "--folds", "0", "--no-mirroring",
                        "--workers", "1", "--device", "cpu", "--samples", "1", "--max-per-group", "1", "--tn-spheres", "1",
                        "--max-omega-voxels", "1", "--out", tmp_path / "peaks")
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(tmp_path / "peaks" / "peaks.csv")
    assert set(rows["case"]) == set(nnunet["tests"]) and np.isfinite(rows.filter(like="_m").to_numpy()).all()
    for name, t in nnunet["tests"].items():
        gt = label_instances(sitk.GetArrayFromImage(sitk.ReadImage(t["label"])) > 0, min_volume_mm3=0.0, connectivity=18)
        lesion_voxels = set(np.bincount(gt.ravel())[1:].tolist())
        mine = rows[rows["case"] == name]
        assert set(mine.loc[mine["group"].isin(["FN"]), "voxels"]) <= lesion_voxels
    # the context experiment over the same cases: this briefly trained network's TP lesions are large
    r = msis_in_process("context", "--manifest", tmp_path / "m.csv", "--model", nnunet["model_folder"], "--folds", "0", "--no-mirroring",
                        "--workers", "1", "--device", "cpu", "--size-range", "500", "20000", "--steps", "2", "--out", tmp_path / "context")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "context" / "context_summary.json").read_text())
    context = pd.read_csv(tmp_path / "context" / "context_raw.csv")
    assert summary["n_lesions"] >= 2 and context["case"].nunique() >= 2 and len(context) == 3 * summary["n_lesions"]
    assert context["mean_probability"].between(0, 1).all()
