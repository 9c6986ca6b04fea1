"""The experiments compute the right numbers: dilation rings, context steps, control spheres."""

import json
from collections import deque

import numpy as np
import pytest
import torch

from MSInstanceSaliencyLib.research.experiments import context_experiment, healthy_white_matter_sphere, sphere_mask, summarize_context
from MSInstanceSaliencyLib.segmentation.instances import dilation_steps
from MSInstanceSaliencyLib.models.base import LoadedModel, freeze
from MSInstanceSaliencyLib.models.monai import build_network

from conftest import tiny_spec


def steps_18(omega, k):
    """Voxels within k steps of Ω along 18-neighbour moves, by breadth-first search."""
    offs = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if 0 < abs(a) + abs(b) + abs(c) <= 2]
    dist = np.full(omega.shape, -1)
    q = deque()
    for v in map(tuple, np.argwhere(omega)):
        dist[v] = 0
        q.append(v)
    while q:
        v = q.popleft()
        if dist[v] == k:
            continue
        for o in offs:
            w = tuple(np.add(v, o))
            if all(0 <= w[i] < omega.shape[i] for i in range(3)) and dist[w] < 0:
                dist[w] = dist[v] + 1
                q.append(w)
    return (dist >= 0) & (dist <= k)


def test_dilation_step_k_is_exactly_k_18_connected_steps():
    om = np.zeros((21, 19, 17), bool)
    om[10, 9, 8] = True
    om[11, 9, 8] = True
    om[4, 4, 4] = True
    steps = dilation_steps(om, 5)
    assert len(steps) == 6
    for k, m in enumerate(steps):
        np.testing.assert_array_equal(m, steps_18(om, k))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    spec = tiny_spec(roi_size=[16, 16, 16])
    net = build_network(spec)
    freeze(net)
    return LoadedModel(net, spec, None)


def test_context_steps_and_full_restoration(tiny_model):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 24, 24, 24)).astype(np.float32)
    om = np.zeros(img.shape[1:], bool)
    om[11:13, 11:13, 11:13] = True
    rows = context_experiment(tiny_model, img, om, n_steps=20, device="cpu", batch=6)
    assert [r["step"] for r in rows] == list(range(21))
    assert rows[0]["restored_voxels"] == 8
    assert all(a["restored_voxels"] <= b["restored_voxels"] for a, b in zip(rows, rows[1:]))
    # once every voxel of the 16^3 window is restored, the score is the model's on the original window
    from MSInstanceSaliencyLib.saliency.context import _crop_pad, context_box

    box = context_box(om, "patch", (16, 16, 16), 4)
    with torch.no_grad():
        p = torch.softmax(tiny_model.network(_crop_pad(torch.from_numpy(img), box)[None]), 1)[0, 1]
    ref = p[_crop_pad(torch.from_numpy(om), box)]
    assert rows[-1]["mean_probability"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert rows[-1]["detected"] == bool((ref > 0.3).any())
    # with only the lesion restored the score differs (the context mattered)
    assert rows[0]["mean_probability"] != pytest.approx(rows[-1]["mean_probability"])


def test_context_summary_by_hand():
    def lesion(scores, thr=0.3):
        return [{"step": k, "distance_mm": float(k), "mean_probability": s, "detected": s > thr} for k, s in enumerate(scores)]

    per = {"a": lesion([0.1, 0.5, 0.8, 0.9, 0.9]), "b": lesion([0.2, 0.2, 0.6, 0.9, 0.88])}
    s = summarize_context(per, plateau_tol=0.02)
    assert [x["detected"] for x in s["steps"]] == [0, 1, 2, 2, 2]
    assert s["all_detected_from_mm"] == 2.0
    assert s["steps"][2]["mean_score"] == pytest.approx(0.7)
    assert s["steps"][2]["sd_score"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert s["plateau_mm"] == 3.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.5)])
