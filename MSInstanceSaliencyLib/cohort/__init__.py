"""`msis cohort`: segment and explain every case of a CSV manifest on dask.distributed.

Work units: one task per case (read, prepare, segment; its state, the prepared image and the lesion
labels, stays on the worker as a future), then one task per lesion that depends on it, so that dask
runs a case's lesions where its image is (data locality). A confluent lesion is split into parts of
Ω, each a task (`saliency.smoothgrad.smoothgrad_part`), and one task combines them: the signed maximum of Eq. 3
is associative, so the combined map is the one-worker map. The model is loaded once per worker
process (a worker plugin, and a per-process cache for workers that join later).

Results: DIR/lesions.parquet/ and DIR/cases.parquet/ are append-only Parquet dataset folders written
by the client alone, as results arrive: each batch goes to a hidden temporary file, fsync, then
os.replace to part-<uuid>.parquet, so a kill at any moment leaves only whole files (readers skip
hidden names). Every row has a `key`: a hash of the case id, its input files (name, size, mtime),
the model's sha256 and every setting that shapes the row (lesion rows add the lesion id). A case row
is written only after all of its lesion rows are durable, so a case with a row is finished; a re-run
skips finished cases, and of unfinished ones the lesions whose keys are there; a case whose inputs changed
is refused once finished, else done again (its earlier rows dropped). DIR/cohort.json records the
settings, written once the cluster is up (it marks DIR as a cohort's: without it DIR must be empty); a
re-run with other settings is refused. DIR/summary.csv is rewritten at the end. Every file goes through
io.outputs.write_output_file (complete, then renamed; never over a file msis did not write).

dask is imported inside functions, so `msis` starts light and the Slicer side never needs it.

Modules, each importing only those before it: manifest (the cases, settings and keys), store (DIR's
files: the tables, maps, summary.csv, cohort.json, the lock), tasks (the workers' side), progress,
cluster (the --scheduler check, the client and local cluster), run (run_cohort), experiments (the paper's
experiments over a manifest, on the same store and cluster). This package exports
the names other code uses; tasks' functions keep their module, by which dask pickles them.
"""


from ..errors import InputError
from .cluster import LOOPBACK, SCHEDULER_TIMEOUT, _close, _start_client, check_scheduler
from .manifest import (COHORT_FORMAT, MAPS, CohortCase, CohortConfig, case_key, check_mprage, file_sha256, lesion_key, read_manifest,
                       row_settings)
from .run import n_parts_for, need_cohort_packages, run_cohort
from .store import (CASE_COLUMNS, CASES, LESIONS, LOCK, MAP_NOTE, SETTINGS_FILE, SUMMARY, SUMMARY_HEADER, TIMING_COLUMNS, ResultTable,
                    _check_map_files, _write_map, check_settings_file, is_cohort_map, is_cohort_summary, lesion_columns, map_name,
                    pin_settings, write_summary)
from .tasks import CaseState, case_info, case_task, combine_task, lesion_task, model_plugin, part_task, worker_model

__all__ = [
    "InputError",  # cohort.InputError, as before the split
    "LOOPBACK", "SCHEDULER_TIMEOUT", "check_scheduler",
    "COHORT_FORMAT", "MAPS", "CohortCase", "CohortConfig", "case_key", "check_mprage", "file_sha256", "lesion_key", "read_manifest",
    "row_settings",
    "n_parts_for", "need_cohort_packages", "run_cohort",
    "CASE_COLUMNS", "CASES", "LESIONS", "LOCK", "MAP_NOTE", "SETTINGS_FILE", "SUMMARY", "SUMMARY_HEADER", "TIMING_COLUMNS", "ResultTable",
    "check_settings_file", "is_cohort_map", "is_cohort_summary", "lesion_columns", "map_name", "pin_settings", "write_summary",
    "CaseState", "case_info", "case_task", "combine_task", "lesion_task", "model_plugin", "part_task", "worker_model",
    "_close", "_start_client", "_check_map_files", "_write_map",  # the tests' handles on the client and the map files
]
