"""Bad input never passes silently and always ends with one line `msis: error: ...` and exit code 2
(issue items 3, 4, 5, 10 and 11: truncated files, non-finite values, ground-truth labels other than 1,
exit 1 where 2 was promised, arguments checked before the work).

Real files (the 2 mm phantom written by SimpleITK, then cut), the tiny random model and the real CLI:
`main([...])` in this process where that is enough, a subprocess where the test needs one (signals, a
time limit for work that must never start).
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MSInstanceSaliencyLib.cli import main
from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.models.monai import build_network, save_model
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.io.volumes import array_from_image, read_image

from conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CLASSIFIER = ROOT / "Resources" / "Models" / "demo_unet" / "tp_classifier.json"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MSIS_DEBUG", raising=False)


def run(capsys, *args):
    """The real CLI in this process: (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(res, *fragments):
    """Exit code 2 and exactly one `msis:` line on stderr, `msis: error: ...` with the fragments."""
    rc, _, err = res
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("msis:")]
    assert len(lines) == 1 and lines[0].startswith("msis: error: "), err
    for f in fragments:
        assert f in lines[0], err
    return lines[0]


def subprocess_msis(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MSIS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "MSInstanceSaliencyLib", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def cut(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def files(phantom_files, tmp_path_factory):
    """The phantom's FLAIR as int16 and float32 in NIfTI and NRRD, complete and cut off."""
    d = tmp_path_factory.mktemp("inputs")
    flair = sitk.ReadImage(str(phantom_files["flair"]))
    as_int = sitk.Cast(sitk.RescaleIntensity(flair, 0, 2000), sitk.sitkInt16)
    out = {"flair": phantom_files["flair"], "mprage": phantom_files["mprage"], "lesions": phantom_files["lesions"], "dir": d}
    for name, img, compress in (("int16.nii.gz", as_int, True), ("float32.nii.gz", sitk.Cast(flair, sitk.sitkFloat32), True),
                                ("int16.nii", as_int, False), ("gzip.nrrd", as_int, True), ("raw.nrrd", as_int, False)):
        sitk.WriteImage(img, str(d / name), useCompression=compress)
        out[name] = d / name
        out["cut_" + name] = cut(d / name, d / ("cut_" + name))
    # a detached NRRD header whose data file lost its end
    (d / "nhdr").mkdir()
    sitk.WriteImage(as_int, str(d / "nhdr" / "flair.nhdr"))
    data_files = [p for p in (d / "nhdr").iterdir() if p.suffix != ".nhdr"]
    assert len(data_files) == 1
    cut(data_files[0], data_files[0])
    out["cut_nhdr"] = d / "nhdr" / "flair.nhdr"
    return out


# ----------------------------------------------------------------------------- 3. truncated inputs

@pytest.mark.parametrize("name", ["int16.nii.gz", "float32.nii.gz", "int16.nii", "gzip.nrrd", "raw.nrrd", "nhdr"])
def test_a_truncated_image_is_refused(files, tiny_model_dir, tmp_path, capsys, name):
    cut_file = files["cut_nhdr" if name == "nhdr" else "cut_" + name]
    line = one_error(run(capsys, "segment", cut_file, files["mprage"], "--out", tmp_path / "o", "--model", tiny_model_dir, "--device", "cpu"),
                     "FLAIR", "is truncated or corrupt")
    assert str(cut_file) in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="truncated"):
        read_image(cut_file, "FLAIR")
    if name != "nhdr":  # the complete file reads, with the values written
        img = read_image(files[name])
        assert img.GetSize() == sitk.ReadImage(str(files["flair"])).GetSize()


def test_a_gzip_nifti_with_a_corrupt_stream_is_refused(files, tmp_path):
    data = bytearray(files["int16.nii.gz"].read_bytes())
    data[-6] ^= 0xFF  # the CRC / size trailer no longer matches what the stream decompresses to
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_image(bad, "FLAIR")


def test_explain_refuses_a_truncated_label_map(files, tiny_model_dir, tmp_path, capsys):
    labels = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(files["lesions"])), sitk.sitkUInt16), str(labels), useCompression=True)
    cut_labels = cut(labels, tmp_path / "cut_labels.nii.gz", 0.7)
    one_error(run(capsys, "explain", files["flair"], files["mprage"], "--lesion", 1, "--labels", cut_labels, "--out", tmp_path / "o",
                  "--model", tiny_model_dir, "--device", "cpu", "--samples", 1), "lesion labels", "is truncated or corrupt")


def test_a_truncated_ground_truth_is_refused(files, tmp_path, capsys):
    gt = cut(Path(files["lesions"]), tmp_path / "gt.nii.gz", 0.8)
    one_error(run(capsys, "evaluate", files["lesions"], gt), "ground truth", "is truncated or corrupt")


