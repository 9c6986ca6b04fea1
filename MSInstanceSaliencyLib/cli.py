"""Command line: `msis <command>` or `python -m MSInstanceSaliencyLib <command>`.

Bad input ends with one line `msis: error: ...` and exit code 2; nothing the user gave is modified.
Set MSIS_DEBUG=1 to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .errors import Cancelled, InputError, swallowed_interrupts_redelivered

N_PATIENTS = 22  # the shared patients' lesion masks of the phantoms (phantom.N_PATIENTS)
PHANTOM_VOXEL_SIZES = (0.5, 4.0)  # mm: what `phantom --voxel-size` and MSIS_PHANTOM_VOXEL_SIZE take
SCHEDULER_TIMEOUT = 10  # seconds: cohort.SCHEDULER_TIMEOUT, for --help (cohort.py is imported when used)


def OutputFolder(*args, **kwargs):  # noqa: N802 - the class, imported when used so that `msis` starts light
    from .io.outputs import OutputFolder as _OutputFolder

    return _OutputFolder(*args, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `msis: error: <message> (see msis <command> --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"msis: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def _real(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """argparse type: a finite number in [lo, hi] (ends excluded where *_open); NaN and Inf are refused."""
    if lo is not None and hi is not None:
        bounds = f"between {lo:g} and {hi:g}" + (" (both excluded)" if lo_open and hi_open else " (excluded)" if lo_open or hi_open else "")
    elif lo is not None:
        bounds = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        bounds = ""

    def number(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text!r}")
        return v

    return number


def _int(lo=None, hi=None):
    """argparse type: an integer in [lo, hi]."""
    bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else ""

    def integer(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer{' ' + bounds if bounds else ''}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return v

    return integer


def _path(text):
    """argparse type: a file or folder name; an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a file or folder name")
    return text


