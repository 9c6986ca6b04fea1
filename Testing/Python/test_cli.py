"""The command line end to end, as a user runs it (msis's main() with its arguments, real files)."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.io.volumes import array_from_image, same_grid

from conftest import msis_in_process

ROOT = Path(__file__).resolve().parents[2]


# phantoms of 2 mm voxels: 8x fewer voxels than the model's 1 mm training phantoms, for fast research-command tests
# (sizes given in voxels scale by 1/8: 40-200 voxels at 1 mm are 5-25 at 2 mm)
SMALL_PHANTOMS = {"MSIS_PHANTOM_VOXEL_SIZE": "2"}
# the one phantom patient of the single-case research tests (control regions, synthetic lesion, peaks)
SHARED_PATIENT = "18"


def msis(*args, cwd=None, env=None):
    """Run msis's command line (in this process: no interpreter start-up per command; test_outputs, test_bad_inputs
    and the Ctrl-C tests run `python -m MSInstanceSaliencyLib` itself); env: extra environment variables (e.g. SMALL_PHANTOMS)."""
    return msis_in_process(*args, cwd=cwd, env=env)


def assert_clean_error(res, fragment):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("msis:")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr


def test_segment_writes_outputs_on_mprage_geometry(phantom_files, tiny_model_dir, tmp_path):
    # an oblique, anisotropic MPRAGE grid: outputs must come back on exactly that geometry
    mprage = sitk.ReadImage(str(phantom_files["mprage"]))
    mprage.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    mprage.SetSpacing((2.0, 1.9, 2.3))
    sitk.WriteImage(mprage, str(tmp_path / "mprage.nrrd"))
    flair = sitk.ReadImage(str(phantom_files["flair"]))
    flair.CopyInformation(mprage)
    sitk.WriteImage(flair, str(tmp_path / "flair.nii.gz"))
    out = tmp_path / "out"
    res = msis("segment", tmp_path / "flair.nii.gz", tmp_path / "mprage.nrrd", "--out", out, "--model", tiny_model_dir, "--threshold", "0.5")
    assert res.returncode == 0, res.stderr
    prob = sitk.ReadImage(str(out / "probability.nii.gz"))
    labels = sitk.ReadImage(str(out / "lesion_labels.nii.gz"))
    for img in (prob, labels):
        assert same_grid(img, mprage)
    assert prob.GetPixelID() == sitk.sitkFloat32
    p = array_from_image(prob)
    assert 0.0 <= p.min() and p.max() <= 1.0
    lab = array_from_image(labels, np.int32)
    rows = list(csv.DictReader(open(out / "lesions.csv")))
    assert len(rows) == lab.max()
    assert [int(r["lesion_id"]) for r in rows] == list(range(1, lab.max() + 1))
    for r in rows[:5]:
        assert int(r["voxels"]) == (lab == int(r["lesion_id"])).sum()
        assert float(r["max_probability"]) > 0.5
    manifest = json.loads((out / "msis_run.json").read_text())
    assert set(manifest["files"]) == {"probability.nii.gz", "lesion_labels.nii.gz", "lesions.csv"}
    # a second run into the same folder replaces its own outputs
    again = msis("segment", tmp_path / "flair.nii.gz", tmp_path / "mprage.nrrd", "--out", out, "--model", tiny_model_dir, "--threshold", "0.5")
    assert again.returncode == 0, again.stderr


def test_user_files_are_never_overwritten(phantom_files, tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "lesions.csv").write_text("my own notes\n")
    res = msis("segment", phantom_files["flair"], phantom_files["mprage"], "--out", out, "--model", tiny_model_dir)
    assert_clean_error(res, "not written by msis")
    assert (out / "lesions.csv").read_text() == "my own notes\n"


def test_bad_inputs_end_with_one_line(phantom_files, tiny_model_dir, tmp_path):
    f, m = phantom_files["flair"], phantom_files["mprage"]
    assert_clean_error(msis("segment", tmp_path / "none.nii.gz", m, "--out", tmp_path / "o"), "does not exist")
    junk = tmp_path / "junk.nrrd"
    junk.write_text("hello")
    assert_clean_error(msis("segment", f, junk, "--out", tmp_path / "o"), "cannot read MPRAGE")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(30, 30).astype(np.float32)), str(flat))
    assert_clean_error(msis("segment", flat, m, "--out", tmp_path / "o"), "3D volume is needed")
    img = sitk.ReadImage(str(f))
    a = sitk.GetArrayFromImage(img)
    a[5, 5, 5] = np.nan
    nan = sitk.GetImageFromArray(a)
    nan.CopyInformation(img)
    sitk.WriteImage(nan, str(tmp_path / "nan.nii.gz"))
    assert_clean_error(msis("segment", tmp_path / "nan.nii.gz", m, "--out", tmp_path / "o", "--model", tiny_model_dir), "NaN or Inf")
    far = sitk.ReadImage(str(f))
    far.SetOrigin((900.0, 900.0, 900.0))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    assert_clean_error(msis("segment", tmp_path / "far.nii.gz", m, "--out", tmp_path / "o", "--model", tiny_model_dir), "do not overlap")
    const = sitk.Image(img.GetSize(), sitk.sitkFloat32) + 3.0
    const.CopyInformation(img)
    sitk.WriteImage(const, str(tmp_path / "const.nii.gz"))
    assert_clean_error(msis("segment", tmp_path / "const.nii.gz", m, "--out", tmp_path / "o", "--model", tiny_model_dir), "constant")
    # a model that wants three channels
    spec = json.loads((tiny_model_dir / "model.json").read_text())
    spec["network_args"]["in_channels"] = 3
    bad = tmp_path / "three"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(spec))
    assert_clean_error(msis("segment", f, m, "--out", tmp_path / "o", "--model", bad), "input channels")
    # output folder on top of an input
    assert_clean_error(msis("segment", f, m, "--out", f, "--model", tiny_model_dir), "not a folder")
    assert not (tmp_path / "o").exists()


def test_evaluate_command(phantom_files, tmp_path):
    gt = phantom_files["lesions"]
    res = msis("evaluate", gt, gt, "--json", tmp_path / "m.json")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["fp"] == 0 and m["fn"] == 0 and m["f1"] == 1.0 and m["dice"] == 1.0


def test_demo_with_bundled_model(tmp_path):
    """The README's main job: a phantom, the bundled demo model, the three outputs, a table. A 2 mm phantom
    (8x cheaper than the default 1 mm; the demo model's quality on 1 mm phantoms: test_preprocessing's
    zero-padding test) of patient 19, where the demo model keeps its 1 mm quality (patient 17, the default,
    falls to PPV < 0.5 at 2 mm)."""
    out = tmp_path / "demo"
    res = msis("demo", "--out", out, "--device", "cpu", "--patient", "19", "--samples", "2", "--no-tp-probability",  # scoring: test_segment_with_tp_probability
               env=SMALL_PHANTOMS)
    _assert_phantom_voxel_size_noted_once(res, 2)
    for name in ("probability.nii.gz", "lesion_labels.nii.gz", "lesions.csv", "phantom_flair.nii.gz"):
        assert (out / name).is_file()
    assert "lesions. Centroids in RAS" in res.stdout
    manifest = json.loads((out / "msis_run.json").read_text())
    # the demo model finds most lesions of an unseen phantom (the model card has the full validation;
    # on head phantoms it makes false positives, PPV 0.50-0.97 per validation case)
    assert manifest["metrics"]["tpr"] > 0.6 and manifest["metrics"]["ppv"] > 0.5  # 0.78 and 0.83 when written
    assert manifest["phantom_voxel_size_mm"] == 2.0
    for name in ("phantom_flair.nii.gz", "lesion_labels.nii.gz"):
        assert sitk.ReadImage(str(out / name)).GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert same_grid(sitk.ReadImage(str(out / "lesion_labels.nii.gz")), sitk.ReadImage(str(out / "phantom_mprage.nii.gz")))
    # and it explains one lesion: both channel maps and the figure
    maps = sorted(p.name for p in out.glob("saliency_lesion*_smoothgrad_*.nii.gz"))
    assert len(maps) == 2 and (out / maps[0].replace("_flair.nii.gz", ".png")).is_file()


def _one_lesion_labels(phantom_files, tmp_path):
    """A labels file on the phantom grid with the phantom's first GT lesion as lesion 1."""
    from MSInstanceSaliencyLib.segmentation.instances import label_instances

    gt = sitk.ReadImage(str(phantom_files["lesions"]))
    lab = label_instances(array_from_image(gt, np.uint8) > 0, spacing=gt.GetSpacing(), min_volume_mm3=0)
    one = (lab == 1).astype(np.uint16)
    img = sitk.GetImageFromArray(one.transpose(2, 1, 0))
    img.CopyInformation(gt)
    sitk.WriteImage(img, str(tmp_path / "labels.nii.gz"))
    return tmp_path / "labels.nii.gz", int(one.sum())


