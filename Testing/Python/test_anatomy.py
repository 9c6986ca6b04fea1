"""Without --wm the experiments derive a white-matter map, brain and head masks by registering the MNI template
to the MPRAGE: the maps follow the scan's anatomy, the fit's quality is reported, a bad scan is told apart.

Limitation: the phantoms are this same template, smoothly deformed (research/phantom.py), so the agreement here
is higher than on a real scan; what these tests show is that the registration finds the anatomy wherever the
scan puts it and that a scan it cannot fit gives a warning or one line, not a map taken as good."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import Cancelled, InputError
from MSInstanceSaliencyLib.io.outputs import OutputFolder, write_output_file
from MSInstanceSaliencyLib.io.volumes import array_from_image, read_image, same_grid
from MSInstanceSaliencyLib.research.anatomy import FILES, STAGES, derive_anatomy, write_anatomy


def moved(img: sitk.Image, degrees: float, shift_mm) -> sitk.Image:
    """The same voxels with the head tilted about left-right and moved: only the geometry changes."""
    a = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    out = sitk.Image(img)
    out.SetDirection((rot @ np.array(img.GetDirection()).reshape(3, 3)).ravel().tolist())
    out.SetOrigin((rot @ np.array(img.GetOrigin()) + np.asarray(shift_mm, float)).tolist())
    return out


def dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_derived_maps_follow_a_tilted_moved_head_and_are_written(small_phantom, tmp_path):
    ph = small_phantom
    tilt = lambda img: moved(img, 15, (10, -10, 15))  # noqa: E731
    mprage = tilt(ph.mprage)
    calls = []
    anatomy = derive_anatomy(mprage, progress=lambda done, total: calls.append((done, total)))

    # measured (2 mm phantom seed 7): WM 0.88, brain 0.97, head 0.99, correlation 0.82 (0.78 affine only)
    wm = array_from_image(tilt(ph.white_matter)) > 0.5
    brain = array_from_image(tilt(ph.brain_mask)) > 0
    head = (array_from_image(tilt(ph.head)) > 0) | brain
    assert dice(anatomy.white_matter > 0.5, wm) > 0.8
    assert dice(anatomy.brain_mask, brain) > 0.95
    assert dice(anatomy.head_mask, head) > 0.97
    q = anatomy.quality
    assert q["correlation"] > 0.75 and q["brain_in_head"] > 0.99 and q["warning"] is None and anatomy.warning is None
    assert anatomy.white_matter.dtype == np.float32 and 0 <= anatomy.white_matter.min() and anatomy.white_matter.max() <= 1
    assert anatomy.white_matter.shape == anatomy.brain_mask.shape == anatomy.head_mask.shape == mprage.GetSize()
    assert all(same_grid(img, mprage) for img in anatomy.images.values())
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (len(STAGES), len(STAGES))

    # beside the results, through the output folder (staged, checked, listed in msis_run.json)
    out = OutputFolder(tmp_path / "results")
    paths = write_anatomy(anatomy, out)
    manifest = json.loads(out.close().read_text())
    assert set(FILES.values()) <= set(manifest["files"])
    record = json.loads(paths["json"].read_text())
    assert record["quality"]["correlation"] == q["correlation"] and "ICBM152 2009" in record["parameters"]["template"]
    back = read_image(paths["white_matter"])
    assert same_grid(back, mprage) and np.array_equal(array_from_image(back), anatomy.white_matter)
    assert np.array_equal(array_from_image(read_image(paths["head_mask"]), dtype=bool), anatomy.head_mask)

    # into a plain folder: again over its own files, never over a user's file of that name
    plain = tmp_path / "plain"
    write_anatomy(anatomy, plain)
    assert write_anatomy(anatomy, plain)["json"] == plain / FILES["json"]
    mine = tmp_path / "mine"
    write_output_file(mine / FILES["brain_mask"], "--wm", lambda tmp: sitk.WriteImage(anatomy.images["brain_mask"], str(tmp)))
    with pytest.raises(InputError, match="not written by msis"):
        write_anatomy(anatomy, mine)


def test_a_scan_the_template_cannot_fit_gives_a_warning_and_the_work_can_be_stopped():
    noise = sitk.GetImageFromArray(np.random.default_rng(0).random((27, 27, 27)).astype(np.float32))
    noise.SetSpacing((4.0, 4.0, 4.0))  # 108 mm: passes the size check, nothing a brain could be fitted to

    def ctrl_c_in_the_affine(done, total):
        if done > 1.5:  # within SimpleITK's optimizer, which would make a RuntimeError of it
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        derive_anatomy(noise, progress=ctrl_c_in_the_affine)
    with pytest.raises(Cancelled):
        derive_anatomy(noise, progress=lambda done, total: done < 1.5)
    anatomy = derive_anatomy(noise)
    assert anatomy.quality["correlation"] < 0.2
    assert "registered poorly" in anatomy.warning and "--wm" in anatomy.warning
    assert anatomy.white_matter.shape == (27, 27, 27)


@pytest.mark.parametrize("case, message", [
    ("slab", "covers only 128 x 128 x 40 mm"),
    ("constant", "constant"),
    ("2d", "3D image"),
    ("vector", "several components"),
])
def test_an_image_that_cannot_be_a_head_mprage_fails_in_one_line(case, message):
    rng = np.random.default_rng(1)
    if case == "2d":
        img = sitk.GetImageFromArray(rng.random((128, 128)).astype(np.float32))
    elif case == "vector":
        img = sitk.GetImageFromArray(rng.random((64, 64, 64, 2)).astype(np.float32), isVector=True)
        img.SetSpacing((2.0, 2.0, 2.0))
    else:
        a = rng.random((20, 64, 64)).astype(np.float32) if case == "slab" else np.full((64, 64, 64), 7.0, np.float32)
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((2.0, 2.0, 2.0))
    with pytest.raises(InputError, match=message):
        derive_anatomy(img)


def test_a_sanity_check_on_files_without_wm_derives_and_writes_the_anatomy(phantom_files, tmp_path, capsys):
    """`msis sanity control-regions` on a user's files with no --wm: the map is derived from the MPRAGE (with
    progress), the check runs on it (its outputs as on phantoms), and the derived maps are beside the results,
    listed in msis_run.json. (The command's test on phantom cases: this one, test_cli's synthetic-lesion on phantoms.)"""
    from MSInstanceSaliencyLib.cli import main

    out = tmp_path / "cr"
    rc = main(["sanity", "control-regions", "--flair", str(phantom_files["flair"]), "--mprage", str(phantom_files["mprage"]),
               "--gt", str(phantom_files["lesions"]), "--out", str(out), "--device", "cpu", "--samples", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "white matter from the MNI template (no --wm)" in err and "Traceback" not in err
    run = json.loads((out / "msis_run.json").read_text())
    assert run["white_matter"] == "derived" and run["derived_anatomy_quality"]["warning"] is None
    assert set(FILES.values()) | {"control_regions.csv", "control_regions_summary.json"} <= set(run["files"])
    derived = read_image(out / FILES["white_matter"])
    assert same_grid(derived, read_image(phantom_files["mprage"]))
    summary = json.loads((out / "control_regions_summary.json").read_text())
    assert set(summary["flair_peak"]) == {"tp_lesion", "wm_sphere_93mm3", "single_voxel_at_tp_centre"}
    rows = list(csv.DictReader(open(out / "control_regions.csv")))
    assert len(rows) == 6 and {r["channel"] for r in rows} == {"flair", "mprage"}
    assert [int(r["voxels"]) for r in rows if r["region"] == "single_voxel_at_tp_centre"] == [1, 1]
    assert (out / "control_regions.png").is_file()
