"""A REAL nnU-Net v2 trained-model folder, made with nnunetv2's own code, plus nnunetv2's own predictions.

Test helper (not a test module): ``make_nnunet_model(root)`` writes a tiny 2-channel raw dataset
(Dataset501_MSISTest), runs nnU-Net's fingerprint extraction, default ExperimentPlanner and
DefaultPreprocessor (3d_fullres), trains the plain ``nnUNetTrainer`` for a few iterations on the CPU
for folds 0 and 1 (its own ``run_training`` loop, so it writes its own checkpoint_final.pth, plans.json,
dataset.json, ...), then runs ``nnUNetPredictor`` on held-out test images and returns the paths.

Needs nnunetv2 2.8.1 in the interpreter (see scripts/reference-constraints.txt):
    pip install -c scripts/reference-constraints.txt nnunetv2==2.8.1
    pip uninstall -y torchvision timm   # the PyPI torchvision is a CUDA build; nnunetv2 does not need it

Everything nnU-Net runs in ONE child process (``sys.executable``): nnunetv2 reads nnUNet_* environment
variables at import (nnunetv2.configuration: nnUNet_def_n_proc, nnUNet_n_proc_DA), so they are set in the
child's environment, and the calling process (pytest) keeps its own environment, torch threads and RNGs.

Conventions: ``shape`` and ``spacing`` are in SimpleITK (x, y, z) order, i.e. ``image.GetSize()`` and
``image.GetSpacing()``; the numpy arrays (sitk.GetArrayFromImage) are (z, y, x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 501
DATASET_NAME = "Dataset501_MSISTest"
CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
FOLDS = (0, 1)
CHANNEL_NAMES = {"0": "FLAIR", "1": "T1"}
LABELS = {"background": 0, "lesion": 1}
FILE_ENDING = ".nii.gz"

# Held-out test images (never in training), name -> (spacing x,y,z or None = training spacing, size x,y,z).
# With the default training shape/spacing (patch [28, 32, 32]):
# "resampled": spacing differs, so nnU-Net resamples there and back (no separate z); larger in-plane than the
#     training images, so after cropping it spans 1 x 2 x 2 sliding-window tiles (z, y, x).
# "native": exactly the training spacing (no resampling); longer in z: 2 tiles along z.
# "aniso": z spacing > 3x in-plane, so nnU-Net's resampling takes its separate-z path (in-plane order 3 / 1,
#     along z order 0); smaller than the patch, so it is padded.
TEST_CASES = {
    "test_resampled": ((1.1, 0.9, 1.5), (52, 60, 28)),
    "test_native": (None, (40, 42, 44)),
    "test_aniso": ((0.95, 1.05, 3.8), (42, 40, 12)),
}

# predictor runs: name -> settings (all tile_step_size=0.5, use_gaussian=True, checkpoint_final.pth, device cpu)
# and the test cases each predicts. Mirroring with 2 folds runs the network 16 times per tile (8 flips x 2 folds),
# so that run takes the cases of 2 tiles (blended) and 1 padded tile, not the 4-tile "resampled" one: mirroring and
# the fold ensemble act per tile, after resampling, which the no-mirror run checks on every case.
PREDICTOR_RUNS = {
    "pred_mirror_f01": {"use_mirroring": True, "folds": [0, 1], "cases": ["test_native", "test_aniso"]},
    "pred_nomirror_f0": {"use_mirroring": False, "folds": [0], "cases": list(TEST_CASES)},
}


# ----------------------------------------------------------------------------------------------------------
# synthetic images (plain numpy + SimpleITK; no nnunetv2 needed)
# ----------------------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, shape_zyx, sigma_vox) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape_zyx), sigma_vox, mode="reflect")
    return n / (n.std() + 1e-12)


def _make_case(rng: np.random.Generator, size_xyz, spacing_xyz, *, hole: bool):
    """(flair, t1, label) as (z, y, x) arrays: a brain-like ellipsoid of smooth blobs, zero outside (so
    crop-to-nonzero crops and use_mask_for_norm is planned), bright FLAIR / dark T1 spherical lesions."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    nx, ny, nz = (int(n) for n in size_xyz)
    shape = (nz, ny, nx)
    z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    ext = np.array([nx * sx, ny * sy, nz * sz])
    centre = ext * (0.5 + rng.uniform(-0.06, 0.06, 3))
    semi = ext * rng.uniform(0.33, 0.38, 3)
    r2 = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    brain = r2 <= 1.0

    sig = (3.0 / sz, 3.0 / sy, 3.0 / sx)  # ~3 mm blobs
    flair = 100.0 + 18.0 * _smooth_noise(rng, shape, sig) + 3.0 * rng.standard_normal(shape)
    t1 = 220.0 + 25.0 * _smooth_noise(rng, shape, sig) + 3.0 * rng.standard_normal(shape)

    label = np.zeros(shape, np.uint8)
    n_lesions = int(rng.integers(2, 5))
    for _ in range(n_lesions):
        for _try in range(50):  # a centre well inside the brain
            c = centre + semi * rng.uniform(-0.55, 0.55, 3)
            if (((c - centre) / semi) ** 2).sum() < 0.45:
                break
        rad = rng.uniform(2.5, 4.5)  # mm
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        les = (d <= rad) & brain
        w = np.clip(1.2 - d / rad, 0.0, 1.0)  # soft edge
        flair += 90.0 * w * brain
        t1 -= 70.0 * w * brain
        label[les] = 1

    flair = np.where(brain, np.maximum(flair, 1.0), 0.0).astype(np.float32)
    t1 = np.where(brain, np.maximum(t1, 1.0), 0.0).astype(np.float32)
    if hole:  # a small zero cavity inside the brain, in both channels: nnU-Net's binary_fill_holes keeps it
        hc = centre + semi * np.array([0.25, -0.2, 0.1])
        cav = ((x - hc[0]) ** 2 + (y - hc[1]) ** 2 + (z - hc[2]) ** 2) <= (1.6 * max(sx, sy, sz)) ** 2
        cav &= label == 0
        flair[cav] = 0.0
        t1[cav] = 0.0
    return flair, t1, label


