"""The everyday commands: segment, explain, demo and evaluate."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import InputError
from .checks import _check_explain_args, _check_register_size
from .common import OutputFolder, _classifier_for, _load, _phantom_voxel_size, _warn


def cmd_segment(args) -> int:
    from ..segmentation.instances import format_table
    from ..segmentation.pipeline import run_info, segment, write_segmentation
    from ..progress import ProgressBar
    from ..io.volumes import read_inputs

    flair, mprage = read_inputs(args.flair, args.mprage)
    _check_register_size([("FLAIR", flair)] + ([("MPRAGE", mprage)] if mprage else []), args)
    from ..segmentation.pipeline import SEGMENTATION_FILES

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


def _score_lesions(model, dev, result, args, out, clf=None) -> dict:
    """Fill tp_probability for every lesion; with --prune-below also write the pruned labels and table."""
    import numpy as np

    from ..segmentation.instances import write_table
    from ..progress import ProgressBar
    from ..classifier.scoring import tp_probabilities
    from ..io.volumes import image_from_array, write_image

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
    from ..segmentation.instances import format_table
    from ..research.phantom import make_phantom
    from ..segmentation.pipeline import run_info, segment, write_segmentation
    from ..progress import ProgressBar
    from ..io.volumes import write_image

    from ..segmentation.pipeline import SEGMENTATION_FILES

    t0 = time.time()
    voxel_size = _phantom_voxel_size(note=True)
    out = OutputFolder(args.out, names=[f"phantom_{n}.nii.gz" for n in ("flair", "mprage", "lesions")] + list(SEGMENTATION_FILES))
    print(f"[1/5] generating phantom (seed {args.seed}, lesions of patient {args.patient}, {voxel_size:g} mm voxels) ...", file=sys.stderr)
    ph = make_phantom(args.seed, patient=args.patient, voxel_size=voxel_size)
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
    from ..segmentation.evaluation import evaluate_case
    from ..io.volumes import mask_from_image

    metrics = evaluate_case(result.labels, mask_from_image(ph.lesions))
    print(format_table(result.table))
    saliency_paths = {}
    if result.table:
        # a typical lesion: the one closest to 100 mm^3 (100 voxels at 1 mm), whatever the phantom's voxel size
        lesion = args.lesion or min(result.table, key=lambda r: abs(r["volume_mm3"] - 100))["lesion_id"]
        print(f"[5/5] SmoothGrad ({args.aggregation}, N={args.samples}) of lesion {lesion} on {dev} ...", file=sys.stderr)
        args.method = "smoothgrad"
        from ..saliency.explain import omega_from_lesion

        t1 = time.time()
        _, saliency_paths = _explain_and_write(model, dev, result.prepared, omega_from_lesion(result.labels, lesion), f"lesion{lesion}", args, out)
        print(f"saliency of lesion {lesion} in {time.time() - t1:.0f} s")
    out.close(**run_info(model, result, command="demo", seed=args.seed, patient=args.patient, phantom_voxel_size_mm=voxel_size, metrics=metrics,
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

    from ..segmentation.evaluation import classify_lesions
    from ..io.volumes import mask_from_image

    c = classify_lesions(result.labels, mask_from_image(phantom.lesions))
    prob = {r["lesion_id"]: r["tp_probability"] for r in result.table}
    for kind in ("tp", "fp"):
        vals = [prob[i] for i in c[kind] if prob.get(i) is not None]
        if vals:
            print(f"TP probability of the {len(vals)} {kind.upper()} lesions: median {np.median(vals):.3f}, range {min(vals):.3f}-{max(vals):.3f}"
                  + (f" (ids {', '.join(str(i) for i in sorted(c[kind]))})" if kind == "fp" else ""))


def _explain_and_write(model, dev, prepared, omega, label, args, out):
    _check_explain_args(args, omega)
    from ..saliency.explain import explain_case, write_explanation
    from ..progress import ProgressBar

    exp = explain_case(model, prepared, omega, args.method, label=label, n_samples=args.samples, sigma=args.sigma,
                  sigma_mode=args.sigma_mode, aggregation=args.aggregation, context=args.context, seed=args.noise_seed, layer=args.layer,
                  alpha=args.alpha, device=dev, precision=args.precision, max_omega_voxels=args.max_omega_voxels,
                  progress=ProgressBar(label=f"{args.method} {label}"))
    with out.writing():
        paths = write_explanation(exp, prepared.reference, prepared.flair_on_reference, out)
    return exp, {k: out.final(v) for k, v in paths.items()}


def cmd_explain(args) -> int:
    import numpy as np

    from ..saliency.explain import omega_from_lesion, omega_from_mask
    from ..segmentation.pipeline import segment
    from ..io.volumes import array_from_image, read_image, read_inputs, same_grid

    flair, mprage = read_inputs(args.flair, args.mprage)
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


def cmd_evaluate(args) -> int:
    from ..segmentation.evaluation import evaluate_case, prediction_labels
    from ..io.volumes import array_from_image, mask_from_image, read_image, same_grid

    from ..io.outputs import check_output_file, write_json_output

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
