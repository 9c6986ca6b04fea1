"""The training command runs for both configurations and writes a loadable model folder."""

import json
import os

import numpy as np
import pytest

from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.research.phantom import PHANTOM_VERSION
from MSInstanceSaliencyLib.research.training import phantom_case, sample_patch, train, training_seed

from test_outputs import assert_failed_rewrite_keeps_the_file, disk_full_after, use_small_phantoms


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture
def phantom_cache(cache_dir, monkeypatch):
    """One phantom cache for this module: patient 1's training phantom is made once (both configurations
    z-score alike, so they share its cached case), then read back; at 2 mm, as SMALL_DEMO_PHANTOM in
    test_outputs: these tests check the training's mechanics and the patch sampling, not the resolution."""
    use_small_phantoms(monkeypatch)
    return cache_dir


@pytest.mark.parametrize("config", ["demo", "paper"])
def test_train_a_few_iterations(tmp_path, config, phantom_cache):
    out = train(tmp_path / config, config, patients=(1,), phantoms_per_patient=1, iterations=2, batch=1, patch=32,
                cache_dir=phantom_cache, device="cpu", log=lambda *_: None)
    m = load_model(out)
    assert m.spec.training["config"] == config and m.spec.training["iterations_done"] == 2
    channels = [32, 64, 128, 256, 512] if config == "paper" else [8, 16, 32, 64, 128]
    assert m.spec.network_args["channels"] == channels
    assert json.loads((out / "training_log.json").read_text())[-1]["iteration"] == 2
    assert (out / "training_curve.png").stat().st_size > 1000


def test_patches_are_centred_on_lesions_often(phantom_cache):
    """On the training case of patient 1 (cached by the training test when it ran first in this module)."""
    from MSInstanceSaliencyLib.models.base import ModelSpec

    seed = training_seed(1, 0)
    case = phantom_case(1, seed, ModelSpec(), phantom_cache)
    assert (phantom_cache / f"p01_s{seed}_zscore_v{PHANTOM_VERSION}.npz").is_file()
    rng = np.random.default_rng(0)
    with_lesion = 0
    for _ in range(20):
        img, inst = sample_patch(rng, case, 32)
        assert img.shape == (2, 32, 32, 32) and inst.shape == (32, 32, 32)
        with_lesion += inst.max() > 0
    assert with_lesion >= 6  # about half the patches are drawn around a lesion voxel


def test_context_restoration_patches_keep_one_lesion_and_its_ring_labelled_background():
    """p_context=1: every patch keeps one lesion and at most context_mm dilation steps around it, the rest
    exactly 0 (the z-scored mean, as in the contextual-information experiment), and no lesion label."""
    from scipy import ndimage

    from MSInstanceSaliencyLib.segmentation.instances import dilation_steps
    from MSInstanceSaliencyLib.research.training import TrainingCase

    rng = np.random.default_rng(0)
    img = (rng.normal(size=(2, 64, 64, 64)) + 3).astype(np.float16)  # no zeros of its own
    inst = np.zeros((64, 64, 64), np.int16)
    inst[30:34, 30:34, 30:34] = 1
    inst[8:11, 50:53, 8:11] = 2
    case = TrainingCase(img, inst, np.argwhere(inst > 0).astype(np.int16), np.zeros((0, 3), np.int16),
                        np.argwhere(np.ones(inst.shape, bool))[::101].astype(np.int16))
    sizes = set()
    for _ in range(40):
        x, y = sample_patch(rng, case, 32, p_context=1.0, context_mm=2)
        assert y.max() == 0
        kept = (x != 0).all(0)
        assert ((x == 0).all(0) | kept).all()  # each voxel kept or removed in both channels
        lab, n = ndimage.label(kept)
        assert n == 1  # one lesion and its ring
        sizes.add(int(kept.sum()))  # the lesion dilated 0, 1 or 2 times (18-connectivity), checked below
    cube = np.zeros((12, 12, 12), bool)
    cube[4:8, 4:8, 4:8] = True
    expected = {int(m.sum()) for m in dilation_steps(cube, 2)}
    small = np.zeros((12, 12, 12), bool)
    small[4:7, 4:7, 4:7] = True
    expected |= {int(m.sum()) for m in dilation_steps(small, 2)}
    assert sizes <= expected and len(sizes) >= 3


def _two_region_case():
    """A 64³ case: brain in x < 32 (value 1; one 4³ lesion of value 5 in a shell of value 2), outside it -1."""
    from MSInstanceSaliencyLib.research.training import TrainingCase

    img = np.full((2, 64, 64, 64), -1.0, np.float16)
    img[:, :32] = 1.0
    inst = np.zeros((64, 64, 64), np.int16)
    inst[2:6, 30:34, 30:34] = 1
    img[:, 0:8, 28:36, 28:36] = 2.0
    img[:, inst > 0] = 5.0
    brain = np.zeros(inst.shape, bool)
    brain[:32] = True
    return TrainingCase(img, inst, np.argwhere(inst > 0).astype(np.int16), np.zeros((0, 3), np.int16),
                        np.argwhere(brain)[::7].astype(np.int16))