def _write(arr_zyx: np.ndarray, path: Path, spacing_xyz, origin_xyz) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    sitk.WriteImage(img, str(path), True)


def _write_dataset(root: Path, seed: int, shape, spacing, n_train: int) -> dict:
    raw = root / "nnUNet_raw" / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    tests_dir = root / "test_images"
    tests_dir.mkdir(parents=True, exist_ok=True)
    origin = (-21.5, 13.25, -7.75)

    for i in range(n_train):
        rng = np.random.default_rng([seed, 0, i])
        flair, t1, lab = _make_case(rng, shape, spacing, hole=(i % 2 == 0))
        cid = f"msis_{i:03d}"
        _write(flair, raw / "imagesTr" / f"{cid}_0000{FILE_ENDING}", spacing, origin)
        _write(t1, raw / "imagesTr" / f"{cid}_0001{FILE_ENDING}", spacing, origin)
        _write(lab, raw / "labelsTr" / f"{cid}{FILE_ENDING}", spacing, origin)

    tests = {}
    for j, (name, (sp, sz)) in enumerate(TEST_CASES.items()):
        sp = tuple(spacing) if sp is None else sp
        rng = np.random.default_rng([seed, 1, j])
        flair, t1, lab = _make_case(rng, sz, sp, hole=True)
        o = (origin[0] + 3.0 * j, origin[1] - 1.5, origin[2] + 0.5 * j)
        files = [tests_dir / f"{name}_0000{FILE_ENDING}", tests_dir / f"{name}_0001{FILE_ENDING}"]
        _write(flair, files[0], sp, o)
        _write(t1, files[1], sp, o)
        _write(lab, tests_dir / f"{name}_label{FILE_ENDING}", sp, o)
        tests[name] = {"channels": [str(f) for f in files], "label": str(tests_dir / f"{name}_label{FILE_ENDING}"),
                       "spacing": list(sp), "size": list(sz)}
    return {"raw_folder": str(raw), "tests": tests}


# ----------------------------------------------------------------------------------------------------------
# the nnU-Net part: runs in the child process
# ----------------------------------------------------------------------------------------------------------