def _patients(text):
    """argparse type: phantom patients as 17-22, 17,19 or 1-4,9; every range ascending, each patient 1..22."""
    try:
        _parse_patients(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _class_weight_arg(text):
    try:
        _class_weight(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--class-weight: ", "").replace("--class-weight ", "")) from None
    return text


def _folds(text: str):
    try:
        folds = [int(f) if f.strip() != "all" else "all" for f in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds are numbers such as 0,1,2 (or all), got {text!r}") from None
    if any(f != "all" and f < 0 for f in folds) or len(set(folds)) != len(folds):
        raise argparse.ArgumentTypeError(f"folds are distinct numbers >= 0, got {text!r}")
    return folds


def _SAMPLES(text):  # noqa: N802 - an argparse type like the others; explain.py imported when used so that `msis` starts light
    from .saliency.explain import MAX_BACKWARD_PASSES

    return _int(1, MAX_BACKWARD_PASSES)(text)


_SEED = _int(0)
_COUNT = _int(1)


def _add_model_args(p):
    p.add_argument("--model", type=_path, default=None,
                   help="model: a model.json folder (MONAI network), an nnU-Net v2 trained-model folder or LST-AI 2.x checkpoints "
                        "(docs/MODELS.md); default: the bundled demo model")
    p.add_argument("--folds", type=_folds, default=None, help="nnU-Net: folds to average, e.g. 0,1,2 (default: every fold present)")
    p.add_argument("--no-mirroring", action="store_true", help="nnU-Net: no test-time mirroring (nnU-Net's default is on)")
    p.add_argument("--model-channels", default=None,
                   help="what the model's input channels are, in order, e.g. flair,mprage (default: from the model: model.json's "
                        "input_channels, nnU-Net's dataset.json channel names, LST-AI's FLAIR,T1)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run the network (default auto: GPU if available)")


def _add_segment_args(p):
    _add_model_args(p)
    p.add_argument("--threshold", type=_real(0, 1, lo_open=True, hi_open=True), default=None, help="probability threshold (default: the model's, 0.3)")
    p.add_argument("--min-volume", type=_real(0), default=None, help="minimum lesion volume in mm^3; smaller or equal components are dropped (default: the model's, 5)")


def _add_saliency_args(p):
    p.add_argument("--samples", type=_SAMPLES, default=50, help="SmoothGrad noisy copies N (default 50)")
    p.add_argument("--sigma", type=_real(0), default=0.05, help="noise: fraction of the FLAIR input range (default 0.05), or absolute with --sigma-mode absolute")
    p.add_argument("--sigma-mode", default="range", choices=["range", "absolute"])
    p.add_argument("--aggregation", default="max", choices=["max", "mean"], help="max: Eq. 3 (signed maximum), mean: Eq. 2")
    p.add_argument("--context", default="patch", choices=["patch", "full"], help="network input: the model's roi around the lesion, or the whole volume")
    p.add_argument("--noise-seed", type=_SEED, default=0, help="SmoothGrad noise seed (same seed, same map)")
    p.add_argument("--max-omega-voxels", type=_COUNT, default=None,
                   help="SmoothGrad max: the max over a seeded random sample of this many lesion voxels (bounded cost for large "
                        "lesions, but a different map when the lesion is much larger; default: all voxels)")
    p.add_argument("--layer", default=None, help="Grad-CAM++ layer (default: the model's)")
    p.add_argument("--alpha", default="paper", choices=["paper", "monai", "layercam"], help="Grad-CAM++ weights")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision of the network (SmoothGrad only)")


def _add_one_lesion_check_args(q, default_lesion: str):
    """Arguments of the sanity checks that work on one TP lesion of one case."""
    _add_case_args(q)
    q.add_argument("--wm", type=_path, default=None, help="white-matter mask or probability map on the MPRAGE grid (phantoms bring their own)")
    q.add_argument("--lesion", type=_COUNT, default=None, help=f"TP lesion id (default: {default_lesion} of at most --max-voxels)")
    q.add_argument("--max-voxels", type=_COUNT, default=300, help="size cap for the default lesion choice (SmoothGrad cost grows with it)")
    q.add_argument("--samples", type=_SAMPLES, default=50)
    q.add_argument("--noise-seed", type=_SEED, default=0)
    q.add_argument("--out", type=_path, required=True)
    _add_model_args(q)


def _add_case_args(p):
    p.add_argument("--flair", type=_path, default=None, help="FLAIR file (default: phantom cases)")
    p.add_argument("--mprage", type=_path, default=None)
    p.add_argument("--gt", type=_path, default=None, help="ground-truth lesion mask on the MPRAGE grid (needed with files: TP lesions are chosen from it)")
    p.add_argument("--phantom-patients", type=_patients, default="17", help="phantom cases (validation seeds) when no files are given, e.g. 17-19")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="msis", description="Instance-level saliency for MS lesion segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment lesions in a FLAIR + MPRAGE pair")
    p.add_argument("flair", type=_path, help="FLAIR volume (NIfTI or NRRD)")
    p.add_argument("mprage", type=_path, nargs="?", default=None,
                   help="MPRAGE / T1w volume (NIfTI or NRRD); outputs are written on its grid (FLAIR-only models: optional; "
                        "without it outputs are on the FLAIR's grid)")
    p.add_argument("--out", type=_path, required=True, help="output folder")
    _add_segment_args(p)
    p.add_argument("--register", action="store_true", help="rigidly register FLAIR to MPRAGE first (Mattes MI)")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction of both images")
    p.add_argument("--tp-probability", action="store_true", help="score every lesion with the TP/FP classifier (one SmoothGrad map per lesion)")
    p.add_argument("--classifier", type=_path, default=None, help="classifier JSON (default: the one in the model's folder; the bundled demo model has one)")
    p.add_argument("--prune-below", type=_real(0, 1), default=None, help="also write labels and table without lesions whose TP probability is below P")

    p = sub.add_parser("explain", help="saliency map of one lesion (or any voxel set) of a case")
    p.add_argument("flair", type=_path)
    p.add_argument("mprage", type=_path, nargs="?", default=None, help="MPRAGE / T1w (optional for FLAIR-only models)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--lesion", type=_COUNT, help="lesion id as in the segment command's lesions.csv")
    target.add_argument("--mask", type=_path, help="a mask file whose non-zero voxels are Ω (e.g. a lesion the model missed)")
    p.add_argument("--labels", type=_path, default=None, help="lesion_labels.nii.gz from `msis segment` (default: segment again)")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--method", default="smoothgrad", choices=["smoothgrad", "gradcampp"])
    _add_saliency_args(p)
    _add_segment_args(p)

    p = sub.add_parser("demo", help="generate a phantom case, segment it, explain one lesion and write the outputs")
    p.add_argument("--out", type=_path, default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--seed", type=_SEED, default=2024, help="phantom seed")
    p.add_argument("--patient", type=_int(1, N_PATIENTS), default=17, help="lesion geometry of shared patient 1..22 (default 17, a validation patient)")
    p.add_argument("--lesion", type=_COUNT, default=None, help="lesion to explain (default: the one closest to 100 voxels)")
    p.add_argument("--no-tp-probability", action="store_true", help="skip scoring every lesion with the TP/FP classifier")
    p.add_argument("--classifier", type=_path, default=None, help="classifier JSON (default: the one in the model's folder; the bundled demo model has one)")
    _add_saliency_args(p)
    _add_segment_args(p)

    p = sub.add_parser("phantom", help="write a phantom case (flair, mprage, lesions, mimics, head layers) as NIfTI")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--patient", type=_int(1, N_PATIENTS), default=None, help="lesion geometry of shared patient 1..22 (default: from the seed)")
    p.add_argument("--lesion-mask", type=_path, default=None, help="place exactly the lesions of this MNI-space mask instead")
    p.add_argument("--voxel-size", type=_real(*PHANTOM_VOXEL_SIZES), default=None,
                   help="isotropic voxel size in mm, 0.5 to 4 (default: the environment variable MSIS_PHANTOM_VOXEL_SIZE if set, "
                        "else 1, the template's)")
    p.add_argument("--skull-stripped", action="store_true", help="the earlier kind: a brain without the head, narrower contrast ranges")

    p = sub.add_parser("evaluate", help="lesion-wise TP/FP/FN, F1, PPV, TPR, Dice, nDSC of a prediction")
    p.add_argument("pred", type=_path, help="predicted instance labels (whole numbers >= 1 of any size, integer or float "
                   "type) or a binary mask (one non-zero value; labelled with 18-connectivity)")
    p.add_argument("gt", type=_path, help="ground-truth lesion mask on the same grid (every non-zero voxel is lesion)")
    p.add_argument("--json", type=_path, default=None, help="also write the metrics to this JSON file")

    p = sub.add_parser("features", help="the 93 saliency radiomic features of every lesion of a case (or of phantom cases)")
    p.add_argument("flair", nargs="?", type=_path)
    p.add_argument("mprage", nargs="?", type=_path)
    p.add_argument("--gt", type=_path, default=None, help="ground-truth lesion mask: labels lesions TP/FP and adds the missed ones as FN rows")
    p.add_argument("--case", default=None, help="case name in the table (default: the FLAIR file name)")
    p.add_argument("--phantom-patients", type=_patients, default=None, help="instead of files: phantom cases of these shared patients, e.g. 1-16")
    p.add_argument("--phantom-seed-base", type=_SEED, default=20_000, help="phantom seed = base + 100 * patient")
    p.add_argument("--max-tp", type=_int(0), default=None, help="phantoms: features of at most this many TPs per case (all FPs always)")
    p.add_argument("--out", type=_path, required=True, help="CSV to write (phantom tables are appended case by case and resume)")
    p.add_argument("--samples", type=_SAMPLES, default=None, help="SmoothGrad N (default 10, as the bundled classifier)")
    p.add_argument("--sigma", type=_real(0), default=None)
    p.add_argument("--sigma-mode", default=None, choices=["range", "absolute"])
    p.add_argument("--context", default=None, choices=["patch", "full"])
    p.add_argument("--max-omega-voxels", type=_int(0), default=None,
                   help="max over at most this many voxels of each lesion (default 256, as the bundled classifier; 0 = all)")
    _add_segment_args(p)

    p = sub.add_parser("train-classifier", help="train the TP/FP logistic regression on a feature table")
    p.add_argument("features", nargs="+", type=_path, help="CSV(s) from `msis features` with a ground truth, made with the same settings")
    p.add_argument("--out", type=_path, required=True, help="classifier JSON to write")
    p.add_argument("--class-weight", type=_class_weight_arg, default=None, metavar="FP,TP",
                   help="class weights of the logistic regression (default 0.29,0.71, the paper's)")

    p = sub.add_parser("evaluate-classifier", help="TP, FP, FN, F1 and PPV before/after the classifier, bootstrap CIs, feature importance")
    p.add_argument("classifier", type=_path)
    p.add_argument("features", nargs="+", type=_path, help="test feature table(s) (with ground truth)")
    p.add_argument("--out", type=_path, required=True, help="folder for the JSON report and the importance plot")
    p.add_argument("--threshold", type=_real(0, 1), default=0.5, help="lesions with P(TP) below this are removed")
    p.add_argument("--n-boot", type=_int(1, 100_000), default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=_SEED, default=0)

    p = sub.add_parser("context", help="contextual-information experiment: lesion score as context is restored ring by ring")
    _add_case_args(p)
    # patient 17 alone has no TP lesion of 90-120 voxels with the demo model; 17-22 have 12
    p.set_defaults(phantom_patients="17-22")
    p.add_argument("--size-range", type=_COUNT, nargs=2, default=[90, 120], metavar=("MIN", "MAX"), help="TP lesions of this many voxels (default 90 120)")
    p.add_argument("--steps", type=_COUNT, default=34, help="dilation iterations (default 34)")
    p.add_argument("--out", type=_path, required=True)
    _add_model_args(p)

    p = sub.add_parser("sanity", help="sanity checks of the saliency maps")
    sanity = p.add_subparsers(dest="sanity_command", required=True)
    _add_one_lesion_check_args(sanity.add_parser(
        "control-regions", help="maps of a healthy white-matter sphere and of one voxel at a TP lesion's centre, against the lesion's"),
        default_lesion="the largest TP")
    _add_one_lesion_check_args(sanity.add_parser(
        "synthetic-lesion", help="copy a TP lesion into white matter, into the background, and into the background with 3 mm of its surroundings"),
        default_lesion="the largest clearly visible TP")

    p = sub.add_parser("stats", help="statistics over cases")
    stats = p.add_subparsers(dest="stats_command", required=True)
    q = stats.add_parser("peaks", help="SmoothGrad peaks of TP, FP, FN lesions and TN spheres; Mann-Whitney U; FLAIR vs MPRAGE contribution")
    _add_case_args(q)
    q.add_argument("--samples", type=_SAMPLES, default=50)
    q.add_argument("--noise-seed", type=_SEED, default=0)
    q.add_argument("--max-per-group", type=_COUNT, default=None, help="at most this many lesions per group and case (seeded choice; default: all)")
    q.add_argument("--tn-volume", type=_real(0, lo_open=True), default=None, help="TN sphere volume in mm^3 (default: the mean GT lesion volume of the cases)")
    q.add_argument("--out", type=_path, required=True)
    _add_model_args(q)

    p = sub.add_parser("reproduce", help="run every experiment on a phantom cohort and write a Markdown report beside the paper's numbers")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--samples", type=_SAMPLES, default=20, help="SmoothGrad N for the sanity checks (peaks use --peak-samples)")
    p.add_argument("--peak-samples", type=_SAMPLES, default=10)
    p.add_argument("--peak-patients", type=_patients, default="17-18")
    p.add_argument("--peak-max-per-group", type=_COUNT, default=8)
    p.add_argument("--context-patients", type=_patients, default="17-22")
    _add_model_args(p)

    p = sub.add_parser("train", help="train a segmentation model on phantoms")
    p.add_argument("--out", type=_path, required=True, help="model folder to write")
    p.add_argument("--config", default="demo", choices=["demo", "paper"])
    p.add_argument("--iterations", type=_COUNT, default=None)
    p.add_argument("--batch", type=_COUNT, default=None)
    p.add_argument("--patch", type=_int(16), default=None)
    p.add_argument("--phantoms-per-patient", type=_COUNT, default=2)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--cache", type=_path, default=".cache/phantoms", help="folder caching prepared training phantoms")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])

    # --- msis cohort (cohort.py): a CSV manifest of cases on dask.distributed, results in Parquet
    p = sub.add_parser("cohort", help="segment and explain every case of a CSV manifest on dask.distributed; results in Parquet, resumable")
    p.add_argument("manifest", type=_path, help="CSV with columns case_id, flair, mprage and optionally gt (paths relative to the CSV)")
    p.add_argument("--out", type=_path, required=True, help="results folder: lesions.parquet, cases.parquet, summary.csv (a re-run resumes it)")
    _add_segment_args(p)
    p.add_argument("--workers", type=_COUNT, default=None, help="local dask workers (default: one per CPU core, or per GPU)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running dask scheduler, tcp://HOST:PORT (dask-jobqueue, dask-cuda; docs/COHORTS.md) instead of a "
                        "local cluster; the scheduler's port (8786 by default), not its dashboard's (8787). Refused, before any "
                        f"work, when no dask scheduler answers there within {SCHEDULER_TIMEOUT} s")
    p.add_argument("--no-tp-probability", action="store_true", help="skip the TP probability of each lesion")
    p.add_argument("--classifier", type=_path, default=None, help="classifier JSON (default: the one in the model's folder)")
    p.add_argument("--features", action="store_true", help="add the 93 saliency radiomic features of each lesion to its row")
    p.add_argument("--maps", action="store_true", help="write each lesion's SmoothGrad maps as NIfTI under OUT/maps/<case_id>/")
    p.add_argument("--samples", type=_SAMPLES, default=None, help="SmoothGrad N (default: the classifier's, 10)")
    p.add_argument("--max-omega-voxels", type=_int(0), default=None, help="max over at most this many voxels of each lesion "
                   "(default: the classifier's, 256; 0 = all)")
    p.add_argument("--noise-seed", type=_SEED, default=None, help="SmoothGrad noise seed (default: the classifier's, 0)")
    p.add_argument("--split-above", type=_int(0), default=1000, metavar="VOXELS",
                   help="split a lesion whose max runs over more Ω voxels than this into parts of about this many, computed by "
                        "separate tasks and combined exactly (default 1000; 0 = never split)")
    p.add_argument("--dashboard", action="store_true", help="serve the Dask dashboard (local cluster: on this machine only, "
                   "127.0.0.1:8787 or a free port) and print its link; without it no dask page is served")
    # --- end msis cohort

    p = sub.add_parser("validate-model", help="lesion-wise detection results on validation phantoms (patients 17-22)")
    _add_model_args(p)
    p.add_argument("--patients", type=_patients, default="17-22", help="e.g. 17-22 or 17,19")
    p.add_argument("--per-patient", type=_COUNT, default=1, help="phantoms per patient (default 1)")
    p.add_argument("--json", type=_path, default=None, help="write per-case and total results here")
    return parser


def _parse_patients(text: str) -> list[int]:
    """'17-22', '17,19' or '1-4,9' -> patient numbers; InputError for anything else (names, empty or
    descending ranges, patients outside 1..22)."""
    out = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            first, last = (int(a), int(b)) if sep else (int(part), int(part))
            if first > last:
                raise InputError(f"the range {part.strip()} is empty (descending); write it as {last}-{first}")
            out.extend(range(first, last + 1))
    except ValueError:
        raise InputError(f"patients must be numbers and ranges such as 17-22 or 17,19, got {text!r}") from None
    bad = [n for n in out if not 1 <= n <= N_PATIENTS]
    if bad:
        raise InputError(f"patients are numbered 1..{N_PATIENTS} (the shared lesion masks), got {bad[0]}")
    if len(set(out)) != len(out):
        raise InputError(f"a patient is listed twice in {text!r}")
    return out


def _load(args):
    from .models.loading import load_model
    from .models.device import resolve_device
    from .models.device import env_threads

    env_threads()
    dev = resolve_device(args.device)
    return load_model(args.model, device=dev, channels=getattr(args, "model_channels", None), folds=getattr(args, "folds", None),
                      mirroring=not getattr(args, "no_mirroring", False)), dev


def cmd_segment(args) -> int:
    from .segmentation.instances import format_table
    from .segmentation.pipeline import run_info, segment, write_segmentation
    from .progress import ProgressBar
    from .io.volumes import read_image

    flair = read_image(args.flair, "FLAIR")
    mprage = read_image(args.mprage, "MPRAGE") if args.mprage else None
    _check_register_size([("FLAIR", flair)] + ([("MPRAGE", mprage)] if mprage else []), args)
    from .segmentation.pipeline import SEGMENTATION_FILES

    pruned = ("lesion_labels_pruned.nii.gz", "lesions_pruned.csv") if args.prune_below is not None else ()
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage) if p], names=SEGMENTATION_FILES + pruned)
    model, dev = _load(args)
    clf = _classifier_for(model, args) if args.tp_probability or args.prune_below is not None else None
    result = segment(flair, mprage, model, device=dev, threshold=args.threshold, min_volume_mm3=args.min_volume,
                     register=args.register, n4=args.n4, progress=ProgressBar(label="segmenting windows"))
    for warning in result.prepared.warnings:
        _warn(warning)
    extra = {}
    if args.tp_probability or args.prune_below is not None:
        extra = _score_lesions(model, dev, result, args, out, clf)
    paths = write_segmentation(result, out)
    paths.update(extra.pop("paths", {}))
    out.close(**run_info(model, result, command="segment", flair=str(Path(args.flair).resolve()),
                         mprage=str(Path(args.mprage).resolve()) if args.mprage else None, **extra))
    print(format_table(result.table))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _classifier_for(model, args):
    """The TP/FP classifier of the model (or --classifier), refused when it was trained for another model."""
    from .classifier.scoring import load_classifier

    return load_classifier(args.classifier, model=model)


