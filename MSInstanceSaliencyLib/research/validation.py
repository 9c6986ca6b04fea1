"""Validation of a model on phantoms it was not trained on (shared patients 17-22 by default)."""

from __future__ import annotations

import time

from ..progress import ProgressBar
from ..segmentation.evaluation import evaluate_case, summarize
from .training import VAL_PATIENTS, validation_seed


def validate_model(model, patients=VAL_PATIENTS, per_patient: int = 1, device="auto", progress=None, voxel_size: float = 1.0) -> dict:
    """Segment validation phantoms (isotropic voxel_size mm voxels) and score them lesion-wise; returns
    per-case rows and the totals."""
    from .phantom import make_phantom
    from ..segmentation.pipeline import segment
    from ..io.volumes import mask_from_image

    pairs = [(p, validation_seed(p, k)) for p in patients for k in range(per_patient)]
    bar = progress or ProgressBar(len(pairs), "validation phantoms")
    cases = []
    t0 = time.time()
    for i, (p, s) in enumerate(pairs):
        ph = make_phantom(s, patient=p, voxel_size=voxel_size)
        res = segment(ph.flair, ph.mprage, model, device=device)
        m = evaluate_case(res.labels, mask_from_image(ph.lesions))
        cases.append({"patient": p, "seed": s, **m, "inference_s": round(res.timings["inference_s"], 2)})
        bar(i + 1, len(pairs))
    return {"cases": cases, "total": summarize(cases), "seconds": round(time.time() - t0, 1),
            "model": model.spec.name, "threshold": model.spec.threshold, "phantom_voxel_size_mm": float(voxel_size)}


def format_validation(res: dict) -> str:
    head = "| patient | seed | GT lesions | TP | FP | FN | F1 | PPV | TPR | Dice | nDSC |\n|---|---|---|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {c['patient']:02d} | {c['seed']} | {c['n_gt']} | {c['tp']} | {c['fp']} | {c['fn']} | {c['f1']:.3f} | {c['ppv']:.3f} | {c['tpr']:.3f} | {c['dice']:.3f} | {c['ndsc']:.3f} |"
        for c in res["cases"]
    ]
    t = res["total"]
    rows.append(
        f"| **all** | | {t['n_gt']} | {t['tp']} | {t['fp']} | {t['fn']} | **{t['f1']:.3f}** | {t['ppv']:.3f} | {t['tpr']:.3f} | {t['dice_mean']:.3f} (mean) | {t['ndsc_mean']:.3f} (mean) |"
    )
    return "\n".join([head, *rows])