def _pools_in_threads() -> None:
    """nnU-Net's fingerprint extraction and preprocessing hand each case to a "spawn" process pool, even of one
    process: each pool is a fresh interpreter importing torch and nnunetv2 again (tens of seconds on a busy
    CPU). Here their pools are thread pools in this process: the same per-case functions (the fingerprint's
    sampling is seeded per case), without the start-up."""
    import multiprocessing
    import multiprocessing.pool
    import types

    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    threads = types.SimpleNamespace(get_context=lambda method=None: types.SimpleNamespace(Pool=multiprocessing.pool.ThreadPool))
    for module in (fingerprint_extractor, default_preprocessor):
        assert module.multiprocessing is multiprocessing, module  # nnU-Net still reaches its pool this way
        module.multiprocessing = threads


def _fingerprint_extractor_of_fewer_samples():
    """nnU-Net's fingerprint extractor, through the class argument extract_fingerprint_dataset takes, drawing 10^6
    foreground voxels for its intensity statistics instead of 10^8 (25 million per training case here: half a
    minute of the fixture). Those statistics serve CT normalisation only; these channels are z-scored per image."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class FewerIntensitySamples(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 10e5

    return FewerIntensitySamples


def _child_main(args: dict) -> None:
    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args

    root = Path(args["root"])
    seed = int(args["seed"])
    iterations = int(args["iterations"])
    n_train = int(args["n_train"])
    tests = args["tests"]
    timings = {}

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    _pools_in_threads()

    t = time.perf_counter()
    generate_dataset_json(args["raw_folder"], CHANNEL_NAMES, LABELS, n_train, FILE_ENDING,
                          dataset_name=DATASET_NAME, description="MSInstanceSaliency test fixture (synthetic)")
    # nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -np 1 (default ExperimentPlanner)
    extract_fingerprint_dataset(DATASET_ID, _fingerprint_extractor_of_fewer_samples(), num_processes=1, check_dataset_integrity=True,
                                clean=True, verbose=False, show_progress_bar=False)
    # the planner calls torch.set_num_threads(get_allowed_n_proc_DA()), which fails for nnUNet_n_proc_DA=0, so
    # that variable is 1 while planning and 0 (no augmentation workers) from training on; nnU-Net reads it per call
    os.environ["nnUNet_n_proc_DA"] = "1"
    _, plans_identifier = plan_experiment_dataset(DATASET_ID)
    os.environ["nnUNet_n_proc_DA"] = "0"
    assert plans_identifier == PLANS, plans_identifier
    preprocess_dataset(DATASET_ID, PLANS, (CONFIGURATION,), (1,), verbose=False, show_progress_bar=False)
    timings["plan_and_preprocess_s"] = time.perf_counter() - t

    # nnU-Net's default split is a 5-fold KFold, which needs >= 5 cases; its documented way to override it is a
    # splits_final.json in the preprocessed folder: here 2 folds (val = every other case).
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    keys = sorted(f"msis_{i:03d}" for i in range(n_train))
    splits = [{"train": [k for k in keys if k not in keys[f::2]], "val": keys[f::2]} for f in FOLDS]
    save_json(splits, str(pre / "splits_final.json"))

    # nnUNetv2_train 501 3d_fullres FOLD -tr nnUNetTrainer -device cpu, shortened: the plain nnUNetTrainer class
    # (so trainer_name in the checkpoint is 'nnUNetTrainer'), 1 epoch of `iterations` train steps + 1 val step,
    # its own run_training loop (on_train_start ... on_train_end -> checkpoint_final.pth). nnU-Net's final full
    # validation (perform_actual_validation) is skipped.
    t = time.perf_counter()
    for fold in FOLDS:
        tf = time.perf_counter()
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, fold, TRAINER, PLANS,
                                        continue_training=False, device=torch.device("cpu"))
        trainer.num_iterations_per_epoch = iterations
        trainer.num_val_iterations_per_epoch = 1
        trainer.num_epochs = 1
        trainer.run_training()
        timings[f"train_fold{fold}_s"] = time.perf_counter() - tf
    timings["train_s"] = time.perf_counter() - t
    model_folder = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIGURATION}"

    # nnUNetv2_predict -device cpu -step_size 0.5 --save_probabilities (-f 0 1 | -f 0 --disable_tta)
    # predict_from_files_sequential: the same preprocessing / sliding window / export functions as
    # predict_from_files, without its worker processes.
    outputs = {}
    for run_name, cfg in PREDICTOR_RUNS.items():
        cases = cfg["cases"]
        t = time.perf_counter()
        out_dir = root / "predictions" / run_name
        out_dir.mkdir(parents=True, exist_ok=True)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=cfg["use_mirroring"],
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(cfg["folds"]),
                                                       checkpoint_name="checkpoint_final.pth")
        predictor.predict_from_files_sequential([tests[n]["channels"] for n in cases], [str(out_dir / n) for n in cases],
                                                save_probabilities=True, overwrite=True)
        timings[f"{run_name}_s"] = time.perf_counter() - t
        outputs[run_name] = {
            "folder": str(out_dir), "folds": cfg["folds"], "use_mirroring": cfg["use_mirroring"],
            "tile_step_size": 0.5, "use_gaussian": True, "checkpoint_name": "checkpoint_final.pth",
            "cases": {n: {"seg": str(out_dir / f"{n}{FILE_ENDING}"), "probabilities": str(out_dir / f"{n}.npz"),
                          "properties": str(out_dir / f"{n}.pkl")} for n in cases},
        }
    Path(args["result_json"]).write_text(json.dumps({"model_folder": str(model_folder), "predictions": outputs,
                                                     "timings": timings}))


# ----------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------

def make_nnunet_model(root: Path, *, seed=0, shape=(40, 44, 36), spacing=(1.0, 1.0, 1.2), n_train=4,
                      iterations=3) -> dict:
    """Make a real nnU-Net v2 model folder (2 folds) under ``root`` and nnU-Net's own predictions.

    ``shape`` / ``spacing``: the training images' SimpleITK size / spacing, (x, y, z).
    Returns a dict of str paths:
      model_folder: .../nnUNet_results/Dataset501_MSISTest/nnUNetTrainer__nnUNetPlans__3d_fullres
                    (dataset.json, plans.json, dataset_fingerprint.json, fold_0/, fold_1/ with checkpoint_final.pth)
      checkpoints: {fold: path of checkpoint_final.pth}
      raw_folder, preprocessed_folder, results_folder
      tests: {case: {channels: [FLAIR, T1 paths], label, spacing (x,y,z), size (x,y,z)}}
      predictions: {run: {folder, folds, use_mirroring, tile_step_size, use_gaussian, checkpoint_name,
                          cases: {case: {seg (.nii.gz), probabilities (.npz, key 'probabilities'),
                                         properties (.pkl)}}}}
      timings: seconds per step, incl. total_s
      log: path of the child's stdout/stderr
    """
    t_total = time.perf_counter()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = _write_dataset(root, int(seed), tuple(shape), tuple(spacing), int(n_train))
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.update({k: str(v) for k, v in dirs.items()})
    env.update({
        "nnUNet_n_proc_DA": "0",  # SingleThreadedAugmenter: no background augmentation workers
        "nnUNet_def_n_proc": "1",  # default_num_processes (torch threads in prediction/export, pools)
        "nnUNet_compile": "false",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "BLOSC_NTHREADS": "1", "NUMEXPR_MAX_THREADS": "1",
        "MPLBACKEND": "Agg", "PYTHONHASHSEED": str(seed),
    })
    result_json = root / "nnunet_reference_result.json"
    args = {"root": str(root), "seed": int(seed), "iterations": int(iterations), "n_train": int(n_train),
            "raw_folder": data["raw_folder"], "tests": data["tests"], "result_json": str(result_json)}
    log = root / "nnunet_reference.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(args)],
                              env=env, cwd=str(root), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"nnU-Net reference run failed (exit {proc.returncode}); log {log}:\n{tail}")
    res = json.loads(result_json.read_text())
    model_folder = Path(res["model_folder"])
    timings = dict(res["timings"])
    timings["total_s"] = time.perf_counter() - t_total
    return {
        "model_folder": str(model_folder),
        "checkpoints": {f: str(model_folder / f"fold_{f}" / "checkpoint_final.pth") for f in FOLDS},
        "raw_folder": data["raw_folder"],
        "preprocessed_folder": str(dirs["nnUNet_preprocessed"] / DATASET_NAME),
        "results_folder": str(dirs["nnUNet_results"]),
        "tests": data["tests"],
        "predictions": res["predictions"],
        "timings": timings,
        "log": str(log),
    }


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--_child":
        _child_main(json.loads(sys.argv[2]))
    else:
        out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="nnunet_ref_"))
        result = make_nnunet_model(out)
        print(json.dumps(result, indent=1))
        print("timings (s):", {k: round(v, 2) for k, v in result["timings"].items()})