def _score_lesions(model, dev, result, args, out, clf=None) -> dict:
    """Fill tp_probability for every lesion; with --prune-below also write the pruned labels and table."""
    import numpy as np

    from .segmentation.instances import write_table
    from .progress import ProgressBar
    from .classifier.scoring import tp_probabilities
    from .io.volumes import image_from_array, write_image

    if args.prune_below is not None and not 0.0 <= args.prune_below <= 1.0:
        raise InputError("--prune-below must be a probability between 0 and 1")
    clf = clf or _classifier_for(model, args)
    ids = [r["lesion_id"] for r in result.table]
    warn = lambda lid, msg: _warn(f"{msg} (no TP probability for lesion {lid})")  # noqa: E731
    probs = tp_probabilities(model, result.prepared, result.labels, ids, clf, device=dev, on_error=warn,
                             progress=ProgressBar(label=f"TP probability of {len(ids)} lesions (SmoothGrad N={clf.saliency.get('n_samples')}), backward passes"))
    for r in result.table:
        p = probs.get(r["lesion_id"])
        r["tp_probability"] = None if p is None else round(p, 4)
    info = {"classifier": str(args.classifier or "bundled"), "classifier_saliency": clf.saliency}
    if args.prune_below is not None:
        keep = [r for r in result.table if r["tp_probability"] is None or r["tp_probability"] >= args.prune_below]
        keep_ids = np.array([0] + [r["lesion_id"] for r in keep])
        pruned = np.where(np.isin(result.labels, keep_ids), result.labels, 0)
        with out.writing():
            info["paths"] = {
                "pruned_labels": out.final(write_image(image_from_array(pruned.astype(np.uint16), reference=result.reference),
                                                       out.file("lesion_labels_pruned.nii.gz"))),
                "pruned_table": out.final(write_table(keep, out.file("lesions_pruned.csv"))),
            }
        info["pruned"] = {"threshold": args.prune_below, "kept": len(keep), "removed": len(result.table) - len(keep)}
    return info


