"""Feature tables of the phantoms: the classifier's training data made from head phantoms, resumable,
with every setting that shapes the rows recorded beside the table (a resume must match them all)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..classifier.scoring import (META_COLUMNS, _resumable_rows, case_feature_rows, lesion_sizes, model_identity, table_manifest,
                                  write_feature_rows, write_table_manifest)
from ..errors import InputError
from ..io.outputs import table_lock


TABLE_FORMAT = 2
# What a phantom table's sidecar records besides the saliency settings: everything that shapes its rows.
# A resume must match all of them (phantom_feature_table).
RESUME_KEYS = ("model", "model_version", "model_sha256", "phantom_seed_base", "max_tp_per_case", "threshold", "min_volume_mm3",
               "phantom_voxel_size", "phantom_version")


def phantom_table_info(model, settings: dict, *, seed_base: int, max_tp_per_case, threshold=None, min_volume_mm3=None,
                       voxel_size: float = 1.0) -> dict:
    """What a phantom table's sidecar records: the saliency settings and every RESUME_KEYS value."""
    from .phantom import PHANTOM_VERSION

    spec = model.spec
    return {"saliency": settings, **model_identity(model), "phantom_seed_base": int(seed_base),
            "max_tp_per_case": None if max_tp_per_case is None else int(max_tp_per_case),
            "threshold": float(spec.threshold if threshold is None else threshold),
            "min_volume_mm3": float(spec.min_lesion_mm3 if min_volume_mm3 is None else min_volume_mm3),
            "phantom_voxel_size": float(voxel_size), "phantom_version": PHANTOM_VERSION, "format": TABLE_FORMAT}


def _show(v):
    return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)


def _check_saliency_on_resume(out: Path, settings: dict) -> dict:
    """The sidecar of a table with rows, after checking it exists and has these saliency settings."""
    earlier = table_manifest(out)
    if earlier is None:
        raise InputError(f"{out} has rows but no {out.name}.json beside it, so what made them is unknown; write a new table (another --out)")
    if earlier["saliency"] != settings:
        keys = [k for k in {**earlier["saliency"], **settings} if earlier["saliency"].get(k) != settings.get(k)]
        diff = ", ".join(f"{k}={earlier['saliency'].get(k)!r} (table) vs {settings.get(k)!r} (now)" for k in keys)
        raise InputError(f"{out} holds features made with other saliency settings ({diff}); resume with those or write a new table")
    return earlier


def _check_resume(out: Path, earlier: dict, now: dict, model) -> None:
    """Refuse to resume a table with other settings than this run's, naming them. Keys an older sidecar
    lacks: phantom_voxel_size, phantom_version, threshold and min_volume_mm3 had one value in older msis
    (1 mm, phantom version 1, the model's); the model's version and hash are unknown, and the error says
    how to go on."""
    legacy = {"phantom_voxel_size": 1.0, "phantom_version": 1, "threshold": float(model.spec.threshold), "min_volume_mm3": float(model.spec.min_lesion_mm3)}
    diffs, unknown = [], {}
    for k in RESUME_KEYS:
        if k in earlier:
            if earlier[k] != now[k]:
                diffs.append(f"{k} {_show(earlier[k])} (table) vs {_show(now[k])} (now)")
        elif k in legacy:
            if legacy[k] != now[k]:
                diffs.append(f"{k} {_show(legacy[k])} (table: older msis, always so) vs {_show(now[k])} (now)")
        else:
            unknown[k] = now[k]
    side = f"{out}.json"
    if diffs:
        raise InputError(f"{out} was made with other settings than this run: {'; '.join(diffs)}. Resume with the table's settings, "
                         "or write a new table (another --out)")
    if unknown:
        raise InputError(f"{side} does not record {', '.join(unknown)} (written by an older msis), so this run cannot tell whether the rows "
                         f"of {out.name} were made as it would make them. Write a new table (another --out), or, if you know they were made "
                         f"with this very model and these settings, add {json.dumps(unknown)} to {side} and run again")


