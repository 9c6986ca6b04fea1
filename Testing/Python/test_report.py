"""The reproduction report judges each claim from the experiments' summaries."""

import csv
import json

from MSInstanceSaliencyLib.research.report import write_reproduction_report

from test_outputs import assert_failed_rewrite_keeps_the_file


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_claims_are_judged_from_the_numbers(tmp_path):
    _write(tmp_path / "context" / "context_summary.json", {"n_lesions": 5, "all_detected_from_mm": 7.0, "plateau_mm": 30.0, "steps": []})
    _write(tmp_path / "control_regions" / "control_regions_summary.json",
           {"tp_over_wm_peak_ratio": 5.2, "single_voxel_map_share_within_3_voxels": 0.8, "single_voxel_map_share_inside_lesion": 0.6})
    res = {k: {"detected": d, "max_probability": 0.9, "map_max_abs": m} for k, d, m in
           (("a_white_matter", True, 3.0), ("b_background", False, 1.0), ("c_background_with_3mm", True, 2.0))}
    _write(tmp_path / "synthetic_lesion" / "synthetic_lesion_summary.json",
           {"results": res, "paper_expectation_met": {"a_segmented": True, "b_not_segmented": True, "c_not_segmented": False, "c_higher_peak_than_b": True}})
    med = {g: {"n": 3, "median": v} for g, v in (("TN", 0.5), ("FN", 1.2), ("FP", 1.6), ("TP", 2.0))}
    _write(tmp_path / "peaks" / "peaks_summary.json", {"medians_positive_peak": med, "mannwhitney_positive_peak": {"TN vs TP": {"U": 1.0, "p": 0.01}},
                                                         "paper_medians_positive_peak": {"TN": 0.465, "FN": 1.202, "FP": 1.630, "TP": 1.997}})
    with open(tmp_path / "peaks" / "peaks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["group", "flair_inside_positive", "flair_inside_negative", "flair_ring_positive", "flair_ring_negative",
                                          "mprage_inside_positive", "mprage_inside_negative", "mprage_ring_positive", "mprage_ring_negative"])
        w.writeheader()
        w.writerow({"group": "TP", "flair_inside_positive": 2.0, "flair_inside_negative": -0.1, "flair_ring_positive": 0.1, "flair_ring_negative": -0.5,
                    "mprage_inside_positive": 0.1, "mprage_inside_negative": -0.4, "mprage_ring_positive": 0.3, "mprage_ring_negative": -0.1})
    status = {"context": {"command": "msis context --out context", "exit_code": 0, "seconds": 1.0}}
    text = write_reproduction_report(tmp_path, status, tmp_path / "REPORT.md").read_text()
    line = lambda start: next(l for l in text.splitlines() if l.startswith("| " + start))  # noqa: E731
    assert line("All TP lesions").endswith("**yes** |")
    assert line("The lesion score plateaus").endswith("**no** |")  # 30 mm is outside the paper's range
    assert line("Healthy white matter").endswith("**yes** |")
    assert line("(c) with 3 mm").endswith("**no** |")
    assert line("Median positive FLAIR peak").endswith("**yes** |")
    assert line("Every pair").endswith("**no** |")  # p = 0.01 is not < 0.001
    assert line("FLAIR: positive inside").endswith("**yes** |") and line("MPRAGE: the opposite").endswith("**yes** |")
    assert "msis context --out context" in text


def test_a_failed_report_keeps_the_earlier_one(tmp_path):
    status = {"context": {"command": "msis context --out context", "exit_code": 0, "seconds": 1.0}}
    path = write_reproduction_report(tmp_path, status, tmp_path / "REPORT.md")
    many = {f"run{i}": {"command": f"msis context --out run{i}", "exit_code": 0, "seconds": 1.0} for i in range(100)}
    assert_failed_rewrite_keeps_the_file(path, lambda: write_reproduction_report(tmp_path, many, path), n_bytes=path.stat().st_size + 100)
    assert "run99" not in path.read_text() and "msis context --out context" in path.read_text()