def test_sphere_volume(spacing):
    m = sphere_mask((60, 60, 60), (30, 30, 30), 93.0, spacing)
    assert m.sum() * np.prod(spacing) == pytest.approx(93.0, rel=0.2)


def test_healthy_sphere_avoids_lesions_and_stays_in_white_matter():
    wm = np.zeros((60, 60, 60), np.float32)
    wm[10:50, 10:50, 10:50] = 1.0
    lesions = np.zeros(wm.shape, bool)
    lesions[15:20, 15:20, 15:20] = True
    s = healthy_white_matter_sphere(wm, lesions, 93.0, margin_mm=10.0, seed=1)
    assert s.sum() == pytest.approx(93, rel=0.2)
    assert (wm[s] > 0.9).all()
    from scipy import ndimage

    d = ndimage.distance_transform_edt(~lesions)
    assert d[s].min() > 10.0
    with pytest.raises(Exception, match="no healthy white matter"):
        healthy_white_matter_sphere(np.zeros_like(wm), lesions)


def test_place_copy_fits_the_exact_shape():
    from MSInstanceSaliencyLib.research.experiments import copy_region, place_copy

    allowed = np.zeros((40, 40, 40), bool)
    allowed[5:35, 18:22, 5:35] = True  # a thin slab: an elongated lesion fits only lying in it
    lesion = np.zeros_like(allowed)
    lesion[2:12, 30, 30] = True  # 10 voxels along x
    keep = np.zeros_like(allowed)
    keep[30:40, 15:25, 30:40] = True
    shift = place_copy(lesion, allowed, keep, (1, 1, 1), margin_mm=0.0, away_mm=3.0, seed=0)
    img = np.random.default_rng(0).standard_normal((2, 40, 40, 40)).astype(np.float32)
    out, copy = copy_region(img, lesion, shift)
    assert copy.sum() == 10 and allowed[copy].all()
    from scipy import ndimage

    assert ndimage.distance_transform_edt(~keep)[copy].min() > 3.0
    np.testing.assert_array_equal(out[:, copy], img[:, lesion])  # same voxel order: a pure shift
    assert np.array_equal(out[:, ~copy], img[:, ~copy])


def test_tn_spheres_volume_and_no_contact():
    from scipy import ndimage

    from MSInstanceSaliencyLib.research.experiments import tn_spheres

    head = np.zeros((70, 70, 70), bool)
    head[5:65, 5:65, 5:65] = True
    lesions = np.zeros_like(head)
    lesions[20:30, 20:30, 20:30] = True
    spheres = tn_spheres(head, lesions, 93.0, n=10, seed=3)
    assert len(spheres) == 10
    union = np.zeros_like(head)
    for s in spheres:
        assert s.sum() == pytest.approx(93, rel=0.2)
        assert head[s].all() and not (s & lesions).any() and not (s & union).any()
        assert ndimage.binary_dilation(s, structure=np.ones((3, 3, 3)))[lesions].sum() == 0  # not even touching
        union |= s


def test_mannwhitney_and_median_ci():
    from scipy.stats import mannwhitneyu

    from MSInstanceSaliencyLib.research.experiments import median_ci, pairwise_mannwhitney

    rng = np.random.default_rng(0)
    groups = {"TN": rng.normal(0.5, 0.2, 30), "FP": rng.normal(1.6, 0.5, 12), "TP": rng.normal(2.0, 0.5, 40), "FN": []}
    res = pairwise_mannwhitney(groups)
    assert set(res) == {"TN vs FP", "TN vs TP", "FP vs TP"}
    for pair, r in res.items():
        a, b = pair.split(" vs ")
        ref = mannwhitneyu(groups[a], groups[b], alternative="two-sided")
        assert r["U"] == ref.statistic and r["p"] == ref.pvalue
    m = median_ci(groups["TP"], seed=1)
    assert m["ci95"][0] <= m["median"] <= m["ci95"][1] and m["median"] == pytest.approx(np.median(groups["TP"]))
    assert median_ci(groups["TP"], seed=1) == m


