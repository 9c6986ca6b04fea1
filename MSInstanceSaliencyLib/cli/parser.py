"""The argument parser of `msis`: every command's arguments and help texts, and the argparse types that
refuse a bad value in one line (`msis: error: ... (see msis <command> --help)`, exit 2). Nothing heavy is
imported here: `msis --help` starts light."""

from __future__ import annotations

import argparse
import math

from ..errors import InputError


N_PATIENTS = 22  # the shared patients' lesion masks of the phantoms (phantom.N_PATIENTS)
PHANTOM_VOXEL_SIZES = (0.5, 4.0)  # mm: what `phantom --voxel-size` and MSIS_PHANTOM_VOXEL_SIZE take
# every command that generates phantoms says this in its help
PHANTOM_VOXELS_HELP = "voxel size: the environment variable MSIS_PHANTOM_VOXEL_SIZE in mm, default 1, the model's training phantoms"
SCHEDULER_TIMEOUT = 10  # seconds: cohort.cluster.SCHEDULER_TIMEOUT, for --help (the cohort package is imported when used)


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
    from ..saliency.explain import MAX_BACKWARD_PASSES

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
    q.add_argument("--wm", type=_path, default=None, help="white-matter mask or probability map on the MPRAGE grid (phantoms bring their own); without it, derived from the MPRAGE by registering the MNI template (written to the results folder)")
    q.add_argument("--lesion", type=_COUNT, default=None, help=f"TP lesion id (default: {default_lesion} of at most --max-voxels)")
    q.add_argument("--max-voxels", type=_COUNT, default=300, help="size cap for the default lesion choice (SmoothGrad cost grows with it)")
    q.add_argument("--samples", type=_SAMPLES, default=50)
    q.add_argument("--noise-seed", type=_SEED, default=0)
    _add_max_omega_voxels(q)
    q.add_argument("--out", type=_path, required=True)
    _add_model_args(q)


def _add_max_omega_voxels(p):
    p.add_argument("--max-omega-voxels", type=_COUNT, default=None,
                   help="SmoothGrad max: the max over a seeded random sample of this many voxels of each region (bounded cost for "
                        "large lesions, but a different map when the region is much larger; default: all voxels)")


def _add_case_args(p):
    p.add_argument("--manifest", type=_path, default=None, metavar="CSV",
                   help="run over every case of a CSV manifest (columns case_id, flair, mprage, gt and optionally wm, as `msis cohort` "
                        "takes; docs/CLI.md) on dask.distributed, resumable, with the whole set's statistics; --out is then the run's folder")
    p.add_argument("--workers", type=_COUNT, default=None, help="with --manifest: local dask workers (default: one per CPU core, or per GPU)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="with --manifest: a running dask scheduler, tcp://HOST:PORT, "
                   "instead of a local cluster (as msis cohort)")
    p.add_argument("--flair", type=_path, default=None, help="FLAIR file (default: phantom cases)")
    p.add_argument("--mprage", type=_path, default=None)
    p.add_argument("--gt", type=_path, default=None, help="ground-truth lesion mask on the MPRAGE grid (needed with files: TP lesions are chosen from it)")
    p.add_argument("--phantom-patients", type=_patients, default="17", help=f"phantom cases (validation seeds) when no files are given, e.g. 17-19 ({PHANTOM_VOXELS_HELP})")


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

    p = sub.add_parser("demo", help="generate a phantom case, segment it, explain one lesion and write the outputs",
                       description=f"Generate a phantom case ({PHANTOM_VOXELS_HELP}), segment it, explain one lesion and write the outputs.")
    p.add_argument("--out", type=_path, default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--seed", type=_SEED, default=2024, help="phantom seed")
    p.add_argument("--patient", type=_int(1, N_PATIENTS), default=17, help="lesion geometry of shared patient 1..22 (default 17, a validation patient)")
    p.add_argument("--lesion", type=_COUNT, default=None, help="lesion to explain (default: the one closest to 100 mm^3)")
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
    p.add_argument("--phantom-patients", type=_patients, default=None, help=f"instead of files: phantom cases of these shared patients, e.g. 1-16 ({PHANTOM_VOXELS_HELP})")
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
    p.add_argument("--size-range", type=_COUNT, nargs=2, default=[90, 120], metavar=("MIN", "MAX"), help="TP lesions of this many voxels of the case's grid (default 90 120; 8x fewer at 2 mm)")
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
    q.add_argument("--tn-spheres", type=_COUNT, default=10, help="TN spheres per case (default 10, the paper's)")
    _add_max_omega_voxels(q)
    q.add_argument("--out", type=_path, required=True)
    _add_model_args(q)

    p = sub.add_parser("reproduce", help="run every experiment on a phantom cohort and write a Markdown report beside the paper's numbers",
                       description=f"Run every experiment on a phantom cohort ({PHANTOM_VOXELS_HELP}) and write a Markdown report "
                                   "beside the paper's numbers.")
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

    # --- msis cohort (the cohort package): a CSV manifest of cases on dask.distributed, results in Parquet
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

    p = sub.add_parser("validate-model", help="lesion-wise detection results on validation phantoms (patients 17-22)",
                       description=f"Lesion-wise detection results on validation phantoms ({PHANTOM_VOXELS_HELP}).")
    _add_model_args(p)
    p.add_argument("--patients", type=_patients, default="17-22", help="e.g. 17-22 or 17,19")
    p.add_argument("--per-patient", type=_COUNT, default=1, help="phantoms per patient (default 1)")
    p.add_argument("--json", type=_path, default=None, help="write per-case and total results here")
    p = sub.add_parser("view", help="the lesion workflow in a browser, on Slicer's core (segment, lesion table, pick, explain, overlay)",
                       description="Serve the interactive workflow to a browser (trame-slicer): segment, the lesion table, a click "
                                   "on a lesion, its saliency map over the FLAIR, its TP probability. With no files: a demo phantom "
                                   f"({PHANTOM_VOXELS_HELP}). On a GPU server: run it there and reach it with an SSH tunnel "
                                   "(ssh -L 8080:127.0.0.1:8080 server).")
    p.add_argument("flair", type=_path, nargs="?", default=None, help="FLAIR volume (NIfTI or NRRD); default: a demo phantom")
    p.add_argument("mprage", type=_path, nargs="?", default=None, help="MPRAGE / T1w volume (optional for FLAIR-only models)")
    p.add_argument("--model", type=_path, default=None,
                   help="model as `segment --model` takes it (docs/MODELS.md); default: the bundled demo model")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run the network (default auto: GPU if available)")
    p.add_argument("--data", type=_path, default=None, help="folder whose scans and models the page may open (nothing outside it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; any other "
                                                        "address requires the access token printed at start)")
    p.add_argument("--port", type=_int(0, 65535), default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--no-token", action="store_true", help="serve a non-loopback --host without an access token (anyone who "
                                                          "reaches the port can use the server and the files under --data)")
    p.add_argument("--patient", type=_int(1, N_PATIENTS), default=17, help="demo phantom's lesion geometry, patient 1..22 (default 17)")

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


def _class_weight(text: str) -> dict:
    try:
        fp, tp = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--class-weight wants two numbers FP,TP such as 0.29,0.71; got {text!r}") from None
    if not (math.isfinite(fp) and math.isfinite(tp) and fp > 0 and tp > 0):
        raise InputError(f"--class-weight: both weights must be finite and positive, got {text!r}")
    return {0: fp, 1: tp}
