"""What runs on the dask workers: the per-process model, classifier and feature extractor, a case's
segmentation (case_task, its CaseState stays on the worker) and its lesions' rows (lesion_task, or
part_task and combine_task for a split lesion). dask pickles these functions by reference: they stay
top-level names of this module."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .manifest import CohortCase, CohortConfig
from .store import _write_map

_WORKER: dict = {}  # per worker process: the loaded model, classifier, feature extractor


def _worker_device(model_cfg: dict):
    """The device of this worker: cuda:<worker number modulo the GPUs> when several are visible."""
    from ..models.device import resolve_device

    dev = resolve_device(model_cfg.get("device", "auto"))
    if dev.type == "cuda" and dev.index is None:
        import torch

        n = torch.cuda.device_count()
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            name = 0
        if n > 1 and isinstance(name, int):
            dev = torch.device(f"cuda:{name % n}")
    return dev


def worker_model(model_cfg: dict, threads: int | None = None):
    """(model, device) of this worker process, loaded once (keyed by how it is loaded)."""
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if _WORKER.get("model_key") != key:
        import torch

        from ..models.loading import load_model

        if threads:
            torch.set_num_threads(int(threads))
        dev = _worker_device(model_cfg)
        _WORKER["model"] = load_model(model_cfg.get("path"), device=dev, channels=model_cfg.get("channels"),
                                      folds=model_cfg.get("folds"), mirroring=model_cfg.get("mirroring", True))
        _WORKER["device"] = dev
        _WORKER["model_key"] = key
    return _WORKER["model"], _WORKER["device"]


def _worker_classifier(path, model):
    if _WORKER.get("classifier_path") != path:
        from ..classifier.scoring import load_classifier

        _WORKER["classifier"] = load_classifier(path, model=model)
        _WORKER["classifier_path"] = path
    return _WORKER["classifier"]


def _worker_extractor():
    if "extractor" not in _WORKER:
        from ..classifier.radiomics import make_extractor

        _WORKER["extractor"] = make_extractor()
    return _WORKER["extractor"]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid{os.getpid()}"


def model_plugin(model_cfg: dict, threads: int | None):
    """A worker plugin that loads the model when a worker starts (on all workers at once, before the
    first task), so each worker process loads it once; tasks take it from the same per-process cache,
    which also serves workers that join later. Defined here so that dask is imported only when used."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class MSISModel(WorkerPlugin):
        name = "msis-model"
        idempotent = False

        def __init__(self, cfg, n_threads):
            self.cfg, self.n_threads = cfg, n_threads

        def setup(self, worker):
            worker_model(self.cfg, self.n_threads)

    return MSISModel(model_cfg, threads)


@dataclass
class CaseState:
    """A segmented case, kept on its worker while its lesions are computed."""

    case_id: str
    prepared: object = None
    labels: np.ndarray | None = None
    table: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # lesion id -> (Ω voxels on the network grid, voxels the max runs over)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    error: str | None = None


def _omega_work(omega, saliency: dict) -> int:
    """Backward passes per noisy copy: the Ω voxels the signed max runs over, or 1 for the mean."""
    from ..saliency.smoothgrad import omega_work

    if saliency.get("aggregation", "max") != "max":
        return 1
    return omega_work(omega, saliency.get("max_omega_voxels"), int(saliency.get("seed", 0)))


def case_task(case: CohortCase, cfg: CohortConfig) -> CaseState:
    """Read, prepare and segment a case; with a ground truth, classify its lesions TP/FP. Failures that
    are the case's (an image that cannot be read, a grid mismatch) become its error, not the run's."""
    from ..segmentation.evaluation import classify_lesions
    from ..segmentation.pipeline import segment
    from ..io.volumes import mask_from_image, read_image, same_grid

    t0 = time.time()
    state = CaseState(case.case_id, worker=_worker_name())
    try:
        model, dev = worker_model(cfg.model, cfg.threads)
        flair = read_image(case.flair, "FLAIR")
        mprage = read_image(case.mprage, "MPRAGE") if case.mprage is not None else None
        res = segment(flair, mprage, model, device=dev, threshold=cfg.threshold, min_volume_mm3=cfg.min_volume_mm3)
        state.prepared, state.labels, state.table = res.prepared, res.labels, res.table
        state.warnings = list(res.prepared.warnings)
        state.counts = {"n_lesions": len(res.table)}
        if case.gt is not None:
            gt_img = read_image(case.gt, "ground truth")
            if not same_grid(gt_img, res.reference):
                raise InputError(f"the ground truth {case.gt} is not on the {'MPRAGE' if mprage is not None else 'FLAIR'} grid")
            c = classify_lesions(res.labels, mask_from_image(gt_img))
            state.kinds = {**{i: "TP" for i in c["tp"]}, **{i: "FP" for i in c["fp"]}}
            state.counts.update(n_tp=len(c["tp"]), n_fp=len(c["fp"]), n_fn=len(c["fn"]), n_gt=c["n_gt"])
        if cfg.saliency is not None:
            for r in res.table:
                om = res.prepared.to_network(res.labels == r["lesion_id"])
                state.work[r["lesion_id"]] = (int(np.count_nonzero(om)), _omega_work(om, cfg.saliency))
    except Exception as exc:  # noqa: BLE001 - recorded in the case's row; the run goes on
        if _transient(exc):
            raise
        state.error = _error_text(exc)
    state.seconds = time.time() - t0
    return state


def case_info(state: CaseState) -> dict:
    """The small part of a case's state the client needs (the arrays stay on the worker)."""
    return {"case_id": state.case_id, "table": state.table, "work": state.work, "counts": state.counts, "warnings": state.warnings,
            "seconds": state.seconds, "worker": state.worker, "error": state.error}


