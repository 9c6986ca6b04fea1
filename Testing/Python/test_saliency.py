"""The saliency engine against independent references: a per-voxel loop, Captum, MONAI's GradCAMpp."""

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from MSInstanceSaliencyLib.errors import Cancelled, InputError
from MSInstanceSaliencyLib.saliency.context import context_box
from MSInstanceSaliencyLib.saliency.gradcampp import gradcampp
from MSInstanceSaliencyLib.saliency.common import list_layers
from MSInstanceSaliencyLib.saliency.smoothgrad import noise_sigma, noise_stream, omega_sample, smoothgrad

SHAPE = (16, 16, 16)
LAYER = "model.1.submodule.2.conv"  # decoder transposed conv of a 3-level MONAI UNet


def small_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8, 16), strides=(2, 2), norm="batch", num_res_units=0)
    # give batch norm non-trivial running statistics, as a trained network has
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 2, *SHAPE))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return small_unet()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return rng.standard_normal((2,) + SHAPE).astype(np.float32)


def lesion(shape=SHAPE):
    om = np.zeros(shape, bool)
    om[6:9, 7:9, 5:8] = True  # 18 voxels
    return om


def loop_reference(net, image, omega, noises, aggregation):
    """The authors' way: whole volume, one autograd.grad per output voxel of Ω, reduced by hand."""
    idx = np.argwhere(omega)
    maps = []
    for noise in noises:
        x = (torch.from_numpy(image) + noise)[None].requires_grad_(True)
        logits = net(x)[0, 1]
        per_voxel = []
        for i, (a, b, c) in enumerate(idx):
            (g,) = torch.autograd.grad(logits[a, b, c], x, retain_graph=i < len(idx) - 1)
            per_voxel.append(g[0].numpy())
        d = np.stack(per_voxel)  # (|Ω|, C, X, Y, Z)
        if aggregation == "mean":
            maps.append(d.mean(0))
        else:
            pick = np.abs(d).argmax(0)
            maps.append(np.take_along_axis(d, pick[None], 0)[0])
    return np.mean(maps, 0)


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_vanilla_equals_per_voxel_loop(net, image, aggregation):
    om = lesion()
    ours = smoothgrad(net, image, om, n_samples=1, sigma=0.0, aggregation=aggregation, context="full", device="cpu", chunk_size=5)
    ref = loop_reference(net, image, om, [torch.zeros(2, *SHAPE)], aggregation)
    assert ours.shape == image.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref).max() > 0


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_smoothgrad_equals_loop_on_the_same_noisy_copies(net, image, aggregation):
    om = lesion()
    n, sigma, seed = 3, 0.05, 7
    sd = noise_sigma(image, sigma, "range")
    stream = noise_stream((2,) + SHAPE, sd, seed)
    noises = [next(stream) for _ in range(n)]
    ours = smoothgrad(net, image, om, n_samples=n, sigma=sigma, aggregation=aggregation, context="full", seed=seed, device="cpu", chunk_size=4)
    ref = loop_reference(net, image, om, noises, aggregation)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and the noise matters: a different seed gives a different map
    other = smoothgrad(net, image, om, n_samples=n, sigma=sigma, aggregation=aggregation, context="full", seed=seed + 1, device="cpu")
    assert not np.allclose(other, ours)


def test_same_seed_is_bit_identical_on_cpu(net, image):
    om = lesion()
    a = smoothgrad(net, image, om, n_samples=2, seed=3, context="full", device="cpu")
    b = smoothgrad(net, image, om, n_samples=2, seed=3, context="full", device="cpu", chunk_size=7)
    np.testing.assert_array_equal(a, b)