def test_truncated_model_weights_and_classifier(tiny_model_dir, files, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    cut(d / "weights.pt", d / "weights.pt", 0.9)
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu"),
              "weights", "truncated or corrupt")
    clf = cut(BUNDLED_CLASSIFIER, tmp_path / "clf.json", 0.5)
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", tiny_model_dir, "--device", "cpu",
                  "--tp-probability", "--classifier", clf), "clf.json")


# ----------------------------------------------------------------------------- 4. non-finite values

@pytest.mark.parametrize("argv, fragment", [
    (["segment", "{f}", "{missing}", "--out", "{o}", "--min-volume", "nan"], "--min-volume"),
    (["segment", "{f}", "{missing}", "--out", "{o}", "--threshold", "nan"], "--threshold"),
    (["segment", "{f}", "{missing}", "--out", "{o}", "--prune-below", "nan"], "--prune-below"),
    (["explain", "{f}", "{missing}", "--lesion", "1", "--out", "{o}", "--sigma", "nan"], "--sigma"),
    (["explain", "{f}", "{missing}", "--lesion", "1", "--out", "{o}", "--sigma", "inf"], "--sigma"),
    (["train-classifier", "{missing}", "--out", "{o}.json", "--class-weight", "nan,1"], "--class-weight"),
    (["train-classifier", "{missing}", "--out", "{o}.json", "--class-weight", "1,inf"], "--class-weight"),
    (["evaluate-classifier", "{missing}", "{missing}", "--out", "{o}", "--threshold", "nan"], "--threshold"),
    (["stats", "peaks", "--flair", "{f}", "--mprage", "{missing}", "--gt", "{f}", "--out", "{o}", "--tn-volume", "inf"], "--tn-volume"),
    (["phantom", "--out", "{o}", "--voxel-size", "nan"], "--voxel-size"),
])
def test_non_finite_parameters_are_refused_before_anything_runs(files, tmp_path, capsys, argv, fragment):
    fill = {"f": files["flair"], "missing": tmp_path / "missing.nii.gz", "o": tmp_path / "o"}
    t0 = time.time()
    line = one_error(run(capsys, *[a.format(**fill) for a in argv]), fragment)
    assert "finite" in line
    assert time.time() - t0 < 5 and not (tmp_path / "o").exists()


def _classifier_with(tmp_path, name="clf.json", **changes):
    d = json.loads(BUNDLED_CLASSIFIER.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v(d[k]) if callable(v) else v
    p = tmp_path / name
    p.write_text(json.dumps(d))  # json writes NaN / Infinity as Python reads them back
    return p


def _set(i, value):
    def change(values):
        values = list(values)
        values[i] = value
        return values
    return change


@pytest.mark.needs_radiomics
@pytest.mark.parametrize("key, change", [("coef", _set(3, math.nan)), ("scaler_mean", _set(0, math.inf)),
                                         ("scaler_scale", _set(5, math.nan)), ("intercept", math.nan), ("C", math.inf)])
def test_a_classifier_with_non_finite_values_is_refused(tmp_path, key, change):
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier

    with pytest.raises(InputError, match=rf"\b{key}\b"):
        TPClassifier.load(_classifier_with(tmp_path, **{key: change}))


@pytest.mark.needs_radiomics
def test_segment_refuses_a_nan_classifier_before_segmenting(files, tiny_model_dir, tmp_path, capsys):
    clf = _classifier_with(tmp_path, coef=_set(0, math.nan))
    rc, out, err = res = run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", tiny_model_dir,
                             "--device", "cpu", "--tp-probability", "--classifier", clf, "--prune-below", "0.5")
    one_error(res, "coef", "finite")
    assert "segmenting windows" not in err and not (tmp_path / "o").exists()


def _tiny_model_with(tiny_model_dir, dst, change):
    shutil.copytree(tiny_model_dir, dst)
    state = torch.load(str(dst / "weights.pt"), weights_only=True)
    change(state)
    torch.save(state, str(dst / "weights.pt"))
    return dst


def test_a_model_with_non_finite_weights_is_refused(files, tiny_model_dir, tmp_path, capsys):
    def nan_weight(state):
        key = [k for k, v in state.items() if v.is_floating_point()][2]
        state[key].view(-1)[0] = float("nan")
        nan_weight.key = key

    d = _tiny_model_with(tiny_model_dir, tmp_path / "nan", nan_weight)
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu"),
              nan_weight.key, "NaN or Inf")

    def inf_running_var(state):
        key = next(k for k in state if k.endswith("running_var"))
        state[key][0] = float("inf")
        inf_running_var.key = key

    d = _tiny_model_with(tiny_model_dir, tmp_path / "inf", inf_running_var)
    with pytest.raises(InputError, match=inf_running_var.key.replace(".", r"\.")):
        load_model(d)