def test_outside_brain_voxels_rebuild_the_brain_from_its_sample_and_keep_a_margin():
    from MSInstanceSaliencyLib.research.training import outside_brain_voxels

    out = outside_brain_voxels(_two_region_case(), margin=3, step=1)
    assert out[:, 0].min() == 35 and len(out) == 29 * 64 * 64  # every voxel of x >= 32 + 3, none inside


def test_transplant_patches_paste_a_lesion_outside_the_brain_labelled_background():
    from MSInstanceSaliencyLib.research.training import outside_brain_voxels

    case = _two_region_case()
    outside = outside_brain_voxels(case, margin=3, step=1)
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(30):
        x, y = sample_patch(rng, case, 32, p_lesion=0.0, p_mimic=0.0, p_transplant=1.0, transplant_mm=1, outside=outside)
        assert y.max() == 0  # the pasted lesion is not a lesion, and the patch holds no real one
        assert (x[0] < 0).any()  # centred outside the brain (the real lesion and its shell lie out of reach)
        # values after at most ±10 % gain and ±0.1 offset: lesion 5 -> above 4, shell 2 -> 1.6-2.4
        sizes.add((int((x[0] > 4).sum()), int(((x[0] > 1.6) & (x[0] < 2.4)).sum())))
    # the 4³ lesion, with 0 or 1 dilation step (18-connectivity: 6 faces of 16 + 12 edges of 4 voxels)
    assert sizes == {(64, 0), (64, 144)}


def test_contrast_augmentation_moves_a_patch_and_its_lesion_together():
    from MSInstanceSaliencyLib.research.training import _contrast_augmentation

    rng = np.random.default_rng(0)
    img = np.zeros((2, 16, 16, 16), np.float32)
    img[:, 6:10, 6:10, 6:10] = 2.0
    mild = [_contrast_augmentation(rng, img, 0.0) for _ in range(50)]
    strong = [_contrast_augmentation(rng, img, 1.0) for _ in range(50)]
    for a in mild:  # gain 0.9-1.1 and offset ±0.1 only: a linear map of the input, per channel
        gain = (a[:, 8, 8, 8] - a[:, 0, 0, 0]) / 2.0
        assert np.all((gain > 0.9 - 1e-5) & (gain < 1.1 + 1e-5)) and np.all(np.abs(a[:, 0, 0, 0]) <= 0.1 + 1e-5)
    background = np.array([a[0, :4, :4, :4].mean() for a in strong])
    contrast = np.array([a[0, 7:9, 7:9, 7:9].mean() - a[0, :4, :4, :4].mean() for a in strong])
    assert np.ptp(background) > 0.6  # absolute level varies a lot ...
    assert contrast.min() > 1.0  # ... while the lesion stays well above its surroundings


def test_a_phantom_cache_that_cannot_be_written_is_not_left_half_written(tmp_path, monkeypatch, small_phantom):
    """A truncated cache would be read back by the next training run: on a full disk there is none, and
    one InputError names it."""
    from MSInstanceSaliencyLib.errors import InputError
    from MSInstanceSaliencyLib.models.base import ModelSpec
    import MSInstanceSaliencyLib.research.phantom as phantom

    monkeypatch.setattr(phantom, "make_phantom", lambda seed, patient: small_phantom)  # the 2 mm one: fast
    with disk_full_after(100_000), pytest.raises(InputError, match=r"cannot write .*p03_s7_.*\.npz.*disk may be full"):
        phantom_case(3, 7, ModelSpec(), tmp_path)
    assert os.listdir(tmp_path) == []
    case = phantom_case(3, 7, ModelSpec(), tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]
    np.testing.assert_array_equal(phantom_case(3, 7, ModelSpec(), tmp_path).image, case.image)  # read back whole


def test_a_failed_training_log_or_curve_keeps_the_earlier_files(tmp_path):
    from MSInstanceSaliencyLib.research.training import plot_training_log

    log = tmp_path / "training_log.json"
    log.write_text(json.dumps([{"iteration": i, "loss": 1 / i, "lr": 1e-3, "seconds": i} for i in range(1, 60)]))
    png = plot_training_log(log, tmp_path / "training_curve.png")
    assert_failed_rewrite_keeps_the_file(png, lambda: plot_training_log(log, png), n_bytes=png.stat().st_size // 2)
    assert png.read_bytes()[:4] == b"\x89PNG"
