"""`msis cohort`'s run: the checks of DIR, then the cases' and lesions' tasks submitted to the cluster and
their rows written as they arrive (see the package's docstring)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ..errors import InputError
from .cluster import model_cluster
from .manifest import MAPS, CohortCase, CohortConfig, case_key, lesion_key
from .progress import _passes, _Progress
from .store import (CASE_COLUMNS, CASES, LESIONS, SUMMARY, ResultTable, _check_map_files, _check_out, _drop_changed_inputs,
                    _failed_keys, _Lock, check_settings_file, is_cohort_summary, lesion_columns, pin_settings, write_summary)
from .tasks import _error_text, case_info, case_task, combine_task, lesion_task, model_plugin, part_task

PRIORITY_STEP = 10**7  # dask priorities: one band per case (higher runs first)
FLUSH_SECONDS = 10.0  # lesion rows are written at least this often (and whenever a case completes)


def need_cohort_packages():
    missing = [m for m in ("distributed", "pyarrow", "pandas") if _find_spec(m) is None]
    if missing:
        raise InputError(f"msis cohort needs {', '.join(missing)}, not installed here: pip install 'MSInstanceSaliencyLib[cohort]' "
                         "(dask.distributed, pyarrow, pandas; bokeh for --dashboard)")


def _find_spec(name):
    import importlib.util

    return importlib.util.find_spec(name)


def n_parts_for(work: int, split_above: int | None) -> int:
    """Parts of about split_above Ω voxels for a lesion whose max runs over `work` voxels (1: not split)."""
    if not split_above or work <= split_above:
        return 1
    return int(math.ceil(work / split_above))


def run_cohort(manifest, out, cfg: CohortConfig, cases: list[CohortCase], *, workers: int | None = None, scheduler: str | None = None,
               dashboard: bool = False, log=None, progress=None) -> dict:
    """Run (or resume) a cohort; returns {"cases", "lesions_written", "cases_written", "skipped_cases", ...}.
    The manifest's cases come validated (read_manifest); cfg.settings is what cohort.json records."""
    from ..io.outputs import check_output_file

    log = log or (lambda m: print(m, file=sys.stderr))
    if cfg.saliency is not None:  # the checks of msis explain and the worker, before anything is written
        from ..saliency.explain import check_explain_args

        check_explain_args("smoothgrad", **{k: cfg.saliency[k] for k in ("n_samples", "sigma", "sigma_mode", "aggregation", "context",
                                                                          "seed", "max_omega_voxels") if k in cfg.saliency})
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        pinned = check_settings_file(out, cfg.settings)
        for pattern in ("*/.tmp-*", "*/.lesion*_smoothgrad_*.msis-*"):  # maps a killed run was writing
            for stale in (out / MAPS).glob(pattern):
                stale.unlink(missing_ok=True)
        lesions = ResultTable(out / LESIONS, lesion_columns(cfg))
        cases_t = ResultTable(out / CASES, CASE_COLUMNS)
        if pinned:
            lesions.open()
            cases_t.open()
        keys = {c.case_id: case_key(cfg.settings, c) for c in cases}
        _drop_changed_inputs(out, lesions, cases_t, keys)
        todo = [c for c in cases if keys[c.case_id] not in cases_t.keys]
        check_output_file(out / SUMMARY, "--out", ours=is_cohort_summary)  # before the work, not after
        if cfg.maps:
            _check_map_files(out, todo, cfg.channels)

        def pin():
            """Called once the cluster is up: a start that fails leaves the folder free for other settings."""
            if not pinned:
                pin_settings(out, cfg.settings)  # first: the folder is then a cohort's (see _check_out)
                lesions.open()
                cases_t.open()

        stats = {"cases": len(cases), "skipped_cases": len(cases) - len(todo), "lesions_written": 0, "cases_written": 0,
                 "lost": []}
        if todo:
            log(f"{len(todo)} of {len(cases)} cases to do" + (f" ({len(cases) - len(todo)} finished earlier, skipped)" if len(todo) < len(cases) else ""))
            _run(todo, keys, cfg, lesions, cases_t, stats, workers=workers, scheduler=scheduler, dashboard=dashboard, log=log,
                 progress=progress, pin=pin)
        else:
            log(f"all {len(cases)} cases are finished in {out}; nothing to do")
        stats["summary"] = str(write_summary(out, lesions, cases_t, [c.case_id for c in cases], cfg))
    return stats


class _Pending:
    """A case in flight on the client: its futures and what is left of it."""

    def __init__(self, case, key, state, t0):
        self.case, self.key, self.state, self.t0 = case, key, state, t0
        self.info = None
        self.remaining = 0
        self.failed = 0
        self.lost = False  # a task of it was lost with a worker: no case row, a re-run does the rest