def cmd_demo(args) -> int:
    from .segmentation.instances import format_table
    from .research.phantom import make_phantom
    from .segmentation.pipeline import run_info, segment, write_segmentation
    from .progress import ProgressBar
    from .io.volumes import write_image

    from .segmentation.pipeline import SEGMENTATION_FILES

    t0 = time.time()
    out = OutputFolder(args.out, names=[f"phantom_{n}.nii.gz" for n in ("flair", "mprage", "lesions")] + list(SEGMENTATION_FILES))
    print(f"[1/5] generating phantom (seed {args.seed}, lesions of patient {args.patient}) ...", file=sys.stderr)
    ph = make_phantom(args.seed, patient=args.patient)
    with out.writing():
        for name in ("flair", "mprage", "lesions"):
            write_image(getattr(ph, name), out.file(f"phantom_{name}.nii.gz"))
    print("[2/5] loading the model ...", file=sys.stderr)
    model, dev = _load(args)
    print(f"[3/5] segmenting on {dev} ...", file=sys.stderr)
    result = segment(ph.flair, ph.mprage, model, device=dev, threshold=args.threshold, min_volume_mm3=args.min_volume,
                     progress=ProgressBar(label="segmenting windows"))
    scoring = {}
    if result.table and not args.no_tp_probability:
        print("[4/5] TP probability of every lesion (saliency radiomics + logistic regression) ...", file=sys.stderr)
        args.prune_below = None
        scoring = _score_lesions(model, dev, result, args, out)
    paths = write_segmentation(result, out)
    from .segmentation.evaluation import evaluate_case
    from .io.volumes import mask_from_image

    metrics = evaluate_case(result.labels, mask_from_image(ph.lesions))
    print(format_table(result.table))
    saliency_paths = {}
    if result.table:
        lesion = args.lesion or min(result.table, key=lambda r: abs(r["voxels"] - 100))["lesion_id"]
        print(f"[5/5] SmoothGrad ({args.aggregation}, N={args.samples}) of lesion {lesion} on {dev} ...", file=sys.stderr)
        args.method = "smoothgrad"
        from .saliency.explain import omega_from_lesion

        t1 = time.time()
        _, saliency_paths = _explain_and_write(model, dev, result.prepared, omega_from_lesion(result.labels, lesion), f"lesion{lesion}", args, out)
        print(f"saliency of lesion {lesion} in {time.time() - t1:.0f} s")
    out.close(**run_info(model, result, command="demo", seed=args.seed, patient=args.patient, metrics=metrics,
                         total_s=round(time.time() - t0, 1), **scoring))
    print(f"against the phantom's ground truth: TP {metrics['tp']}  FP {metrics['fp']}  FN {metrics['fn']}  "
          f"F1 {metrics['f1']:.3f}  PPV {metrics['ppv']:.3f}  Dice {metrics['dice']:.3f}")
    if scoring:
        _print_tp_probability_by_kind(result, ph)
    for k, v in {**paths, **{f"saliency_{k}": v for k, v in saliency_paths.items()}}.items():
        print(f"{k}: {v}")
    print(f"inputs: {out.path / 'phantom_flair.nii.gz'}, {out.path / 'phantom_mprage.nii.gz'} (ground truth: phantom_lesions.nii.gz)")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def _print_tp_probability_by_kind(result, phantom) -> None:
    """The classifier's view beside the truth: which lesions are FPs, and the P(TP) of each kind."""
    import numpy as np

    from .segmentation.evaluation import classify_lesions
    from .io.volumes import mask_from_image

    c = classify_lesions(result.labels, mask_from_image(phantom.lesions))
    prob = {r["lesion_id"]: r["tp_probability"] for r in result.table}
    for kind in ("tp", "fp"):
        vals = [prob[i] for i in c[kind] if prob.get(i) is not None]
        if vals:
            print(f"TP probability of the {len(vals)} {kind.upper()} lesions: median {np.median(vals):.3f}, range {min(vals):.3f}-{max(vals):.3f}"
                  + (f" (ids {', '.join(str(i) for i in sorted(c[kind]))})" if kind == "fp" else ""))


