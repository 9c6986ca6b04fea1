"""The training command runs for both configurations and writes a loadable model folder."""

import json

import numpy as np
import pytest

from MSInstanceSaliencyLib.model import load_model
from MSInstanceSaliencyLib.training import phantom_case, sample_patch, train


@pytest.mark.parametrize("config", ["demo", "paper"])
def test_train_a_few_iterations(tmp_path, config):
    out = train(tmp_path / config, config, patients=(1,), phantoms_per_patient=1, iterations=2, batch=1, patch=32,
                cache_dir=tmp_path / "cache", device="cpu", log=lambda *_: None)
    m = load_model(out)
    assert m.spec.training["config"] == config and m.spec.training["iterations_done"] == 2
    channels = [32, 64, 128, 256, 512] if config == "paper" else [8, 16, 32, 64, 128]
    assert m.spec.network_args["channels"] == channels
    assert json.loads((out / "training_log.json").read_text())[-1]["iteration"] == 2


def test_patches_are_centred_on_lesions_often(tmp_path):
    from MSInstanceSaliencyLib.model import ModelSpec

    case = phantom_case(2, 202, ModelSpec(), tmp_path)
    assert (tmp_path / "p02_s202_zscore.npz").is_file()
    rng = np.random.default_rng(0)
    with_lesion = 0
    for _ in range(20):
        img, inst = sample_patch(rng, case, 32)
        assert img.shape == (2, 32, 32, 32) and inst.shape == (32, 32, 32)
        with_lesion += inst.max() > 0
    assert with_lesion >= 6  # about half the patches are drawn around a lesion voxel