def test_explain_smoothgrad_and_gradcampp(phantom_files, tiny_model_dir, tmp_path):
    labels, n_vox = _one_lesion_labels(phantom_files, tmp_path)
    out = tmp_path / "exp"
    res = msis("explain", phantom_files["flair"], phantom_files["mprage"], "--lesion", 1, "--labels", labels, "--out", out,
               "--model", tiny_model_dir, "--samples", 2, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    mprage = sitk.ReadImage(str(phantom_files["mprage"]))
    for ch in ("flair", "mprage"):
        img = sitk.ReadImage(str(out / f"saliency_lesion1_smoothgrad_{ch}.nii.gz"))
        assert same_grid(img, mprage)
        assert np.abs(array_from_image(img)).max() > 0
    png = out / "saliency_lesion1_smoothgrad.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    res = msis("explain", phantom_files["flair"], phantom_files["mprage"], "--mask", labels, "--method", "gradcampp", "--out", out,
               "--model", tiny_model_dir, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    cam = sitk.ReadImage(str(out / "saliency_mask_gradcampp.nii.gz"))
    assert same_grid(cam, mprage) and array_from_image(cam).min() >= 0
    manifest = json.loads((out / "msis_run.json").read_text())
    assert manifest["omega_voxels"] == n_vox


def test_explain_unknown_lesion_and_empty_mask(phantom_files, tiny_model_dir, tmp_path):
    labels, _ = _one_lesion_labels(phantom_files, tmp_path)
    res = msis("explain", phantom_files["flair"], phantom_files["mprage"], "--lesion", 7, "--labels", labels, "--out", tmp_path / "o",
               "--model", tiny_model_dir)
    assert_clean_error(res, "lesion 7 does not exist")
    empty = sitk.Image(sitk.ReadImage(str(phantom_files["mprage"])).GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(sitk.ReadImage(str(phantom_files["mprage"])))
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    res = msis("explain", phantom_files["flair"], phantom_files["mprage"], "--mask", tmp_path / "empty.nii.gz", "--out", tmp_path / "o",
               "--model", tiny_model_dir)
    assert_clean_error(res, "mask is empty")


def _feature_table(path, n_samples=1, cases=("c0", "c1", "c2"), max_omega_voxels=4):
    """A feature table from real pyradiomics features of synthetic saliency maps, with missed lesions."""
    from test_radiomics import lesion_map

    from MSInstanceSaliencyLib.classifier.radiomics import default_feature_names, saliency_features
    from MSInstanceSaliencyLib.classifier.scoring import saliency_settings, write_feature_rows, write_table_manifest

    rows = []
    for i in range(30):
        tp = i % 3 != 0
        m, les = lesion_map(500 + i, positive=tp)
        rows.append({"case": f"c{i % 3}", "lesion_id": i + 1, "kind": "TP" if tp else "FP", "label": int(tp), "voxels": int(les.sum()),
                     **saliency_features(m, les)})
    rows += [{"case": "c0", "lesion_id": "gt1", "kind": "FN"}, {"case": "c1", "lesion_id": "gt4", "kind": "FN"}]
    rows = [r for r in rows if r["case"] in cases]
    write_feature_rows(rows, path, default_feature_names())
    write_table_manifest(path, saliency_settings(n_samples=n_samples, max_omega_voxels=max_omega_voxels))
    return path


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """A feature table (N = 1, the max over 4 voxels of each lesion) and what `train-classifier` makes of it: shared
    by the classifier commands' test and the segment --tp-probability test (which scores every lesion so)."""
    d = tmp_path_factory.mktemp("classifier")
    feats = _feature_table(d / "features.csv", n_samples=1)
    res = msis("train-classifier", feats, "--out", d / "clf.json")
    return res, feats, d / "clf.json"


@pytest.mark.needs_radiomics
def test_train_and_evaluate_classifier_commands(trained_classifier, tmp_path):
    res, feats, clf_path = trained_classifier
    assert res.returncode == 0, res.stderr
    clf = json.loads(clf_path.read_text())
    assert clf["saliency"]["n_samples"] == 1 and clf["saliency"]["max_omega_voxels"] == 4 and len(clf["feature_names"]) == 93
    res = msis("evaluate-classifier", clf_path, feats, "--out", tmp_path / "ev", "--n-boot", 200)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "ev" / "classifier_evaluation.json").read_text())
    assert rep["counts_before"] == {"tp": 20, "fp": 10, "fn": 2}
    assert rep["f1_after"]["ci95"][0] <= rep["f1_after"]["point"] <= rep["f1_after"]["ci95"][1]
    for png in ("feature_importance.png", "tp_probability.png", "threshold_sweep.png"):
        assert (tmp_path / "ev" / png).is_file()
    assert rep["roc_auc_size_only"]["point"] is not None and rep["threshold_sweep"][0]["tp"] == 20
    auc = rep["roc_auc"]
    assert 0.5 < auc["point"] <= 1.0 and auc["ci95"][0] <= auc["point"] <= auc["ci95"][1]
    per_lesion = list(csv.DictReader(open(tmp_path / "ev" / "test_probabilities.csv")))
    assert len(per_lesion) == 30 and all(0.0 <= float(r["tp_probability"]) <= 1.0 for r in per_lesion)
    # features made with other saliency settings are refused
    other = _feature_table(tmp_path / "other.csv", n_samples=50)
    assert_clean_error(msis("evaluate-classifier", clf_path, other, "--out", tmp_path / "ev2"), "n_samples=50")
    # a cohort split over several tables counts as one; mixing settings or repeating a case is refused
    a = _feature_table(tmp_path / "a.csv", cases=("c0", "c1"))
    b = _feature_table(tmp_path / "b.csv", cases=("c2",))
    res = msis("evaluate-classifier", clf_path, a, b, "--out", tmp_path / "ev3", "--n-boot", 200)
    assert res.returncode == 0, res.stderr
    rep3 = json.loads((tmp_path / "ev3" / "classifier_evaluation.json").read_text())
    assert rep3["counts_before"] == rep["counts_before"] and rep3["counts_after"] == rep["counts_after"]
    assert msis("train-classifier", a, b, "--out", tmp_path / "clf_ab.json").returncode == 0
    np.testing.assert_allclose(json.loads((tmp_path / "clf_ab.json").read_text())["coef"], clf["coef"], rtol=1e-9, atol=1e-12)
    assert_clean_error(msis("train-classifier", a, other, "--out", tmp_path / "clf2.json"), "other saliency settings")
    assert_clean_error(msis("train-classifier", a, a, "--out", tmp_path / "clf3.json"), "is in both")
    # other class weights are stored with the classifier; nonsense is refused
    assert msis("train-classifier", feats, "--class-weight", "0.5,0.5", "--out", tmp_path / "clf_eq.json").returncode == 0
    assert json.loads((tmp_path / "clf_eq.json").read_text())["class_weight"] == {"0": 0.5, "1": 0.5}
    assert clf["class_weight"] == {"0": 0.29, "1": 0.71}
    assert_clean_error(msis("train-classifier", feats, "--class-weight", "1,x", "--out", tmp_path / "clf4.json"), "FP,TP")