def _run(todo, keys, cfg, lesions, cases_t, stats, *, workers, scheduler, dashboard, log, progress, pin):
    from distributed import as_completed

    with model_cluster(cfg, scheduler=scheduler, workers=workers, dashboard=dashboard, log=log, on_start=pin) as (client, res):
        earlier_failed = _failed_keys(lesions)  # lesions of unfinished cases done earlier, with an error
        ac = as_completed()
        tags, pending = {}, {}
        n = len(todo)
        for i, case in enumerate(todo):
            # earlier cases first, a case's lesions before later cases' segmentation (cases finish early, so a
            # kill loses little), and within a case the largest lesions first (no long task left at the end)
            prio = (n - i) * PRIORITY_STEP
            st = client.submit(case_task, case, cfg, key=f"segment-{case.case_id}-{keys[case.case_id][:8]}", priority=prio, **res)
            info = client.submit(case_info, st, key=f"case-info-{case.case_id}-{keys[case.case_id][:8]}", priority=(n + 1) * PRIORITY_STEP)
            pending[case.case_id] = _Pending(case, keys[case.case_id], st, time.time())
            tags[info] = ("case", case.case_id, prio)
            ac.add(info)
        bar = _Progress(progress, n)
        buffer, last_flush = [], time.time()

        def flush():
            nonlocal buffer, last_flush
            if buffer:
                stats["lesions_written"] += lesions.append(buffer)
            buffer, last_flush = [], time.time()

        def finish_case(p: _Pending, error=None):
            flush()  # its lesion rows are durable before the case row says it is finished
            info = p.info or {}
            counts = info.get("counts", {})
            row = {"key": p.key, "case_id": p.case.case_id, "flair": p.case.names.get("flair"), "mprage": p.case.names.get("mprage"),
                   "gt": p.case.names.get("gt"), **counts, "lesions_failed": p.failed if not error else None,
                   "warnings": " | ".join(info.get("warnings", [])) or None, "error": error, "segment_seconds": info.get("seconds"),
                   "seconds": time.time() - p.t0, "worker": info.get("worker")}
            stats["cases_written"] += cases_t.append([row])
            pending.pop(p.case.case_id, None)
            p.state = None

        try:
            for fut in ac:
                kind, cid, prio = tags.pop(fut)
                p = pending.get(cid)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - the cluster's failure (a worker died): nothing is written, a re-run retries
                    stats["lost"].append(f"{cid}{'' if kind == 'case' else f' lesion {kind[1]}'}: {_error_text(exc)}")
                    log(f"msis: warning: {stats['lost'][-1]} (not recorded; a re-run retries it)")
                    if p is not None:
                        p.lost = True  # its case row is not written: the case is not finished
                        p.remaining -= 0 if kind == "case" else 1
                        if kind == "case" or p.remaining == 0:
                            pending.pop(cid, None)
                            p.state = None
                    continue
                finally:
                    fut.release()
                if kind == "case":
                    p.info = result
                    bar.case_done()
                    if result["error"]:
                        log(f"msis: warning: case {cid}: {result['error']}")
                        finish_case(p, result["error"])
                        continue
                    ids = [r["lesion_id"] for r in result["table"] if lesion_key(p.key, r["lesion_id"]) not in lesions.keys]
                    p.failed = sum(lesion_key(p.key, r["lesion_id"]) in earlier_failed for r in result["table"])
                    bar.add(len(ids), sum(_passes(cfg, result["work"].get(i)) for i in ids))
                    p.remaining = len(ids)
                    for lid in ids:
                        lkey = lesion_key(p.key, lid)
                        work = result["work"].get(lid, (0, 0))[1] if cfg.saliency is not None else 0
                        parts = n_parts_for(work, cfg.split_above) if cfg.saliency is not None else 1
                        lprio = prio + 1 + min(work, PRIORITY_STEP - 2)
                        if parts == 1:
                            f = client.submit(lesion_task, p.state, lid, cfg, key=f"lesion-{cid}-{lid}-{lkey[:8]}", priority=lprio, **res)
                        else:
                            pf = [client.submit(part_task, p.state, lid, k, parts, cfg, key=f"lesion-part-{cid}-{lid}-{k}-{lkey[:8]}",
                                                priority=lprio, **res) for k in range(parts)]
                            f = client.submit(combine_task, p.state, lid, pf, cfg, key=f"lesion-combine-{cid}-{lid}-{lkey[:8]}",
                                              priority=prio + PRIORITY_STEP - 1)
                            del pf  # the combine task holds them
                        tags[f] = (("lesion", lid), cid, prio)
                        ac.add(f)
                    if not ids:
                        finish_case(p)
                    continue
                row = {**result, "key": lesion_key(p.key, kind[1]), "case_key": p.key}
                if row.get("error"):
                    p.failed += 1
                    log(f"msis: warning: case {cid} lesion {kind[1]}: {row['error']}")
                buffer.append(row)
                p.remaining -= 1
                bar.lesion_done(_passes(cfg, (row.get("omega_voxels"), row.get("omega_work"))))
                if p.remaining == 0:
                    if p.lost:
                        flush()
                        pending.pop(cid, None)
                        p.state = None
                    else:
                        finish_case(p)
                elif time.time() - last_flush > FLUSH_SECONDS:
                    flush()
        finally:
            flush()  # lesions finished so far are kept (their case row waits for the rest)
