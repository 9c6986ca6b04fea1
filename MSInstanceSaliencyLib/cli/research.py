"""The research commands: phantom, the paper's experiments (context, sanity, stats, reproduce), train and
validate-model."""

from __future__ import annotations

import json
import sys
import time

from ..errors import InputError
from .common import OutputFolder, _load, _phantom_voxel_size, _warn, _write_rows
from .parser import _parse_patients


def cmd_phantom(args) -> int:
    from ..research.phantom import make_phantom

    voxel_size = _phantom_voxel_size() if args.voxel_size is None else args.voxel_size
    names = ("flair", "mprage", "lesions", "mimics") + (() if args.skull_stripped else ("head",))
    out = OutputFolder(args.out, protected=[args.lesion_mask] if args.lesion_mask else [], names=[f"{n}.nii.gz" for n in names])
    ph = make_phantom(args.seed, args.lesion_mask, patient=args.patient, voxel_size=voxel_size, skull_stripped=args.skull_stripped)
    from ..io.volumes import write_image

    with out.writing():
        for name in names:
            write_image(getattr(ph, name), out.file(f"{name}.nii.gz"))
    out.close(command="phantom", seed=args.seed, patient=ph.patient, **ph.info)
    for name in names:
        print(out.path / f"{name}.nii.gz")
    return 0


def _phantom_voxel_size_of(args):
    """The voxel size of the experiment's phantom cases (MSIS_PHANTOM_VOXEL_SIZE, noted on stderr when
    not 1 mm); None when the cases are files. Read before the model loads: a bad value fails at once."""
    return None if args.flair or args.mprage else _phantom_voxel_size(note=True)


def _case_files(args, need_wm: bool = False):
    """With files: the case read and checked (FLAIR, MPRAGE, --gt and --wm readable and on one grid;
    --wm where the experiment needs white matter) before the model loads; None for phantom cases."""
    from ..research.experiments import read_case_files

    if not (args.flair or args.mprage):
        return None
    if not (args.flair and args.gt):
        raise InputError("with files, give --flair, --mprage and --gt (the experiments choose TP lesions from the ground truth; "
                         "--mprage may be left out for a FLAIR-only model)")
    return read_case_files(args.flair, args.mprage, args.gt, getattr(args, "wm", None), need_wm=need_wm)


def _check_channels(model, files) -> None:
    """The model's inputs against the files, once the model is loaded and before it runs."""
    if files is not None and files.mprage is None and "mprage" in model.spec.input_channels:
        raise InputError(f"this model takes {' + '.join(c.upper() for c in model.spec.input_channels)}: give --mprage as well")


def _cases(args, model, dev, voxel_size, files):
    """Experiment cases: the checked files (_case_files) or phantom cases of voxel_size mm, segmented with progress."""
    from ..research.experiments import phantom_cases, segment_case_files

    if files is not None:
        yield segment_case_files(model, files, device=dev, progress=_bars)
        return
    yield from phantom_cases(model, _parse_patients(args.phantom_patients), device=dev, voxel_size=voxel_size, progress=_bars)


def _bars(label):
    from ..progress import ProgressBar

    return ProgressBar(label=label)


def _load_checked(args, files):
    model, dev = _load(args)
    _check_channels(model, files)
    return model, dev