def _explain_and_write(model, dev, prepared, omega, label, args, out):
    _check_explain_args(args, omega)
    from .saliency.explain import explain_case, write_explanation
    from .progress import ProgressBar

    exp = explain_case(model, prepared, omega, args.method, label=label, n_samples=args.samples, sigma=args.sigma,
                  sigma_mode=args.sigma_mode, aggregation=args.aggregation, context=args.context, seed=args.noise_seed, layer=args.layer,
                  alpha=args.alpha, device=dev, precision=args.precision, max_omega_voxels=args.max_omega_voxels,
                  progress=ProgressBar(label=f"{args.method} {label}"))
    with out.writing():
        paths = write_explanation(exp, prepared.reference, prepared.flair_on_reference, out)
    return exp, {k: out.final(v) for k, v in paths.items()}


def cmd_explain(args) -> int:
    import numpy as np

    from .saliency.explain import omega_from_lesion, omega_from_mask
    from .segmentation.pipeline import segment
    from .io.volumes import array_from_image, read_image, same_grid

    flair = read_image(args.flair, "FLAIR")
    mprage = read_image(args.mprage, "MPRAGE") if args.mprage else None
    protected = [p for p in (args.flair, args.mprage, args.mask, args.labels) if p]
    label = "mask" if args.mask else f"lesion{args.lesion}"
    maps = ["gradcampp"] if args.method == "gradcampp" else ["smoothgrad_flair", "smoothgrad_mprage"]
    out = OutputFolder(args.out, protected=protected, names=[f"saliency_{label}_{m}.nii.gz" for m in maps] + [f"saliency_{label}_{args.method}.png"])
    model, dev = _load(args)
    if args.mask:
        prepared = model.prepare(flair, mprage)
        omega, label = omega_from_mask(read_image(args.mask, "mask"), prepared.reference), "mask"
    else:
        if args.labels:
            prepared = model.prepare(flair, mprage)
            lab_img = read_image(args.labels, "lesion labels")
            if not same_grid(lab_img, prepared.reference):
                raise InputError("--labels is not on the MPRAGE grid; use the lesion_labels.nii.gz that `msis segment` wrote for these inputs")
            labels = array_from_image(lab_img, np.int32)
        else:
            result = segment(flair, mprage, model, device=dev, threshold=args.threshold, min_volume_mm3=args.min_volume)
            prepared, labels = result.prepared, result.labels
        omega, label = omega_from_lesion(labels, args.lesion), f"lesion{args.lesion}"
    for warning in prepared.warnings:
        _warn(warning)
    exp, paths = _explain_and_write(model, dev, prepared, omega, label, args, out)
    out.close(command="explain", method=args.method, label=label, omega_voxels=int(omega.sum()), params=exp.params, model=str(model.path))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_phantom(args) -> int:
    from .research.phantom import make_phantom

    voxel_size = _phantom_voxel_size() if args.voxel_size is None else args.voxel_size
    names = ("flair", "mprage", "lesions", "mimics") + (() if args.skull_stripped else ("head",))
    out = OutputFolder(args.out, protected=[args.lesion_mask] if args.lesion_mask else [], names=[f"{n}.nii.gz" for n in names])
    ph = make_phantom(args.seed, args.lesion_mask, patient=args.patient, voxel_size=voxel_size, skull_stripped=args.skull_stripped)
    from .io.volumes import write_image

    with out.writing():
        for name in names:
            write_image(getattr(ph, name), out.file(f"{name}.nii.gz"))
    out.close(command="phantom", seed=args.seed, patient=ph.patient, **ph.info)
    for name in names:
        print(out.path / f"{name}.nii.gz")
    return 0


def cmd_evaluate(args) -> int:
    from .segmentation.evaluation import evaluate_case, prediction_labels
    from .io.volumes import array_from_image, mask_from_image, read_image, same_grid

    from .io.outputs import check_output_file, write_json_output

    if args.json:
        check_output_file(args.json, "--json")
    pred_img = read_image(args.pred, "prediction")
    gt_img = read_image(args.gt, "ground truth")
    if not same_grid(pred_img, gt_img):
        raise InputError("prediction and ground truth are not on the same grid (size, spacing, origin, direction); resample one onto the other first")
    pred = array_from_image(pred_img, None)  # as stored: a cast would turn 0.5 or 256 into 0
    pred = prediction_labels(pred, pred_img.GetSpacing(), f"prediction {args.pred}")
    m = evaluate_case(pred, mask_from_image(gt_img))  # every non-zero voxel is lesion
    print(f"TP {m['tp']}  FP {m['fp']}  FN {m['fn']}  (GT lesions {m['n_gt']}, detected {m['gt_detected']})")
    print(f"F1 {m['f1']:.4f}  PPV {m['ppv']:.4f}  TPR {m['tpr']:.4f}  Dice {m['dice']:.4f}  nDSC {m['ndsc']:.4f}")
    if args.json:
        write_json_output(args.json, m, "--json")
    return 0


def _phantom_voxel_size() -> float:
    """MSIS_PHANTOM_VOXEL_SIZE: the voxel size in mm of the phantoms of `phantom` (where --voxel-size
    overrides it) and of `features --phantom-patients` (default 1, the model's training phantoms; tests
    use 2 for small, fast cases). Recorded in the phantom's and the feature table's sidecars."""
    text = os.environ.get("MSIS_PHANTOM_VOXEL_SIZE", "").strip()
    if not text:
        return 1.0
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    lo, hi = PHANTOM_VOXEL_SIZES
    if not lo <= v <= hi:
        raise InputError(f"MSIS_PHANTOM_VOXEL_SIZE must be a voxel size in mm between {lo:g} and {hi:g}, got {text!r}")
    return v


def cmd_features(args) -> int:
    from .classifier.radiomics import default_feature_names
    from .classifier.scoring import case_feature_rows, model_identity, saliency_settings, write_feature_rows, write_table_manifest
    from .research.phantom_features import phantom_feature_table
    from .io.outputs import table_lock
    from .io.volumes import mask_from_image, read_image, same_grid

    settings = saliency_settings(n_samples=args.samples, sigma=args.sigma, sigma_mode=args.sigma_mode, context=args.context,
                                 max_omega_voxels=args.max_omega_voxels)
    voxel_size = _phantom_voxel_size() if args.phantom_patients else 1.0
    model, dev = _load(args)
    if args.phantom_patients:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        if voxel_size != 1.0:
            log(f"phantoms with {voxel_size:g} mm voxels (MSIS_PHANTOM_VOXEL_SIZE); the model's training phantoms have 1 mm")
        path = phantom_feature_table(model, _parse_patients(args.phantom_patients), args.out, settings, seed_base=args.phantom_seed_base,
                                     max_tp_per_case=args.max_tp, threshold=args.threshold, min_volume_mm3=args.min_volume,
                                     voxel_size=voxel_size, device=dev, log=log)
        print(f"features: {path}")
        return 0
    if not args.flair:
        raise InputError("give FLAIR and MPRAGE files (FLAIR-only models: the FLAIR), or --phantom-patients")
    from .segmentation.pipeline import segment
    from .progress import ProgressBar

    out_path = Path(args.out)
    if out_path.exists():
        raise InputError(f"{out_path} already exists; choose another --out")
    if Path(f"{out_path}.json").exists():  # the table's sidecar: never over a file the user put there
        raise InputError(f"{out_path}.json already exists; choose another --out or move it")
    flair, mprage = read_image(args.flair, "FLAIR"), read_image(args.mprage, "MPRAGE") if args.mprage else None
    result = segment(flair, mprage, model, device=dev, threshold=args.threshold, min_volume_mm3=args.min_volume)
    gt = None
    if args.gt:
        gt_img = read_image(args.gt, "ground truth")
        if not same_grid(gt_img, result.reference):
            raise InputError("--gt is not on the MPRAGE grid")
        gt = mask_from_image(gt_img)  # every non-zero voxel is lesion (labels of 256 or 0.5 too)
    case = args.case or Path(args.flair).name.split(".")[0]
    rows = case_feature_rows(model, result.prepared, result.labels, case, settings, gt, device=dev, progress=ProgressBar(label="lesion features, backward passes"))
    with table_lock(out_path):  # refuses a second writer; the sidecar first, then the table, each atomically
        if out_path.exists():
            raise InputError(f"{out_path} already exists (written meanwhile by another msis process?); choose another --out")
        write_table_manifest(out_path, settings, **model_identity(model), case=case,
                             threshold=float(model.spec.threshold if args.threshold is None else args.threshold),
                             min_volume_mm3=float(model.spec.min_lesion_mm3 if args.min_volume is None else args.min_volume))
        write_feature_rows(rows, out_path, default_feature_names())
    bad = [r for r in rows if r.get("error")]
    for r in bad:
        print(f"msis: warning: {r['error']}", file=sys.stderr)
    print(f"{len(rows) - len(bad)} lesions with features -> {out_path}")
    return 0