@pytest.mark.needs_radiomics
def test_segment_with_tp_probability_and_pruning(trained_classifier, tmp_path):
    """The bundled demo model on a 2 mm phantom with two small lesions, a classifier trained with N = 1."""
    from MSInstanceSaliencyLib.research.phantom import make_phantom, patient_mask_path

    ref = sitk.ReadImage(str(patient_mask_path(1)))
    a = np.zeros(ref.GetSize()[::-1], np.uint8)  # MNI (FSL grid) mask with two small cubes in white matter
    a[70:75, 120:125, 60:65] = 1
    a[80:84, 100:104, 110:114] = 1
    mask = sitk.GetImageFromArray(a)
    mask.CopyInformation(ref)
    files = make_phantom(5, mask, n_mimics=4, voxel_size=2.0).save(tmp_path / "case")
    trained, _, clf = trained_classifier
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "seg"
    res = msis("segment", files["flair"], files["mprage"], "--out", out, "--device", "cpu",
               "--tp-probability", "--classifier", clf, "--prune-below", "0.5")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(out / "lesions.csv")))
    assert rows
    probs = [float(r["tp_probability"]) for r in rows if r["tp_probability"]]
    assert len(probs) == len(rows) and all(0.0 <= p <= 1.0 for p in probs)
    kept = list(csv.DictReader(open(out / "lesions_pruned.csv")))
    assert {r["lesion_id"] for r in kept} == {r["lesion_id"] for r in rows if float(r["tp_probability"]) >= 0.5}
    pruned = array_from_image(sitk.ReadImage(str(out / "lesion_labels_pruned.nii.gz")), np.int32)
    assert set(np.unique(pruned)) - {0} == {int(r["lesion_id"]) for r in kept}


