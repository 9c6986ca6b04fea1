"""The paper's experiments over a manifest (`--manifest CSV`, cohort.experiments): every case a dask task, the
statistics the whole set's; equal to one in-process run over the same cases; a re-run does only the cases
without a row; bad manifests refused in seconds, nothing started.

Small and fast: three 2 mm validation phantoms (patients 17-19) with the bundled demo model, on a real
LocalCluster of 2 workers reached with --scheduler; SmoothGrad N = 1 over at most 2 voxels of each region.
Case p19's manifest row has no white-matter map: the sanity checks derive it (MNI template) on the worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import msis_in_process as msis

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

PATIENTS = (17, 18, 19)
PEAKS_ARGS = ["--samples", "1", "--max-per-group", "1", "--tn-spheres", "2", "--max-omega-voxels", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The three phantom cases as files and a manifest (wm given for p17 and p18, not for p19)."""
    from MSInstanceSaliencyLib.io.volumes import write_image
    from MSInstanceSaliencyLib.research.phantom import make_phantom
    from MSInstanceSaliencyLib.research.training import validation_seed

    d = tmp_path_factory.mktemp("experiment_cohort")
    lines = ["case_id,flair,mprage,gt,wm"]
    for pt in PATIENTS:
        ph = make_phantom(validation_seed(pt), patient=pt, voxel_size=2.0)
        files = ph.save(d / f"p{pt}")
        wm = write_image(ph.white_matter, d / f"p{pt}" / "wm.nii.gz") if pt != 19 else ""
        lines.append(",".join(str(x) for x in (f"p{pt}", files["flair"], files["mprage"], files["lesions"], wm)))
    (d / "manifest.csv").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def cluster():
    from MSInstanceSaliencyLib import cohort

    client, lc = cohort._start_client(None, 2)
    yield lc
    cohort._close(client, lc)


def _in_process_cases(d: Path):
    """The manifest's cases segmented here, named by their case ids, as one in-process run over them sees them."""
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.research.experiments import read_case_files, segment_case_files

    model = load_model(None, device="cpu")
    out = []
    for pt in PATIENTS:
        f = read_case_files(*(d / f"p{pt}" / n for n in ("flair.nii.gz", "mprage.nii.gz", "lesions.nii.gz")))
        f.name = f"p{pt}"
        out.append(segment_case_files(model, f, device="cpu"))
    return model, out


