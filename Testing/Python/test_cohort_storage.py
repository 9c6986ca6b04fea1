"""`msis cohort` storage: nothing lost, nothing silently wrong (issue 24, round 2, items 2, 3, 4 and 7).

A full disk (a file-size limit) never leaves a truncated map or an unnamed Parquet failure; a user's file
under an output's name is never replaced; case ids whose folders would be one (case, Unicode
normalisation) or too long are refused in the manifest; a case whose result was an error is done again
once its input is fixed, and a start that failed pins no settings.

Small and fast: one 2 mm phantom, the bundled demo model without TP probability, one dask worker shared
by every run of this file (its files may not exceed WORKER_FILE_LIMIT bytes: a full disk for the maps).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib import cohort
from MSInstanceSaliencyLib.errors import InputError

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

from test_cohort import _write_manifest  # noqa: E402
from test_outputs import _file_size_limit, assert_one_line_error, complete_image, msis, msis_here  # noqa: E402

WORKER_FILE_LIMIT = 200_000  # bytes; a map of the 2 mm phantom is about 950 kB, nothing else a worker writes is large
SEGMENT_ONLY = ["--no-tp-probability", "--min-volume", "40"]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory, small_phantom):
    """The phantom as case a, and a manifest of it."""
    d = tmp_path_factory.mktemp("cohort_storage")
    small_phantom.save(d / "a")
    _write_manifest(d / "a.csv", [["a", "a/flair.nii.gz", "a/mprage.nii.gz"]], header="case_id,flair,mprage")
    return d


@pytest.fixture(scope="module")
def small_disk_cluster():
    """One dask worker process, as `msis cohort` starts them, started under a file-size limit it keeps (the
    limit of this process is restored at once: the client writes as usual)."""
    from distributed import LocalCluster

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (WORKER_FILE_LIMIT, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        lc = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, silence_logs=logging.ERROR, dashboard_address=None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    yield lc
    lc.close()


def cohort_run(manifest, out, cluster, *extra):
    return msis_here("cohort", manifest, "--out", out, "--scheduler", cluster.scheduler_address, *SEGMENT_ONLY, *extra)


def case_rows(out) -> pd.DataFrame:
    return pd.read_parquet(Path(out) / "cases.parquet")


# ----------------------------------------------------------------------------- item 2: a full disk

def test_maps_on_a_full_disk_are_not_recorded_as_done(case_dir, small_disk_cluster):
    """The worker's map writes fail (SimpleITK writes the first 200 kB and returns): no map is put in place
    and no row says the lesion or the case is done (a re-run does them again); the file is named."""
    out = case_dir / "out_full_disk"
    res = cohort_run(case_dir / "a.csv", out, small_disk_cluster, "--maps", "--samples", "2", "--max-omega-voxels", "4")
    assert res.returncode == 1, res.stderr
    assert "maps/a/lesion" in res.stderr and "the disk may be full" in res.stderr and "Traceback" not in res.stderr
    assert case_rows(out).empty and pd.read_parquet(out / "lesions.parquet").empty
    assert [p.name for p in (out / "maps" / "a").iterdir() if not complete_image(p)] == []  # no truncated map, none hidden either


@pytest.mark.parametrize("limit, table", [(3000, "lesions.parquet"), (5000, "lesions.parquet")])
def test_a_parquet_write_on_a_full_disk_is_one_line_naming_the_file(case_dir, small_disk_cluster, tmp_path, limit, table):
    """The client's writes: 3000 bytes stop the empty part made with the table, 5000 the first rows (7.5 kB)."""
    out = tmp_path / "out"
    res = msis("cohort", case_dir / "a.csv", "--out", out, "--scheduler", small_disk_cluster.scheduler_address, *SEGMENT_ONLY,
               preexec_fn=_file_size_limit(limit))
    line = assert_one_line_error(res, f"{out / table}{os.sep}part-", "File too large", "disk")
    assert "internal error" not in res.stderr
    assert not [p.name for p in out.rglob("*") if p.name.startswith(".part-")]  # no temporary file left
    assert not (out / "cases.parquet").exists() or case_rows(out).empty, line


# ----------------------------------------------------------------------------- item 3: user files

