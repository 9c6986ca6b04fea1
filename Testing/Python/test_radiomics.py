"""Saliency radiomics (pyradiomics) and the TP/FP classifier (scikit-learn), on real libraries."""

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.classifier.radiomics import (N_FEATURES, FeatureError, TPClassifier, bootstrap_detection,
                                                        default_feature_names, importance_figure, saliency_features)

from test_outputs import assert_failed_rewrite_keeps_the_file


def lesion_map(seed, positive=True, shape=(24, 24, 24)):
    """A saliency-like map: a blob inside the lesion (sign by class), a negative rim, noise."""
    rng = np.random.default_rng(seed)
    z = np.indices(shape).astype(float) - 12
    r = np.sqrt((z**2).sum(0))
    les = r <= rng.uniform(2.5, 4.0)
    amp = rng.uniform(2, 4) if positive else rng.uniform(0.3, 1.2)
    m = amp * np.exp(-(r**2) / 8) - (0.3 * amp if positive else 0.05) * ((r > 4) & (r < 7)) + rng.normal(0, 0.05, shape)
    return m.astype(np.float32), les


@pytest.mark.needs_radiomics
def test_93_features_with_pyradiomics_names():
    m, les = lesion_map(0)
    f = saliency_features(m, les, spacing=(1.0, 1.0, 1.0))
    assert len(f) == N_FEATURES == 93
    classes = {k.split("_")[1] for k in f}
    assert classes == {"firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"}
    assert all(k.startswith("original_") for k in f)
    assert list(f) == default_feature_names()
    assert all(np.isfinite(v) for v in f.values())


@pytest.mark.needs_radiomics
def test_equals_a_direct_pyradiomics_call():
    import radiomics
    from radiomics import featureextractor, imageoperations

    radiomics.setVerbosity(logging.ERROR)
    m, les = lesion_map(1)
    spacing = (0.9, 1.0, 1.2)
    ours = saliency_features(m, les, spacing)
    # the reference: pyradiomics by hand with the paper's settings
    img = sitk.GetImageFromArray(m.transpose(2, 1, 0))
    img.SetSpacing(spacing)
    img = imageoperations.normalizeImage(img)
    dil = ndimage.maximum_filter(les.astype(np.uint8), size=5)
    mask = sitk.GetImageFromArray(dil.transpose(2, 1, 0))
    mask.SetSpacing(spacing)
    ext = featureextractor.RadiomicsFeatureExtractor(binWidth=10, sigma=[1, 2, 3])
    ext.disableAllFeatures()
    for c in ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"):
        ext.enableFeatureClassByName(c)
    ref = {k: float(v) for k, v in ext.execute(img, mask).items() if not k.startswith("diagnostics")}
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), k


@pytest.mark.needs_radiomics
def test_degenerate_inputs_give_a_feature_error():
    m, les = lesion_map(2)
    with pytest.raises(FeatureError, match="empty"):
        saliency_features(m, np.zeros_like(les))
    with pytest.raises(FeatureError, match="constant"):
        saliency_features(np.zeros_like(m), les)
    with pytest.raises(InputError, match="differ in shape"):
        saliency_features(m, les[:-1])


def training_set(n=40, seed=0):
    rows, labels = [], []
    for i in range(n):
        tp = i % 3 != 0
        m, les = lesion_map(seed * 1000 + i, positive=tp)
        rows.append(saliency_features(m, les))
        labels.append(int(tp))
    names = default_feature_names()
    return np.array([[r[k] for k in names] for r in rows]), np.array(labels), names


@pytest.fixture(scope="module")
def fitted():
    X, y, names = training_set()
    clf = TPClassifier(saliency={"method": "smoothgrad", "aggregation": "max", "n_samples": 10, "sigma": 0.05,
                                 "sigma_mode": "range", "context": "patch"}).fit(X, y, names)
    return clf, X, y, names