# ----------------------------------------------------------------------------- 5. ground-truth labels

def _gt_variant(files, tmp_path, name, pixel_type, value):
    a = array_from_image(sitk.ReadImage(str(files["lesions"])), np.float64)
    img = sitk.GetImageFromArray((a > 0).transpose(2, 1, 0).astype(np.float64) * value)
    img.CopyInformation(sitk.ReadImage(str(files["lesions"])))
    p = tmp_path / name
    sitk.WriteImage(sitk.Cast(img, pixel_type), str(p))
    return p


@pytest.mark.parametrize("pixel_type, value", [(sitk.sitkUInt16, 256), (sitk.sitkFloat32, 0.5), (sitk.sitkInt16, -1)])
def test_evaluate_counts_every_non_zero_ground_truth_label(files, tmp_path, capsys, pixel_type, value):
    reference = run(capsys, "evaluate", files["lesions"], files["lesions"], "--json", tmp_path / "ref.json")
    assert reference[0] == 0
    gt = _gt_variant(files, tmp_path, "gt.nii.gz", pixel_type, value)
    rc, out, err = run(capsys, "evaluate", files["lesions"], gt, "--json", tmp_path / "m.json")
    assert rc == 0, err
    ref, m = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert ref["n_gt"] > 0 and m["n_gt"] == ref["n_gt"] and m["fp"] == 0 and m["f1"] == 1.0
    # a prediction stored the same way is the same set of lesions
    rc, out, err = run(capsys, "evaluate", gt, files["lesions"], "--json", tmp_path / "p.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["tp"] == ref["tp"]


def test_experiment_cases_read_ground_truth_as_non_zero(files, tiny_model_dir, tmp_path):
    from MSInstanceSaliencyLib.research.experiments import file_case

    gt = _gt_variant(files, tmp_path, "gt256.nii.gz", sitk.sitkUInt16, 256)
    case = file_case(load_model(tiny_model_dir), files["flair"], files["mprage"], gt, device="cpu")
    n = int((array_from_image(sitk.ReadImage(str(files["lesions"])), np.uint8) > 0).sum())
    assert n > 0 and int((case.gt > 0).sum()) == n


@pytest.mark.needs_radiomics
def test_features_labels_lesions_with_a_ground_truth_of_256(files, tiny_model_dir, tmp_path, capsys):
    """The tiny model finds one lesion over the whole head at threshold 0.3: a TP of any non-empty GT."""
    gt = _gt_variant(files, tmp_path, "gt256.nii.gz", sitk.sitkUInt16, 256)
    out = tmp_path / "features.csv"
    rc, _, err = run(capsys, "features", files["flair"], files["mprage"], "--gt", gt, "--out", out, "--model", tiny_model_dir,
                     "--device", "cpu", "--samples", 1, "--max-omega-voxels", 1, "--threshold", "0.3")
    assert rc == 0, err
    kinds = {r["kind"] for r in csv.DictReader(open(out))}
    assert "TP" in kinds and "FP" not in kinds


# ----------------------------------------------------------------------------- 10. exit 2, not 1

@pytest.mark.parametrize("change, fragment", [
    ({"roi_size": "96"}, "roi_size"),
    ({"roi_size": [32, 32.5, 32]}, "roi_size"),
    ({"threshold": "0.3"}, "threshold"),
    ({"overlap": None}, "overlap"),
    ({"input_channels": "flair"}, "input_channels"),
    ({"network_args": [1, 2]}, "network_args"),
    ({"network_class": 3}, "network_class"),
    ({"lesion_class": "1"}, "lesion_class"),
    ({"min_lesion_mm3": "5"}, "min_lesion_mm3"),
    ({"min_lesion_mm3": float("nan")}, "min_lesion_mm3"),
    ({"weights": 3}, "weights"),
    ({"blend_mode": "nearest"}, "blend_mode"),
    ({"gradcam_layer": ["a"]}, "gradcam_layer"),
    ({"training": "yes"}, "training"),
])
def test_badly_typed_model_json_fields(files, tiny_model_dir, tmp_path, capsys, change, fragment):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    spec = json.loads((d / "model.json").read_text())
    spec.update(change)
    (d / "model.json").write_text(json.dumps(spec))
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu"), fragment)


def test_model_json_that_is_not_an_object(files, tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.json").write_text("[1, 2, 3]\n")
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu"),
              "JSON object")


@pytest.mark.parametrize("weights", [[1, 2], torch.zeros(3), {"a": "b"}])
def test_weights_that_are_not_a_state_dict(files, tiny_model_dir, tmp_path, capsys, weights):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    torch.save(weights, str(d / "weights.pt"))
    one_error(run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu"),
              "weights")


@pytest.mark.parametrize("overrides, fragment", [
    ({"network_args": dict(tiny_spec().network_args, spatial_dims=2)}, "3D"),
    ({"network_args": dict(tiny_spec().network_args, out_channels=1)}, "out_channels"),
    ({"network_class": "FlexUNet", "roi_size": [16, 16, 16],
      "network_args": {"in_channels": 2, "out_channels": 2, "backbone": "efficientnet-b0", "pretrained": False, "spatial_dims": 3}},
     "FlexUNet"),
])
def test_networks_the_pipeline_cannot_use_are_refused_at_load(files, tmp_path, capsys, overrides, fragment):
    spec = tiny_spec(**overrides)
    d = tmp_path / "model"
    save_model(build_network(spec), spec, d)
    rc, _, err = res = run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", d, "--device", "cpu")
    one_error(res, fragment)
    assert "segmenting windows" not in err


@pytest.mark.needs_radiomics
@pytest.mark.parametrize("key", ["C", "intercept", "class_weight", "feature_names", "coef", "max_iter"])
def test_a_classifier_with_a_missing_key_is_refused(tmp_path, key):
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier

    with pytest.raises(InputError, match=rf"\b{key}\b"):
        TPClassifier.load(_classifier_with(tmp_path, **{key: None}))


@pytest.mark.needs_radiomics
@pytest.mark.parametrize("key, value", [("C", "one"), ("class_weight", [0.3, 0.7]), ("coef", "x"), ("saliency", {"n_samples": "ten"}),
                                        ("max_iter", 1.5), ("feature_names", [1, 2])])
def test_a_classifier_with_badly_typed_values_is_refused(tmp_path, key, value):
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier

    with pytest.raises(InputError, match=rf"\b{key}\b"):
        TPClassifier.load(_classifier_with(tmp_path, **{key: value}))


@pytest.mark.needs_radiomics
@pytest.mark.parametrize("value", ["abc", "inf", ""])
def test_non_numeric_feature_cells_are_refused(tmp_path, capsys, value):
    from test_cli import _feature_table

    table = _feature_table(tmp_path / "features.csv")
    rows = list(csv.DictReader(open(table)))
    column = list(rows[0])[20]
    rows[4][column] = value
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    line = one_error(run(capsys, "train-classifier", table, "--out", tmp_path / "clf.json"), column)
    assert f"lesion {rows[4]['lesion_id']}" in line
    assert not (tmp_path / "clf.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["features", "--phantom-patients", "abc", "--out", "{o}.csv"], "--phantom-patients"),
    (["context", "--phantom-patients", "17,x", "--out", "{o}"], "--phantom-patients"),
    (["validate-model", "--patients", "", "--json", "{o}.json"], "--patients"),
    (["phantom", "--out", "{o}", "--voxel-size", "0"], "--voxel-size"),
    (["phantom", "--out", "{o}", "--seed", "-1"], "--seed"),
    (["phantom", "--out", "{o}", "--patient", "23"], "--patient"),
    (["evaluate-classifier", "{missing}", "{missing}", "--out", "{o}", "--n-boot", "0"], "--n-boot"),
    (["stats", "peaks", "--flair", "{f}", "--mprage", "{missing}", "--gt", "{f}", "--out", "{o}", "--tn-volume", "-5"], "--tn-volume"),
    (["segment", "{f}", "{missing}", "--out", "{o}", "--threshold", "2"], "--threshold"),
    (["segment", "{f}", "{missing}", "--out", "{o}", "--min-volume", "-1"], "--min-volume"),
    (["explain", "{f}", "{missing}", "--lesion", "0", "--out", "{o}"], "--lesion"),
    (["explain", "{f}", "{missing}", "--lesion", "1", "--out", "{o}", "--noise-seed", "-3"], "--noise-seed"),
    (["explain", "{f}", "{missing}", "--lesion", "1", "--out", "{o}", "--max-omega-voxels", "0"], "--max-omega-voxels"),
    (["context", "--flair", "{f}", "--mprage", "{missing}", "--gt", "{f}", "--size-range", "120", "90", "--out", "{o}"], "--size-range"),
    (["context", "--flair", "{f}", "--mprage", "{missing}", "--gt", "{f}", "--steps", "0", "--out", "{o}"], "--steps"),
    (["train", "--out", "{o}", "--iterations", "0", "--cache", "{o}"], "--iterations"),
])
def test_bad_arguments_are_refused_before_the_work(files, tmp_path, capsys, argv, fragment):
    fill = {"f": files["flair"], "missing": tmp_path / "missing.nii.gz", "o": tmp_path / "o"}
    t0 = time.time()
    one_error(run(capsys, *[a.format(**fill) for a in argv]), fragment)
    assert time.time() - t0 < 5 and not (tmp_path / "o").exists()


