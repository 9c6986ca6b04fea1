"""The reproduction report: our numbers beside the journal paper's, one line per claim."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import numpy as np


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _yes(flag) -> str:
    return "n/a" if flag is None else ("**yes**" if flag else "**no**")


def _fmt(v, nd=3):
    return "n/a" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def write_reproduction_report(out_dir, status: dict, path) -> Path:
    out = Path(out_dir)
    ctx = _load(out / "context" / "context_summary.json")
    ctl = _load(out / "control_regions" / "control_regions_summary.json")
    syn = _load(out / "synthetic_lesion" / "synthetic_lesion_summary.json")
    pk = _load(out / "peaks" / "peaks_summary.json")
    rows = []  # (claim, paper, ours, same behaviour?)
    if ctx:
        d = ctx["all_detected_from_mm"]
        rows.append(("All TP lesions of 90-120 voxels detected once enough context is restored", "from 7 mm (U-Net)",
                     f"from {_fmt(d)} mm ({ctx['n_lesions']} lesions)", _yes(d is not None and d >= 5)))
        rows.append(("The lesion score plateaus at a distance", "12-15 mm", f"{_fmt(ctx['plateau_mm'])} mm (within 0.02 of the maximum)",
                     _yes(8 <= ctx["plateau_mm"] <= 20)))
    if ctl:
        ratio = ctl.get("tp_over_wm_peak_ratio")
        rows.append(("Healthy white matter (93 mm³ sphere) has much smaller saliency than a TP lesion", "about 5x smaller",
                     f"TP / WM FLAIR peak = {_fmt(ratio)}", _yes(ratio is not None and ratio >= 2)))
        share = ctl.get("single_voxel_map_share_within_3_voxels")
        rows.append(("A one-voxel Ω at a TP's centre gives a map concentrated near that voxel", "concentrated near Ω, inside the lesion",
                     f"{_fmt(share)} of the summed abs(map) within 3 voxels; {_fmt(ctl.get('single_voxel_map_share_inside_lesion'))} inside the lesion",
                     _yes(share is not None and share >= 0.5)))
    if syn:
        r, met = syn["results"], syn["paper_expectation_met"]
        rows.append(("(a) a lesion copied into healthy white matter is segmented", "segmented",
                     f"segmented: {r['a_white_matter']['detected']} (max p {r['a_white_matter']['max_probability']:.2f})", _yes(met["a_segmented"])))
        rows.append(("(b) a lesion copied into the background is not segmented", "not segmented",
                     f"segmented: {r['b_background']['detected']} (max p {r['b_background']['max_probability']:.2f})", _yes(met["b_not_segmented"])))
        rows.append(("(c) with 3 mm of its surroundings, still not segmented", "not segmented",
                     f"segmented: {r['c_background_with_3mm']['detected']} (max p {r['c_background_with_3mm']['max_probability']:.2f})",
                     _yes(met["c_not_segmented"])))
        rows.append(("(c) has higher saliency peaks than (b)", "higher", f"{r['c_background_with_3mm']['map_max_abs']:.3g} vs "
                     f"{r['b_background']['map_max_abs']:.3g}", _yes(met["c_higher_peak_than_b"])))
    if pk:
        med = {g: v["median"] for g, v in pk["medians_positive_peak"].items() if v["n"]}
        order = [g for g in ("TN", "FN", "FP", "TP") if g in med]
        increasing = all(med[a] < med[b] for a, b in zip(order, order[1:]))
        paper = pk["paper_medians_positive_peak"]
        rows.append(("Median positive FLAIR peak grows TN < FN < FP < TP",
                     ", ".join(f"{g} {paper[g]}" for g in ("TN", "FN", "FP", "TP")),
                     ", ".join(f"{g} {med[g]:.3g}" for g in order), _yes(increasing)))
        ps = pk["mannwhitney_positive_peak"]
        rows.append(("Every pair of groups differs (two-sided Mann-Whitney U, p < 0.001)", "all p < 0.001",
                     "; ".join(f"{k}: p={v['p']:.2g}" for k, v in ps.items()), _yes(bool(ps) and all(v["p"] < 0.001 for v in ps.values()))))
        contrib = _contribution(out / "peaks" / "peaks.csv")
        if contrib:
            c = contrib
            flair_pattern = c["flair_inside_positive"] > abs(c["flair_inside_negative"]) and abs(c["flair_ring_negative"]) > c["flair_ring_positive"]
            mprage_pattern = abs(c["mprage_inside_negative"]) > c["mprage_inside_positive"] and c["mprage_ring_positive"] > abs(c["mprage_ring_negative"])
            rows.append(("FLAIR: positive inside the lesion, negative around it", "yes",
                         f"inside +{c['flair_inside_positive']:.3g} / {c['flair_inside_negative']:.3g}; ring +{c['flair_ring_positive']:.3g} / {c['flair_ring_negative']:.3g}",
                         _yes(flair_pattern)))
            rows.append(("MPRAGE: the opposite (negative inside, positive around)", "yes",
                         f"inside +{c['mprage_inside_positive']:.3g} / {c['mprage_inside_negative']:.3g}; ring +{c['mprage_ring_positive']:.3g} / {c['mprage_ring_negative']:.3g}",
                         _yes(mprage_pattern)))
            rows.append(("FLAIR contributes more than MPRAGE (magnitude inside the lesion)", "yes",
                         f"{c['flair_inside_positive']:.3g} vs {abs(c['mprage_inside_negative']):.3g}",
                         _yes(c["flair_inside_positive"] > abs(c["mprage_inside_negative"]))))
    lines = [
        "# Reproduction report: the journal paper's experiments with the demo model on phantoms",
        "",
        "Written by `msis reproduce`. The demo model is a small U-Net trained on synthetic phantoms, not the paper's",
        "U-Net on real scans: a \"no\" below says that *this* model behaves differently, not that the paper is wrong.",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}; SmoothGrad N per experiment as in the commands.",
        "",
        "| claim (journal paper) | paper | ours | same behaviour? |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ((x.replace("|", "/") for x in r) for r in rows)],
        "",
        "## Runs",
        "",
        "| experiment | command | exit code | seconds |",
        "|---|---|---|---|",
        *[f"| {k} | `{v['command']}` | {v['exit_code']} | {v['seconds']} |" for k, v in status.items()],
        "",
        "## Figures",
        "",
    ]
    for fig, caption in (("context/context.png", "Contextual information (paper Fig. 15B)"),
                         ("control_regions/control_regions.png", "Control regions: TP lesion, healthy WM sphere, one voxel"),
                         ("synthetic_lesion/synthetic_lesion.png", "Synthetic lesions: input, probability, FLAIR map"),
                         ("peaks/peaks_violin.png", "FLAIR SmoothGrad peaks per group (paper Fig. 11)"),
                         ("peaks/modality_contribution.png", "FLAIR vs MPRAGE contribution")):
        if (out / fig).is_file():
            lines += [f"### {caption}", "", f"![{caption}]({fig})", ""]
    from ..io.outputs import atomic_write

    return atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _contribution(csv_path: Path):
    """Mean contribution columns over the TP lesions."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["group"] == "TP"]
    if not rows:
        return None
    keys = [k for k in rows[0] if k.startswith(("flair_inside", "flair_ring", "mprage_inside", "mprage_ring"))]
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in keys}