def test_single_voxel_equals_captum_saliency(net, image):
    from captum.attr import Saliency

    om = np.zeros(SHAPE, bool)
    om[8, 8, 8] = True
    n, sigma, seed = 3, 0.05, 11
    ours = smoothgrad(net, image, om, n_samples=n, sigma=sigma, context="full", seed=seed, device="cpu")
    stream = noise_stream((2,) + SHAPE, noise_sigma(image, sigma, "range"), seed)
    sal = Saliency(lambda x: net(x)[:, 1, 8, 8, 8])
    ref = np.mean([sal.attribute((torch.from_numpy(image) + next(stream))[None], abs=False)[0].detach().numpy() for _ in range(n)], 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_mean_aggregation_equals_captum_on_mean_logit(net, image):
    from captum.attr import Saliency

    om = lesion()
    mask = torch.from_numpy(om)
    n, sigma, seed = 2, 0.05, 5
    ours = smoothgrad(net, image, om, n_samples=n, sigma=sigma, aggregation="mean", context="full", seed=seed, device="cpu")
    stream = noise_stream((2,) + SHAPE, noise_sigma(image, sigma, "range"), seed)
    sal = Saliency(lambda x: net(x)[:, 1][:, mask].mean(1))
    ref = np.mean([sal.attribute((torch.from_numpy(image) + next(stream))[None], abs=False)[0].detach().numpy() for _ in range(n)], 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_patch_covering_the_volume_equals_full(net, image):
    om = lesion()
    full = smoothgrad(net, image, om, n_samples=2, context="full", device="cpu")
    patch = smoothgrad(net, image, om, n_samples=2, context="patch", roi_size=(64, 64, 64), device="cpu")
    np.testing.assert_array_equal(patch, full)


def test_patch_is_zero_outside_the_box_and_close_inside():
    net = small_unet()
    rng = np.random.default_rng(2)
    img = rng.standard_normal((2, 48, 40, 32)).astype(np.float32)
    om = np.zeros(img.shape[1:], bool)
    om[20:23, 18:21, 14:17] = True
    patch = smoothgrad(net, img, om, n_samples=1, sigma=0.0, context="patch", roi_size=(16, 16, 16), device="cpu")
    box = context_box(om, "patch", (16, 16, 16), 16)  # a plain module: smoothgrad's divisor is 16
    inside = np.zeros(om.shape, bool)
    inside[box.slices] = True
    assert np.all(patch[:, ~inside] == 0)
    assert np.abs(patch[:, inside]).max() > 0


@pytest.mark.parametrize("divisor", [4, 8, 16])
def test_patch_lies_on_the_network_grid_and_holds_omega(divisor):
    """Origins and padded sizes are multiples of the divisor (else the strided network computes another
    function on the patch), Ω is inside, and a box reaching the volume's end is padded like the volume."""
    rng = np.random.default_rng(divisor)
    for _ in range(400):
        shape = tuple(int(n) for n in rng.integers(5, 90, 3))
        lo = [int(rng.integers(0, n)) for n in shape]
        hi = [min(n - 1, a + int(rng.integers(0, 30))) for a, n in zip(lo, shape)]
        om = np.zeros(shape, bool)
        om[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = True
        roi = tuple(int(r) for r in rng.integers(4, 70, 3))
        box = context_box(om, "patch", roi, divisor)
        for a, (s, pad) in enumerate(zip(box.slices, box.pad)):
            assert s.start % divisor == 0 and (s.stop - s.start + pad) % divisor == 0
            assert s.start <= lo[a] and hi[a] < s.stop <= shape[a]
            assert pad == 0 or s.stop == shape[a]
            assert s.stop - s.start + pad >= min(roi[a], shape[a])


def test_omega_on_border_single_voxel_and_larger_than_roi(net, image):
    border = np.zeros(SHAPE, bool)
    border[0, 0:3, 15] = True
    m = smoothgrad(net, image, border, n_samples=1, sigma=0.0, roi_size=(8, 8, 8), device="cpu")
    assert np.isfinite(m).all() and np.abs(m).max() > 0
    big = np.zeros(SHAPE, bool)
    big[1:14, 2:12, 3:15] = True  # larger than the 8^3 roi: the box grows to contain it
    box = context_box(big, "patch", (8, 8, 8), 4)
    assert all(s.start <= 1 and s.stop >= 14 for s in box.slices[:1])
    m = smoothgrad(net, image, big, n_samples=1, sigma=0.0, roi_size=(8, 8, 8), device="cpu", aggregation="mean")
    assert np.abs(m).max() > 0


def test_odd_sized_volume_is_padded_for_the_network(net):
    img = np.random.default_rng(0).standard_normal((2, 13, 17, 11)).astype(np.float32)
    om = np.zeros(img.shape[1:], bool)
    om[6, 8, 5] = True
    m = smoothgrad(net, img, om, n_samples=1, sigma=0.0, context="full", device="cpu")
    assert m.shape == img.shape and np.abs(m).max() > 0


def test_copies_sharing_backward_passes_equal_one_copy_at_a_time(net, image):
    om = lesion()
    one = smoothgrad(net, image, om, n_samples=5, seed=2, context="full", device="cpu", copies_per_pass=1)
    for copies in (2, 5):
        batched = smoothgrad(net, image, om, n_samples=5, seed=2, context="full", device="cpu", copies_per_pass=copies)
        # float32 summation order of batched convolutions only
        np.testing.assert_allclose(batched, one, rtol=0, atol=1e-5 * np.abs(one).max())
    mean_one = smoothgrad(net, image, om, n_samples=5, seed=2, aggregation="mean", context="full", device="cpu", copies_per_pass=1)
    mean_all = smoothgrad(net, image, om, n_samples=5, seed=2, aggregation="mean", context="full", device="cpu", copies_per_pass=5)
    np.testing.assert_allclose(mean_all, mean_one, rtol=0, atol=1e-5 * np.abs(mean_one).max())


@pytest.mark.parametrize("n_parts", [1, 3, 18])
def test_parts_of_omega_combine_to_the_one_pass_map(net, image, n_parts):
    from MSInstanceSaliencyLib.saliency.smoothgrad import combine_parts, omega_work, smoothgrad_part

    om = lesion()
    kw = dict(n_samples=3, seed=5, context="full", device="cpu", copies_per_pass=3)
    whole = smoothgrad(net, image, om, **kw)
    parts = [smoothgrad_part(net, image, om, part=p, n_parts=n_parts, **kw) for p in range(n_parts)]
    assert sum(p.per_copy.shape[0] for p in parts) == 3 * n_parts and omega_work(om) == 18
    np.testing.assert_array_equal(combine_parts(parts[::-1]), whole)  # any order, bit-identical
    with pytest.raises(InputError, match="every part"):
        combine_parts(parts[1:] or [])


def test_bad_arguments(net, image):
    with pytest.raises(InputError, match="omega is empty"):
        smoothgrad(net, image, np.zeros(SHAPE, bool), device="cpu")
    with pytest.raises(InputError, match="shape"):
        smoothgrad(net, image, np.ones((4, 4, 4), bool), device="cpu")
    with pytest.raises(InputError, match="aggregation"):
        smoothgrad(net, image, lesion(), aggregation="median", device="cpu")
    with pytest.raises(InputError, match="layer"):
        gradcampp(net, image, lesion(), layer="nope", device="cpu")


def test_progress_and_cancel(net, image):
    calls = []
    smoothgrad(net, image, lesion(), n_samples=2, context="full", device="cpu", chunk_size=6, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(12, 36), (24, 36), (36, 36)]  # both copies share each backward pass over 6 voxels of Ω
    calls.clear()
    smoothgrad(net, image, lesion(), n_samples=3, context="full", device="cpu", chunk_size=6, copies_per_pass=2,
               progress=lambda d, t: calls.append((d, t)))
    assert calls == [(12, 54), (24, 54), (36, 54), (42, 54), (48, 54), (54, 54)]
    with pytest.raises(Cancelled):
        smoothgrad(net, image, lesion(), n_samples=5, context="full", device="cpu", chunk_size=6, progress=lambda d, t: d < 12)


def test_parameters_frozen_only_during_the_call(net, image):
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    smoothgrad(net, image, lesion(), n_samples=1, context="full", device="cpu")
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())  # no weight gradients were computed
    net.eval()


# ---------------------------------------------------------------------------------- Grad-CAM++

class ClassScore(torch.nn.Module):
    """MONAI's GradCAMpp wants one score per class: give it y' = Σ logits where p > t (class 1)."""

    def __init__(self, net, t=0.3):
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x):
        out = self.net(x)
        prob = torch.softmax(out, 1)[:, 1]
        y = out[:, 1]
        score = (y * (prob > self.t)).flatten(1).sum(1)
        return torch.stack([-score, score], 1)


def test_class_level_monai_variant_equals_monai_gradcampp(image):
    from monai.visualize import GradCAMpp

    net = small_unet()
    # scale the logits down so that exp(y') stays finite in MONAI (no overflow guard there)
    with torch.no_grad():
        last = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)][-1]
        last.weight.mul_(0.01)
        last.bias.mul_(0.01)
    ours = gradcampp(net, image, None, layer=LAYER, alpha="monai", threshold=0.5, device="cpu", upsample=False)
    cam = GradCAMpp(ClassScore(net, 0.5), target_layers="net." + LAYER, upsampler=lambda size: (lambda t: t), postprocessing=lambda t: t)
    ref = cam(torch.from_numpy(image)[None], class_idx=1)[0, 0].detach().numpy()
    assert ref.shape == ours.shape == tuple(s // 2 for s in SHAPE)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def layer_activations_and_gradients(net, image, om):
    """A^k and g = ∂(Σ_Ω y)/∂A^k at LAYER, computed directly with a hook."""
    acts = {}
    h = dict(net.named_modules())[LAYER].register_forward_hook(lambda m, i, o: acts.__setitem__("A", o))
    x = torch.from_numpy(image)[None].requires_grad_(True)
    y = net(x)[0, 1][torch.from_numpy(om)].sum()
    h.remove()
    (g,) = torch.autograd.grad(y, acts["A"])
    return acts["A"], g


def test_instance_level_with_alpha_one_is_relu_g_times_a(net, image):
    om = lesion()
    ours = gradcampp(net, image, om, layer=LAYER, alpha="layercam", context="full", device="cpu", upsample=False)
    A, g = layer_activations_and_gradients(net, image, om)
    ref = torch.relu((torch.relu(g) * A).sum(1))[0].detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert ref.max() > 0


def test_paper_alpha_closed_form(net, image):
    """Eq. 7 evaluated by hand on the layer's activations and gradients."""
    om = lesion()
    ours = gradcampp(net, image, om, layer=LAYER, alpha="paper", context="full", device="cpu", upsample=False)
    A, g = layer_activations_and_gradients(net, image, om)
    A, g = A[0].detach().double().numpy(), g[0].double().numpy()
    S = A.reshape(A.shape[0], -1).sum(1)[:, None, None, None]
    den = 2 * g**2 + S * g**3
    alpha = np.where((g != 0) & (den != 0), g**2 / np.where(den != 0, den, 1), 0)
    ref = np.maximum((alpha * np.maximum(g, 0) * A).sum(0), 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_gradcampp_upsampled_to_the_input_grid(net, image):
    m = gradcampp(net, image, lesion(), layer=LAYER, device="cpu")
    assert m.shape == SHAPE and m.dtype == np.float32 and (m >= 0).all()
    c = gradcampp(net, image, None, layer=LAYER, device="cpu", threshold=0.01)
    assert c.shape == SHAPE


def test_list_layers_names_the_default_layer(net):
    names = [n for n, _ in list_layers(net)]
    assert LAYER in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu_and_sizes_chunks_from_memory(net, image):
    from MSInstanceSaliencyLib.saliency.common import auto_chunk_size

    om = lesion()
    cpu = smoothgrad(net, image, om, n_samples=2, context="full", device="cpu")
    gpu = smoothgrad(net, image, om, n_samples=2, context="full", device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())
    assert next(net.parameters()).device.type == "cpu"  # a plain module goes back where it was
    x = torch.from_numpy(image)[None].cuda()
    assert 1 <= auto_chunk_size(net.cuda(), x, torch.device("cuda"), int(om.sum())) <= int(om.sum())
    net.cpu()
    cam_cpu = gradcampp(net, image, om, layer=LAYER, device="cpu")
    cam_gpu = gradcampp(net, image, om, layer=LAYER, device="cuda")
    np.testing.assert_allclose(cam_gpu, cam_cpu, rtol=1e-3, atol=1e-5 * max(np.abs(cam_cpu).max(), 1e-12))
    net.cpu()


def test_max_over_a_sample_of_omega_equals_the_loop_over_that_sample(net, image):
    om = lesion()  # 18 voxels
    keep = omega_sample(int(om.sum()), 5, seed=4)
    assert len(keep) == 5 and np.all(np.diff(keep) > 0)
    sub = np.zeros_like(om)
    sub[tuple(np.argwhere(om)[keep].T)] = True
    ours = smoothgrad(net, image, om, n_samples=1, sigma=0.0, context="full", seed=4, device="cpu", max_omega_voxels=5)
    ref = loop_reference(net, image, sub, [torch.zeros(2, *SHAPE)], "max")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # a cap at or above |Ω| changes nothing; mean aggregation ignores it (one backward pass anyway)
    exact = smoothgrad(net, image, om, n_samples=1, sigma=0.0, context="full", device="cpu")
    np.testing.assert_array_equal(smoothgrad(net, image, om, n_samples=1, sigma=0.0, context="full", device="cpu", max_omega_voxels=18), exact)
    mean = smoothgrad(net, image, om, n_samples=1, sigma=0.0, aggregation="mean", context="full", device="cpu")
    np.testing.assert_array_equal(
        smoothgrad(net, image, om, n_samples=1, sigma=0.0, aggregation="mean", context="full", device="cpu", max_omega_voxels=2), mean)
    with pytest.raises(InputError, match="max_omega_voxels"):
        smoothgrad(net, image, om, n_samples=1, device="cpu", max_omega_voxels=0)


# ------------------------------------------------------------------------------ partial maps

def _partials(**kwargs):
    """(copies_done, map) of each partial call, and the map returned, for smoothgrad(net, image, lesion(), **kwargs)."""
    got = []
    final = smoothgrad(kwargs.pop("net"), kwargs.pop("image"), lesion(), partial=lambda k, m: got.append((k, m.copy())), **kwargs)
    return got, final


@pytest.mark.parametrize("aggregation, copies, n, expected", [("max", 2, 6, [2, 4, 6]), ("mean", 3, 7, [3, 6, 7]), ("max", 3, 5, [3, 5])])
def test_partial_maps_are_smoothgrad_with_fewer_copies_and_the_last_is_the_map(net, image, aggregation, copies, n, expected):
    kw = dict(aggregation=aggregation, seed=4, context="full", device="cpu", copies_per_pass=copies)
    got, final = _partials(net=net, image=image, n_samples=n, partial_interval_s=0, **kw)
    assert [k for k, _ in got] == expected  # after every batch of copies here, in order
    for k, m in got[:-1]:  # the mean over the copies so far: a plain run with that many copies, bit for bit
        np.testing.assert_array_equal(m, smoothgrad(net, image, lesion(), n_samples=k, **kw))
    one_go = smoothgrad(net, image, lesion(), n_samples=n, **kw)
    np.testing.assert_array_equal(got[-1][1], one_go)
    np.testing.assert_array_equal(final, one_go)  # asking for partial maps does not change the map
    assert not np.array_equal(got[0][1], one_go)  # and the early map is a different (noisier) one


def test_partial_maps_are_throttled_by_copies_and_seconds(net, image):
    kw = dict(net=net, image=image, seed=1, aggregation="mean", context="full", device="cpu", copies_per_pass=1)
    assert [k for k, _ in _partials(n_samples=7, partial_every=3, partial_interval_s=0, **kw)[0]] == [1, 4, 7]
    assert [k for k, _ in _partials(n_samples=7, partial_every=1, partial_interval_s=3600, **kw)[0]] == [1, 7]  # first and last
    assert [k for k, _ in _partials(n_samples=1, partial_interval_s=0, **kw)[0]] == [1]  # one copy: the final map only


@pytest.mark.parametrize("bad, says", [(dict(partial_every=0), "partial_every"), (dict(partial_every=2.5), "partial_every"),
                                       (dict(partial_every=True), "partial_every"), (dict(partial_interval_s=-1), "partial_interval_s"),
                                       (dict(partial_interval_s=float("nan")), "partial_interval_s")])
def test_bad_partial_settings_are_refused_before_any_work(net, image, bad, says):
    calls = []
    with pytest.raises(InputError, match=says):
        smoothgrad(net, image, lesion(), n_samples=2, device="cpu", progress=lambda d, t: calls.append(d), partial=print, **bad)
    assert not calls


def test_explain_streams_partial_maps_by_channel_and_only_for_smoothgrad(net, image):
    from MSInstanceSaliencyLib.saliency.explain import explain

    got = []
    exp = explain(net, image, lesion(), "smoothgrad", n_samples=3, context="full", device="cpu", partial=lambda k, maps: got.append((k, maps)),
                  partial_interval_s=0)
    assert got[-1][0] == 3 and all(set(maps) == {"flair", "mprage"} for _, maps in got)
    for name in ("flair", "mprage"):
        np.testing.assert_array_equal(got[-1][1][name], exp.maps[name])
    with pytest.raises(InputError, match="SmoothGrad"):
        explain(net, image, lesion(), "gradcampp", layer=LAYER, device="cpu", partial=print)