def test_context_command_on_a_phantom(tmp_path):
    out = tmp_path / "ctx"
    # 12-25 voxels: two TP lesions of patient 19 at 2 mm (5-25: eight, each a network pass per step)
    res = msis("context", "--out", out, "--device", "cpu", "--phantom-patients", "19", "--size-range", "12", "25", "--steps", "3", env=SMALL_PHANTOMS)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "context_summary.json").read_text())
    assert s["n_lesions"] >= 1 and len(s["steps"]) == 4  # the lesion alone, then 3 rings of context
    rows = list(csv.DictReader(open(out / "context_raw.csv")))
    assert len(rows) == 4 * s["n_lesions"]
    assert (out / "context.png").is_file()
    assert s["phantom_voxel_size_mm"] == 2.0
    # the cheapest phantom (4 mm) suffices to find no lesion of this size
    assert_clean_error(msis("context", "--out", tmp_path / "none", "--phantom-patients", "19", "--size-range", "100000", "200000",
                            env={"MSIS_PHANTOM_VOXEL_SIZE": "4"}), "no TP lesion")


def test_synthetic_lesion_command_on_a_phantom(tmp_path):
    out = tmp_path / "syn"
    res = msis("sanity", "synthetic-lesion", "--out", out, "--device", "cpu", "--phantom-patients", SHARED_PATIENT, "--samples", "1",
               "--max-voxels", "8", env=SMALL_PHANTOMS)  # 60 voxels at 1 mm
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "synthetic_lesion_summary.json").read_text())
    assert set(s["results"]) == {"original", "a_white_matter", "b_background", "c_background_with_3mm"}
    n = {v["voxels"] for v in s["results"].values()}
    assert len(n) == 1  # every copy has exactly the lesion's voxels
    assert s["results"]["original"]["detected"]  # a TP lesion is segmented where it is
    assert set(s["paper_expectation_met"]) == {"a_segmented", "b_not_segmented", "c_not_segmented", "c_higher_peak_than_b"}
    assert (out / "synthetic_lesion.png").is_file() and (out / "synthetic_lesion.csv").is_file()