@pytest.mark.needs_radiomics
def test_classifier_separates_and_matches_sklearn(fitted):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    import sklearn

    clf, X, y, _ = fitted
    p = clf.predict_proba(X)[:, 1]
    assert p[y == 1].mean() > p[y == 0].mean() + 0.3
    # the same pipeline fitted with scikit-learn directly
    sc = StandardScaler().fit(X)
    l1 = {"l1_ratio": 1.0} if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8) else {"penalty": "l1"}
    lr = LogisticRegression(max_iter=10000, solver="liblinear", C=1.0, class_weight={0: 0.29, 1: 0.71}, random_state=0, **l1)
    lr.fit(sc.transform(X), y)
    assert np.sum(lr.coef_ == 0) > 0  # L1 really is in force: some coefficients are exactly zero
    np.testing.assert_allclose(p, lr.predict_proba(sc.transform(X))[:, 1], rtol=1e-10)


@pytest.mark.needs_radiomics
def test_scaler_is_not_refitted_on_new_data(fitted):
    clf, X, y, _ = fitted
    single = clf.predict_proba(X[:1])[0, 1]
    batch = clf.predict_proba(X)[0, 1]
    assert single == pytest.approx(batch)  # a lesion's probability does not depend on the others


@pytest.mark.needs_radiomics
def test_round_trip_identical_probabilities(fitted, tmp_path):
    clf, X, _, _ = fitted
    path = clf.save(tmp_path / "clf.json")
    text = path.read_text()
    assert json.loads(text)["format"].startswith("msis-tp-classifier")
    back = TPClassifier.load(path)
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    assert back.saliency == clf.saliency


