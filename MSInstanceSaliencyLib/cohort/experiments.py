"""The paper's experiments over a manifest: `msis context | sanity control-regions | sanity synthetic-lesion |
stats peaks --manifest CSV`. Each case is one task on dask.distributed, as `msis cohort` runs its cases:
read and check the files, derive the white matter when the manifest has no wm column and the experiment
needs it, segment, and compute the case's rows. The statistics are the whole set's, computed from every
case's rows at the end (peaks per TP/FP/FN/TN over all cases, Mann-Whitney U between the groups; the
context curve over all lesions; the sanity checks' measures over the cases), with the same functions as
the one-case commands, so that a set run gives what one in-process run over the same cases gives.

DIR holds (besides the whole set's outputs, written like the one-case command's, with msis_run.json):
- cohort.json: the settings, the experiment's among them (a re-run with other settings is refused);
- cases.parquet/: one row per finished case, its rows and summary as JSON or its error, appended by the
  client as each case ends (store.ResultTable: whole files only), so a kill loses the cases in flight
  only and a re-run does just those;
- cases/<case id>/: what a worker writes for its case (a sanity check's figure, the derived white matter).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .manifest import COHORT_FORMAT, MAX_LISTED_PROBLEMS, CohortCase, case_key
from .tasks import _error_text, _transient, _worker_name, worker_model

EXPERIMENTS = {"context": "context", "control-regions": "control_regions", "synthetic-lesion": "synthetic_lesion", "peaks": "peaks"}
NEEDS_WHITE_MATTER = ("control-regions", "synthetic-lesion")
CASE_FOLDERS = "cases"  # DIR/cases/<case id>/
CASE_MARK = ".msis-case"  # in each case folder msis made: the files there under the names msis writes are its own
EXPERIMENT_CASE_COLUMNS = [("key", "string"), ("case_id", "string"), ("rows", "string"), ("summary", "string"), ("warnings", "string"),
                           ("error", "string"), ("seconds", "float64"), ("worker", "string")]


@dataclass
class ExperimentConfig:
    """Everything a worker needs for its case; `settings` is what cohort.json records and every key hashes."""

    experiment: str  # a key of EXPERIMENTS
    out: str
    model: dict  # how workers load the model (as CohortConfig.model)
    params: dict  # the experiment's own settings
    threads: int | None = None
    settings: dict = field(default_factory=dict)


def experiment_settings(cfg: ExperimentConfig, identity: dict, channels) -> dict:
    return {"format": COHORT_FORMAT, "experiment": cfg.experiment, **identity, "channels": list(channels), "params": cfg.params,
            "folds": cfg.model.get("folds"), "mirroring": cfg.model.get("mirroring")}


def outputs(experiment: str) -> list[str]:
    """The whole set's output files, named as the one-case command names them: the table, the summary, the figures."""
    name = EXPERIMENTS[experiment]
    if experiment == "context":
        return ["context_raw.csv", "context_summary.json", "context.png"]
    if experiment == "peaks":
        return ["peaks.csv", "peaks_summary.json", "peaks_violin.png", "modality_contribution.png"]
    return [f"{name}.csv", f"{name}_summary.json", f"{name}.png"]


# ----------------------------------------------------------------------------- before the work (client)

def check_cases(cases: list[CohortCase], experiment: str, manifest) -> list[float]:
    """Every case's files read and checked as the one-case commands check theirs (research.experiments.read_case_files:
    a ground truth on the reference grid, a wm map there, an MPRAGE to derive white matter from), all problems in one
    line with their CSV lines, before the model loads. Returns the ground truths' lesion volumes in mm^3."""
    from ..research.experiments import gt_lesion_volumes, read_case_files

    problems, volumes = [], []
    no_gt = [c.line for c in cases if c.gt is None]
    if no_gt:
        raise InputError(f"{manifest}: the experiments choose lesions from the ground truth, but the gt cell is empty or missing on line"
                         f"{'s' if len(no_gt) > 1 else ''} {', '.join(map(str, no_gt[:MAX_LISTED_PROBLEMS]))}; nothing was started")
    for c in cases:
        try:
            files = read_case_files(c.flair, c.mprage, c.gt, c.wm, need_wm=experiment in NEEDS_WHITE_MATTER)
        except InputError as exc:
            problems.append(f"line {c.line} ({c.case_id}): {exc}")
            continue
        volumes += gt_lesion_volumes(files.gt, files.reference.GetSpacing())
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise InputError(f"{manifest}: {len(problems)} case{'s' if len(problems) > 1 else ''} cannot be used, nothing was started: "
                         + "; ".join(problems[:MAX_LISTED_PROBLEMS]) + more)
    return volumes


# ----------------------------------------------------------------------------- a case (on a worker)

