"""Outputs: nothing lost, nothing silently wrong (issue items 3, 6, 7, 9 and full or read-only disks).

Every test runs the real commands on small inputs (the 2 mm phantom, a tiny random model), mostly as
subprocesses, so that a run can be killed, paused or given a file-size limit like a full disk.
"""

import contextlib
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.io.volumes import array_from_image

from conftest import msis_in_process

ROOT = Path(__file__).resolve().parents[2]

# Patches run in the child before the command (same code path, only smaller or interrupted).
KILL_WHILE_WRITING = """
import os, signal, SimpleITK as sitk
_write = sitk.WriteImage
def _killed_mid_write(img, path, *a, **k):
    _write(img, path, *a, **k)
    if os.path.basename(path).startswith("." + os.environ["MSIS_TEST_KILL_AT"] + ".msis-"):  # its temporary (io.outputs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
sitk.WriteImage = _killed_mid_write
"""
SMALL_DEMO_PHANTOM = """
import MSInstanceSaliencyLib.research.phantom as _ph
_make = _ph.make_phantom
_ph.make_phantom = lambda *a, **k: _make(*a, **{**k, "voxel_size": 2.0})
"""


def use_small_phantoms(monkeypatch):
    """SMALL_DEMO_PHANTOM for a command run in this process: 2 mm phantoms."""
    import MSInstanceSaliencyLib.research.phantom as phantom

    make = phantom.make_phantom
    monkeypatch.setattr(phantom, "make_phantom", lambda *a, **k: make(*a, **{**k, "voxel_size": 2.0}))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("MSIS_DEBUG", None)
    return env


def _argv(args, prelude):
    code = prelude + "\nimport sys\nfrom MSInstanceSaliencyLib.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *map(str, args)]


def msis(*args, prelude="", preexec_fn=None, env=None):
    return subprocess.run(_argv(args, prelude), capture_output=True, text=True, env=env or _env(), preexec_fn=preexec_fn, timeout=600)


def msis_here(*args):
    """The same command in this process (no interpreter start-up: faster, for runs that are not interrupted)."""
    return msis_in_process(*args)


def start(*args, prelude=""):
    return subprocess.Popen(_argv(args, prelude), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("msis:")]
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], res.stderr
    return lines[0]


def complete_image(path) -> bool:
    """Independent of the Lib: every voxel the NIfTI header promises can be read."""
    try:
        img = nib.load(str(path))
        np.asarray(img.dataobj)
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        return True
    except Exception:
        return False


def listed_files_are_complete(out: Path) -> dict:
    manifest = json.loads((out / "msis_run.json").read_text())
    for name in manifest["files"]:
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, name
        if name.endswith((".nii", ".nii.gz")):
            assert complete_image(p), f"{name} is listed in msis_run.json but truncated"
    return manifest


def visible(out: Path) -> list:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []


def staging_folders(out: Path) -> list:
    return sorted(p.name for p in out.glob(".msis-staging-*")) if out.exists() else []


def segment_args(phantom_files, model, out):
    return ["segment", phantom_files["flair"], phantom_files["mprage"], "--out", out, "--model", model, "--device", "cpu", "--threshold", "0.5"]


def one_lesion_labels(phantom_files, path):
    gt = sitk.ReadImage(str(phantom_files["lesions"]))
    a = array_from_image(gt, np.uint8)
    from MSInstanceSaliencyLib.segmentation.instances import label_instances

    lab = label_instances(a > 0, spacing=gt.GetSpacing(), min_volume_mm3=0)
    img = sitk.GetImageFromArray((lab == 1).astype(np.uint16).transpose(2, 1, 0))
    img.CopyInformation(gt)
    sitk.WriteImage(img, str(path))
    return path


# -- 3: a run killed while writing never leaves a truncated file that msis_run.json lists --------------