@pytest.mark.needs_radiomics
def test_mismatched_files_are_refused(fitted, tmp_path):
    clf, _, _, _ = fitted
    d = clf.to_dict()
    d["feature_names"] = d["feature_names"][::-1]
    (tmp_path / "order.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="do not match"):
        TPClassifier.load(tmp_path / "order.json")
    d = clf.to_dict()
    for k in ("feature_names", "scaler_mean", "scaler_scale", "coef"):
        d[k] = d[k][:50]
    (tmp_path / "short.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="do not match"):
        TPClassifier.load(tmp_path / "short.json")
    (tmp_path / "pickle.json").write_bytes(b"\x80\x04\x95")
    with pytest.raises(InputError, match="not a classifier"):
        TPClassifier.load(tmp_path / "pickle.json")


@pytest.mark.needs_radiomics
def test_other_saliency_settings_are_refused(fitted):
    clf, _, _, _ = fitted
    clf.check_settings(n_samples=10, context="patch")
    with pytest.raises(InputError, match="n_samples=50"):
        clf.check_settings(n_samples=50)
    with pytest.raises(InputError, match="context='full'"):
        clf.check_settings(context="full")


def test_bootstrap_contains_point_and_is_reproducible():
    rng = np.random.default_rng(3)
    is_tp = rng.random(120) < 0.7
    keep = np.where(is_tp, rng.random(120) < 0.9, rng.random(120) < 0.3)
    a = bootstrap_detection(is_tp, keep, n_fn=15, n_boot=300, seed=7)
    b = bootstrap_detection(is_tp, keep, n_fn=15, n_boot=300, seed=7)
    assert a == b
    for k in ("f1_before", "ppv_before", "f1_after", "ppv_after"):
        lo, hi = a[k]["ci95"]
        assert lo <= a[k]["point"] <= hi and lo < hi
    tp, fp, fn = is_tp.sum(), (~is_tp).sum(), 15
    assert a["f1_before"]["point"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    tp2, fp2, fn2 = (is_tp & keep).sum(), (~is_tp & keep).sum(), 15 + (is_tp & ~keep).sum()
    assert a["ppv_after"]["point"] == pytest.approx(tp2 / (tp2 + fp2))
    assert a["f1_after"]["point"] == pytest.approx(2 * tp2 / (2 * tp2 + fp2 + fn2))
    assert bootstrap_detection(is_tp, keep, 15, n_boot=300, seed=8) != a
    # paired changes: after - before on each resample
    assert a["ppv_change"]["point"] == pytest.approx(a["ppv_after"]["point"] - a["ppv_before"]["point"])
    assert a["f1_change"]["point"] == pytest.approx(a["f1_after"]["point"] - a["f1_before"]["point"])
    same = bootstrap_detection(is_tp, np.ones(120, bool), n_fn=15, n_boot=300, seed=7)
    assert same["ppv_change"]["ci95"] == [0.0, 0.0] and same["f1_change"]["ci95"] == [0.0, 0.0]
    only_fps = bootstrap_detection(is_tp, is_tp, n_fn=15, n_boot=300, seed=7)  # removes every FP and nothing else
    assert only_fps["ppv_change"]["ci95"][0] > 0 and only_fps["f1_change"]["ci95"][0] > 0


@pytest.mark.needs_radiomics
def test_importance_plot(fitted, tmp_path):
    clf, _, _, _ = fitted
    imp = clf.importance()
    assert max(abs(v) for v in imp.values()) == pytest.approx(1.0)
    p = importance_figure(clf, tmp_path / "imp.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.needs_radiomics
def test_files_without_omega_cap_refuse_capped_maps(fitted):
    clf, _, _, _ = fitted  # trained without max_omega_voxels: on maps over all of Ω
    clf.check_settings(max_omega_voxels=None)
    with pytest.raises(InputError, match="max_omega_voxels=256"):
        clf.check_settings(max_omega_voxels=256)


@pytest.mark.needs_radiomics
def test_tp_probability_reuses_an_explanation_only_with_the_classifier_settings(fitted):
    from MSInstanceSaliencyLib.saliency.explain import Explanation
    from MSInstanceSaliencyLib.classifier.scoring import tp_probability_of_explanation

    clf, _, _, _ = fitted
    m, les = lesion_map(77)
    params = dict(n_samples=10, sigma=0.05, sigma_mode="range", aggregation="max", context="patch", seed=0, precision="fp32",
                  max_omega_voxels=None)
    exp = Explanation("smoothgrad", {"flair": m, "mprage": -m}, les, "lesion1", params)
    direct = clf.predict_proba(clf.features_to_matrix([saliency_features(m, les)]))[0, 1]
    assert tp_probability_of_explanation(clf, exp, (1.0, 1.0, 1.0)) == pytest.approx(direct)
    for change in ({"n_samples": 50}, {"aggregation": "mean"}, {"context": "full"}, {"seed": 1}, {"precision": "bf16"},
                   {"max_omega_voxels": 256}):
        other = Explanation("smoothgrad", exp.maps, les, "lesion1", {**params, **change})
        assert tp_probability_of_explanation(clf, other, (1.0, 1.0, 1.0)) is None, change
    gc = Explanation("gradcampp", {"gradcampp": m}, les, "lesion1", {"context": "patch"})
    assert tp_probability_of_explanation(clf, gc, (1.0, 1.0, 1.0)) is None


def test_roc_auc_is_the_share_of_correctly_ordered_tp_fp_pairs():
    from MSInstanceSaliencyLib.classifier.radiomics import roc_auc_with_ci

    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.7
    p = np.clip(rng.normal(0.45 + 0.2 * y, 0.2), 0, 1)
    pairs = [(a > b) + 0.5 * (a == b) for a in p[y] for b in p[~y]]  # a plain loop over TP-FP pairs
    auc = roc_auc_with_ci(y, p, n_boot=300, seed=1)
    assert auc["point"] == pytest.approx(np.mean(pairs))
    assert auc["ci95"][0] <= auc["point"] <= auc["ci95"][1]
    assert roc_auc_with_ci(y, p, n_boot=300, seed=1) == auc
    assert roc_auc_with_ci(np.ones(5, bool), p[:5])["point"] is None


def test_threshold_sweep_runs_from_the_network_alone_to_nothing_kept():
    from MSInstanceSaliencyLib.classifier.radiomics import detection_scores, threshold_sweep

    is_tp = np.array([1, 1, 1, 0, 0, 1], bool)
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.55])
    rows = threshold_sweep(is_tp, p, n_fn=2, kept_tp=1, kept_fp=1, thresholds=[0.0, 0.5, 0.58, 0.95])
    assert rows[0] == {"threshold": 0.0, "tp": 5, "fp": 3, "fn": 2, "f1": detection_scores(5, 3, 2)[0], "ppv": 5 / 8}
    assert (rows[1]["tp"], rows[1]["fp"], rows[1]["fn"]) == (4, 2, 3)  # the TP at 0.3 and the FP at 0.1 go
    assert (rows[2]["tp"], rows[2]["fp"], rows[2]["fn"]) == (3, 2, 4)  # the TP at 0.55 goes too
    assert (rows[3]["tp"], rows[3]["fp"], rows[3]["fn"]) == (1, 1, 6)  # only the unscored lesions are left


@pytest.mark.needs_radiomics
def test_lesion_features_progress_counts_backward_passes_and_cancels():
    import torch

    from conftest import tiny_spec
    from MSInstanceSaliencyLib.errors import Cancelled
    from MSInstanceSaliencyLib.models.base import LoadedModel, freeze
    from MSInstanceSaliencyLib.models.monai import build_network
    from MSInstanceSaliencyLib.models.preprocessing import PreparedCase
    from MSInstanceSaliencyLib.classifier.scoring import lesion_features, saliency_settings

    torch.manual_seed(0)
    spec = tiny_spec(roi_size=[16, 16, 16])
    net = build_network(spec)
    freeze(net)
    model = LoadedModel(net, spec, None)
    rng = np.random.default_rng(0)
    case = PreparedCase(rng.standard_normal((2, 24, 24, 24)).astype(np.float32), sitk.Image(24, 24, 24, sitk.sitkFloat32),
                        ["flair", "mprage"], None, [])
    labels = np.zeros((24, 24, 24), np.int32)
    labels[2:4, 2:4, 2:4] = 1  # 8 voxels
    labels[8:11, 8:11, 8:11] = 2  # 27
    labels[15:19, 15:20, 15:17] = 3  # 40, above the sample of 30
    settings = saliency_settings(n_samples=2, max_omega_voxels=30)
    calls = []
    feats = lesion_features(model, case, labels, [1, 2, 3], settings, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert sorted(feats) == [1, 2, 3]
    total = 2 * 8 + 2 * 27 + 2 * 30
    assert {t for _, t in calls} == {total} and calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done) and {16, 70} <= set(done)  # lesion boundaries
    with pytest.raises(Cancelled):
        lesion_features(model, case, labels, [1, 2, 3], settings, device="cpu", progress=lambda d, t: False)


@pytest.mark.needs_radiomics
def test_a_failed_classifier_save_keeps_the_earlier_file(fitted, tmp_path):
    clf, X, _, _ = fitted
    path = clf.save(tmp_path / "clf.json")
    assert_failed_rewrite_keeps_the_file(path, lambda: clf.save(path), n_bytes=path.stat().st_size // 2)
    np.testing.assert_array_equal(TPClassifier.load(path).predict_proba(X), clf.predict_proba(X))


@pytest.mark.needs_radiomics
@pytest.mark.parametrize("figure", ["importance", "probability", "threshold"])
def test_a_failed_figure_keeps_the_earlier_png(fitted, tmp_path, figure):
    """The classifier's figures are written whole (saliency.figures.save_figure), never half a PNG."""
    from MSInstanceSaliencyLib.classifier.radiomics import probability_figure, threshold_figure, threshold_sweep

    clf, X, y, _ = fitted
    p = clf.predict_proba(X)[:, 1]
    draw = {"importance": lambda path: importance_figure(clf, path),
            "probability": lambda path: probability_figure(p, y == 1, np.arange(len(y)) + 10, 0.5, path),
            "threshold": lambda path: threshold_figure(threshold_sweep(y == 1, p, n_fn=2), 0.5, path)}[figure]
    path = draw(tmp_path / f"{figure}.png")
    assert_failed_rewrite_keeps_the_file(path, lambda: draw(path), n_bytes=path.stat().st_size // 2)
    assert path.read_bytes()[:4] == b"\x89PNG"