def test_modality_contribution_by_hand():
    from MSInstanceSaliencyLib.research.experiments import modality_contribution

    om = np.zeros((12, 12, 12), bool)
    om[5:7, 5:7, 5:7] = True
    maps = np.zeros((2, 12, 12, 12), np.float32)
    maps[0][om] = 2.0
    maps[0, 5, 5, 5] = 0.05  # under the |value| < 0.1 cut: ignored
    maps[0, 4, 5, 5] = -1.0  # in the ring
    maps[1][om] = -0.5
    c = modality_contribution(maps, om)
    assert c["flair_inside_positive"] == pytest.approx(2.0)
    assert c["flair_ring_negative"] == pytest.approx(-1.0)
    assert c["flair_inside_negative"] == 0.0 and c["mprage_inside_negative"] == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- the experiments on the model's own grid

def case_with_lesions_of(res, gt_mask, white_matter=None, name="case"):
    """A Case whose lesions are the ground truth's (every lesion a TP): the experiments' regions exist
    whatever a small random model segments, and the model's grid is what is tested."""
    from dataclasses import replace

    from MSInstanceSaliencyLib.research.experiments import Case
    from MSInstanceSaliencyLib.segmentation.instances import label_instances, lesion_table

    labels = label_instances(gt_mask, spacing=res.prepared.spacing, min_volume_mm3=0)
    return Case(name, replace(res, labels=labels, table=lesion_table(labels, res.reference, res.probability)), gt_mask, white_matter)


def check_experiments_on_the_reference_grid(model, case, *, max_omega_voxels=None):
    """Every experiment on one case with N = 1, on its smallest lesion and small TN spheres (SmoothGrad
    costs a backward pass per voxel of the max_omega_voxels it takes): maps and rows on the reference grid, finite."""
    from MSInstanceSaliencyLib.research.experiments import run_context, run_control_regions, run_peaks, run_synthetic_lesion

    shape = case.result.prepared.shape
    assert case.result.prepared.image.shape[1:] != shape  # the network runs on another grid
    smallest = min(case.result.table, key=lambda r: r["voxels"])
    if case.white_matter is not None:
        rows, summary, regions, maps = run_control_regions(model, case, lesion_id=smallest["lesion_id"], n_samples=1, device="cpu",
                                                           max_omega_voxels=max_omega_voxels)
        assert all(m.shape == (len(case.result.prepared.channels),) + shape and np.isfinite(m).all() for m in maps.values())
        assert all(np.abs(m[:, regions[r]]).max() > 0 for r, m in maps.items())  # each region's map is there, on its region
        assert summary["flair_peak"]["tp_lesion"] > 0 and np.isfinite(summary["tp_over_wm_peak_ratio"])
        rows, summary, panels = run_synthetic_lesion(model, case, lesion_id=summary["lesion_id"], n_samples=1, device="cpu",
                                                     max_omega_voxels=max_omega_voxels)
        assert len({r["voxels"] for r in rows}) == 1  # every copy has exactly the lesion's voxels on the reference grid
        for p in panels.values():
            assert p["probability"].shape == shape and p["map"].shape == shape and p["flair"].shape == shape
            assert np.isfinite(p["map"]).all() and np.abs(p["map"][p["omega"]]).max() > 0
    one = case_with_lesions_of(case.result, case.result.labels == smallest["lesion_id"])  # the smallest lesion alone
    rows, summary = run_context(model, [one], (smallest["voxels"],) * 2, n_steps=2, device="cpu")
    assert len(rows) == 3 and summary["n_lesions"] == 1 and all(0 <= r["mean_probability"] <= 1 for r in rows)
    rows, summary = run_peaks(model, [one], n_samples=1, tn_volume_mm3=4 * float(np.prod(case.result.prepared.spacing)), device="cpu",
                             max_omega_voxels=max_omega_voxels, tn_per_case=2)
    assert sorted(r["group"] for r in rows) == ["TN", "TN", "TP"] and all(np.isfinite(r["flair_max"]) for r in rows)
    return rows