def cmd_train_classifier(args) -> int:
    from .classifier.radiomics import TPClassifier, default_feature_names
    from .classifier.scoring import labelled_matrix, read_feature_tables, tables_model

    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out} already exists; choose another --out")
    names = default_feature_names()
    rows, settings = read_feature_tables(args.features)
    _check_feature_cells(rows, names)
    X, y, usable = labelled_matrix(rows, names)
    clf = TPClassifier(saliency=settings, trained_for=tables_model(args.features))
    if args.class_weight is not None:
        clf.class_weight = _class_weight(args.class_weight)
    clf.fit(X, y, names)
    clf.training_info = {"features": [Path(f).name for f in args.features], "n_tp": int(y.sum()), "n_fp": int((y == 0).sum()),
                         "cases": sorted({r["case"] for r in usable})}
    from .io.outputs import write_output_file

    write_output_file(out, "--out", clf.save, replace_own=False)
    nz = int((clf.coef_ != 0).sum())
    print(f"trained on {int(y.sum())} TP and {int((y == 0).sum())} FP lesions; {nz} of {len(names)} coefficients non-zero -> {out}")
    return 0


def _class_weight(text: str) -> dict:
    try:
        fp, tp = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--class-weight wants two numbers FP,TP such as 0.29,0.71; got {text!r}") from None
    if not (math.isfinite(fp) and math.isfinite(tp) and fp > 0 and tp > 0):
        raise InputError(f"--class-weight: both weights must be finite and positive, got {text!r}")
    return {0: fp, 1: tp}


def cmd_evaluate_classifier(args) -> int:
    from .classifier.radiomics import TPClassifier, importance_figure, probability_figure, threshold_figure
    from .classifier.scoring import evaluate_classifier, read_feature_tables

    clf = TPClassifier.load(args.classifier)
    rows, settings = read_feature_tables(args.features)
    clf.check_settings(**settings)
    out = OutputFolder(args.out, protected=[args.classifier, *args.features],
                       names=["classifier_evaluation.json", "feature_importance.png", "tp_probability.png", "threshold_sweep.png",
                              "test_probabilities.csv"])
    rep = evaluate_classifier(clf, rows, threshold=args.threshold, n_boot=args.n_boot, seed=args.seed)
    if rep["n_unscored"]:
        print(f"msis: warning: {rep['n_unscored']} predicted lesions have no features and are kept as they are", file=sys.stderr)
    per_lesion = rep.pop("lesions")
    rep.update({"classifier": str(args.classifier), "features": [str(f) for f in args.features]})
    with out.writing():
        (out.file("classifier_evaluation.json")).write_text(json.dumps(rep, indent=2) + "\n")
        importance_figure(clf, out.file("feature_importance.png"))
        probability_figure([r["tp_probability"] for r in per_lesion], [r["kind"] == "TP" for r in per_lesion],
                           [float(r["voxels"]) for r in per_lesion], args.threshold, out.file("tp_probability.png"))
        threshold_figure(rep["threshold_sweep"], args.threshold, out.file("threshold_sweep.png"))
        if per_lesion:
            _write_rows(out.file("test_probabilities.csv"), per_lesion)
    out.close(command="evaluate-classifier")
    cb, ca = rep["counts_before"], rep["counts_after"]
    print(f"U-Net alone:      TP {cb['tp']}  FP {cb['fp']}  FN {cb['fn']}")
    print(f"with classifier:  TP {ca['tp']}  FP {ca['fp']}  FN {ca['fn']}   (P(TP) >= {args.threshold})")
    for k in ("f1_before", "f1_after", "f1_change", "ppv_before", "ppv_after", "ppv_change"):
        v = rep[k]
        print(f"{k:<11} {v['point']:.4f}  bootstrap mean {v['mean']:.4f}  95% CI [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]")
    auc, size = rep["roc_auc"], rep["roc_auc_size_only"]
    if auc["point"] is not None:
        print(f"ROC AUC (TP vs FP) {auc['point']:.4f}  95% CI [{auc['ci95'][0]:.4f}, {auc['ci95'][1]:.4f}]; "
              f"lesion size alone {size['point']:.4f} [{size['ci95'][0]:.4f}, {size['ci95'][1]:.4f}]")
    print(f"report: {out.path / 'classifier_evaluation.json'}; plots: feature_importance.png, tp_probability.png, threshold_sweep.png")
    return 0


def _cases(args, model, dev):
    """Experiment cases: the given files (with --gt, and --wm where used) or phantom cases."""
    from .research.experiments import file_case, phantom_cases

    if args.flair or args.mprage:
        if not (args.flair and args.mprage and args.gt):
            raise InputError("with files, give --flair, --mprage and --gt (the experiments choose TP lesions from the ground truth)")
        yield file_case(model, args.flair, args.mprage, args.gt, getattr(args, "wm", None), device=dev)
        return
    yield from phantom_cases(model, _parse_patients(args.phantom_patients), device=dev)


