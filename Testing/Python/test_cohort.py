"""`msis cohort`: manifest validation, a run on a real dask LocalCluster of 2 workers with Parquet
results, a re-run that skips everything, kill -9 and resume, and a lesion split across dask tasks.

Small and fast: 2 mm phantoms, the bundled demo model, a copy of its TP classifier whose maps are
SmoothGrad N=2 over at most 8 voxels of each lesion (instead of N=10 over 256), --min-volume 40, and
lesions above 7 voxels of Ω split in 2 parts (the 7-voxel lesion of case b is not: both kinds are run).
The killed run starts 1 worker (each worker process imports torch and loads the model): the kill takes
its whole process group all the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib import cohort
from MSInstanceSaliencyLib.cli import main
from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.research.phantom import make_phantom

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

ROOT = Path(__file__).resolve().parents[2]
# the same cohort, the same settings, in every run of this file
RUN_ARGS = ["--min-volume", "40", "--features", "--split-above", "7"]


def _write_manifest(path: Path, rows, header="case_id,flair,mprage,gt"):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory, small_phantom):
    """Three cases: two phantoms (2 and 8 lesions kept with --min-volume 40) and one whose ground truth
    is on another grid (the case fails; its row says why), a manifest and the N=2 classifier."""
    from MSInstanceSaliencyLib.classifier.radiomics import TPClassifier, default_classifier_path

    d = tmp_path_factory.mktemp("cohort")
    small_phantom.save(d / "a")
    make_phantom(12, patient=2, voxel_size=2.0).save(d / "b")
    (d / "c").mkdir()
    for name in ("flair", "mprage"):
        os.link(d / "a" / f"{name}.nii.gz", d / "c" / f"{name}.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(d / "a" / "lesions.nii.gz"))[:-2, :, :], str(d / "c" / "lesions.nii.gz"))
    _write_manifest(d / "manifest.csv", [[c, f"{c}/flair.nii.gz", f"{c}/mprage.nii.gz", f"{c}/lesions.nii.gz"] for c in "abc"])
    clf = TPClassifier.load(default_classifier_path())
    clf.saliency.update(n_samples=2, max_omega_voxels=8)
    clf.save(d / "clf.json")
    return d


@pytest.fixture(scope="module")
def cluster(cohort_dir):
    """A LocalCluster of 2 worker processes (1 thread each), as `msis cohort` starts one; runs reach it with --scheduler."""
    client, lc = cohort._start_client(None, 2)
    yield lc
    cohort._close(client, lc)


def _run(cohort_dir, out, *extra):
    return main(["cohort", str(cohort_dir / "manifest.csv"), "--out", str(out), "--classifier", str(cohort_dir / "clf.json"),
                 *RUN_ARGS, *extra])


def _rows(out, table="lesions"):
    df = pd.read_parquet(Path(out) / f"{table}.parquet")
    return df.drop(columns=[c for c in cohort.TIMING_COLUMNS if c in df]).sort_values("key").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference_run(cohort_dir, cluster):
    """An uninterrupted run on the 2-worker cluster."""
    out = cohort_dir / "out_reference"
    t0 = time.time()
    assert _run(cohort_dir, out, "--scheduler", cluster.scheduler_address) == 0
    return out, time.time() - t0


# ----------------------------------------------------------------------------- manifest

def test_manifest_problems_are_listed_with_line_numbers(tmp_path, phantom_files):
    flair, mprage = phantom_files["flair"], phantom_files["mprage"]
    (tmp_path / "broken.nii.gz").write_text("not an image")
    m = _write_manifest(tmp_path / "m.csv", [
        ["p1", str(flair), str(mprage), ""],          # line 2: fine
        ["p1", str(flair), str(mprage), ""],          # line 3: duplicate id
        ["", str(flair), str(mprage), ""],            # line 4: empty id
        ["p4", "missing.nii.gz", str(mprage), ""],    # line 5: file not found (relative to the manifest)
        ["p5", str(flair), "broken.nii.gz", ""],      # line 6: not an image
        ["p6", str(flair)],                           # line 7: too few fields
        ["../p7", str(flair), str(mprage), ""],       # line 8: not a folder name
    ])
    with pytest.raises(InputError) as e:
        cohort.read_manifest(m)
    msg = str(e.value)
    assert "6 problems" in msg
    for fragment in ("line 3: case_id 'p1' is already on line 2", "line 4: empty case_id", "line 5: flair file not found",
                     "missing.nii.gz", "line 6: mprage not a readable image", "line 7: 2 fields, the header has 4", "line 8: case_id '../p7'"):
        assert fragment in msg, msg
    assert "line 2" not in msg.replace("already on line 2", "")


def test_manifest_columns_are_checked(tmp_path, phantom_files):
    m = _write_manifest(tmp_path / "m.csv", [["p1", str(phantom_files["flair"]), "x"]], header="case_id,flair,t1")
    with pytest.raises(InputError, match=r"line 1: missing column mprage; line 1: unknown column 't1'"):
        cohort.read_manifest(m)
    ok = cohort.read_manifest(_write_manifest(tmp_path / "ok.csv", [["p1", str(phantom_files["flair"]), str(phantom_files["mprage"])]],
                                              header="case_id,flair,mprage"))
    assert [(c.case_id, c.gt, c.line) for c in ok] == [("p1", None, 2)]


def test_bad_manifest_is_refused_before_any_work(tmp_path, phantom_files, capsys):
    m = _write_manifest(tmp_path / "m.csv", [["p1", str(phantom_files["flair"]), "nope.nii.gz", ""]])
    out = tmp_path / "out"
    assert main(["cohort", str(m), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msis: error:") and "line 2: mprage file not found" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- runs

def test_run_writes_one_row_per_lesion(reference_run, cohort_dir):
    out, _ = reference_run
    les, cases = pd.read_parquet(out / "lesions.parquet"), pd.read_parquet(out / "cases.parquet")
    assert sorted(cases["case_id"]) == ["a", "b", "c"]
    by_case = cases.set_index("case_id")
    assert "not on the MPRAGE grid" in by_case.loc["c", "error"]  # a failing case is a row, not a failed run
    assert by_case["error"].isna().sum() == 2
    assert not les["key"].duplicated().any() and not les[["case_id", "lesion_id"]].duplicated().any()
    for cid in ("a", "b"):
        mine = les[les["case_id"] == cid]
        assert len(mine) == by_case.loc[cid, "n_lesions"] > 0
        assert sorted(mine["lesion_id"]) == list(range(1, len(mine) + 1))
    assert les["error"].isna().all()
    assert les["tp_probability"].between(0, 1).all()
    assert les["original_firstorder_Maximum"].notna().all() and set(les["kind"]) <= {"TP", "FP"}
    assert (les["omega_work"] == np.minimum(les["omega_voxels"], 8)).all()
    assert (les["parts"] == np.where(les["omega_work"] > 7, 2, 1)).all() and set(les["parts"]) == {1, 2}  # some were split, some not
    assert (les["flair_max"] >= les["flair_min"]).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["case_id"]) == ["a", "b", "c"] and summary["lesions"].iloc[:2].tolist() == by_case.loc[["a", "b"], "n_lesions"].tolist()
    settings = json.loads((out / "cohort.json").read_text())["settings"]
    assert settings["saliency"]["n_samples"] == 2 and settings["model_sha256"]


def test_rerun_skips_everything(reference_run, cohort_dir, capsys):
    out, _ = reference_run
    before = sorted(p.name for p in (out / "lesions.parquet").iterdir())
    t0 = time.time()
    assert _run(cohort_dir, out) == 0  # no cluster is started: there is nothing to do
    assert time.time() - t0 < 15
    assert "nothing to do" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "lesions.parquet").iterdir()) == before
    assert not _rows(out)["key"].duplicated().any()


def test_other_settings_are_refused(reference_run, cohort_dir, capsys):
    out, _ = reference_run
    assert main(["cohort", str(cohort_dir / "manifest.csv"), "--out", str(out), "--classifier", str(cohort_dir / "clf.json"),
                 "--min-volume", "30", "--features"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "min_volume_mm3 40.0" in err and "30.0 (now)" in err


def test_kill_9_then_resume_loses_and_duplicates_nothing(reference_run, cohort_dir, cluster):
    """The run is killed (SIGKILL, the whole process group: client, scheduler, workers) once its first
    lesion rows are on disk; the resumed run must give the rows of the uninterrupted one."""
    ref, _ = reference_run
    out = cohort_dir / "out_killed"
    cmd = [sys.executable, "-m", "MSInstanceSaliencyLib", "cohort", str(cohort_dir / "manifest.csv"), "--out", str(out),
           "--classifier", str(cohort_dir / "clf.json"), "--workers", "1", *RUN_ARGS]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(cohort_dir / "killed_run.log", "w+b")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            parts = list((out / "lesions.parquet").glob("part-*.parquet")) if (out / "lesions.parquet").exists() else []
            if len(parts) >= 2:  # the empty part made with the folder, and the first batch of rows
                killed_at = len(parts)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    log.seek(0)
    assert killed_at is not None, f"the run ended before it could be killed: {log.read().decode()[-2000:]}"
    log.close()
    partial = pd.read_parquet(out / "lesions.parquet")
    assert 0 < len(partial) < len(pd.read_parquet(ref / "lesions.parquet"))  # killed in the middle
    # resumed in this process on the module's cluster: which workers finish the run does not matter here, and
    # the killed run has already shown that the command starts its own
    assert _run(cohort_dir, out, "--scheduler", cluster.scheduler_address) == 0
    for table in ("lesions", "cases"):
        got, want = _rows(out, table), _rows(ref, table)
        assert not got["key"].duplicated().any()
        assert list(got["key"]) == list(want["key"])
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-30)


def test_split_lesion_equals_one_worker_map(cluster, small_phantom):
    """Parts of Ω computed by separate dask tasks and combined give the one-worker SmoothGrad map."""
    from distributed import Client

    from MSInstanceSaliencyLib.saliency import smoothgrad as saliency
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.segmentation.pipeline import segment

    model = load_model(None, device="cpu")
    res = segment(small_phantom.flair, small_phantom.mprage, model, device="cpu", min_volume_mm3=40)
    lesion = max(res.table, key=lambda r: r["voxels"])  # 25 voxels
    omega = res.prepared.to_network(res.labels == lesion["lesion_id"])
    kw = dict(n_samples=2, sigma=0.05, sigma_mode="range", context="patch", seed=3, max_omega_voxels=None)
    model_cfg = {"path": None, "device": "cpu"}

    def part(image, om, k):
        from distributed import get_worker

        m, dev = cohort.worker_model(model_cfg)
        return saliency.smoothgrad_part(m, image, om, part=k, n_parts=3, device=dev, **kw), get_worker().address

    def whole(image, om):
        m, dev = cohort.worker_model(model_cfg)
        return saliency.smoothgrad(m, image, om, aggregation="max", device=dev, **kw)

    with Client(cluster.scheduler_address, timeout="30s") as client:
        image, om = client.scatter([res.prepared.image, omega], broadcast=True)
        workers = sorted(client.scheduler_info()["workers"])
        parts = [client.submit(part, image, om, k, workers=[workers[k % 2]], allow_other_workers=False, pure=False) for k in range(3)]
        one = client.submit(whole, image, om, workers=[workers[0]], allow_other_workers=False, pure=False)
        combined = client.submit(lambda ps: saliency.combine_parts([p for p, _ in reversed(ps)]), parts).result()
        ran_on = {w for _, w in client.gather(parts)}
        reference = one.result()
    assert len(ran_on) == 2  # the parts ran on both workers
    assert combined.shape == reference.shape and np.abs(reference).max() > 0
    np.testing.assert_allclose(combined, reference, rtol=1e-6, atol=1e-7 * np.abs(reference).max())


def test_maps_without_tp_probability(cohort_dir, cluster, small_phantom):
    """--no-tp-probability --maps: the maps with the given SmoothGrad settings, written whole as NIfTI on the
    case's grid, one row per lesion `segment` finds; a manifest without gt has no kind column."""
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.segmentation.pipeline import segment

    manifest = _write_manifest(cohort_dir / "maps.csv", [["a", "a/flair.nii.gz", "a/mprage.nii.gz"]], header="case_id,flair,mprage")
    out = cohort_dir / "out_maps"
    assert main(["cohort", str(manifest), "--out", str(out), "--no-tp-probability", "--maps", "--samples", "2", "--max-omega-voxels", "4",
                 "--min-volume", "40", "--scheduler", cluster.scheduler_address]) == 0
    les = pd.read_parquet(out / "lesions.parquet")
    expected = segment(small_phantom.flair, small_phantom.mprage, load_model(None, device="cpu"), device="cpu", min_volume_mm3=40).table
    assert sorted(les["voxels"]) == sorted(r["voxels"] for r in expected) and len(expected) > 0
    assert "tp_probability" not in les and "kind" not in les and les["error"].isna().all()
    assert (les["backward_passes"] == 2 * np.minimum(les["voxels"], 4)).all()
    flair = sitk.ReadImage(str(cohort_dir / "a" / "mprage.nii.gz"))
    for path in les["map_flair"].tolist() + les["map_mprage"].tolist():
        img = sitk.ReadImage(str(out / path))
        assert img.GetSize() == flair.GetSize() and np.allclose(img.GetSpacing(), flair.GetSpacing())
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(out / les["map_flair"].iloc[0])))).max() > 0
    assert not list((out / "maps" / "a").glob(".tmp-*"))
    assert json.loads((out / "cohort.json").read_text())["settings"]["saliency"]["max_omega_voxels"] == 4