def _small_noise_image(path, size, seed=None):
    a = np.random.default_rng(size if seed is None else seed).random((size, size, size)).astype(np.float32) * 100 + 10
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    return path


@pytest.mark.parametrize("flag", ["--register", "--n4"])
def test_register_and_n4_refuse_images_too_small_for_them(tiny_model_dir, tmp_path, capsys, flag):
    img, other = _small_noise_image(tmp_path / "small.nii.gz", 6), _small_noise_image(tmp_path / "other.nii.gz", 6, seed=1)
    one_error(run(capsys, "segment", img, other, "--out", tmp_path / "o", "--model", tiny_model_dir, "--device", "cpu", flag), flag)


@pytest.mark.parametrize("command", [["segment"], ["explain", "--lesion", "1"]])
def test_the_same_volume_as_flair_and_mprage_is_refused_before_the_model_loads(files, tmp_path, capsys, command):
    """The network would get the FLAIR twice and answer without complaint: the same file, or a copy of it."""
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(Path(files["flair"]).read_bytes())
    for second in (files["flair"], copy):
        t0 = time.time()
        one_error(run(capsys, command[0], files["flair"], second, *command[1:], "--out", tmp_path / "o", "--model", tmp_path / "no model"),
                  "FLAIR and MPRAGE are the same volume")
        assert time.time() - t0 < 5 and not (tmp_path / "o").exists()