@pytest.mark.parametrize("user_file", ["summary.csv", "maps/a/lesion1_smoothgrad_flair.nii.gz", "lesions.parquet/notes.txt"])
def test_a_user_file_in_a_new_out_is_refused_before_any_work(case_dir, small_disk_cluster, tmp_path, user_file):
    out = tmp_path / "out"
    (out / user_file).parent.mkdir(parents=True)
    (out / user_file).write_text("notes")
    res = cohort_run(case_dir / "a.csv", out, small_disk_cluster)
    assert_one_line_error(res, str(out), user_file.split("/")[0], "no cohort.json")
    assert (out / user_file).read_text() == "notes"
    assert sorted(p.name for p in out.iterdir() if p.name != ".cohort.lock") == [user_file.split("/")[0]]


def test_a_user_file_in_a_cohort_folder_is_never_replaced(case_dir, small_disk_cluster, tmp_path):
    """A re-run replaces the summary.csv it wrote, but not the user's notes put under that name."""
    out = tmp_path / "out"
    assert cohort_run(case_dir / "a.csv", out, small_disk_cluster).returncode == 0
    assert (out / "summary.csv").read_text().startswith("case_id,lesions,")
    assert cohort_run(case_dir / "a.csv", out, small_disk_cluster).returncode == 0  # its own summary: replaced
    (out / "summary.csv").write_text("notes\n")
    res = cohort_run(case_dir / "a.csv", out, small_disk_cluster)
    assert_one_line_error(res, str(out / "summary.csv"), "not written by msis")
    assert (out / "summary.csv").read_text() == "notes\n"


def test_a_map_replaces_only_a_map_msis_wrote(case_dir, tmp_path):
    """_write_map (the workers' writer): an earlier map of msis (a killed run's) is replaced, a user's file under
    a map's name is not, and the check before the work names it; a map is always complete."""
    ref = sitk.ReadImage(str(case_dir / "a" / "flair.nii.gz"))
    zeros = np.zeros(ref.GetSize(), np.float32)
    rel = cohort._write_map(str(tmp_path), "a", 1, "flair", zeros, ref)
    ones = zeros + 1
    assert cohort._write_map(str(tmp_path), "a", 1, "flair", ones, ref) == rel  # its own: replaced
    assert complete_image(tmp_path / rel) and sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / rel))).min() == 1
    mine = tmp_path / "maps" / "a" / "lesion2_smoothgrad_flair.nii.gz"
    sitk.WriteImage(ref, str(mine))  # an image of the user's
    before = mine.read_bytes()
    with pytest.raises(OSError, match="lesion2_smoothgrad_flair.nii.gz already exists and was not written by msis"):
        cohort._write_map(str(tmp_path), "a", 2, "flair", ones, ref)
    case = cohort.read_manifest(case_dir / "a.csv")
    with pytest.raises(InputError, match=r"lesion2_smoothgrad_flair.nii.gz already exists and was not written by msis; move it"):
        cohort._check_map_files(tmp_path, case, ["flair", "mprage"])
    assert mine.read_bytes() == before and not list((tmp_path / "maps" / "a").glob(".*"))


# ----------------------------------------------------------------------------- item 4: case ids