def test_peaks_over_a_manifest_equal_one_run_over_its_cases_and_resume(cases, cluster, tmp_path):
    """The whole set's peaks (TN spheres of the set's mean GT lesion volume) equal run_peaks over the same cases in
    this process; with one case's row gone (as after a kill), a re-run does that case only and gives the same outputs."""
    from MSInstanceSaliencyLib.research.experiments import run_peaks

    out = tmp_path / "peaks"
    r = msis("stats", "peaks", "--manifest", cases / "manifest.csv", "--out", out, "--scheduler", cluster.scheduler_address, *PEAKS_ARGS)
    assert r.returncode == 0, r.stderr
    assert "3 cases (0 finished earlier), 0 without a result" in r.stdout
    rows = pd.read_csv(out / "peaks.csv")
    summary = json.loads((out / "peaks_summary.json").read_text())
    assert summary["cases"] == ["p17", "p18", "p19"] and set(rows["case"]) == {"p17", "p18", "p19"}
    assert (rows.groupby("case")["group"].apply(lambda g: (g == "TN").sum()) == 2).all()
    for name in ("peaks_violin.png", "modality_contribution.png", "msis_run.json", "cohort.json"):
        assert (out / name).is_file()

    model, here = _in_process_cases(cases)
    ref_rows, ref = run_peaks(model, here, n_samples=1, max_per_group=1, tn_per_case=2, max_omega_voxels=2, device="cpu")
    ref_rows = pd.DataFrame(ref_rows)
    assert summary["tn_volume_mm3"] == pytest.approx(ref["tn_volume_mm3"])
    key = ["case", "group", "region_id"]
    a, b = rows.sort_values(key).reset_index(drop=True), ref_rows.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["voxels"]], b[key + ["voxels"]], check_dtype=False)
    np.testing.assert_allclose(a.drop(columns=key).to_numpy(float), b.drop(columns=key).to_numpy(float), rtol=1e-4, atol=1e-6)
    for g in ("TN", "FN", "FP", "TP"):
        assert summary["medians_positive_peak"][g]["n"] == ref["medians_positive_peak"][g]["n"]
    assert set(summary["mannwhitney_positive_peak"]) == set(ref["mannwhitney_positive_peak"])

    # resume: remove p18's row (one part file per finished case), run again
    parts = sorted((out / "cases.parquet").glob("part-*.parquet"))
    p18 = [p for p in parts if "p18" in set(pd.read_parquet(p)["case_id"])]
    assert len(p18) == 1
    p18[0].unlink()
    r = msis("stats", "peaks", "--manifest", cases / "manifest.csv", "--out", out, "--scheduler", cluster.scheduler_address, *PEAKS_ARGS)
    assert r.returncode == 0, r.stderr
    assert "1 of 3 cases to do (2 finished earlier, skipped)" in r.stderr
    again = pd.read_csv(out / "peaks.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, a)
    # other settings in the same folder: refused, naming the difference
    r = msis("stats", "peaks", "--manifest", cases / "manifest.csv", "--out", out, "--scheduler", cluster.scheduler_address, *PEAKS_ARGS,
             "--tn-volume", "50")
    assert r.returncode == 2 and "other settings" in r.stderr and "params" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def demo_on_its_own_grid(tmp_path_factory):
    """The bundled demo model as a model.json whose network runs on a 2.5 mm ASL grid (target_spacing, orientation):
    every region goes to that grid and back; the model still segments the phantoms' lesions there."""
    import shutil

    from MSInstanceSaliencyLib.models.loading import default_model_dir

    d = tmp_path_factory.mktemp("demo_asl") / "model"
    shutil.copytree(default_model_dir(), d)
    spec = json.loads((d / "model.json").read_text())
    spec.update(target_spacing=[2.5, 2.5, 2.5], orientation="ASL")
    (d / "model.json").write_text(json.dumps(spec))
    return d


def test_sanity_checks_and_context_over_a_manifest(cases, cluster, demo_on_its_own_grid, tmp_path):
    """Both sanity checks and the context experiment over the three cases, with the demo model on its own 2.5 mm ASL
    grid: a row per case, the set's summary and figure, each case's own figure, and for p19 (no wm column value) the
    white matter derived on the worker and written."""
    from MSInstanceSaliencyLib.research.anatomy import FILES

    common = ["--manifest", cases / "manifest.csv", "--scheduler", cluster.scheduler_address, "--device", "cpu",
              "--model", demo_on_its_own_grid]
    out = tmp_path / "cr"
    r = msis("sanity", "control-regions", "--out", out, "--samples", "1", "--max-voxels", "8", "--max-omega-voxels", "2", *common)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "control_regions_summary.json").read_text())
    assert s["n_cases"] == 3 and [c["case"] for c in s["cases"]] == ["p17", "p18", "p19"] and not s["cases_failed"]
    assert s["medians"]["tp_over_wm_peak_ratio"]["n"] == 3
    assert len(pd.read_csv(out / "control_regions.csv")) == 3 * 3 * 2  # 3 regions, 2 channels, 3 cases
    assert (out / "control_regions.png").is_file()
    assert all((out / "cases" / f"p{pt}" / "control_regions.png").is_file() for pt in PATIENTS)
    derived = out / "cases" / "p19" / FILES["white_matter"]
    assert derived.is_file() and not (out / "cases" / "p17" / FILES["white_matter"]).exists()
    assert sitk.ReadImage(str(derived)).GetSize() == sitk.ReadImage(str(cases / "p19" / "mprage.nii.gz")).GetSize()

    out = tmp_path / "syn"
    r = msis("sanity", "synthetic-lesion", "--out", out, "--samples", "1", "--max-voxels", "40", "--max-omega-voxels", "2", *common)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "synthetic_lesion_summary.json").read_text())
    assert s["n_cases"] + len(s["cases_failed"]) == 3 and s["n_cases"] >= 2, s["cases_failed"]
    assert set(s["expectation_met_in_cases"]) == {"a_segmented", "b_not_segmented", "c_not_segmented", "c_higher_peak_than_b"}
    assert "paper's expectations, cases where they hold" in r.stdout

    out = tmp_path / "ctx"
    r = msis("context", "--out", out, "--size-range", "12", "25", "--steps", "2", *common)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "context_summary.json").read_text())
    rows = pd.read_csv(out / "context_raw.csv")
    assert s["n_lesions"] == rows.groupby(["case", "lesion_id"]).ngroups >= 2 and len(rows) == 3 * s["n_lesions"]
    assert rows["case"].nunique() >= 2 and (out / "context.png").is_file()