def test_a_threshold_of_2_is_refused_before_inference(files, tiny_model_dir, tmp_path, capsys):
    rc, _, err = res = run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o", "--model", tiny_model_dir,
                           "--device", "cpu", "--threshold", "2")
    one_error(res, "--threshold")
    assert "segmenting windows" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 11. smaller ones

def test_validate_model_refuses_zero_cases(tmp_path, capsys):
    one_error(run(capsys, "validate-model", "--per-patient", "0", "--json", tmp_path / "v.json"), "--per-patient")
    assert not (tmp_path / "v.json").exists()


@pytest.mark.parametrize("patients", ["3-1", "-", "1-", "5-5-6", "0"])
def test_empty_or_reversed_patient_ranges_are_refused(tmp_path, capsys, patients):
    one_error(run(capsys, "features", "--phantom-patients", patients, "--out", tmp_path / "f.csv"), "--phantom-patients")
    assert not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize("argv", [
    ["segment", "{f}", "{missing}", "--out", ""],
    ["phantom", "--out", ""],
    ["features", "{f}", "{missing}", "--out", ""],
    ["segment", "", "{f}", "--out", "{o}"],
    ["segment", "{f}", "{f}", "--out", "{o}", "--model", ""],
    ["evaluate", "{f}", "{f}", "--json", ""],
])
def test_empty_paths_are_refused(files, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    fill = {"f": files["flair"], "missing": tmp_path / "missing.nii.gz", "o": tmp_path / "o"}
    one_error(run(capsys, *[a.format(**fill) for a in argv]), "is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, command", [
    ([], "msis"),
    (["segment"], "msis segment"),
    (["nonsense"], "msis"),
    (["segment", "a.nii", "b.nii", "--out", "o", "--device", "gpu"], "msis segment"),
    (["explain", "a.nii", "b.nii", "--out", "o"], "msis explain"),
    (["sanity", "control-regions", "--samples", "many", "--out", "o"], "msis sanity control-regions"),
])
def test_argparse_errors_are_one_line(capsys, argv, command):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("msis: error: ") and err.strip().endswith(f"(see {command} --help)"), err


def test_help_still_works(capsys):
    rc, out, err = run(capsys, "segment", "--help")
    assert rc == 0 and "--threshold" in out and err == ""


def test_a_ctrl_c_that_a_library_swallows_is_not_lost(capsys):
    """A Ctrl-C can land in a library's bare `except:` (an import's) or become its own error: the command still
    knows (an error then reads `msis: interrupted`, exit 130) and its next progress step stops it."""
    from MSInstanceSaliencyLib.errors import interrupted, swallowed_interrupts_redelivered
    from MSInstanceSaliencyLib.progress import ProgressBar

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (pytest-xdist workers may differ)
    try:
        with swallowed_interrupts_redelivered():
            assert not interrupted()
            try:  # what such a library does
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(2)
            except BaseException:  # noqa: BLE001
                pass
            assert interrupted()
            with pytest.raises(KeyboardInterrupt):
                ProgressBar(label="segmenting")(1, 10)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert "segmenting" not in capsys.readouterr().err


def test_a_ctrl_c_during_a_deferred_import_is_raised_when_it_ends():
    """Inside interrupts_deferred (torch's import: a KeyboardInterrupt raised in its C++ callbacks aborts the process)
    a Ctrl-C is held and raised once the block ends; outside it, at once as usual."""
    from MSInstanceSaliencyLib.errors import interrupted, interrupts_deferred, swallowed_interrupts_redelivered

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (pytest-xdist workers may differ)
    try:
        with swallowed_interrupts_redelivered():
            reached_the_end = False
            with pytest.raises(KeyboardInterrupt):
                with interrupts_deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.5)  # the handler has run by now: it held the interrupt
                    reached_the_end = True
            assert reached_the_end and interrupted()
            with interrupts_deferred():  # no Ctrl-C: nothing raised
                pass
            # torch's import, wherever it happens, runs inside interrupts_deferred: the finder msis puts first
            import sys

            from MSInstanceSaliencyLib.errors import _TORCH_IMPORT_HOLDS_INTERRUPTS as finder

            assert sys.meta_path[0] is finder and finder.find_spec("numpy") is None
            spec = finder.find_spec("torch")
            assert spec.origin.endswith("torch/__init__.py") and spec.loader.exec_module.__qualname__.endswith("find_spec.<locals>.exec_module")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(2)
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigint_during_start_up_is_one_line(files, tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MSIS_DEBUG", None)
    argv = [sys.executable, "-m", "MSInstanceSaliencyLib", "segment", files["flair"], files["mprage"], "--out", tmp_path / "o",
            "--model", tiny_model_dir, "--device", "cpu"]
    seen, codes = [], []
    # the window between Python's handler and the end of a run is short and moves with the machine's
    # load (a fresh clone, the first import of each module), so try many moments
    for delay in (0.15, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.7, 2.0, 2.5, 3.0):
        # as from a terminal: a suite started in the background inherits SIGINT ignored, and Python then
        # installs no handler at all, so the children would never see the signal
        p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        codes.append((delay, p.returncode))
        assert "Traceback" not in err, (delay, err)
        if p.returncode == -signal.SIGINT:  # before Python's own handler was installed: nothing printed
            assert err == ""
            continue
        if p.returncode == 0:  # finished before the signal
            continue
        assert p.returncode == 130, (delay, p.returncode, err)
        assert [l for l in err.strip().splitlines() if l.startswith("msis:")] == ["msis: interrupted"], err
        seen.append(delay)
    assert seen, f"no run was interrupted: (delay, exit code) {codes}"


def test_ctrl_c_swallowed_by_a_callback_still_stops_the_run(files, tmp_path, capsys, monkeypatch):
    """CPython only prints ("Exception ignored in ...") a KeyboardInterrupt raised inside a weakref callback
    or __del__ and goes on: the timing test above met one in an import's module-lock callback. The run
    must still stop with the one line, no traceback and nothing written."""
    from MSInstanceSaliencyLib import cli

    class InterruptedWhileCollected:
        def __del__(self):
            raise KeyboardInterrupt

    reached = []

    def check_then_meet_ctrl_c(args):
        InterruptedWhileCollected()  # collected at once: its KeyboardInterrupt goes to sys.unraisablehook
        reached.append(time.monotonic())
        while time.monotonic() < reached[0] + 10:  # the interrupt, delivered again, ends this work
            pass
        raise AssertionError("the run went on after Ctrl-C")

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    hook_before = sys.unraisablehook
    monkeypatch.setattr(cli, "_check_args", check_then_meet_ctrl_c)
    rc, _, err = run(capsys, "segment", files["flair"], files["mprage"], "--out", tmp_path / "o")
    assert (rc, err.strip()) == (130, "msis: interrupted"), err
    assert time.monotonic() - reached[0] < 5 and not (tmp_path / "o").exists()
    assert sys.unraisablehook is hook_before  # main() leaves the process as it found it


def test_precision_is_refused_for_gradcampp(files, tmp_path, capsys):
    one_error(run(capsys, "explain", files["flair"], tmp_path / "missing.nii.gz", "--mask", files["lesions"], "--method", "gradcampp",
                  "--precision", "bf16", "--out", tmp_path / "o"), "--precision")


@pytest.mark.parametrize("argv", [
    ["stats", "peaks", "--flair", "{f}", "--mprage", "{missing}", "--gt", "{f}", "--max-per-group", "0", "--out", "{o}"],
    ["reproduce", "--peak-max-per-group", "0", "--out", "{o}", "--model", "{missing}"],
])
def test_max_per_group_zero_is_refused(files, tmp_path, capsys, argv):
    fill = {"f": files["flair"], "missing": tmp_path / "missing", "o": tmp_path / "o"}
    one_error(run(capsys, *[a.format(**fill) for a in argv]), "max-per-group")
    assert not (tmp_path / "o").exists()


def test_saliency_work_without_end_is_refused(files, tiny_model_dir, tmp_path, capsys):
    one_error(run(capsys, "explain", files["flair"], files["mprage"], "--lesion", 1, "--out", tmp_path / "o", "--samples", "100000000",
                  "--model", tmp_path / "missing"), "--samples")
    # a mask over the whole volume: N x |Ω| backward passes; refused up front, naming the ways out
    whole = sitk.ReadImage(str(files["mprage"])) * 0 + 1
    sitk.WriteImage(sitk.Cast(whole, sitk.sitkUInt8), str(tmp_path / "whole.nii.gz"))
    t0 = time.time()
    res = subprocess_msis("explain", files["flair"], files["mprage"], "--mask", tmp_path / "whole.nii.gz", "--out", tmp_path / "o",
                          "--model", tiny_model_dir, "--device", "cpu", timeout=120)
    one_error((res.returncode, res.stdout, res.stderr), "backward passes", "--max-omega-voxels", "--samples")
    assert time.time() - t0 < 120 and not (tmp_path / "o").exists()
    # the same mask within the limit runs: the mean needs N passes, the max over a sample N x K
    rc, _, err = run(capsys, "explain", files["flair"], files["mprage"], "--mask", tmp_path / "whole.nii.gz", "--out", tmp_path / "o2",
                     "--model", tiny_model_dir, "--device", "cpu", "--samples", 1, "--aggregation", "mean")
    assert rc == 0, err


def test_gradcampp_figure_says_what_its_colour_bar_shows(tmp_path, monkeypatch):
    import matplotlib.figure

    from MSInstanceSaliencyLib.saliency.explain import Explanation, write_explanation
    from MSInstanceSaliencyLib.io.outputs import OutputFolder

    labels = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *a, **k):
        # figures are drawn into a hidden temporary `.NAME.msis-XXXXXXXX.png` beside NAME, then put in place
        name = re.sub(r"^\.(.+)\.msis-[0-9a-f]+\.png$", r"\1", Path(path).name)
        labels[name] = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    ref = sitk.Image(12, 12, 12, sitk.sitkFloat32)
    omega = np.zeros((12, 12, 12), bool)
    omega[5:7, 5:7, 5:7] = True
    cam = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    out = OutputFolder(tmp_path / "out")
    write_explanation(Explanation("gradcampp", {"gradcampp": cam}, omega, "mask", {"layer": "model.1"}), ref, ref, out)
    write_explanation(Explanation("smoothgrad", {"flair": cam - 0.5, "mprage": cam}, omega, "lesion1", {"n_samples": 2}), ref, ref, out)
    cam_label, = labels["saliency_mask_gradcampp.png"]
    sg_label, = labels["saliency_lesion1_smoothgrad.png"]
    assert "Grad-CAM++" in cam_label and "∂" not in cam_label
    assert "∂ logit / ∂ input" in sg_label