@pytest.mark.parametrize("first, second", [("c1", "C1"), (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")),
                                           ("Straße", "STRASSE")])
def test_case_ids_whose_folders_would_be_one_are_refused(case_dir, first, second):
    rows = [[cid, "a/flair.nii.gz", "a/mprage.nii.gz"] for cid in ("ok", first, second)]
    m = _write_manifest(case_dir / "collide.csv", rows, header="case_id,flair,mprage")
    with pytest.raises(InputError) as e:
        cohort.read_manifest(m)
    msg = str(e.value)
    assert "1 problem," in msg and f"line 4: case_id {second!r} differs from {first!r} on line 3 only by upper/lower case" in msg
    assert "\n" not in msg


def test_case_ids_longer_than_a_folder_name_are_refused(case_dir):
    rows = [["x" * 255, "a/flair.nii.gz", "a/mprage.nii.gz"],  # 255 bytes: fits
            ["y" * 256, "a/flair.nii.gz", "a/mprage.nii.gz"],
            ["é" * 128, "a/flair.nii.gz", "a/mprage.nii.gz"]]  # 128 characters, 256 bytes
    m = _write_manifest(case_dir / "long.csv", rows, header="case_id,flair,mprage")
    with pytest.raises(InputError) as e:
        cohort.read_manifest(m)
    msg = str(e.value)
    assert "2 problems" in msg and "line 3: case_id" in msg and "line 4: case_id" in msg and "line 2" not in msg
    assert "256 bytes long, more than the 255" in msg


def test_map_paths_longer_than_the_system_allows_are_refused(case_dir, tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    cases = cohort.read_manifest(_write_manifest(case_dir / "deep.csv", [["z" * 250, "a/flair.nii.gz", "a/mprage.nii.gz"]],
                                                 header="case_id,flair,mprage"))
    cohort._check_map_files(deep, cases, ["flair"])  # fits
    deeper = deep
    while len(os.fsencode(str(deeper))) < 4096:
        deeper = deeper / ("f" * 200)
    with pytest.raises(InputError, match=r"the paths of the maps of case on line 2 would be longer than the \d+ bytes"):
        cohort._check_map_files(deeper, cases, ["flair"])


# ----------------------------------------------------------------------------- item 7: retries

def test_a_case_whose_result_was_an_error_is_done_again_with_its_fixed_input(case_dir, small_disk_cluster, tmp_path):
    """t: a truncated FLAIR; g: a ground truth on another grid; both are error rows. Once the files are fixed,
    the re-run does them again and each has one row; a finished case whose input changes stays refused."""
    a = tmp_path / "a"
    shutil.copytree(case_dir / "a", a)  # its own copy: its FLAIR is touched at the end
    for cid in ("t", "g"):
        (tmp_path / cid).mkdir()
        for name in ("flair", "mprage", "lesions"):
            os.link(a / f"{name}.nii.gz", tmp_path / cid / f"{name}.nii.gz")
    (tmp_path / "t" / "flair.nii.gz").unlink()
    data = (a / "flair.nii.gz").read_bytes()
    (tmp_path / "t" / "flair.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "g" / "lesions.nii.gz").unlink()
    sitk.WriteImage(sitk.ReadImage(str(a / "lesions.nii.gz"))[:-2, :, :], str(tmp_path / "g" / "lesions.nii.gz"))
    m = _write_manifest(tmp_path / "m.csv", [[c, f"{c}/flair.nii.gz", f"{c}/mprage.nii.gz", f"{c}/lesions.nii.gz"] for c in "atg"])
    out = tmp_path / "out"
    assert cohort_run(m, out, small_disk_cluster).returncode == 0
    first = case_rows(out).set_index("case_id")
    assert first.loc["t", "error"] and first.loc["g", "error"] and pd.isna(first.loc["a", "error"])
    for cid, name in (("t", "flair"), ("g", "lesions")):  # the fixed files
        (tmp_path / cid / f"{name}.nii.gz").unlink()
        os.link(a / f"{name}.nii.gz", tmp_path / cid / f"{name}.nii.gz")
    res = cohort_run(m, out, small_disk_cluster)
    assert res.returncode == 0, res.stderr
    assert "2 of 3 cases to do (1 finished earlier, skipped)" in res.stderr
    rows = case_rows(out)
    assert sorted(rows["case_id"]) == ["a", "g", "t"] and rows["error"].isna().all()
    les = pd.read_parquet(out / "lesions.parquet")
    assert set(les["case_key"]) == set(rows["key"]) and not les["key"].duplicated().any()
    assert list(pd.read_csv(out / "summary.csv")["case_id"]) == ["a", "t", "g"]
    os.utime(a / "flair.nii.gz", ns=(0, 0))  # a's FLAIR (linked into t and g) is another file now: finished cases are pinned
    assert_one_line_error(cohort_run(m, out, small_disk_cluster), "the input files of cases a, t, g", "changed")


def test_a_start_that_failed_pins_no_settings(case_dir, small_disk_cluster, tmp_path):
    """A run that failed before its cluster was up (here: --device cuda without a GPU) leaves no cohort.json,
    so a run with other settings may use the folder."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("--device cuda does not fail here")
    out = tmp_path / "out"
    res = msis_here("cohort", case_dir / "a.csv", "--out", out, "--device", "cuda", *SEGMENT_ONLY)
    assert_one_line_error(res, "no CUDA GPU")
    assert not (out / "cohort.json").exists()
    res = cohort_run(case_dir / "a.csv", out, small_disk_cluster, "--min-volume", "30")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "cohort.json").read_text())["settings"]["min_volume_mm3"] == 30.0