def test_bad_manifests_are_refused_before_any_work(cases, tmp_path):
    """No gt, a wm on another grid, files beside --manifest: one line each, in seconds, nothing written."""
    m = tmp_path / "no_gt.csv"
    m.write_text("case_id,flair,mprage\n" + f"a,{cases}/p17/flair.nii.gz,{cases}/p17/mprage.nii.gz\n")
    r = msis("stats", "peaks", "--manifest", m, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "gt cell is empty or missing on line 2" in r.stderr, r.stderr
    small = tmp_path / "wm_small.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(cases / "p17" / "wm.nii.gz"))[:-2, :, :], str(small))
    m = tmp_path / "bad_wm.csv"
    m.write_text("case_id,flair,mprage,gt,wm\n" + "".join(f"{c},{cases}/p17/flair.nii.gz,{cases}/p17/mprage.nii.gz,{cases}/p17/lesions.nii.gz,{w}\n"
                                                         for c, w in (("a", cases / "p17" / "wm.nii.gz"), ("b", small))))
    r = msis("sanity", "control-regions", "--manifest", m, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "line 3 (b)" in r.stderr and "white-matter map" in r.stderr and "line 2" not in r.stderr, r.stderr
    r = msis("sanity", "control-regions", "--manifest", m, "--flair", cases / "p17" / "flair.nii.gz", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "leave out --flair" in r.stderr
    r = msis("context", "--workers", "2", "--out", tmp_path / "o4")
    assert r.returncode == 2 and "--workers goes with --manifest" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_peaks_over_a_manifest_with_a_model_on_its_own_grid(cases, cluster, tmp_path):
    """A model.json model whose network runs on a 3 mm ASL grid (random, segmenting nothing), loaded by the workers: every
    case's regions and peaks on the reference grid (the ground truth's lesions keep their voxel counts there)."""
    import torch
    from conftest import tiny_spec

    from MSInstanceSaliencyLib.models.monai import build_network, save_model
    from MSInstanceSaliencyLib.research.experiments import gt_lesion_volumes

    torch.manual_seed(0)
    spec = tiny_spec(target_spacing=[3.0, 3.0, 3.0], orientation="ASL")
    net = build_network(spec)
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():  # background everywhere: every ground-truth lesion is an FN, and the TN spheres have room
        last.bias.copy_(torch.tensor([8.0, -8.0]))
    save_model(net, spec, tmp_path / "model")
    out = tmp_path / "peaks"
    r = msis("stats", "peaks", "--manifest", cases / "manifest.csv", "--model", tmp_path / "model", "--out", out,
             "--scheduler", cluster.scheduler_address, *PEAKS_ARGS)
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(out / "peaks.csv")
    assert set(rows["case"]) == {"p17", "p18", "p19"} and np.isfinite(rows.filter(like="flair_").to_numpy()).all()
    for case, mine in rows.groupby("case"):
        gt_voxels = {round(v / 8.0) for v in gt_lesion_volumes(sitk.GetArrayFromImage(sitk.ReadImage(str(cases / case / "lesions.nii.gz"))),
                                                                (2.0, 2.0, 2.0))}
        assert sorted(mine["group"]) == ["FN", "TN", "TN"], r.stderr
        assert set(mine.loc[mine["group"] == "FN", "voxels"]) <= gt_voxels