def test_the_cli_knows_the_phantoms_patients():
    from MSInstanceSaliencyLib import cli
    from MSInstanceSaliencyLib.research import phantom

    assert cli.N_PATIENTS == phantom.N_PATIENTS


def test_context_defaults_name_cases_that_have_lesions_of_the_default_sizes():
    """`msis context --out DIR` as docs/CLI.md gives it: patient 17 alone has no TP lesion of 90-120
    voxels for the demo model (exit 2, "no TP lesion"); patients 17-22 have 12 (the run takes minutes,
    so only its defaults are checked here; docs/reproduction runs the same cohort)."""
    from MSInstanceSaliencyLib.cli import _parse_patients, build_parser

    args = build_parser().parse_args(["context", "--out", "ctx"])
    assert _parse_patients(args.phantom_patients) == [17, 18, 19, 20, 21, 22] and args.size_range == [90, 120]
    # the other experiments keep their one-case default
    assert build_parser().parse_args(["stats", "peaks", "--out", "p"]).phantom_patients == "17"


# ----------------------------------------------------------------------------- the experiments' inputs, checked before segmenting

@pytest.fixture(scope="module")
def experiment_inputs(files, small_phantom, tmp_path_factory):
    """A white-matter map on the MPRAGE grid, and a ground truth and white-matter map on another grid (the 2 mm grid at 3 mm);
    FLAIR, MPRAGE and ground truth of a 40 mm slab (no whole head a white-matter map could be derived from)."""
    d = tmp_path_factory.mktemp("experiment_inputs")
    wm = d / "wm.nii.gz"
    sitk.WriteImage(small_phantom.white_matter, str(wm))
    out = {"wm": wm}
    for name in ("flair", "mprage", "lesions"):  # 40 mm of the head: a slab, not a whole head
        out[f"slab_{name}"] = d / f"slab_{name}.nii.gz"
        sitk.WriteImage(getattr(small_phantom, name)[:, :, 30:50], str(out[f"slab_{name}"]))
    for name, img in (("gt_3mm", small_phantom.lesions), ("wm_3mm", small_phantom.white_matter)):
        ref = sitk.Image([int(n * 2 / 3) for n in img.GetSize()], sitk.sitkFloat32)
        ref.SetSpacing((3.0, 3.0, 3.0))
        ref.SetOrigin(img.GetOrigin())
        ref.SetDirection(img.GetDirection())
        out[name] = d / f"{name}.nii.gz"
        sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0), str(out[name]))
    return out