@pytest.fixture(scope="module")
def peaks_run(tmp_path_factory):
    """One `stats peaks` run for the peaks test and the voxel-size test (a 128 mm^3 TN sphere: a known size in voxels;
    small, because each TN sphere costs one backward pass per voxel)."""
    out = tmp_path_factory.mktemp("peaks") / "peaks"
    res = msis("stats", "peaks", "--out", out, "--device", "cpu", "--phantom-patients", SHARED_PATIENT, "--samples", "1", "--max-per-group", "2",
               "--tn-volume", "128", "--max-omega-voxels", "4", env=SMALL_PHANTOMS)
    return res, out


def test_stats_peaks_command_on_a_phantom(peaks_run):
    res, out = peaks_run
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "peaks_summary.json").read_text())
    rows = list(csv.DictReader(open(out / "peaks.csv")))
    assert sum(r["group"] == "TN" for r in rows) == 10 and s["tn_volume_mm3"] == 128.0
    assert all(1 <= sum(r["group"] == g for r in rows) <= 2 for g in ("TP", "FP", "FN"))  # patient 18 at 2 mm has each kind
    assert s["medians_positive_peak"]["TN"]["n"] == 10
    for name in ("peaks_violin.png", "modality_contribution.png"):
        assert (out / name).is_file()


def _assert_phantom_voxel_size_noted_once(res, mm):
    assert res.returncode == 0, res.stderr
    note = f"phantoms with {mm:g} mm voxels (MSIS_PHANTOM_VOXEL_SIZE); the model's training phantoms have 1 mm"
    assert res.stderr.count(note) == 1, res.stderr