def phantom_feature_table(model, patients, out_csv, settings: dict, *, seed_base: int = 20_000, max_tp_per_case: int | None = None,
                          threshold: float | None = None, min_volume_mm3: float | None = None, voxel_size: float = 1.0,
                          device="auto", log=print) -> Path:
    """Feature table of phantom cases (seed = seed_base + 100 * patient), resumable case by case: an
    interrupted run (also kill -9) goes on where it stopped when run again.

    Each case is committed whole: the table is rewritten through a temporary file and os.replace after
    every case, so it only ever holds complete cases. The sidecar (out_csv + ".json", atomic too) is
    written once, before the first case, with the saliency settings and what else shapes the rows
    (phantom_table_info); a resume with anything else is refused, naming it. A lock on out_csv + ".lock"
    refuses a second writer. An empty or header-only CSV (a kill at creation) starts afresh. With
    max_tp_per_case, a seeded random subset of each case's TPs is kept (every FP always is).
    threshold and min_volume_mm3 default to the model's; voxel_size is the phantoms' (1 mm as the model's
    training phantoms; 2 mm makes small, fast cases for tests)."""
    from ..segmentation.evaluation import classify_lesions
    from .phantom import make_phantom
    from ..segmentation.pipeline import segment
    from ..progress import ProgressBar
    from ..classifier.radiomics import default_feature_names
    from ..io.volumes import mask_from_image

    names = default_feature_names()
    out = Path(out_csv)
    with table_lock(out):
        rows, dropped = _resumable_rows(out, META_COLUMNS + names, log)
        if rows or dropped:
            earlier = _check_saliency_on_resume(out, settings)
            _check_resume(out, earlier, phantom_table_info(model, settings, seed_base=seed_base, max_tp_per_case=max_tp_per_case,
                                                           threshold=threshold, min_volume_mm3=min_volume_mm3, voxel_size=voxel_size), model)
            if dropped:  # repaired at once, also when that case is not among the patients of this run
                write_feature_rows(rows, out, names)
        else:  # a new table, or one with no rows yet: its sidecar first, so every row ever committed has it
            info = phantom_table_info(model, settings, seed_base=seed_base, max_tp_per_case=max_tp_per_case, threshold=threshold,
                                      min_volume_mm3=min_volume_mm3, voxel_size=voxel_size)
            write_table_manifest(out, info.pop("saliency"), **info)
        done = {r["case"] for r in rows}
        for p in patients:
            seed = seed_base + 100 * int(p)
            case = f"phantom_p{int(p):02d}_s{seed}"
            if case in done:
                log(f"{case}: already in {out_csv}, skipped")
                continue
            ph = make_phantom(seed, patient=int(p), voxel_size=voxel_size)
            res = segment(ph.flair, ph.mprage, model, device=device, threshold=threshold, min_volume_mm3=min_volume_mm3)
            gt = mask_from_image(ph.lesions)  # every non-zero voxel is lesion
            c = classify_lesions(res.labels, gt)
            ids = sorted(c["fp"]) + sorted(c["tp"])
            if max_tp_per_case is not None and len(c["tp"]) > max_tp_per_case:
                rng = np.random.default_rng(seed)
                ids = sorted(c["fp"]) + sorted(rng.choice(c["tp"], size=max_tp_per_case, replace=False).tolist())
            log(f"{case}: {len(c['tp'])} TP, {len(c['fp'])} FP, {len(c['fn'])} FN; features of {len(ids)} lesions")
            case_rows = case_feature_rows(model, res.prepared, res.labels, case, settings, gt, lesion_ids=ids, device=device,
                                          progress=ProgressBar(label=f"{case}: {len(ids)} lesions, backward passes"))
            if max_tp_per_case is not None:  # record the TPs left out so counts stay honest
                sizes = lesion_sizes(res.labels)
                for lid in sorted(set(c["tp"]) - set(ids)):
                    case_rows.append({"case": case, "lesion_id": int(lid), "kind": "TP", "label": 1, "voxels": int(sizes[lid]),
                                      "error": "not sampled"})
            write_feature_rows(rows + case_rows, out, names)  # the whole table, atomically: this case whole or not at all
            rows += case_rows
            done.add(case)
    return out