@pytest.mark.parametrize("check", ["synthetic-lesion", "control-regions"])
@pytest.mark.parametrize("case, fragments", [
    ("no wm, no mprage", ["derives from an MPRAGE", "--wm"]),
    ("no wm, a slab mprage", ["covers only", "give --wm"]),
    ("wm elsewhere", ["white-matter map", "is not on the MPRAGE grid"]),
    ("gt elsewhere", ["ground truth", "is not on the MPRAGE grid"]),
    ("gt cut", ["ground truth", "is truncated or corrupt"]),
    ("no gt", ["--gt"]),
])
def test_sanity_checks_refuse_their_inputs_before_segmenting(files, experiment_inputs, tiny_model_dir, tmp_path, capsys, check, case,
                                                              fragments):
    """Files the sanity checks cannot use fail in seconds, before the model loads (a user waited 3 minutes to learn --wm was needed)."""
    wm, gt = experiment_inputs["wm"], files["lesions"]
    flair, mprage = files["flair"], files["mprage"]
    if case == "no wm, no mprage":
        wm = mprage = None
    elif case == "no wm, a slab mprage":
        wm, flair, mprage, gt = None, *(experiment_inputs[f"slab_{n}"] for n in ("flair", "mprage", "lesions"))
    elif case == "wm elsewhere":
        wm = experiment_inputs["wm_3mm"]
    elif case == "gt elsewhere":
        gt = experiment_inputs["gt_3mm"]
    elif case == "gt cut":
        gt = cut(Path(files["lesions"]), tmp_path / "gt.nii.gz", 0.7)
    argv = ["sanity", check, "--flair", flair, "--out", tmp_path / "o", "--model", tiny_model_dir, "--device", "cpu", "--samples", 1]
    argv += ["--mprage", mprage] if mprage else []
    argv += ["--gt", gt] if case != "no gt" else []
    argv += ["--wm", wm] if wm else []
    t0 = time.time()
    rc, out, err = res = run(capsys, *argv)
    one_error(res, *fragments)
    assert time.time() - t0 < 5 and "segmenting" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["context"], ["stats", "peaks"]])