def _write_rows(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _warn(message):
    print(f"msis: warning: {message}", file=sys.stderr)


def _bars(label):
    from .progress import ProgressBar

    return ProgressBar(label=label)


def cmd_context(args) -> int:
    from .research.experiments import context_figure, run_context

    model, dev = _load(args)
    out = OutputFolder(args.out, names=["context_raw.csv", "context_summary.json", "context.png"])
    rows, summary = run_context(model, _cases(args, model, dev), tuple(args.size_range), n_steps=args.steps, device=dev,
                                progress=_bars, warn=_warn)
    with out.writing():
        _write_rows(out.file("context_raw.csv"), rows)
        out.file("context_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        context_figure(summary, out.file("context.png"))
    out.close(command="context", size_range=list(args.size_range), steps=args.steps)
    print(f"{summary['n_lesions']} lesions; all detected from {summary['all_detected_from_mm']} mm; plateau at {summary['plateau_mm']} mm "
          f"(paper, U-Net on real scans: all detected from 7 mm, plateau 12-15 mm)")
    print(f"outputs in {out.path}: context_raw.csv, context_summary.json, context.png")
    return 0


def cmd_sanity(args) -> int:
    if args.sanity_command == "control-regions":
        return _sanity_control_regions(args)
    if args.sanity_command == "synthetic-lesion":
        return _sanity_synthetic_lesion(args)
    raise InputError(f"unknown sanity check {args.sanity_command}")


def _sanity_control_regions(args) -> int:
    from .research.experiments import control_regions_figure, run_control_regions

    model, dev = _load(args)
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt, args.wm) if p],
                       names=["control_regions.csv", "control_regions_summary.json", "control_regions.png"])
    case = next(_cases(args, model, dev))
    rows, summary, regions, maps = run_control_regions(model, case, lesion_id=args.lesion, max_voxels=args.max_voxels, n_samples=args.samples,
                                                       seed=args.noise_seed, device=dev, progress=_bars)
    with out.writing():
        _write_rows(out.file("control_regions.csv"), rows)
        out.file("control_regions_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        control_regions_figure(case.result.prepared.flair_on_reference, case.result.reference, regions, maps, out.file("control_regions.png"))
    out.close(command="sanity control-regions")
    print(json.dumps(summary, indent=2))
    return 0


def _sanity_synthetic_lesion(args) -> int:
    from .research.experiments import run_synthetic_lesion, synthetic_lesion_figure

    model, dev = _load(args)
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt, args.wm) if p],
                       names=["synthetic_lesion.csv", "synthetic_lesion_summary.json", "synthetic_lesion.png"])
    case = next(_cases(args, model, dev))
    rows, summary, panels = run_synthetic_lesion(model, case, lesion_id=args.lesion, max_voxels=args.max_voxels, n_samples=args.samples,
                                                 seed=args.noise_seed, device=dev, progress=_bars)
    with out.writing():
        _write_rows(out.file("synthetic_lesion.csv"), rows)
        out.file("synthetic_lesion_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        synthetic_lesion_figure(panels, out.file("synthetic_lesion.png"))
    out.close(command="sanity synthetic-lesion")
    for r in rows:
        print(f"{r['variant']:<24} segmented {str(r['detected']):<5}  mean p {r['mean_probability']:.3f}  max p {r['max_probability']:.3f}  "
              f"FLAIR map peaks {r['map_max']:.3g} / {r['map_min']:.3g}")
    print("paper's expectations: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["paper_expectation_met"].items()))
    return 0


def cmd_stats(args) -> int:
    from .research.experiments import peaks_figures, run_peaks

    model, dev = _load(args)
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt) if p],
                       names=["peaks.csv", "peaks_summary.json", "peaks_violin.png", "modality_contribution.png"])
    rows, summary = run_peaks(model, list(_cases(args, model, dev)), n_samples=args.samples, seed=args.noise_seed,
                              max_per_group=args.max_per_group, tn_volume_mm3=args.tn_volume, device=dev, progress=_bars, warn=_warn)
    with out.writing():
        _write_rows(out.file("peaks.csv"), rows)
        out.file("peaks_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        peaks_figures(rows, out.file("peaks_violin.png"), out.file("modality_contribution.png"))
    out.close(command="stats peaks")
    for g in ("TN", "FN", "FP", "TP"):
        m = summary["medians_positive_peak"][g]
        if m["n"]:
            print(f"{g}: n={m['n']:<4} median positive peak {m['median']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  (paper {summary['paper_medians_positive_peak'][g]})")
    for pair, r in summary["mannwhitney_positive_peak"].items():
        print(f"  {pair}: U={r['U']:.1f} p={r['p']:.3g}")
    return 0


def cmd_reproduce(args) -> int:
    from .research.report import write_reproduction_report

    out = OutputFolder(args.out, names=["REPORT.md"])
    common = ["--device", args.device] + (["--model", args.model] if args.model else [])
    runs = {
        "context": ["context", "--phantom-patients", args.context_patients],
        "control_regions": ["sanity", "control-regions", "--phantom-patients", "17", "--samples", str(args.samples)],
        "synthetic_lesion": ["sanity", "synthetic-lesion", "--phantom-patients", "17", "--samples", str(args.samples)],
        "peaks": ["stats", "peaks", "--phantom-patients", args.peak_patients, "--samples", str(args.peak_samples),
                  "--max-per-group", str(args.peak_max_per_group)],
    }
    status, t0 = {}, time.time()
    for name, argv in runs.items():
        print(f"== {name}: msis {' '.join(argv)}", file=sys.stderr)
        t = time.time()
        status[name] = {"exit_code": main(argv + ["--out", str(out.path / name)] + common), "seconds": round(time.time() - t, 1),
                        "command": "msis " + " ".join(argv + ["--out", f"{name}"])}
    with out.writing():
        report = out.final(write_reproduction_report(out.path, status, out.file("REPORT.md")))
    out.close(command="reproduce", runs=status, total_s=round(time.time() - t0, 1))
    print(f"report: {report}")
    return 0 if all(v["exit_code"] == 0 for v in status.values()) else 1


def cmd_train(args) -> int:
    from .research.training import train

    from .models.base import SPEC_FILE, ModelSpec

    names = [SPEC_FILE, ModelSpec().weights, "training_log.json"]
    out = OutputFolder(args.out, names=names)
    staged = [out.file(n) for n in names]
    with out.writing():  # checkpoints and the log go to the staging folder, into place when training ends
        train(staged[0].parent, args.config, iterations=args.iterations, batch=args.batch, patch=args.patch,
              phantoms_per_patient=args.phantoms_per_patient, seed=args.seed, cache_dir=args.cache, device=args.device)
    out.close(command="train", config=args.config, seed=args.seed)
    print(f"model written to {out.path}")
    return 0


def cmd_validate_model(args) -> int:
    from .io.outputs import check_output_file, write_json_output
    from .research.validation import format_validation, validate_model

    if args.json:
        check_output_file(args.json, "--json")
    model, dev = _load(args)
    res = validate_model(model, _parse_patients(args.patients), per_patient=args.per_patient, device=dev)
    print(format_validation(res))
    if args.json:
        write_json_output(args.json, res, "--json")
    return 0


# --- msis cohort (cohort.py)
def cmd_cohort(args) -> int:
    from .cohort import CohortConfig, check_mprage, check_scheduler, need_cohort_packages, read_manifest, row_settings, run_cohort
    from .models.loading import load_model
    from .classifier.scoring import classifier_settings, model_identity, saliency_settings

    need_cohort_packages()
    if args.scheduler:  # a wrong address is refused in seconds, before anything is read, loaded or written
        args.scheduler = check_scheduler(args.scheduler)
    cases = read_manifest(args.manifest)  # every problem of the manifest, before anything is loaded or started
    model = load_model(args.model, device="cpu", channels=args.model_channels, folds=args.folds, mirroring=not args.no_mirroring)
    check_mprage(cases, model.spec.input_channels, args.manifest)
    tp = not args.no_tp_probability
    asked = {k: v for k, v in (("n_samples", args.samples), ("max_omega_voxels", args.max_omega_voxels), ("seed", args.noise_seed))
             if v is not None}
    if asked.get("max_omega_voxels") == 0:
        asked["max_omega_voxels"] = None
    clf_path, clf_sha = None, None
    if tp:
        from .cohort import file_sha256

        clf = _classifier_for(model, args)
        clf_path = str(Path(args.classifier or model.default_classifier()).resolve())
        clf_sha = file_sha256(clf_path)
        try:
            clf.check_settings(**asked)
        except InputError as exc:
            raise InputError(f"{exc} (the TP probability needs the classifier's maps; or add --no-tp-probability)") from None
        saliency = classifier_settings(clf)
    else:  # the defaults where not given; --max-omega-voxels 0 is all of Ω
        saliency = saliency_settings(n_samples=args.samples, seed=args.noise_seed, max_omega_voxels=args.max_omega_voxels)
    gt = any(c.gt is not None for c in cases)
    needs_map = tp or args.features or args.maps  # with a ground truth, the map's peaks come along
    cfg = CohortConfig(
        out=str(Path(args.out).resolve()),
        model={"path": str(Path(args.model).resolve()) if args.model else None, "device": args.device, "channels": args.model_channels,
               "folds": args.folds, "mirroring": not args.no_mirroring},
        channels=list(model.spec.input_channels),
        threshold=float(model.spec.threshold if args.threshold is None else args.threshold),
        min_volume_mm3=float(model.spec.min_lesion_mm3 if args.min_volume is None else args.min_volume),
        saliency=saliency if needs_map else None, tp_probability=tp, classifier=clf_path, features=args.features, maps=args.maps,
        gt=gt, peaks=gt and needs_map, split_above=args.split_above or None)
    cfg.settings = row_settings(cfg, model_identity(model), clf_sha)
    del model  # the workers load their own
    bar = {}

    def progress(label, done, total):
        from .progress import ProgressBar

        b = bar.setdefault("bar", ProgressBar(label=label))
        b.label = label
        b(done, total)

    t0 = time.time()
    stats = run_cohort(args.manifest, args.out, cfg, cases, workers=args.workers, scheduler=args.scheduler, dashboard=args.dashboard,
                       progress=progress)
    out = Path(args.out)
    print(f"{stats['cases']} cases ({stats['skipped_cases']} finished earlier); {stats['cases_written']} case rows and "
          f"{stats['lesions_written']} lesion rows written in {time.time() - t0:.0f} s")
    print(f"lesions: {out / 'lesions.parquet'}\ncases: {out / 'cases.parquet'}\nsummary: {stats['summary']}")
    if stats["lost"]:
        print(f"msis: {len(stats['lost'])} tasks failed for reasons of the machine (a worker died, memory, disk) and were not "
              "recorded; run the same command again to do them", file=sys.stderr)
        return 1
    return 0
# --- end msis cohort


COMMANDS = {
    "segment": cmd_segment, "explain": cmd_explain, "demo": cmd_demo, "phantom": cmd_phantom, "evaluate": cmd_evaluate,
    "train": cmd_train, "validate-model": cmd_validate_model, "features": cmd_features,
    "train-classifier": cmd_train_classifier, "evaluate-classifier": cmd_evaluate_classifier,
    "context": cmd_context, "sanity": cmd_sanity, "stats": cmd_stats, "reproduce": cmd_reproduce,
    "cohort": cmd_cohort,
}


def _check_args(args) -> None:
    """What argparse cannot check alone, before any work starts (InputError, one line)."""
    if args.command in ("explain", "demo"):
        _check_explain_args(args)
    if args.command == "cohort" and args.scheduler and args.workers:
        raise InputError("--workers sizes the local cluster; with --scheduler the cluster you started decides (drop --workers)")
    if args.command == "context" and args.size_range[0] > args.size_range[1]:
        raise InputError(f"--size-range MIN MAX: MIN ({args.size_range[0]}) is larger than MAX ({args.size_range[1]})")
    if args.command == "segment" and (args.tp_probability or args.prune_below is not None) or (
            args.command == "demo" and not args.no_tp_probability and args.classifier):
        try:
            from .classifier.scoring import load_classifier

            load_classifier(args.classifier)  # a broken classifier is refused now, not after the segmentation
        except ImportError as exc:
            raise InputError(f"the TP probability needs {exc.name or 'pyradiomics'}, which is not installed here "
                             "(in 3D Slicer it comes with the SlicerRadiomics extension); run without --tp-probability (demo: with "
                             "--no-tp-probability)") from None


def _check_register_size(images, args) -> None:
    """Registration (shrink factors 4, 2, 1 and 5% sampling) and N4 (on a 4x shrunk copy) fail inside
    ITK on images this small; refuse them with the reason instead."""
    flags = [f for f, on in (("--register", getattr(args, "register", False)), ("--n4", getattr(args, "n4", False))) if on]
    if not flags:
        return
    for what, img in images:
        if min(img.GetSize()[:3]) < MIN_SIZE_REGISTER_N4:
            raise InputError(f"{' and '.join(flags)} need at least {MIN_SIZE_REGISTER_N4} voxels along each axis; {what} has size "
                             f"{tuple(img.GetSize())}. Run without {' and '.join(flags)} or on the full volumes")


_EXPLAIN_FLAGS = {"n_samples": "--samples", "seed": "--noise-seed", "lesion_id": "--lesion", **{
    a: "--" + a.replace("_", "-") for a in ("method", "sigma", "sigma_mode", "aggregation", "context", "precision", "max_omega_voxels")}}


def _check_explain_args(args, omega=None) -> None:
    """The explain arguments through the checks every entry point shares (explain.check_explain_args);
    with Ω also SmoothGrad's cost, refused above MAX_BACKWARD_PASSES before it starts."""
    from .saliency.explain import check_explain_args

    check_explain_args(getattr(args, "method", "smoothgrad"), n_samples=args.samples, sigma=args.sigma, sigma_mode=args.sigma_mode,
                       aggregation=args.aggregation, context=args.context, seed=args.noise_seed, precision=args.precision,
                       max_omega_voxels=args.max_omega_voxels, omega=omega, names=_EXPLAIN_FLAGS)


def _check_feature_cells(rows, names) -> None:
    """Every feature of every TP/FP row with features is a finite number (a clear error, not a crash in NumPy)."""
    from .classifier.radiomics import feature_value

    for r in rows:
        if r.get("kind") in ("TP", "FP") and not r.get("error"):
            for n in names:
                feature_value(r, n)


MIN_SIZE_REGISTER_N4 = 16


def main(argv=None) -> int:
    with swallowed_interrupts_redelivered():
        return _main(argv)


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"msis: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    except Cancelled:
        print("msis: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("msis: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless debugging
        if os.environ.get("MSIS_DEBUG"):
            raise
        print(f"msis: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set MSIS_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
