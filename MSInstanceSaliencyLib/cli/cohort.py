"""`msis cohort`: a CSV manifest of cases on dask.distributed, results in Parquet (the work is in MSInstanceSaliencyLib.cohort)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import InputError
from .common import _classifier_for


def cmd_cohort(args) -> int:
    from ..cohort import CohortConfig, check_mprage, check_scheduler, need_cohort_packages, read_manifest, row_settings, run_cohort
    from ..models.loading import load_model
    from ..classifier.scoring import classifier_settings, model_identity, saliency_settings

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
        from ..cohort import file_sha256

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
        from ..progress import ProgressBar

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