@pytest.fixture(scope="module")
def resampled(small_phantom, tmp_path_factory):
    """A model.json model on its own grid: 3 mm voxels, axes permuted and flipped (ASL), on the 2 mm phantom."""
    from MSInstanceSaliencyLib.io.volumes import array_from_image, mask_from_image
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.models.monai import save_model
    from MSInstanceSaliencyLib.segmentation.pipeline import segment

    torch.manual_seed(0)
    spec = tiny_spec(target_spacing=[3.0, 3.0, 3.0], orientation="ASL")
    d = tmp_path_factory.mktemp("resampled_model")
    save_model(build_network(spec), spec, d)
    model = load_model(d)
    res = segment(small_phantom.flair, small_phantom.mprage, model, device="cpu")
    return model, case_with_lesions_of(res, mask_from_image(small_phantom.lesions), array_from_image(small_phantom.white_matter))


def test_a_shift_on_the_reference_grid_is_the_same_displacement_on_the_network_grid(resampled):
    from MSInstanceSaliencyLib.research.experiments import copy_region, network_shift

    _, case = resampled
    prepared = case.result.prepared
    lesion = case.result.labels == 6
    shift = np.array([3, -6, 3])  # 6, -12, 6 mm: whole voxels of the 3 mm network grid, whose first two axes are swapped and flipped
    net_shift = network_shift(prepared, shift)
    assert sorted(np.abs(net_shift).tolist()) == [2, 2, 4] and abs(net_shift[0]) == 4
    moved = copy_region(np.zeros((1,) + lesion.shape, np.float32), lesion, shift)[1]
    on_network = prepared.to_network(lesion)
    assert on_network.any()
    np.testing.assert_array_equal(copy_region(np.zeros((1,) + on_network.shape, np.float32), on_network, net_shift)[1],
                                  prepared.to_network(moved))


def test_experiments_with_a_model_json_on_its_own_grid(resampled):
    model, case = resampled
    check_experiments_on_the_reference_grid(model, case, max_omega_voxels=4)


def test_a_flair_only_model_runs_the_experiments_without_mprage_columns(small_phantom):
    """Without an MPRAGE channel there is no MPRAGE map: the peaks and contributions are the FLAIR's; the regions are the same."""
    from MSInstanceSaliencyLib.io.volumes import array_from_image, mask_from_image
    from MSInstanceSaliencyLib.research.experiments import run_control_regions, run_peaks
    from MSInstanceSaliencyLib.segmentation.pipeline import segment

    torch.manual_seed(0)
    spec = tiny_spec(input_channels=["flair"], network_args=dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 16],
                                                                 strides=[2, 2], norm="batch", num_res_units=0))
    net = build_network(spec)
    freeze(net)
    model = LoadedModel(net, spec, None)
    res = segment(small_phantom.flair, None, model, device="cpu")  # the FLAIR's grid is the reference
    case = case_with_lesions_of(res, mask_from_image(small_phantom.lesions), array_from_image(small_phantom.white_matter))
    rows, summary = run_peaks(model, [case], n_samples=1, max_per_group=1, tn_per_case=1, max_omega_voxels=1, device="cpu")
    assert {r["group"] for r in rows} == {"TP", "TN"} and not any(k.startswith("mprage") for r in rows for k in r)
    assert summary["medians_positive_peak"]["TP"]["n"] == 1
    rows, summary, _, maps = run_control_regions(model, case, lesion_id=1, n_samples=1, max_omega_voxels=1, device="cpu")
    assert {r["channel"] for r in rows} == {"flair"} and all(m.shape == (1,) + res.prepared.shape for m in maps.values())
