"""The kernel choices of benchmarks/saliency_speed.py --kernels (saliency.kernels): every exact one gives the default's
SmoothGrad map within 1e-5 of its peak; bf16 is the one that does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.models.base import LoadedModel, freeze
from MSInstanceSaliencyLib.models.monai import build_network
from MSInstanceSaliencyLib.saliency.kernels import EXACT, KERNELS, fold_batch_norm, kernel_model, precision_of
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad


@pytest.fixture(scope="module")
def case():
    """A small U-Net with batch norms whose statistics are not the identity, a random 2-channel image and an 18-voxel Ω."""
    torch.manual_seed(0)
    spec = tiny_spec()
    net = build_network(spec)
    freeze(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    image = np.random.default_rng(0).standard_normal((2, 40, 40, 40)).astype(np.float32)
    omega = np.zeros((40, 40, 40), bool)
    omega[18:21, 18:21, 19:21] = True
    model = LoadedModel(net, spec, None)
    return model, image, omega, smoothgrad(model, image, omega, n_samples=3, device="cpu", copies_per_pass=3)


@pytest.mark.parametrize("kind", KERNELS)
def test_every_exact_kernel_gives_the_default_map(case, kind):
    model, image, omega, reference = case
    maps = smoothgrad(kernel_model(model, kind), image, omega, n_samples=3, device="cpu", precision=precision_of(kind), copies_per_pass=3)
    error = np.abs(maps - reference).max() / np.abs(reference).max()
    if kind in EXACT:
        assert error <= 1e-5, error
    else:  # bf16: percents of the peak, which is why it is not the default
        assert np.isfinite(maps).all() and error > 1e-3


def test_batch_norms_fold_into_their_convolutions_and_the_model_is_left_alone(case):
    model, *_ = case
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.network.modules())
    folded = kernel_model(model, "bn_folded")
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.network.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.network.modules()) == n_bn  # a copy was folded
    assert fold_batch_norm(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3))) == 0
    with pytest.raises(InputError, match="kernel must be one of"):
        kernel_model(model, "fp8")


def test_cpu_copies_per_pass_keep_their_activations_under_the_budget(case, monkeypatch):
    """On a CPU the copies of a pass are capped by CPU_PASS_ACTIVATION_BYTES (a wide network's large batches outgrew the
    cache and ran slower); fewer copies per pass change the map by float rounding only."""
    from MSInstanceSaliencyLib.saliency import smoothgrad as sg
    from MSInstanceSaliencyLib.saliency.common import _activation_bytes

    model, image, omega, reference = case
    job = sg._SmoothGradJob(model, image, omega, n_samples=8, device="cpu")
    per_copy = _activation_bytes(model.network, job.x0[None])
    assert job._batch_sizes(int(omega.sum()))[0] == 8  # this small network: the cap of 8
    monkeypatch.setattr(sg, "CPU_PASS_ACTIVATION_BYTES", int(2.5 * per_copy))
    assert job._batch_sizes(int(omega.sum()))[0] == 2
    maps = sg.smoothgrad(model, image, omega, n_samples=3, device="cpu")  # passes of 2 and 1 copies
    assert np.abs(maps - reference).max() <= 1e-5 * np.abs(reference).max()
