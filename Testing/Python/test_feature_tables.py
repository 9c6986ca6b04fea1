"""Resumable feature tables (`msis features --phantom-patients ... --out F.csv`) lose nothing and accept
nothing foreign: a case is committed whole or not at all (also under kill -9), a second writer is
refused, a resume with other settings is refused, and the classifier commands refuse duplicate rows.

The runs are real `python -m MSInstanceSaliencyLib features` processes on small phantoms: 2 mm voxels
(MSIS_PHANTOM_VOXEL_SIZE=2, the test option of phantom tables), the bundled demo model (it finds real
lesions there; a random tiny model finds one lesion covering everything or thousands of specks),
SmoothGrad with N = 1 over at most 2 voxels of each lesion, one sampled TP per case and
--min-volume 20 (drops the 1- and 2-voxel specks), so a case costs seconds.

A process start costs more than a case (importing torch and MONAI, loading the model), so only what
needs a process is one: the reference run (the command end to end), the runs killed with -9 and the
refusals on the command line. The resumes after a kill run in this process on a shared model: the
same phantom_feature_table the command calls, and the reference's sidecar must match their settings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from MSInstanceSaliencyLib.errors import InputError

from conftest import msis_in_process

ROOT = Path(__file__).resolve().parents[2]
PATIENTS = "9,4"  # the second case has the more rows (83, about 13 kB: more than a write buffer)
CASES = ("phantom_p09_s20900", "phantom_p04_s20400")
OPTIONS = ["--device", "cpu", "--samples", "1", "--max-omega-voxels", "2", "--max-tp", "1", "--min-volume", "20"]

pytestmark = pytest.mark.needs_radiomics

# Runs `msis` in this process with csv.DictWriter patched to SIGKILL the process when it is about to
# write row number KILL_AFTER + 1 of case KILL_CASE: a kill -9 at a chosen point inside the writing of
# a case, the place where an append-only table tears.
KILLER = r'''
import csv, os, runpy, signal, sys
case, after = os.environ["KILL_CASE"], int(os.environ["KILL_AFTER"])
seen = [0]
plain = csv.DictWriter.writerow
def writerow(self, row):
    if row.get("case") == case:
        seen[0] += 1
        if seen[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
    return plain(self, row)
def writerows(self, rows):
    for r in rows:
        writerow(self, r)
csv.DictWriter.writerow, csv.DictWriter.writerows = writerow, writerows
sys.argv = ["msis"] + sys.argv[1:]
runpy.run_module("MSInstanceSaliencyLib", run_name="__main__", alter_sys=True)
'''


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MSIS_PHANTOM_VOXEL_SIZE="2")
    env.pop("MSIS_DEBUG", None)
    env.update(extra)
    return env


def _features_args(out, patients=PATIENTS, *extra):
    return ["features", "--phantom-patients", patients, "--out", str(out), *OPTIONS, *extra]


def _msis(*args):
    """`msis ARGS` with the tests' 2 mm phantoms, in this process (the kill tests start real processes)."""
    return msis_in_process(*args, env={"MSIS_PHANTOM_VOXEL_SIZE": "2"})


def _one_error_line(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("msis:")]
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def demo_model():
    from MSInstanceSaliencyLib.models.loading import load_model

    return load_model(device="cpu")