def test_3_a_run_killed_mid_write_leaves_the_listed_outputs_complete(phantom_files, tiny_model_dir, tmp_path):
    out = tmp_path / "seg"
    first = msis_here(*segment_args(phantom_files, tiny_model_dir, out))
    assert first.returncode == 0, first.stderr
    before = {n: (out / n).read_bytes() for n in visible(out)}
    killed = msis(*segment_args(phantom_files, tiny_model_dir, out), prelude=KILL_WHILE_WRITING,
                  env=_env(MSIS_TEST_KILL_AT="probability.nii.gz"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    listed_files_are_complete(out)
    assert {n: (out / n).read_bytes() for n in visible(out)} == before  # the earlier, complete run is untouched


# -- 6: no command overwrites a file the user put there ----------------------------------------------------

def test_6_train_refuses_a_model_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mymodel"
    out.mkdir()
    (out / "model.json").write_text('{"mine": true}\n')
    (out / "weights.pt").write_bytes(b"my weights")
    t0 = time.time()
    res = msis_here("train", "--out", out, "--iterations", 1, "--batch", 1, "--patch", 16, "--phantoms-per-patient", 1,
               "--cache", tmp_path / "cache", "--device", "cpu")
    assert_one_line_error(res, "not written by msis")
    assert (out / "model.json").read_text() == '{"mine": true}\n' and (out / "weights.pt").read_bytes() == b"my weights"
    assert visible(out) == ["model.json", "weights.pt"] and not (tmp_path / "cache").exists()  # refused before any work
    assert time.time() - t0 < 60


def test_6_train_writes_a_complete_model_folder_and_may_replace_it(tmp_path, monkeypatch, capsys):
    import functools

    import MSInstanceSaliencyLib.research.training as training
    from MSInstanceSaliencyLib.cli import main
    from MSInstanceSaliencyLib.models.loading import load_model

    monkeypatch.setattr(training, "train", functools.partial(training.train, patients=(1,)))
    use_small_phantoms(monkeypatch)  # the model folder's mechanics, not the phantom's resolution, are checked here
    out = tmp_path / "model"
    args = ["train", "--out", str(out), "--iterations", "2", "--batch", "1", "--patch", "32", "--phantoms-per-patient", "1",
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    assert visible(out) == ["model.json", "msis_run.json", "training_log.json", "weights.pt"] and not staging_folders(out)
    assert load_model(out).spec.training["iterations_done"] == 2
    assert main(args) == 0, capsys.readouterr().err  # its own earlier model may be replaced


def test_6_phantom_refuses_a_user_msis_run_json(tmp_path):
    for text in ('{"my": "notes"}\n', "not even JSON\n"):
        out = tmp_path / f"ph{len(text)}"
        out.mkdir()
        (out / "msis_run.json").write_text(text)
        res = msis_here("phantom", "--out", out, "--voxel-size", 4)
        assert_one_line_error(res, "msis_run.json", "not written by msis")
        assert (out / "msis_run.json").read_text() == text and visible(out) == ["msis_run.json"]


def test_6_features_refuses_a_user_file_beside_its_table(phantom_files, tiny_model_dir, tmp_path):
    side = tmp_path / "F.csv.json"
    side.write_text('{"my": "settings"}\n')
    res = msis_here("features", phantom_files["flair"], phantom_files["mprage"], "--out", tmp_path / "F.csv", "--model", tiny_model_dir,
               "--device", "cpu", "--samples", 1)
    assert_one_line_error(res, "F.csv.json")
    assert side.read_text() == '{"my": "settings"}\n' and not (tmp_path / "F.csv").exists()


def test_6_single_file_outputs_never_replace_a_user_file(phantom_files, tiny_model_dir, tmp_path):
    gt = phantom_files["lesions"]
    mine = tmp_path / "mine.json"
    mine.write_text("my notes\n")
    assert_one_line_error(msis("evaluate", gt, gt, "--json", mine), "mine.json")
    assert mine.read_text() == "my notes\n"
    # a file msis wrote itself may be replaced, atomically
    ours = tmp_path / "metrics.json"
    assert msis_here("evaluate", gt, gt, "--json", ours).returncode == 0
    res = msis_here("evaluate", gt, gt, "--json", ours)
    assert res.returncode == 0, res.stderr
    assert json.loads(ours.read_text())["f1"] == 1.0 and not list(tmp_path.glob(".*metrics*"))
    # validate-model refuses before it segments anything
    t0 = time.time()
    assert_one_line_error(msis("validate-model", "--model", tiny_model_dir, "--device", "cpu", "--patients", 17, "--json", mine), "mine.json")
    assert mine.read_text() == "my notes\n" and time.time() - t0 < 60
    # train-classifier refuses an existing target before reading any table
    (tmp_path / "f.csv").write_text("case,lesion_id\n")
    assert_one_line_error(msis("train-classifier", tmp_path / "f.csv", "--out", mine), "already exists")
    assert mine.read_text() == "my notes\n"


# -- 7: two runs into one --out never mix: the second is refused while the first runs ----------------------

def test_7_a_second_run_into_the_same_out_is_refused(phantom_files, tiny_model_dir, tmp_path):
    labels = one_lesion_labels(phantom_files, tmp_path / "labels.nii.gz")
    out = tmp_path / "exp"

    def explain(seed):
        return ["explain", phantom_files["flair"], phantom_files["mprage"], "--lesion", 1, "--labels", labels, "--out", out,
                "--model", tiny_model_dir, "--device", "cpu", "--samples", 3, "--noise-seed", seed]

    first = start(*explain(1))
    try:
        for line in first.stderr:  # its first SmoothGrad progress: it is at work in --out
            if "smoothgrad" in line:
                break
        first.send_signal(signal.SIGSTOP)
        try:
            second = msis_here(*explain(2))
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert_one_line_error(second, "another msis run", str(out))
    manifest = listed_files_are_complete(out)
    assert manifest["params"]["seed"] == 1 and manifest["written"] == sorted(
        ["saliency_lesion1_smoothgrad_flair.nii.gz", "saliency_lesion1_smoothgrad_mprage.nii.gz", "saliency_lesion1_smoothgrad.png"])
    # and the maps are the seed-1 maps: the same as a run of seed 1 alone
    alone = tmp_path / "alone"
    assert msis_here(*[a if a != out else alone for a in explain(1)]).returncode == 0
    for ch in ("flair", "mprage"):
        name = f"saliency_lesion1_smoothgrad_{ch}.nii.gz"
        np.testing.assert_array_equal(array_from_image(sitk.ReadImage(str(out / name))), array_from_image(sitk.ReadImage(str(alone / name))))


# -- 9: failed or killed runs leave nothing unrecorded and never block a re-run ----------------------------

def test_9_a_failed_demo_leaves_nothing_and_can_run_again(tiny_model_dir, tmp_path, monkeypatch):
    # in this process (the run fails, it is not interrupted): no interpreter start-up per run
    use_small_phantoms(monkeypatch)
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--model", tiny_model_dir, "--device", "cpu", "--lesion", 999, "--no-tp-probability", "--samples", 1]
    assert_one_line_error(msis_here(*args), "lesion 999 does not exist")
    assert visible(out) == [] and not staging_folders(out)
    # a re-run fails for the same true reason, not with "not written by msis"
    assert_one_line_error(msis_here(*args), "lesion 999 does not exist")


def test_9_a_user_file_in_out_is_refused_before_any_work(phantom_files, tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "lesions.csv").write_text("my own notes\n")
    res = msis_here(*segment_args(phantom_files, tiny_model_dir, out))
    assert_one_line_error(res, "lesions.csv", "not written by msis")
    assert "segmenting" not in res.stderr  # refused before the model ran
    assert sorted(p.name for p in out.iterdir()) == ["lesions.csv"] and (out / "lesions.csv").read_text() == "my own notes\n"


def test_9_a_killed_run_leaves_nothing_visible_and_a_re_run_cleans_up(phantom_files, tiny_model_dir, tmp_path):
    out = tmp_path / "seg"
    killed = msis(*segment_args(phantom_files, tiny_model_dir, out), prelude=KILL_WHILE_WRITING,
                  env=_env(MSIS_TEST_KILL_AT="lesion_labels.nii.gz"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert visible(out) == []  # nothing half-written and nothing unrecorded in place
    again = msis_here(*segment_args(phantom_files, tiny_model_dir, out))
    assert again.returncode == 0, again.stderr
    assert not staging_folders(out)  # the dead run's staging folder is gone
    manifest = listed_files_are_complete(out)
    assert set(manifest["files"]) == {"probability.nii.gz", "lesion_labels.nii.gz", "lesions.csv"}


# -- disk full and read-only --out -------------------------------------------------------------------------

def _file_size_limit(n_bytes):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@contextlib.contextmanager
def disk_full_after(n_bytes):
    """In this process, for the block: no file grows beyond n_bytes (writes fail with EFBIG, like ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def assert_failed_rewrite_keeps_the_file(path, rewrite, n_bytes=1000, shown=None):
    """rewrite() of the good file at `path` on a disk full after n_bytes: one InputError naming the file
    (`shown`: the name the user sees; "cannot write FILE: ..." or, for an image cut short, "output FILE is
    truncated: ..."), the earlier file byte for byte, and no temporary file beside it."""
    from MSInstanceSaliencyLib.errors import InputError

    path = Path(path)
    before, listing = path.read_bytes(), sorted(os.listdir(path.parent))
    with disk_full_after(n_bytes), pytest.raises(InputError) as err:
        rewrite()
    message = str(err.value)
    assert str(shown or path) in message and "disk may be full" in message and "\n" not in message, message
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == listing
    return message


def test_a_full_disk_is_one_line_and_publishes_nothing(phantom_files, tiny_model_dir, tmp_path):
    out = tmp_path / "seg"
    assert msis_here(*segment_args(phantom_files, tiny_model_dir, out)).returncode == 0
    before = {n: (out / n).read_bytes() for n in visible(out)}
    assert len(before["probability.nii.gz"]) > 500_000
    # SimpleITK returns normally after writing only the first 500 kB of probability.nii.gz
    res = msis(*segment_args(phantom_files, tiny_model_dir, out), preexec_fn=_file_size_limit(500_000))
    line = assert_one_line_error(res, "probability.nii.gz", "disk")
    assert str(out) in line
    assert {n: (out / n).read_bytes() for n in visible(out)} == before and not staging_folders(out)
    # a Python writer's error (EFBIG) is the same one line
    gt = phantom_files["lesions"]
    res = msis("evaluate", gt, gt, "--json", tmp_path / "m.json", preexec_fn=_file_size_limit(20))
    assert_one_line_error(res, "m.json", "disk")
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.glob(".*m.json*"))


def test_an_unwritable_out_is_refused_before_any_work(phantom_files, tiny_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = msis_here(*segment_args(phantom_files, tiny_model_dir, blocker / "out"))
    assert_one_line_error(res, "cannot write into --out")
    assert "segmenting" not in res.stderr
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = False
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode; an immutable folder is read-only even for root
            immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only here (root without chattr)")
        res = msis_here(*segment_args(phantom_files, tiny_model_dir, ro))
        assert_one_line_error(res, "cannot write into --out", str(ro))
        assert "segmenting" not in res.stderr and list(ro.iterdir()) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)


# -- the one atomic write (io.outputs._write_whole) behind atomic_write and write_output_file -----------------

@pytest.mark.parametrize("data", [b"new contents " * 200, "callable"])
def test_atomic_write_on_a_full_disk_keeps_the_earlier_file(tmp_path, data):
    from MSInstanceSaliencyLib.io.outputs import atomic_write

    p = atomic_write(tmp_path / "table.csv", b"a,b\n1,2\n")
    assert p.read_bytes() == b"a,b\n1,2\n"
    write = (lambda tmp: Path(tmp).write_bytes(b"x" * 5000)) if data == "callable" else data
    assert_failed_rewrite_keeps_the_file(p, lambda: atomic_write(p, write))
    assert_failed_rewrite_keeps_the_file(p, lambda: atomic_write(p, lambda tmp: None))  # a writer that wrote nothing
    # a new file that cannot be written leaves nothing under its name
    from MSInstanceSaliencyLib.errors import InputError

    with disk_full_after(1000), pytest.raises(InputError, match="new.csv"):
        atomic_write(tmp_path / "new.csv", write)
    assert sorted(os.listdir(tmp_path)) == ["table.csv"]


def test_write_output_file_on_a_full_disk_keeps_the_earlier_file(tmp_path):
    from MSInstanceSaliencyLib.io.outputs import write_json_output

    p = write_json_output(tmp_path / "m.json", {"dice": 0.5}, "--json")
    assert_failed_rewrite_keeps_the_file(p, lambda: write_json_output(p, {"dice": [0.1] * 1000}, "--json"))
    assert write_json_output(p, {"dice": 0.7}, "--json") == p and json.loads(p.read_text())["dice"] == 0.7


def test_atomically_written_files_have_the_usual_permissions(tmp_path):
    """Not mkstemp's owner-only 0600: a model folder or a table is as readable as a file open() writes."""
    from MSInstanceSaliencyLib.io.outputs import atomic_write, write_json_output

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    usual = plain.stat().st_mode & 0o777
    assert (atomic_write(tmp_path / "a.bin", b"x").stat().st_mode & 0o777) == usual
    assert (write_json_output(tmp_path / "b.json", {}, "--json").stat().st_mode & 0o777) == usual


def test_a_failed_write_into_an_output_folder_names_the_output_not_the_staging_folder(small_phantom, tmp_path):
    from MSInstanceSaliencyLib.errors import InputError
    from MSInstanceSaliencyLib.io.outputs import OutputFolder
    from MSInstanceSaliencyLib.io.volumes import write_image

    out = OutputFolder(tmp_path / "out", names=["flair.nii.gz"])
    # SimpleITK returns normally after writing part of an image on a full disk: the check after it refuses
    with out.writing(), disk_full_after(100_000), pytest.raises(InputError) as err:
        write_image(small_phantom.flair, out.file("flair.nii.gz"))
    line = str(err.value)
    assert line.startswith(f"cannot write {tmp_path / 'out' / 'flair.nii.gz'}: ") or f"output {tmp_path / 'out' / 'flair.nii.gz'} is truncated" in line, line
    assert "staging" not in line and "disk may be full" in line and f"Nothing was changed in {tmp_path / 'out'}" in line
    assert os.listdir(out.staging) == []


def test_a_table_lock_removes_the_temporaries_of_a_killed_writer(tmp_path):
    from MSInstanceSaliencyLib.io.outputs import table_lock

    table = tmp_path / "FEATURES.csv"
    stale = [tmp_path / ".FEATURES.csv.msis-0a1b2c3d.csv", tmp_path / ".FEATURES.csv.json.msis-0a1b2c3d.json"]
    other = tmp_path / ".OTHER.csv.msis-0a1b2c3d.csv"  # another table's: not this lock's to remove
    for p in (*stale, other):
        p.write_text("half a row")
    with table_lock(table):
        assert not any(p.exists() for p in stale) and other.exists()