def experiment_case_task(case: CohortCase, cfg: ExperimentConfig) -> dict:
    """One case's experiment: its rows and (sanity checks) its summary, JSON-ready. A failure that is the case's (no TP
    lesion to use, a file that cannot be read) is its row's error; one of the machine is raised (nothing is recorded)."""
    from ..research import experiments as ex

    t0 = time.time()
    result = {"case_id": case.case_id, "rows": [], "summary": None, "warnings": [], "error": None, "worker": _worker_name()}
    try:
        model, dev = worker_model(cfg.model, cfg.threads)
        files = ex.read_case_files(case.flair, case.mprage, case.gt, case.wm, need_wm=cfg.experiment in NEEDS_WHITE_MATTER)
        files.name = case.case_id
        if files.derive_white_matter:
            from ..research.anatomy import write_anatomy

            anatomy = ex.derive_case_anatomy(files)
            if anatomy.warning:
                result["warnings"].append(anatomy.warning)
            write_anatomy(anatomy, _case_folder(cfg.out, case.case_id))
        c = ex.segment_case_files(model, files, device=dev)
        result["warnings"] += list(c.result.prepared.warnings)
        p, warn = cfg.params, result["warnings"].append
        if cfg.experiment == "context":
            result["rows"] = ex.context_rows(model, c, tuple(p["size_range"]), n_steps=p["steps"], device=dev, warn=warn)
        elif cfg.experiment == "peaks":
            result["rows"] = ex.peaks_rows(model, c, p["tn_volume_mm3"], n_samples=p["samples"], seed=p["noise_seed"],
                                           max_per_group=p["max_per_group"], device=dev, warn=warn, max_omega_voxels=p["max_omega_voxels"],
                                           tn_per_case=p["tn_spheres"])
        else:
            kw = dict(max_voxels=p["max_voxels"], n_samples=p["samples"], seed=p["noise_seed"], device=dev,
                      max_omega_voxels=p["max_omega_voxels"])
            png = _case_folder(cfg.out, case.case_id) / f"{EXPERIMENTS[cfg.experiment]}.png"
            if cfg.experiment == "control-regions":
                rows, summary, regions, maps = ex.run_control_regions(model, c, **kw)
                ex.control_regions_figure(c.result.prepared.flair_on_reference, c.result.reference, regions, maps, png)
            else:
                rows, summary, panels = ex.run_synthetic_lesion(model, c, **kw)
                ex.synthetic_lesion_figure(panels, png)
            result["rows"], result["summary"] = rows, {**summary, "figure": f"{CASE_FOLDERS}/{case.case_id}/{png.name}"}
    except Exception as exc:  # noqa: BLE001 - recorded in the case's row; the run goes on
        if _transient(exc):
            raise
        result["error"] = _error_text(exc)
    result["seconds"] = time.time() - t0
    return result


def _case_folder(out, case_id: str) -> Path:
    """DIR/cases/<case id>/, made by msis (and marked so): the files msis writes there are replaced by a re-run."""
    folder = Path(out) / CASE_FOLDERS / case_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CASE_MARK).touch()
    return folder


def _json(obj) -> str:
    return json.dumps(obj, default=lambda v: v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else str(v))


# ----------------------------------------------------------------------------- the run (client)