def _transient(exc) -> bool:
    """Failures of the machine, not of the case or lesion (memory, the disk): raised, so that dask reports
    the task as failed, nothing is recorded and a re-run does it again; anything else is the row's error."""
    return isinstance(exc, (MemoryError, OSError)) or "out of memory" in str(exc).lower()


def _error_text(exc) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def _smoothgrad_kwargs(saliency: dict) -> dict:
    return dict(n_samples=int(saliency["n_samples"]), sigma=float(saliency["sigma"]), sigma_mode=saliency["sigma_mode"],
                context=saliency["context"], seed=int(saliency.get("seed", 0)), max_omega_voxels=saliency.get("max_omega_voxels"))


def lesion_task(state: CaseState, lesion_id: int, cfg: CohortConfig) -> dict:
    """The row of one lesion, its map computed in one piece."""
    from ..saliency.smoothgrad import smoothgrad

    t0 = time.time()
    try:
        maps = None
        if cfg.saliency is not None:
            model, dev = worker_model(cfg.model, cfg.threads)
            omega = state.prepared.to_network(state.labels == lesion_id)
            maps = smoothgrad(model, state.prepared.image, omega, aggregation=cfg.saliency["aggregation"], device=dev,
                              **_smoothgrad_kwargs(cfg.saliency))
        return _lesion_row(state, lesion_id, maps, cfg, t0, parts=1)
    except Exception as exc:  # noqa: BLE001 - the lesion's row says why; the run goes on
        if _transient(exc):
            raise
        return _error_row(state, lesion_id, cfg, exc, t0)


def part_task(state: CaseState, lesion_id: int, part: int, n_parts: int, cfg: CohortConfig):
    """One part of a split lesion's map: the signed max over a part of Ω (saliency.smoothgrad_part);
    an error is returned, not raised, so the combining task can put it in the lesion's row."""
    from ..saliency.smoothgrad import smoothgrad_part

    t0 = time.time()
    try:
        model, dev = worker_model(cfg.model, cfg.threads)
        omega = state.prepared.to_network(state.labels == lesion_id)
        return smoothgrad_part(model, state.prepared.image, omega, part=part, n_parts=n_parts, device=dev,
                               **_smoothgrad_kwargs(cfg.saliency)), time.time() - t0
    except Exception as exc:  # noqa: BLE001
        if _transient(exc):
            raise
        return exc, time.time() - t0


def combine_task(state: CaseState, lesion_id: int, parts: list, cfg: CohortConfig) -> dict:
    """The row of a split lesion: its parts combined (exactly the one-piece map), then as lesion_task."""
    from ..saliency.smoothgrad import combine_parts

    t0 = time.time()
    spent = sum(s for _, s in parts)
    failed = [p for p, _ in parts if isinstance(p, Exception)]
    try:
        if failed:
            raise failed[0]
        maps = combine_parts([p for p, _ in parts])
        return _lesion_row(state, lesion_id, maps, cfg, t0 - spent, parts=len(parts))
    except Exception as exc:  # noqa: BLE001
        if _transient(exc):
            raise
        return _error_row(state, lesion_id, cfg, exc, t0 - spent)


def _base_row(state: CaseState, lesion_id: int, cfg: CohortConfig) -> dict:
    row = dict(next(r for r in state.table if r["lesion_id"] == lesion_id))
    row.pop("tp_probability", None)
    row.update(case_id=state.case_id, lesion_id=int(lesion_id), worker=_worker_name())
    if cfg.saliency is not None:
        n_omega, work = state.work[lesion_id]
        row.update(omega_voxels=n_omega, omega_work=work, backward_passes=int(cfg.saliency["n_samples"]) * work)
    if cfg.gt:
        row["kind"] = state.kinds.get(lesion_id)
    return row


def _error_row(state, lesion_id, cfg, exc, t0) -> dict:
    row = _base_row(state, lesion_id, cfg)
    row.update(error=_error_text(exc), seconds=time.time() - t0)
    return row


def _lesion_row(state: CaseState, lesion_id: int, maps, cfg: CohortConfig, t0: float, parts: int) -> dict:
    """TP probability, features, peaks and map files of a lesion from its maps (C, X, Y, Z) on the network grid."""
    row = _base_row(state, lesion_id, cfg)
    if maps is not None:
        prepared = state.prepared
        omega = state.labels == lesion_id
        ref = [prepared.to_reference(maps[i]) if not prepared.grid.same else maps[i] for i in range(maps.shape[0])]
        by_channel = dict(zip(prepared.channels, ref))
        row["parts"] = parts
        if cfg.tp_probability or cfg.features:
            from ..classifier.radiomics import saliency_features

            model, _ = worker_model(cfg.model, cfg.threads)
            feats = saliency_features(by_channel[cfg.saliency.get("channel", "flair")], omega, prepared.spacing, extractor=_worker_extractor())
            if cfg.features:
                row.update(feats)
            if cfg.tp_probability:
                clf = _worker_classifier(cfg.classifier, model)
                row["tp_probability"] = float(clf.predict_proba(clf.features_to_matrix([feats]))[0, 1])
        if cfg.peaks:
            from ..research.experiments import modality_contribution

            stacked = np.stack(ref)
            for c, m in by_channel.items():
                row[f"{c}_max"], row[f"{c}_min"] = float(m.max()), float(m.min())
            row.update(modality_contribution(stacked, omega, prepared.channels))
        if cfg.maps:
            for c, m in by_channel.items():
                row[f"map_{c}"] = _write_map(cfg.out, state.case_id, lesion_id, c, m, prepared.reference)
    row["seconds"] = time.time() - t0
    return row