def test_phantom_voxel_size_is_honoured_and_recorded(peaks_run, monkeypatch, capsys):
    """MSIS_PHANTOM_VOXEL_SIZE sets the phantoms of the experiments (of demo: test_demo_with_bundled_model), said
    once on stderr and recorded; sizes in mm^3 stay mm^3 on the coarser grid; unset, it is the model's 1 mm, unsaid."""
    from MSInstanceSaliencyLib.cli.common import _phantom_voxel_size

    res, peaks = peaks_run
    _assert_phantom_voxel_size_noted_once(res, 2)
    assert json.loads((peaks / "peaks_summary.json").read_text())["phantom_voxel_size_mm"] == 2.0
    assert json.loads((peaks / "msis_run.json").read_text())["phantom_voxel_size_mm"] == 2.0
    # a 128 mm^3 TN sphere is about 16 voxels of 8 mm^3 (it would be about 128 at 1 mm)
    tn = [int(r["voxels"]) for r in csv.DictReader(open(peaks / "peaks.csv")) if r["group"] == "TN"]
    assert len(tn) == 10 and all(8 <= v <= 40 for v in tn), tn
    monkeypatch.delenv("MSIS_PHANTOM_VOXEL_SIZE", raising=False)
    assert _phantom_voxel_size(note=True) == 1.0 and "MSIS_PHANTOM_VOXEL_SIZE" not in capsys.readouterr().err
    # a bad value is refused before the model loads or any phantom is made
    assert_clean_error(msis("validate-model", "--patients", "17", env={"MSIS_PHANTOM_VOXEL_SIZE": "8"}), "MSIS_PHANTOM_VOXEL_SIZE must be")


@pytest.mark.needs_radiomics
def test_a_phantom_table_resumes_only_with_its_own_settings(tmp_path):
    from MSInstanceSaliencyLib.research.phantom_features import phantom_feature_table
    from MSInstanceSaliencyLib.classifier.scoring import saliency_settings

    table = _feature_table(tmp_path / "features.csv", n_samples=50)
    before = table.read_bytes()
    with pytest.raises(InputError, match="other saliency settings"):
        phantom_feature_table(None, [1], table, saliency_settings(n_samples=10))
    assert table.read_bytes() == before  # nothing appended



@pytest.mark.needs_radiomics
def test_bundled_classifier_is_reproduced_from_the_committed_feature_tables(tmp_path):
    """The shipped tp_classifier.json is what `train-classifier` makes of docs/classifier's training
    tables, uses the pipeline's saliency settings, and gives the model card's test results."""
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier, default_classifier_path, default_feature_names
    from MSInstanceSaliencyLib.classifier.scoring import DEFAULT_SETTINGS

    bundled = TPClassifier.load(default_classifier_path())
    assert bundled.saliency == DEFAULT_SETTINGS and bundled.feature_names_ == default_feature_names()
    tables = ROOT / "docs" / "classifier"
    res = msis("train-classifier", *sorted(tables.glob("features_train*.csv")), "--out", tmp_path / "clf.json")
    assert res.returncode == 0, res.stderr
    again = json.loads((tmp_path / "clf.json").read_text())
    shipped = json.loads(default_classifier_path().read_text())
    for key in ("coef", "intercept", "scaler_mean", "scaler_scale"):
        np.testing.assert_allclose(again[key], shipped[key], rtol=1e-9, atol=1e-12)
    tests = sorted(tables.glob("features_test*.csv"))
    res = msis("evaluate-classifier", default_classifier_path(), *tests, "--out", tmp_path / "ev")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "ev" / "classifier_evaluation.json").read_text())
    card = json.loads((tables / "evaluation" / "classifier_evaluation.json").read_text())
    for key in ("counts_before", "counts_after", "f1_before", "f1_after", "ppv_before", "ppv_after", "roc_auc"):
        assert rep[key] == card[key], key


def test_demo_prints_tp_probability_by_kind(capsys):
    import types

    from MSInstanceSaliencyLib.cli import _print_tp_probability_by_kind

    labels = np.zeros((12, 12, 12), np.int32)
    labels[1:3, 1:3, 1:3], labels[5:7, 5:7, 5:7], labels[9:11, 9:11, 9:11] = 1, 2, 3
    gt = (labels == 1) | (labels == 3)  # lesion 2 is the false positive
    table = [{"lesion_id": 1, "tp_probability": 0.9}, {"lesion_id": 2, "tp_probability": 0.4}, {"lesion_id": 3, "tp_probability": 0.7}]
    truth = sitk.GetImageFromArray(np.transpose(gt.astype(np.uint8), (2, 1, 0)).copy())
    _print_tp_probability_by_kind(types.SimpleNamespace(labels=labels, table=table), types.SimpleNamespace(lesions=truth))
    out = capsys.readouterr().out
    assert "of the 2 TP lesions: median 0.800, range 0.700-0.900" in out
    assert "of the 1 FP lesions: median 0.400, range 0.400-0.400 (ids 2)" in out
