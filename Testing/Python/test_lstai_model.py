"""LST-AI 2.x checkpoints against lst_ai's own inference (lst_ai.segment.unet_segmentation), with
checkpoints written in its format by its own network class (lst_ai.model.NNUNet3D)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_reference

from scipy import ndimage

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.io.volumes import array_from_image, image_from_array, mask_from_image
from MSInstanceSaliencyLib.saliency.explain import explain_case, omega_from_lesion
from MSInstanceSaliencyLib.models.formats import LSTAI_STEMS
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.segmentation.pipeline import segment

CROP = (48, 48, 48)  # lst_ai's input_shape argument (192^3 for its released models); small for a fast test


@pytest.fixture(scope="module")
def lstai(tmp_path_factory, small_phantom):
    """Three members of LST-AI's architecture (small widths), saved as lst_ai/weights.py saves them, and
    lst_ai's own outputs for the phantom's FLAIR and T1."""
    require_reference("lst_ai")
    import nibabel  # noqa: F401  (lst_ai reads and writes with nibabel)
    from lst_ai.model import NNUNet3D
    from lst_ai.segment import unet_segmentation

    root = tmp_path_factory.mktemp("lstai")
    models = root / "model"
    models.mkdir()
    for i, stem in enumerate(LSTAI_STEMS):
        torch.manual_seed(i)
        config = dict(in_channels=2, n_conv_blocks=3, n_filters=4 + 2 * i, n_classes=1, ds_layers=(-2,) if i != 1 else ())
        net = NNUNet3D(**config)
        with torch.no_grad():  # a lesion-like bias so that the random members disagree and segment something
            net.out_seg.bias.fill_(-0.2 * i)
        torch.save({"config": {**config, "ds_layers": list(config["ds_layers"])}, "state_dict": net.state_dict()}, models / f"{stem}.pt")
    flair, t1 = root / "mni_flair.nii.gz", root / "mni_t1.nii.gz"
    sitk.WriteImage(small_phantom.flair, str(flair))
    sitk.WriteImage(small_phantom.mprage, str(t1))
    out = {k: root / f"{k}.nii.gz" for k in ("seg", "prob", "prob1", "prob2", "prob3")}
    unet_segmentation(str(models), str(t1), str(flair), str(out["seg"]), str(out["prob"]), str(out["prob1"]), str(out["prob2"]),
                      str(out["prob3"]), device="cpu", probmap=True, input_shape=CROP)
    return {"models": models, "flair": flair, "t1": t1, **out}


def _array(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)


def test_ensemble_equals_lst_ai_inference(lstai):
    model = load_model(lstai["models"])
    assert model.format == "lst-ai" and len(model.members) == 3 and model.spec.output_activation == "sigmoid"
    model.input_shape = CROP
    res = segment(sitk.ReadImage(str(lstai["flair"])), sitk.ReadImage(str(lstai["t1"])), model)
    theirs = _array(lstai["prob"])
    np.testing.assert_array_equal(res.probability, theirs)
    seg = _array(lstai["seg"]) > 0
    near = np.abs(theirs - 0.5) < 1e-6  # LST-AI thresholds the float64 mean; ours is float32
    assert seg.any() and np.array_equal((res.labels > 0) & ~near, seg & ~near)


def test_one_member_equals_its_probability_map(lstai):
    model = load_model(lstai["models"] / f"{LSTAI_STEMS[0]}.pt")
    model.input_shape = CROP
    prepared = model.prepare(sitk.ReadImage(str(lstai["flair"])), sitk.ReadImage(str(lstai["t1"])))
    prob = model.predict_case(prepared)
    np.testing.assert_array_equal(prob, _array(lstai["prob1"]))


def test_saliency_of_the_ensemble_on_the_whole_crop(lstai):
    model = load_model(lstai["models"])
    model.input_shape = CROP
    res = segment(sitk.ReadImage(str(lstai["flair"])), sitk.ReadImage(str(lstai["t1"])), model)
    omega = omega_from_lesion(res.labels, 1)
    exp = explain_case(model, res.prepared, omega, n_samples=1, max_omega_voxels=2, context="full")
    assert exp.maps["flair"].shape == res.probability.shape and np.abs(exp.maps["flair"]).max() > 0
    # outside the crop the network sees nothing: the map is 0 there
    lo = model.prepare(sitk.ReadImage(str(lstai["flair"])), sitk.ReadImage(str(lstai["t1"]))).grid.lo
    assert np.all(exp.maps["flair"][: lo[0]] == 0)
    cam = explain_case(model, res.prepared, omega, "gradcampp", context="full")
    assert cam.maps["gradcampp"].max() > 0


def test_lstai_inputs_checked(lstai, small_phantom):
    model = load_model(lstai["models"])
    with pytest.raises(InputError, match="MNI"):
        segment(small_phantom.flair, small_phantom.mprage, model)  # 80 x 98 x 82 is smaller than 192^3
    with pytest.raises(InputError, match="--register"):
        model.prepare(small_phantom.flair, small_phantom.mprage, register=True)


def _skull_stripped(img, radius_mm=34.0):
    """The image with zeros outside a ball about its centre, as LST-AI's skull-stripped inputs have outside the brain."""
    a = array_from_image(img)
    idx = np.indices(a.shape).reshape(3, -1).T * np.array(img.GetSpacing())
    ball = (np.linalg.norm(idx - idx.mean(0), axis=1) <= radius_mm).reshape(a.shape)
    return image_from_array(np.where(ball, a, 0).astype(np.float32), reference=img), ball


def test_experiments_on_the_lstai_crop(lstai, small_phantom):
    """The four experiments with LST-AI's ensemble (sigmoid, 3 members) on its centred crop of the reference grid, on a
    skull-stripped phantom as LST-AI takes: regions where the crop lies, maps and probabilities back on the reference grid."""
    from MSInstanceSaliencyLib.research.experiments import network_coverage
    from test_experiments import case_with_lesions_of, check_experiments_on_the_reference_grid

    model = load_model(lstai["models"])
    model.input_shape = (40, 56, 40)  # of the 2 mm phantom's 92 x 110 x 88: the stripped brain and background around it
    flair, brain = _skull_stripped(small_phantom.flair)
    res = segment(flair, _skull_stripped(small_phantom.mprage)[0], model, device="cpu")
    seen = network_coverage(res.prepared)
    assert seen.any() and not seen.all() and not brain[seen].all()
    inside = ndimage.binary_erosion(brain & seen, iterations=3)
    gt = mask_from_image(small_phantom.lesions) & inside  # the lesions the network sees
    check_experiments_on_the_reference_grid(model, case_with_lesions_of(res, gt, array_from_image(small_phantom.white_matter) * inside),
                                            max_omega_voxels=1)