def run_experiment_cohort(cfg: ExperimentConfig, cases: list[CohortCase], *, workers=None, scheduler=None, log=None, progress=None) -> dict:
    """Run (or resume) an experiment over the cases, then the whole set's outputs into cfg.out. Returns
    {"cases", "skipped_cases", "cases_written", "lost", "failed": {case id: error}, "summary", "files"}."""
    from .store import ResultTable, _check_out, _drop_changed_inputs, _Lock, check_settings_file, pin_settings
    from ..io.outputs import OutputFolder

    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(cfg.out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        pinned = check_settings_file(out, cfg.settings)
        _check_case_folders(out, cases)
        table = ResultTable(out / "cases.parquet", EXPERIMENT_CASE_COLUMNS)
        if pinned:
            table.open()
        keys = {c.case_id: case_key(cfg.settings, c) for c in cases}
        _drop_changed_inputs(out, None, table, keys)
        todo = [c for c in cases if keys[c.case_id] not in table.keys]
        # a user's file under an output's name in a folder of an earlier run: refused now, not after the work (a new folder is empty)
        results = OutputFolder(out, names=outputs(cfg.experiment)) if pinned else None

        def pin():
            if not pinned:
                pin_settings(out, cfg.settings)
                table.open()

        stats = {"cases": len(cases), "skipped_cases": len(cases) - len(todo), "cases_written": 0, "lost": []}
        if todo:
            log(f"{len(todo)} of {len(cases)} cases to do" + (f" ({len(cases) - len(todo)} finished earlier, skipped)" if len(todo) < len(cases) else ""))
            _run(todo, keys, cfg, table, stats, workers=workers, scheduler=scheduler, log=log, progress=progress, pin=pin)
        else:
            log(f"all {len(cases)} cases are finished in {out}; nothing to do")
        stats.update(_write_set_outputs(cfg, cases, keys, table, results or OutputFolder(out, names=outputs(cfg.experiment))))
    return stats


def _check_case_folders(out: Path, cases) -> None:
    """A cases/<id> that msis did not make (no mark) is the user's: refused before the work."""
    theirs = [out / CASE_FOLDERS / c.case_id for c in cases if (out / CASE_FOLDERS / c.case_id).exists()
              and not (out / CASE_FOLDERS / c.case_id / CASE_MARK).exists()]
    if theirs:
        raise InputError(f"{theirs[0]} already exists and was not made by msis; move it, or give a new --out")


def _run(todo, keys, cfg, table, stats, *, workers, scheduler, log, progress, pin):
    from distributed import as_completed

    from .cluster import model_cluster
    from .run import PRIORITY_STEP

    with model_cluster(cfg, scheduler=scheduler, workers=workers, max_workers=len(todo), log=log, on_start=pin) as (client, res):
        futures = [client.submit(experiment_case_task, c, cfg, key=f"{cfg.experiment}-{c.case_id}-{keys[c.case_id][:8]}",
                                 priority=(len(todo) - i) * PRIORITY_STEP, **res) for i, c in enumerate(todo)]
        by_future = dict(zip(futures, todo))
        done = 0
        if progress:
            progress(f"{cfg.experiment}: cases", 0, len(todo))
        for fut in as_completed(futures):
            case = by_future.pop(fut)
            try:
                r = fut.result()
            except Exception as exc:  # noqa: BLE001 - the machine's failure (a worker died): nothing recorded, a re-run retries
                stats["lost"].append(f"{case.case_id}: {_error_text(exc)}")
                log(f"msis: warning: {stats['lost'][-1]} (not recorded; a re-run retries it)")
                continue
            finally:
                fut.release()
            if r["error"]:
                log(f"msis: warning: case {case.case_id}: {r['error']}")
            for w in r["warnings"]:
                log(f"msis: warning: case {case.case_id}: {w}")
            stats["cases_written"] += table.append([{"key": keys[case.case_id], "case_id": case.case_id, "rows": _json(r["rows"]),
                                                     "summary": _json(r["summary"]), "warnings": " | ".join(r["warnings"]) or None,
                                                     "error": r["error"], "seconds": r["seconds"], "worker": r["worker"]}])
            done += 1
            if progress:
                progress(f"{cfg.experiment}: cases", done, len(todo))


def _write_set_outputs(cfg, cases, keys, table, results) -> dict:
    """The whole set's tables, summary and figures from every finished case's rows (in the manifest's order)."""
    from ..research import experiments as ex
    from ..io.outputs import write_csv_rows

    df = table.read()
    by_key = {k: r for k, r in zip(df["key"], df.to_dict("records"))}
    finished = [by_key[keys[c.case_id]] for c in cases if keys[c.case_id] in by_key]
    failed = {r["case_id"]: r["error"] for r in finished if isinstance(r["error"], str)}
    ok = [r for r in finished if not isinstance(r["error"], str)]
    rows = [row for r in ok for row in json.loads(r["rows"])]
    p, name = cfg.params, EXPERIMENTS[cfg.experiment]
    table_name, summary_name, *figures = outputs(cfg.experiment)
    if cfg.experiment == "context":
        summary = ex.context_summary(rows, tuple(p["size_range"]))
        draw = lambda paths: ex.context_figure(summary, *paths)  # noqa: E731
    elif cfg.experiment == "peaks":
        summary = ex.peaks_summary(rows, p["samples"], p["tn_volume_mm3"], [r["case_id"] for r in ok])
        draw = lambda paths: ex.peaks_figures(rows, *paths)  # noqa: E731
    else:
        per_case = [json.loads(r["summary"]) for r in ok]
        if not per_case:
            raise InputError(f"no case could be used for {cfg.experiment}: " + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5]))
        summary = (ex.control_regions_set_summary if cfg.experiment == "control-regions" else ex.synthetic_lesion_set_summary)(per_case)
        draw = lambda paths: ex.sanity_set_figure(name, summary, *paths)  # noqa: E731
    summary.update(cases_failed=failed, cases_missing=[c.case_id for c in cases if keys[c.case_id] not in by_key])
    with results.writing():
        write_csv_rows(results.file(table_name), rows)
        results.file(summary_name).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        draw([results.file(f) for f in figures])
    results.close(command=f"{cfg.experiment} --manifest", experiment=cfg.experiment, settings=cfg.settings,
                  cases=len(cases), cases_finished=len(finished), cases_failed=len(failed))
    return {"summary": summary, "failed": failed, "files": [str(Path(cfg.out) / n) for n in outputs(cfg.experiment)]}