def cmd_context(args) -> int:
    from ..research.experiments import context_figure, run_context

    if args.manifest:
        return _over_manifest(args, "context", {"size_range": list(args.size_range), "steps": args.steps}, _print_context)
    voxel_size = _phantom_voxel_size_of(args)
    files = _case_files(args)
    model, dev = _load_checked(args, files)
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt) if p],
                       names=["context_raw.csv", "context_summary.json", "context.png"])
    rows, summary = run_context(model, _cases(args, model, dev, voxel_size, files), tuple(args.size_range), n_steps=args.steps, device=dev,
                                progress=_bars, warn=_warn)
    summary["phantom_voxel_size_mm"] = voxel_size
    with out.writing():
        _write_rows(out.file("context_raw.csv"), rows)
        out.file("context_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        context_figure(summary, out.file("context.png"))
    out.close(command="context", size_range=list(args.size_range), steps=args.steps, phantom_voxel_size_mm=voxel_size)
    _print_context(summary)
    print(f"outputs in {out.path}: context_raw.csv, context_summary.json, context.png")
    return 0


def _print_context(summary) -> None:
    print(f"{summary['n_lesions']} lesions; all detected from {summary['all_detected_from_mm']} mm; plateau at {summary['plateau_mm']} mm "
          f"(paper, U-Net on real scans: all detected from 7 mm, plateau 12-15 mm)")


def cmd_sanity(args) -> int:
    if args.manifest:
        params = {"max_voxels": args.max_voxels, "samples": args.samples, "noise_seed": args.noise_seed, "max_omega_voxels": args.max_omega_voxels}
        return _over_manifest(args, args.sanity_command, params, _print_sanity_set)
    if args.sanity_command == "control-regions":
        return _sanity_control_regions(args)
    if args.sanity_command == "synthetic-lesion":
        return _sanity_synthetic_lesion(args)
    raise InputError(f"unknown sanity check {args.sanity_command}")


def _sanity_check(args, name: str, run_check) -> tuple[list, dict]:
    """The frame both sanity checks share: one case, then NAME.csv, NAME_summary.json and NAME.png written together.
    run_check(model, case, dev) returns (rows, summary, draw), draw(path) making the figure."""
    voxel_size = _phantom_voxel_size_of(args)
    files = _case_files(args, need_wm=True)  # both checks place a region in healthy white matter
    model, dev = _load_checked(args, files)
    from ..research.anatomy import FILES as ANATOMY_FILES

    derive = files is not None and files.derive_white_matter
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt, args.wm) if p],
                       names=[f"{name}.csv", f"{name}_summary.json", f"{name}.png", *(ANATOMY_FILES.values() if derive else ())])
    if derive:
        from ..research.experiments import derive_case_anatomy

        bar = _bars(f"{files.name}: white matter from the MNI template (no --wm)")
        anatomy = derive_case_anatomy(files, lambda done, total: bar(round(100 * done / total), 100))
        if anatomy.warning:
            _warn(anatomy.warning)
    case = next(_cases(args, model, dev, voxel_size, files))
    rows, summary, draw = run_check(model, case, dev)
    summary["phantom_voxel_size_mm"] = voxel_size
    with out.writing():
        _write_rows(out.file(f"{name}.csv"), rows)
        out.file(f"{name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        draw(out.file(f"{name}.png"))
    white_matter = "phantom" if files is None else "--wm" if not derive else "derived"
    if derive:
        from ..research.anatomy import write_anatomy

        write_anatomy(files.anatomy, out)
    out.close(command=f"sanity {args.sanity_command}", phantom_voxel_size_mm=voxel_size, white_matter=white_matter,
              **({"derived_anatomy_quality": files.anatomy.quality} if derive else {}))
    return rows, summary


def _sanity_control_regions(args) -> int:
    from ..research.experiments import control_regions_figure, run_control_regions

    def run_check(model, case, dev):
        rows, summary, regions, maps = run_control_regions(model, case, lesion_id=args.lesion, max_voxels=args.max_voxels,
                                                           n_samples=args.samples, seed=args.noise_seed, device=dev, progress=_bars,
                                                           max_omega_voxels=args.max_omega_voxels)
        return rows, summary, lambda path: control_regions_figure(case.result.prepared.flair_on_reference, case.result.reference,
                                                                  regions, maps, path)

    _, summary = _sanity_check(args, "control_regions", run_check)
    print(json.dumps(summary, indent=2))
    return 0


def _sanity_synthetic_lesion(args) -> int:
    from ..research.experiments import run_synthetic_lesion, synthetic_lesion_figure

    def run_check(model, case, dev):
        rows, summary, panels = run_synthetic_lesion(model, case, lesion_id=args.lesion, max_voxels=args.max_voxels,
                                                     n_samples=args.samples, seed=args.noise_seed, device=dev, progress=_bars,
                                                     max_omega_voxels=args.max_omega_voxels)
        return rows, summary, lambda path: synthetic_lesion_figure(panels, path)

    rows, summary = _sanity_check(args, "synthetic_lesion", run_check)
    for r in rows:
        print(f"{r['variant']:<24} segmented {str(r['detected']):<5}  mean p {r['mean_probability']:.3f}  max p {r['max_probability']:.3f}  "
              f"FLAIR map peaks {r['map_max']:.3g} / {r['map_min']:.3g}")
    print("paper's expectations: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["paper_expectation_met"].items()))
    return 0


def _print_sanity_set(summary) -> None:
    n = summary["n_cases"]
    if "expectation_met_in_cases" in summary:
        print("paper's expectations, cases where they hold: " + ", ".join(f"{k}: {v}/{n}" for k, v in summary["expectation_met_in_cases"].items()))
        return
    for k, m in summary["medians"].items():
        if m["n"]:
            print(f"{k}: median {m['median']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] over {m['n']} of {n} cases")


def cmd_stats(args) -> int:
    from ..research.experiments import peaks_figures, run_peaks

    if args.manifest:
        params = {"samples": args.samples, "noise_seed": args.noise_seed, "max_per_group": args.max_per_group, "tn_volume_mm3": args.tn_volume,
                  "tn_spheres": args.tn_spheres, "max_omega_voxels": args.max_omega_voxels}
        return _over_manifest(args, "peaks", params, _print_peaks)
    voxel_size = _phantom_voxel_size_of(args)
    files = _case_files(args)
    model, dev = _load_checked(args, files)
    out = OutputFolder(args.out, protected=[p for p in (args.flair, args.mprage, args.gt) if p],
                       names=["peaks.csv", "peaks_summary.json", "peaks_violin.png", "modality_contribution.png"])
    rows, summary = run_peaks(model, list(_cases(args, model, dev, voxel_size, files)), n_samples=args.samples, seed=args.noise_seed,
                              max_per_group=args.max_per_group, tn_volume_mm3=args.tn_volume, device=dev, progress=_bars, warn=_warn,
                              max_omega_voxels=args.max_omega_voxels, tn_per_case=args.tn_spheres)
    summary["phantom_voxel_size_mm"] = voxel_size
    with out.writing():
        _write_rows(out.file("peaks.csv"), rows)
        out.file("peaks_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        peaks_figures(rows, out.file("peaks_violin.png"), out.file("modality_contribution.png"))
    out.close(command="stats peaks", phantom_voxel_size_mm=voxel_size)
    _print_peaks(summary)
    return 0


def _print_peaks(summary) -> None:
    for g in ("TN", "FN", "FP", "TP"):
        m = summary["medians_positive_peak"][g]
        if m["n"]:
            print(f"{g}: n={m['n']:<4} median positive peak {m['median']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  (paper {summary['paper_medians_positive_peak'][g]})")
    for pair, r in summary["mannwhitney_positive_peak"].items():
        print(f"  {pair}: U={r['U']:.1f} p={r['p']:.3g}")


def _over_manifest(args, experiment: str, params: dict, show) -> int:
    """An experiment over every case of --manifest on dask (cohort.experiments): the manifest and every case's files checked,
    then the model loaded once here (its channels and identity), then the cases on the workers; the whole set's outputs in --out."""
    from pathlib import Path

    from ..classifier.scoring import model_identity
    from ..cohort import check_mprage, check_scheduler, need_cohort_packages, read_manifest
    from ..cohort.experiments import ExperimentConfig, check_cases, experiment_settings, outputs, run_experiment_cohort
    from ..models.loading import load_model
    from ..progress import ProgressBar
    from ..research.experiments import mean_lesion_volume

    need_cohort_packages()
    if args.scheduler:
        args.scheduler = check_scheduler(args.scheduler)
    cases = read_manifest(args.manifest, optional=("gt", "wm"))
    volumes = check_cases(cases, experiment, args.manifest)  # every case's files, before the model loads
    model = load_model(args.model, device="cpu", channels=args.model_channels, folds=args.folds, mirroring=not args.no_mirroring)
    check_mprage(cases, model.spec.input_channels, args.manifest)
    if experiment == "peaks" and params["tn_volume_mm3"] is None:
        params["tn_volume_mm3"] = mean_lesion_volume(volumes)  # the whole set's mean, as one run over all the cases takes it
    cfg = ExperimentConfig(experiment, str(Path(args.out).resolve()), {
        "path": str(Path(args.model).resolve()) if args.model else None, "device": args.device, "channels": args.model_channels,
        "folds": args.folds, "mirroring": not args.no_mirroring}, params)
    cfg.settings = experiment_settings(cfg, model_identity(model), model.spec.input_channels)
    del model  # the workers load their own
    bars = {}

    def progress(label, done, total):
        bars.setdefault(label, ProgressBar(label=label))(done, total)

    stats = run_experiment_cohort(cfg, cases, workers=args.workers, scheduler=args.scheduler, progress=progress)
    show(stats["summary"])
    failed = stats["failed"]
    print(f"{stats['cases']} cases ({stats['skipped_cases']} finished earlier), {len(failed)} without a result"
          + (f" ({'; '.join(f'{k}: {v}' for k, v in list(failed.items())[:3])})" if failed else ""))
    print(f"outputs in {cfg.out}: {', '.join(outputs(experiment))}")
    if stats["lost"]:
        print(f"msis: {len(stats['lost'])} cases failed for reasons of the machine (a worker died, memory, disk) and were not "
              "recorded; run the same command again to do them", file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args, run) -> int:
    """run: msis's main, which runs each experiment as its own command (exit code, one-line errors)."""
    from ..research.report import write_reproduction_report

    voxel_size = _phantom_voxel_size()  # each experiment reads it again and notes it; here for the run record
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
        status[name] = {"exit_code": run(argv + ["--out", str(out.path / name)] + common), "seconds": round(time.time() - t, 1),
                        "command": "msis " + " ".join(argv + ["--out", f"{name}"])}
    with out.writing():
        report = out.final(write_reproduction_report(out.path, status, out.file("REPORT.md")))
    out.close(command="reproduce", runs=status, total_s=round(time.time() - t0, 1), phantom_voxel_size_mm=voxel_size)
    print(f"report: {report}")
    return 0 if all(v["exit_code"] == 0 for v in status.values()) else 1


def cmd_train(args) -> int:
    from ..research.training import train

    from ..models.base import SPEC_FILE, ModelSpec

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
    from ..io.outputs import check_output_file, write_json_output
    from ..research.validation import format_validation, validate_model

    if args.json:
        check_output_file(args.json, "--json")
    voxel_size = _phantom_voxel_size(note=True)
    model, dev = _load(args)
    res = validate_model(model, _parse_patients(args.patients), per_patient=args.per_patient, device=dev, voxel_size=voxel_size)
    print(format_validation(res))
    if args.json:
        write_json_output(args.json, res, "--json")
    return 0
