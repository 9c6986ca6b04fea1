"""The TP/FP classifier's commands: features, train-classifier and evaluate-classifier."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from .common import OutputFolder, _load, _phantom_voxel_size, _write_rows
from .parser import _class_weight, _parse_patients


def cmd_features(args) -> int:
    from ..classifier.radiomics import default_feature_names
    from ..classifier.scoring import case_feature_rows, model_identity, saliency_settings, write_feature_rows, write_table_manifest
    from ..research.phantom_features import phantom_feature_table
    from ..io.outputs import table_lock
    from ..io.volumes import mask_from_image, read_image, read_inputs, same_grid

    settings = saliency_settings(n_samples=args.samples, sigma=args.sigma, sigma_mode=args.sigma_mode, context=args.context,
                                 max_omega_voxels=args.max_omega_voxels)
    voxel_size = _phantom_voxel_size(note=True) if args.phantom_patients else 1.0
    model, dev = _load(args)
    if args.phantom_patients:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        path = phantom_feature_table(model, _parse_patients(args.phantom_patients), args.out, settings, seed_base=args.phantom_seed_base,
                                     max_tp_per_case=args.max_tp, threshold=args.threshold, min_volume_mm3=args.min_volume,
                                     voxel_size=voxel_size, device=dev, log=log)
        print(f"features: {path}")
        return 0
    if not args.flair:
        raise InputError("give FLAIR and MPRAGE files (FLAIR-only models: the FLAIR), or --phantom-patients")
    from ..segmentation.pipeline import segment
    from ..progress import ProgressBar

    out_path = Path(args.out)
    if out_path.exists():
        raise InputError(f"{out_path} already exists; choose another --out")
    if Path(f"{out_path}.json").exists():  # the table's sidecar: never over a file the user put there
        raise InputError(f"{out_path}.json already exists; choose another --out or move it")
    flair, mprage = read_inputs(args.flair, args.mprage)
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
    from ..classifier.radiomics import TPClassifier, default_feature_names
    from ..classifier.scoring import labelled_matrix, read_feature_tables, tables_model

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
    from ..io.outputs import write_output_file

    write_output_file(out, "--out", clf.save, replace_own=False)
    nz = int((clf.coef_ != 0).sum())
    print(f"trained on {int(y.sum())} TP and {int((y == 0).sum())} FP lesions; {nz} of {len(names)} coefficients non-zero -> {out}")
    return 0


def cmd_evaluate_classifier(args) -> int:
    from ..classifier.radiomics import TPClassifier, importance_figure, probability_figure, threshold_figure
    from ..classifier.scoring import evaluate_classifier, read_feature_tables

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


def _check_feature_cells(rows, names) -> None:
    """Every feature of every TP/FP row with features is a finite number (a clear error, not a crash in NumPy)."""
    from ..classifier.radiomics import feature_value

    for r in rows:
        if r.get("kind") in ("TP", "FP") and not r.get("error"):
            for n in names:
                feature_value(r, n)