def _features_in_process(model, out, patients=(9, 4)):
    """What `msis features` with OPTIONS does, in this process; its log lines."""
    from MSInstanceSaliencyLib.classifier.scoring import saliency_settings
    from MSInstanceSaliencyLib.research.phantom_features import phantom_feature_table

    log = []
    phantom_feature_table(model, list(patients), out, saliency_settings(n_samples=1, max_omega_voxels=2), max_tp_per_case=1,
                          min_volume_mm3=20.0, voxel_size=2.0, device="cpu", log=log.append)
    return log


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_value(a, b):
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def assert_same_rows(path, reference, cases=CASES):
    """path holds exactly the rows of `cases` in the uninterrupted reference table: none lost, none twice."""
    got, want = _rows(path), [r for r in _rows(reference) if r["case"] in cases]
    keys = [(r["case"], r["lesion_id"]) for r in got]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert [r["case"] for r in got if r["case"] not in cases] == []
    for case in cases:
        n_got, n_want = sum(r["case"] == case for r in got), sum(r["case"] == case for r in want)
        assert n_got == n_want, f"{case}: {n_got} rows, the uninterrupted run has {n_want}"
    assert keys == [(r["case"], r["lesion_id"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        bad = [k for k in b if not _same_value(a[k], b[k])]
        assert not bad, (a["case"], a["lesion_id"], bad[:5])


def _leftovers(folder, name):
    """Files beside the table other than the table, its sidecar and its lock file."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in (name, name + ".json", name + ".lock"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run over both cases."""
    out = tmp_path_factory.mktemp("reference") / "f.csv"
    t = time.time()
    res = _msis(*_features_args(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    for case in CASES:  # each case has several rows, and features for at least one lesion
        mine = [r for r in rows if r["case"] == case]
        assert len(mine) >= (61 if case == CASES[1] else 25) and any(r["kind"] in ("TP", "FP") and not r["error"] for r in mine), (case, len(mine))
    print(f"reference run: {time.time() - t:.1f} s, {len(rows)} rows")
    return out


def _copy_table(reference, folder):
    out = Path(folder) / "f.csv"
    shutil.copy(reference, out)
    shutil.copy(str(reference) + ".json", str(out) + ".json")
    return out


def _first_case_only(reference, out):
    """The reference table cut down to its first case (its own lines, byte for byte) and its sidecar:
    a table one case into its run."""
    lines = reference.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:1] + [l for l in lines[1:] if l.startswith(CASES[0].encode() + b",")]))
    shutil.copy(str(reference) + ".json", str(out) + ".json")
    return out.read_bytes()


def test_a_kill_while_a_case_is_written_loses_no_rows(reference, demo_model, tmp_path):
    """A run resumes a table that holds the first case and is killed (-9) after 60 rows of the second
    case went to the CSV writer: the table still holds exactly the first case; a rerun adds the second
    case whole (the same rows as an uninterrupted run)."""
    out = tmp_path / "f.csv"
    first = _first_case_only(reference, out)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    res = subprocess.run([sys.executable, str(killer), *_features_args(out)], capture_output=True, text=True,
                         env=_env(KILL_CASE=CASES[1], KILL_AFTER="60"), timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert f"{CASES[0]}: already in" in res.stderr
    assert out.read_bytes() == first  # nothing of the second case
    assert f"{CASES[0]}: already in" in "\n".join(_features_in_process(demo_model, out))
    assert_same_rows(out, reference)
    assert json.loads(Path(str(out) + ".json").read_text()) == json.loads(Path(str(reference) + ".json").read_text())
    assert _leftovers(tmp_path, "f.csv") == ["killer.py"]  # no temporary file is left behind


@contextlib.contextmanager
def _features_in_first_case(out, log):
    """A features process writing `out` (stderr to `log`), yielded once it reports its first case, i.e.
    while it computes that case's maps; killed (and continued first, if stopped) when the block ends."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "MSInstanceSaliencyLib", *_features_args(out, "9")], stdout=subprocess.DEVNULL,
                                stderr=err, env=_env())
        try:
            deadline = time.time() + 300
            while f"{CASES[0]}:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=60)


def test_kill_9_from_outside_in_the_middle_of_a_case(reference, demo_model, tmp_path):
    """A real kill -9 of a running features process while it computes its case's maps: no row of that
    case is left, and a rerun makes the case whole."""
    out, log = tmp_path / "f.csv", tmp_path / "stderr.txt"
    with _features_in_first_case(out, log) as proc:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not out.exists() or not _rows(out)
    _features_in_process(demo_model, out, [9])
    assert_same_rows(out, reference, cases=CASES[:1])


def test_a_table_left_empty_by_a_kill_at_creation_resumes(reference, demo_model, tmp_path):
    """What a kill at creation left (older msis): the sidecar and a 0-byte CSV."""
    out = tmp_path / "f.csv"
    shutil.copy(str(reference) + ".json", str(out) + ".json")
    out.write_bytes(b"")
    _features_in_process(demo_model, out, [9])
    assert_same_rows(out, reference, cases=CASES[:1])


@pytest.mark.parametrize("left", ["empty", "header only"])
def test_a_table_without_rows_starts_afresh(reference, tmp_path, left):
    """A 0-byte or header-only CSV holds no rows: whatever its sidecar says, a run starts it afresh (in
    process, with no cases to compute: only the acceptance and the new sidecar are checked)."""
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.research.phantom_features import phantom_feature_table
    from MSInstanceSaliencyLib.classifier.scoring import saliency_settings

    out = tmp_path / "f.csv"
    side = Path(str(out) + ".json")
    side.write_text(json.dumps({"saliency": saliency_settings(n_samples=50), "model": "another", "max_tp_per_case": 7}))
    out.write_text("" if left == "empty" else reference.read_text().splitlines()[0] + "\n")
    phantom_feature_table(load_model(), [], out, saliency_settings(n_samples=1, max_omega_voxels=2), max_tp_per_case=1, min_volume_mm3=20.0,
                          voxel_size=2.0, device="cpu", log=lambda m: None)
    assert json.loads(side.read_text()) == json.loads(Path(str(reference) + ".json").read_text())


# Holds the table's lock the way a running `msis features` does (the same table_lock, for as long as it
# writes) until its stdin closes: a writer without the cost of computing a case.
LOCK_HOLDER = r'''
import sys
from MSInstanceSaliencyLib.io.outputs import table_lock
with table_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
'''


def test_a_second_writer_is_refused(reference, demo_model, tmp_path):
    """While writer A (another process) holds the table of a first case, writer B is refused at once,
    naming A, and touches nothing of A's; once A is gone the table resumes."""
    out = tmp_path / "f.csv"
    first = _first_case_only(reference, out)
    sidecar = Path(str(out) + ".json").read_bytes()
    a = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert a.stdout.readline() == "locked\n"
        with pytest.raises(InputError, match=rf"is being written by another msis process \(pid {a.pid}\)"):
            _features_in_process(demo_model, out)
        assert out.read_bytes() == first and Path(str(out) + ".json").read_bytes() == sidecar
    finally:
        a.stdin.close()
        assert a.wait(timeout=60) == 0
    assert _features_in_process(demo_model, out, [9]) == [f"{CASES[0]}: already in {out}, skipped"]  # A's lock died with A


def test_resuming_with_another_model_or_max_tp_is_refused(reference, tmp_path, tiny_model_dir):
    out = _copy_table(reference, tmp_path)
    side = Path(str(out) + ".json")
    table, sidecar = out.read_bytes(), side.read_bytes()
    # one process for both: the refusal names every setting that differs
    args = _features_args(out, PATIENTS, "--model", tiny_model_dir)
    args[args.index("--max-tp") + 1] = "3"
    line = _one_error_line(_msis(*args), str(out), "model", "max_tp_per_case 1 (table) vs 3 (now)")
    assert "tiny-test" in line and "msis-demo-unet" in line
    assert out.read_bytes() == table and side.read_bytes() == sidecar  # nothing appended, the sidecar keeps its settings


def test_resuming_with_other_settings_is_refused_naming_them(reference, tmp_path, tiny_model_dir):
    """The same checks in-process (no process start per case): every setting that shapes the rows."""
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.research.phantom_features import phantom_feature_table
    from MSInstanceSaliencyLib.classifier.scoring import saliency_settings

    out = _copy_table(reference, tmp_path)
    side = Path(str(out) + ".json")
    table, sidecar = out.read_bytes(), side.read_bytes()
    demo, tiny = load_model(), load_model(tiny_model_dir)
    same = dict(seed_base=20_000, max_tp_per_case=1, min_volume_mm3=20.0, voxel_size=2.0, device="cpu", log=lambda m: None)
    settings = saliency_settings(n_samples=1, max_omega_voxels=2)

    def refused(model=demo, settings=settings, **change):
        with pytest.raises(InputError) as e:
            phantom_feature_table(model, [9, 4], out, settings, **{**same, **change})
        assert out.read_bytes() == table and side.read_bytes() == sidecar
        return str(e.value)

    assert "other saliency settings" in refused(settings=saliency_settings(n_samples=2, max_omega_voxels=2))
    assert "msis-demo-unet" in refused(model=tiny)
    # the same name and version with other weights is another model too
    import torch

    with torch.no_grad():
        next(demo.network.parameters()).add_(1e-3)
    msg = refused()
    assert "model_sha256" in msg
    demo = load_model()
    for change, key in ((dict(max_tp_per_case=None), "max_tp_per_case"), (dict(seed_base=10_000), "phantom_seed_base"),
                        (dict(voxel_size=1.0), "phantom_voxel_size"), (dict(min_volume_mm3=5.0), "min_volume_mm3"),
                        (dict(threshold=0.5), "threshold")):
        assert key in refused(model=demo, **change), key
    # a table of the earlier phantoms (version 1, skull-stripped) does not take today's head phantoms
    original = sidecar
    side.write_text(json.dumps({**json.loads(original), "phantom_version": 1}))
    sidecar = side.read_bytes()
    assert "phantom_version" in refused(model=demo)
    side.write_bytes(original)
    sidecar = original
    # an older sidecar that does not record the model's identity: refused, saying what to do
    old = json.loads(sidecar)
    for k in ("model_version", "model_sha256", "phantom_voxel_size", "threshold", "min_volume_mm3", "format"):
        old.pop(k, None)
    side.write_text(json.dumps(old))
    sidecar = side.read_bytes()
    msg = refused(model=demo, voxel_size=1.0, min_volume_mm3=None)
    assert "model_sha256" in msg and "add" in msg and "new table" in msg
    # and the duly completed older sidecar resumes (nothing to do: both cases are there)
    fixed = dict(json.loads(sidecar))
    fixed.update(json.loads(msg.split("add ", 1)[1].split(" to ", 1)[0]))  # the values the message says to add
    side.write_text(json.dumps(fixed))
    phantom_feature_table(demo, [9, 4], out, settings, **{**same, "voxel_size": 1.0, "min_volume_mm3": None})
    assert out.read_bytes() == table


def test_train_and_evaluate_classifier_refuse_duplicate_rows(reference, tmp_path):
    """Two runs that appended the same cases to one table: refused with the first duplicate named."""
    out = _copy_table(reference, tmp_path)
    lines = reference.read_text().splitlines(keepends=True)
    out.write_text("".join(lines + lines[1:]))
    first = _rows(reference)[0]
    want = [f"case {first['case']}", f"lesion {first['lesion_id']}"]
    _one_error_line(_msis("train-classifier", out, "--out", tmp_path / "clf.json"), str(out), *want)
    assert not (tmp_path / "clf.json").exists()
    from MSInstanceSaliencyLib.classifier.radiomics import default_classifier_path

    _one_error_line(_msis("evaluate-classifier", default_classifier_path(), out, "--out", tmp_path / "ev"), *want)


def test_table_readers_refuse_torn_and_duplicate_rows_and_read_the_committed_tables(tmp_path):
    from MSInstanceSaliencyLib.classifier.radiomics import default_feature_names
    from MSInstanceSaliencyLib.classifier.scoring import (read_feature_rows, read_feature_tables, saliency_settings, write_feature_rows,
                                                          write_table_manifest)

    names = default_feature_names()
    rows = [{"case": "c", "lesion_id": i, "kind": "TP", "label": 1, "voxels": 9, **{n: 0.5 for n in names}} for i in (1, 2, 3)]
    p = write_feature_rows(rows, tmp_path / "t.csv", names)
    write_table_manifest(p, saliency_settings())
    assert [r["lesion_id"] for r in read_feature_rows(p)] == ["1", "2", "3"]
    data = p.read_bytes()
    p.write_bytes(data[:-40])  # the last row cut off, as an interrupted append leaves it
    with pytest.raises(InputError, match="cut off"):
        read_feature_rows(p)
    p.write_bytes(data + data.split(b"\r\n", 2)[2])  # lesions 2 and 3 twice
    with pytest.raises(InputError, match="case c, lesion 2"):
        read_feature_tables([p])
    # the committed tables of the bundled classifier are read whole (every row of every case)
    tables = ROOT / "docs" / "classifier"
    rows, settings = read_feature_tables(sorted(tables.glob("features_train*.csv")))
    assert len(rows) == 974 + 395 and settings["n_samples"] == 10
    rows, _ = read_feature_tables(sorted(tables.glob("features_test_*.csv")))
    assert len(rows) == 154 + 169 + 157 + 175  # patients 17-19, 20, 21, 22