def test_experiments_refuse_a_ground_truth_on_another_grid_and_a_missing_mprage(files, experiment_inputs, tiny_model_dir, tmp_path, capsys,
                                                                                command):
    common = ["--out", tmp_path / "o", "--model", tiny_model_dir, "--device", "cpu"]
    t0 = time.time()
    one_error(run(capsys, *command, "--flair", files["flair"], "--mprage", files["mprage"], "--gt", experiment_inputs["gt_3mm"], *common),
              "is not on the MPRAGE grid")
    # a FLAIR + MPRAGE model without --mprage: refused once the model is known, before it runs
    one_error(run(capsys, *command, "--flair", files["flair"], "--gt", files["lesions"], *common), "FLAIR + MPRAGE", "--mprage")
    assert time.time() - t0 < 10 and not (tmp_path / "o").exists()


def test_a_lesion_that_does_not_exist_fails_right_after_segmenting(files, experiment_inputs, tiny_model_dir, tmp_path, capsys):
    rc, out, err = res = run(capsys, "sanity", "control-regions", "--flair", files["flair"], "--mprage", files["mprage"], "--gt",
                             files["lesions"], "--wm", experiment_inputs["wm"], "--lesion", 999, "--out", tmp_path / "o", "--model",
                             tiny_model_dir, "--device", "cpu", "--samples", 1)
    one_error(res, "lesion 999 does not exist")
    assert "segmenting windows" in err and "SmoothGrad" not in err and not (tmp_path / "o").exists()
    one_error(run(capsys, "sanity", "synthetic-lesion", "--lesion", 0, "--out", tmp_path / "o"), "--lesion")
