"""The worker process as the Slicer module uses it: a real subprocess, the bundled demo model, a phantom."""

import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import Cancelled, InputError, WorkerError
from MSInstanceSaliencyLib.saliency.explain import explain
from MSInstanceSaliencyLib.models.sliding_window import predict_probability
from MSInstanceSaliencyLib.models.loading import load_model
from MSInstanceSaliencyLib.models.preprocessing import prepare_case
from MSInstanceSaliencyLib.worker import Worker, load_array, save_array
from MSInstanceSaliencyLib.worker_client import WorkerClient

from test_outputs import assert_failed_rewrite_keeps_the_file, disk_full_after


@pytest.fixture(scope="module")
def client(small_phantom):
    with WorkerClient() as c:
        c.request("load_model", device="cpu")
        sitk.WriteImage(small_phantom.flair, c.path("flair.nrrd"))
        sitk.WriteImage(small_phantom.mprage, c.path("mprage.nrrd"))
        c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"))
        yield c


@pytest.fixture(scope="module")
def segmented(client):
    """(answer, probability, labels, progress calls)"""
    seen = []
    result = client.request("segment", progress=lambda d, t: seen.append((d, t)))
    prob, labels = load_array(result["probability"], remove=True), load_array(result["labels"], remove=True)
    return result, prob, labels, [s for s in seen if s[0] is not None]


def test_info_reports_the_torch_build_and_the_device(client):
    info = client.request("info", device="cpu")
    import torch

    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["pid"] == client.pid
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["device_note"]  # says why there is or is not a GPU
    if not os.environ.get("MSIS_THREADS"):
        assert info["threads"] == max(1, (os.cpu_count() or 1) - 1)  # a core left to Slicer's user interface


def test_segment_equals_the_library_in_process(client, segmented, small_phantom):
    result, prob, labels, progress = segmented
    model = load_model(device="cpu")
    case = prepare_case(small_phantom.flair, small_phantom.mprage, model.spec)
    expected = predict_probability(model, case.image, device="cpu")
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    assert labels.max() == len(result["table"]) > 0
    assert [r["lesion_id"] for r in result["table"]] == list(range(1, labels.max() + 1))
    assert progress and progress[-1][0] == progress[-1][1]  # streamed, and complete at the end


def test_explain_then_cancel_mid_smoothgrad_then_explain_again(client, segmented, small_phantom):
    table = segmented[0]["table"]
    small = min(table, key=lambda r: r["voxels"])["lesion_id"]
    big = max(table, key=lambda r: r["voxels"])["lesion_id"]
    pid = client.pid
    first = client.request("explain", lesion_id=small, n_samples=3, aggregation="max")
    # a long SmoothGrad (all voxels of the largest lesion, N = 200), cancelled at its first progress step
    calls = []

    def stop_after_first(done, total):
        if done is not None:
            calls.append(done)
        return not calls

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        client.request("explain", lesion_id=big, n_samples=200, aggregation="max", progress=stop_after_first)
    assert time.monotonic() - t0 < client.cancel_grace_s  # stopped by the worker itself, not killed
    assert client.pid == pid  # the worker survived the cancel, model and case still loaded
    again = client.request("explain", lesion_id=small, n_samples=3, aggregation="max")
    a, b = (load_array(r["maps"]["flair"]) for r in (first, again))
    np.testing.assert_array_equal(a, b)  # same seed, same map
    # and the worker's map is the library's map
    model = load_model(device="cpu")
    case = prepare_case(small_phantom.flair, small_phantom.mprage, model.spec)
    ref = explain(model, case.image, segmented[2] == small, "smoothgrad", n_samples=3, aggregation="max", device="cpu")
    np.testing.assert_allclose(a, ref.maps["flair"], rtol=1e-5, atol=1e-7)


def test_gradcampp_and_a_custom_region(client, segmented):
    labels = segmented[2]
    cam = client.request("explain", lesion_id=1, method="gradcampp")
    assert list(cam["maps"]) == ["gradcampp"] and cam["tp_probability"] is None
    assert load_array(cam["maps"]["gradcampp"]).shape == labels.shape
    mask = save_array(client.path("mask.npy"), labels == 1)
    region = client.request("explain", mask=mask, n_samples=2)
    np.testing.assert_array_equal(load_array(region["maps"]["flair"]), load_array(client.request("explain", lesion_id=1, n_samples=2)["maps"]["flair"]))


def test_bad_requests_are_input_errors_and_the_worker_stays(client, segmented):
    pid = client.pid
    with pytest.raises(InputError, match="lesion 9999 does not exist"):
        client.request("explain", lesion_id=9999)
    with pytest.raises(InputError, match="unknown worker command"):
        client.request("no_such_command")
    with pytest.raises(InputError, match="threshold"):
        client.request("segment", threshold=1.5)
    copy = client.path("flair copy.nrrd")
    sitk.WriteImage(sitk.ReadImage(client.path("flair.nrrd")), copy)
    for mprage in (client.path("flair.nrrd"), copy):  # the same file, or the same volume in another file
        with pytest.raises(InputError, match="FLAIR and MPRAGE are the same volume"):
            client.request("prepare", flair=client.path("flair.nrrd"), mprage=mprage)
    assert client.pid == pid
    client.request("explain", lesion_id=1, n_samples=1)  # the case and labels it held are still there


@pytest.mark.needs_radiomics
def test_score_streams_lesions_and_a_cancel_keeps_those_done(client, segmented):
    ids = [r["lesion_id"] for r in sorted(segmented[0]["table"], key=lambda r: r["voxels"])[:3]]
    got = []
    client.request("score", lesion_ids=ids, on_message=got.append)
    assert [m["lesion_id"] for m in got] == ids and all(0.0 <= m["tp_probability"] <= 1.0 for m in got)
    # cancel once the first lesion arrived: it is kept, the rest is not computed
    partial = []
    with pytest.raises(Cancelled):
        client.request("score", lesion_ids=ids, on_message=partial.append, progress=lambda d, t: not partial)
    assert [m["lesion_id"] for m in partial] == ids[:1]
    assert partial[0]["tp_probability"] == pytest.approx(got[0]["tp_probability"], abs=1e-9)


def _kill_at_first_call(pid):
    """A progress callback that kills pid once: later calls (the client also calls it while it waits) may come
    after the client has reaped the dead worker, when os.kill would raise ProcessLookupError."""
    killed = []

    def progress(done, total):
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
    return progress


def test_a_killed_worker_is_restarted_cleanly(small_phantom):
    with WorkerClient() as c:
        c.request("load_model", device="cpu")
        c.synced["model"] = "demo"
        sitk.WriteImage(small_phantom.flair, c.path("flair.nrrd"))
        sitk.WriteImage(small_phantom.mprage, c.path("mprage.nrrd"))
        first = c.pid
        # killed from outside in the middle of a request (a registration: seconds of work)
        with pytest.raises(WorkerError, match="stopped unexpectedly"):
            c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"), register=True,
                      progress=_kill_at_first_call(first))
        assert not c.alive and c.synced == {}
        # the next request starts a fresh worker, which holds nothing yet
        with pytest.raises(InputError, match="no case prepared"):
            c.request("explain", lesion_id=1)
        assert c.starts == 2 and c.pid != first
        assert c.request("ping")["pid"] == c.pid


def test_a_worker_that_ignores_cancel_is_killed_after_the_grace_period(small_phantom):
    with WorkerClient(cancel_grace_s=0.5) as c:
        c.request("load_model", device="cpu")
        sitk.WriteImage(small_phantom.flair, c.path("flair.nrrd"))
        sitk.WriteImage(small_phantom.mprage, c.path("mprage.nrrd"))
        first = c.pid

        calls = []

        def hang_then_cancel(done, total):
            if not calls:
                os.kill(first, signal.SIGSTOP)  # a worker that no longer answers, whatever the machine's speed
            calls.append(time.monotonic())
            return False

        with pytest.raises(Cancelled, match="restarted"):
            c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"), register=True, n4=True,
                      progress=hang_then_cancel)
        assert not c.alive
        # the GUI's progress (its processEvents) kept being called during the grace period, every tick
        assert len(calls) >= 0.5 * c.cancel_grace_s / c.tick_s and max(np.diff(calls)) < 0.5
        assert c.request("ping")["pid"] != first


# ----------------------------------------------------------------------------- the protocol's edges

def _send_raw(c, line: bytes) -> None:
    """A line of bytes as any client might write it (the client's own requests are well formed)."""
    c._proc.stdin.flush()
    c._proc.stdin.buffer.write(line + b"\n")
    c._proc.stdin.buffer.flush()


def _next_answer(c, timeout=20.0) -> dict:
    """The worker's next protocol message (its stderr lines skipped); fails, rather than waits forever, when none comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = c._messages.get(timeout=0.1)
        except queue.Empty:
            continue
        if msg.get("type") != "log":
            return msg
    pytest.fail(f"the worker did not answer within {timeout:g} s")


DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize("line, rid, says", [
    (b"[1,2]", None, "JSON object"), (b"null", None, "JSON object"), (b"5", None, "JSON object"), (b'"ping"', None, "JSON object"),
    (DEEP, None, "nested too deeply"), (b'{"id": 4, "cmd": "ping", "x": ' + DEEP + b"}", None, "nested too deeply"),
    (b"{not json", None, "not a JSON request"), (b"\xff\xfe{}", None, "UTF-8"),
    (b'{"id": 1, "cmd": "ping", "pad": "' + b"x" * (5 * 2**20) + b'"}', None, "bytes"),
    (b'{"id": 3}', 3, '"cmd"'), (b'{"id": "a", "cmd": 5}', "a", '"cmd"'), (b'{"cmd": "ping"}', None, "id"),
    (b'{"id": [1], "cmd": "ping"}', None, "id"), (b'{"id": 1.5, "cmd": "ping"}', None, "id"), (b'{"id": true, "cmd": "ping"}', None, "id"),
    (b'{"id": "../x", "cmd": "ping"}', "../x", "id"), (b'{"id": "a/b", "cmd": "cancel"}', "a/b", "id"),
    (b'{"id": {"a": 1}, "cmd": "cancel"}', None, "id"),
], ids=["list", "null", "number", "string", "deep", "deep-in-object", "not-json", "not-utf8", "huge", "no-cmd", "cmd-number", "no-id",
        "id-list", "id-float", "id-bool", "id-dotdot", "cancel-id-slash", "cancel-id-object"])
def test_a_bad_request_line_gets_an_error_and_the_worker_serves_on(client, line, rid, says):
    pid = client.pid
    _send_raw(client, line)
    answer = _next_answer(client)
    assert (answer["type"], answer["kind"], answer["id"]) == ("error", "input", rid) and says in answer["message"], answer
    _send_raw(client, b'{"id": "after-bad_line", "cmd": "ping"}')
    assert _next_answer(client) == {"id": "after-bad_line", "type": "result", "pid": pid}
    assert client.request("ping")["pid"] == pid


def test_request_ids_never_name_files_outside_the_work_folder(tmp_path):
    w = Worker(tmp_path / "w", send=lambda msg: None)
    for rid in (7, -2, "job-1_A"):
        assert w.out_path(rid, "labels").parent == (tmp_path / "w").resolve()
    for rid in ("../x", "a/b", "..", "/etc/x", "", "x" * 65, None, True, 1.5):
        with pytest.raises(InputError, match="request id"):
            w.out_path(rid, "labels")


def test_segment_with_a_path_as_id_is_refused_and_writes_nothing(client, tmp_path):
    before = set(os.listdir(client.workdir))
    _send_raw(client, json.dumps({"id": "r/../../escaped", "cmd": "segment"}).encode())
    answer = _next_answer(client)
    assert (answer["type"], answer["kind"]) == ("error", "input") and "id" in answer["message"], answer
    assert set(os.listdir(client.workdir)) == before and not (client.workdir.parent / "escaped_probability.npy").exists()


def _long_explain(c, rid):
    """SmoothGrad of the largest lesion with N = 500: minutes on a CPU, progress every 0.1 s."""
    _send_raw(c, json.dumps({"id": rid, "cmd": "explain", "lesion_id": c.big_lesion, "n_samples": 500}).encode())


@pytest.fixture
def segmented_worker(small_phantom):
    c = WorkerClient()
    c.request("load_model", device="cpu")
    sitk.WriteImage(small_phantom.flair, c.path("flair.nrrd"))
    sitk.WriteImage(small_phantom.mprage, c.path("mprage.nrrd"))
    c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"))
    table = c.request("segment")["table"]
    c.big_lesion = max(table, key=lambda r: r["voxels"])["lesion_id"]
    yield c
    c.close()


@pytest.mark.parametrize("running", [True, False])
def test_closed_stdin_cancels_queued_work_and_the_worker_exits(segmented_worker, running):
    c = segmented_worker
    proc = c._proc
    _long_explain(c, "first")
    if running:  # closed while the first runs (its first progress step seen), or with both still waiting
        while (msg := _next_answer(c))["type"] != "progress":
            pass
    _long_explain(c, "queued")
    t0 = time.monotonic()
    proc.stdin.close()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker went on working after its client closed stdin")
    assert time.monotonic() - t0 < 15 and proc.returncode == 0
    assert not [n for n in os.listdir(c.workdir) if n.startswith(("rqueued_", "rfirst_"))]  # neither finished


def _request_in_thread(c, *args, **kwargs):
    """c.request in a thread: (thread, box) with box["error"] once it ends; a test fails instead of hanging."""
    box = {}

    def run():
        try:
            box["result"] = c.request(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.mark.parametrize("per_request", [True, False])
def test_a_request_without_progress_fails_when_the_worker_stops_answering(per_request):
    c = WorkerClient(silence_timeout_s=600.0 if per_request else 1.0)
    try:
        pid = c.request("ping")["pid"]
        os.kill(pid, signal.SIGSTOP)  # a hung worker: alive, silent
        t0 = time.monotonic()
        t, box = _request_in_thread(c, "ping", **({"timeout_s": 1.0} if per_request else {}))
        t.join(timeout=15)
        assert not t.is_alive(), "request() waited on a silent worker"
        assert isinstance(box.get("error"), WorkerError) and "sent nothing for 1 s" in str(box["error"])
        assert time.monotonic() - t0 < 10 and not c.alive  # the hung one is gone; the next request starts a fresh one
        assert c.request("ping")["pid"] != pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        c.close()


def _stop_at_first_step(done, total):
    """A request refused up front never reaches its first progress step; work that starts is cancelled there
    (Cancelled, not InputError: what these tests would see on a worker without the checks, not days of work)."""
    return done is None


@pytest.mark.parametrize("args, names", [
    ({"sigma": math.nan}, "sigma"), ({"sigma": math.inf}, "sigma"), ({"sigma": -0.1}, "sigma"), ({"sigma": "0.1"}, "sigma"),
    ({"n_samples": 0}, "n_samples"), ({"n_samples": -3}, "n_samples"), ({"n_samples": 2.5}, "n_samples"), ({"n_samples": "10"}, "n_samples"),
    ({"n_samples": 10**6 + 1, "aggregation": "mean"}, "backward passes"), ({"method": "lime"}, "method"),
    ({"aggregation": "median"}, "aggregation"), ({"precision": "fp64"}, "precision"), ({"method": "gradcampp", "precision": "bf16"}, "precision"),
    ({"seed": -1}, "seed"), ({"max_omega_voxels": 2.5}, "max_omega_voxels"), ({"lesion_id": "1"}, "lesion_id"),
    ({"lesion_id": 1.5}, "lesion_id"), ({"lesion_id": None}, "lesion_id or mask"), ({"noise": 0.1}, "noise"),
])
def test_explain_in_the_worker_refuses_what_the_cli_refuses(client, segmented, args, names):
    with pytest.raises(InputError, match=names):
        client.request("explain", **{"lesion_id": 1, "n_samples": 2, **args}, progress=_stop_at_first_step)
    assert client.request("ping")["pid"] == client.pid


def test_explain_in_the_worker_has_the_backward_pass_cap(client, segmented):
    big = max(segmented[0]["table"], key=lambda r: r["voxels"])
    over = 10**6 // big["voxels"] + 1
    stop = _stop_at_first_step
    with pytest.raises(InputError, match=f"{over * big['voxels']:,} backward passes"):
        client.request("explain", lesion_id=big["lesion_id"], n_samples=over, progress=stop)
    # bounded with max_omega_voxels, the same N is within the cap and starts (cancelled at once here)
    with pytest.raises(Cancelled):
        client.request("explain", lesion_id=big["lesion_id"], n_samples=over, max_omega_voxels=1, progress=stop)


def test_one_check_for_every_entry_point():
    from MSInstanceSaliencyLib.saliency.explain import MAX_BACKWARD_PASSES, check_explain_args

    assert check_explain_args(n_samples=np.int64(3), sigma=1, lesion_id=2) == dict(
        method="smoothgrad", n_samples=3, sigma=1.0, sigma_mode="range", aggregation="max", context="patch", seed=0, precision="fp32",
        max_omega_voxels=None, lesion_id=2)
    omega = np.ones((10, 10, 11), bool)
    with pytest.raises(InputError, match="--samples 1000 needs 1,100,000 backward passes.*--max-omega-voxels"):
        check_explain_args(n_samples=1000, omega=omega, names={"n_samples": "--samples", "max_omega_voxels": "--max-omega-voxels"})
    check_explain_args(n_samples=MAX_BACKWARD_PASSES // 1100, omega=omega)
    check_explain_args(n_samples=1000, omega=omega, max_omega_voxels=1000)
    check_explain_args("gradcampp", n_samples=10**7, omega=omega)  # Grad-CAM++: one backward pass whatever N


@pytest.mark.parametrize("change, names", [({"sigma": math.nan}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"n_samples": 0}, "n_samples"),
                                           ({"n_samples": 2 * 10**6}, "backward passes"), ({"context": "lesion"}, "context")])
def test_the_cohort_refuses_them_too_before_writing(tmp_path, change, names):
    from MSInstanceSaliencyLib.cohort import CohortConfig, run_cohort

    saliency = {"method": "smoothgrad", "aggregation": "max", "channel": "flair", "n_samples": 10, "sigma": 0.05, "sigma_mode": "range",
                "context": "patch", "max_omega_voxels": None, "seed": 0, **change}
    cfg = CohortConfig(out=str(tmp_path / "out"), model={}, channels=["flair", "mprage"], threshold=0.3, min_volume_mm3=5.0,
                       saliency=saliency, tp_probability=False)
    with pytest.raises(InputError, match=names):
        run_cohort(tmp_path / "manifest.csv", tmp_path / "out", cfg, [], log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_close_when_the_worker_can_no_longer_be_asked_to_leave():
    c = WorkerClient()
    pid = c.request("ping")["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive, but its stdin is gone: close() cannot send shutdown and kills it instead
    c._proc.stdin.close()
    c.close()
    assert not c.alive


def test_save_array_on_a_full_disk_keeps_the_earlier_array_and_leaves_no_part_file(tmp_path):
    """The worker's answer files: a failed write is an input error naming the file (not an internal error),
    the array of the earlier request stays readable, and no half-written file is left in the work folder."""
    path = save_array(tmp_path / "r1_probability.npy", np.zeros((8, 9, 10), np.float32))
    assert_failed_rewrite_keeps_the_file(path, lambda: save_array(path, np.ones((30, 30, 30), np.float32)))
    np.testing.assert_array_equal(load_array(path), np.zeros((8, 9, 10), np.float32))
    with disk_full_after(1000), pytest.raises(InputError, match="r2_labels.npy"):
        save_array(tmp_path / "r2_labels.npy", np.ones((30, 30, 30), np.uint16))
    assert os.listdir(tmp_path) == ["r1_probability.npy"]


# ----------------------------------------------------------------------------- partial SmoothGrad maps

@pytest.fixture(scope="module")
def tiny_client(small_phantom, tiny_model_dir):
    """A worker with the tiny test model, the small phantom prepared, and a 2-voxel region as Ω."""
    with WorkerClient() as c:
        c.request("load_model", model=str(tiny_model_dir), device="cpu")
        sitk.WriteImage(small_phantom.flair, c.path("flair.nrrd"))
        sitk.WriteImage(small_phantom.mprage, c.path("mprage.nrrd"))
        shape = c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"))["shape"]
        region = np.zeros(shape, bool)
        x, y, z = (n // 2 for n in shape)
        region[x:x + 2, y, z] = True
        c.region = save_array(c.path("region.npy"), region)
        yield c


@pytest.mark.parametrize("n_samples, seconds, expected", [(10, 0, [8, 10]), (6, 0, [6]), (12, None, [8, 12])])
def test_explain_streams_partial_maps_and_the_last_is_the_answer(tiny_client, small_phantom, tiny_model_dir, n_samples, seconds, expected):
    from MSInstanceSaliencyLib.saliency.common import MAX_COPIES_PER_PASS

    assert MAX_COPIES_PER_PASS[0] == 8  # partial maps come at the ends of batches of 8 noisy copies on the CPU
    c = tiny_client
    got = []

    def on_message(msg):  # read the files when the message arrives, as a face would
        got.append((msg["type"], msg["copies_done"], msg["n_samples"], {name: load_array(p) for name, p in msg["maps"].items()}))

    kw = dict(mask=c.region, n_samples=n_samples, seed=3)
    answer = c.request("explain", **kw, partial_every=1, partial_interval_s=seconds, on_message=on_message)  # None: the default 1 s
    assert [(kind, k, n) for kind, k, n, _ in got] == [("partial", k, n_samples) for k in expected]  # in order
    final = {name: load_array(p) for name, p in answer["maps"].items()}
    assert set(final) == set(got[-1][3]) == {"flair", "mprage"}
    for name in final:
        np.testing.assert_array_equal(got[-1][3][name], final[name])  # the last partial map is the answer
    plain = c.request("explain", **kw)  # the answer as without streaming
    assert {k: v for k, v in plain.items() if k != "maps"} == {k: v for k, v in answer.items() if k != "maps"}
    for name, path in plain["maps"].items():
        np.testing.assert_array_equal(load_array(path, remove=True), final[name])
    if len(expected) > 1 and seconds == 0:  # an early map is SmoothGrad with fewer copies: the library's, in this process
        model = load_model(tiny_model_dir, device="cpu")
        case = prepare_case(small_phantom.flair, small_phantom.mprage, model.spec)
        early = explain(model, case.image, load_array(c.region), "smoothgrad", n_samples=expected[0], seed=3, device="cpu")
        np.testing.assert_allclose(got[0][3]["flair"], early.maps["flair"], rtol=1e-5, atol=1e-6 * np.abs(early.maps["flair"]).max())
        assert not np.array_equal(got[0][3]["flair"], final["flair"])


@pytest.mark.parametrize("args, says", [({"partial_every": 0}, "partial_every must be an integer >= 1"),
                                        ({"partial_every": 1, "partial_interval_s": -1}, "partial_interval_s must be a number of seconds"),
                                        ({"partial_every": 1, "method": "gradcampp"}, "SmoothGrad")])
def test_bad_partial_settings_in_the_worker_are_input_errors(tiny_client, args, says):
    with pytest.raises(InputError, match=says):
        tiny_client.request("explain", mask=tiny_client.region, n_samples=2, on_message=print, progress=_stop_at_first_step, **args)
    assert tiny_client.request("ping")["pid"] == tiny_client.pid


# ----------------------------------------------------------------------------- starting: slow, cancelled, hidden

def _slow_python(tmp_path, seconds):
    """A `python` that sleeps before it becomes the real one, as a cold torch import on a slow disk does."""
    import sys

    path = tmp_path / "slow-python"
    path.write_text(f"#!/bin/sh\nsleep {seconds}\nexec {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(os.name != "posix", reason="the slow python is a shell script")
def test_a_slow_start_calls_progress_has_no_fixed_limit_and_cancels_at_once(tmp_path):
    # with a progress callback the start has no time limit: 2 s of silence is fine with a 0.5 s limit
    calls = []
    with WorkerClient(python=_slow_python(tmp_path, 2), start_timeout_s=0.5) as c:
        assert c.request("ping", progress=lambda done, total: calls.append((done, total)) or True)["pid"]
    assert len(calls) > 1.5 / c.tick_s and set(calls[:10]) == {(None, None)}  # every tick while it started
    # without one, silence beyond start_timeout_s means a hung start
    with WorkerClient(python=_slow_python(tmp_path, 30), start_timeout_s=0.5) as c:
        with pytest.raises(WorkerError, match="sent nothing for 0.5 s while starting"):
            c.start()
        assert not c.alive
    # returning False stops the starting worker (its whole process group) within a second
    with WorkerClient(python=_slow_python(tmp_path, 30)) as c:
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="starting"):
            c.start(progress=lambda done, total: time.monotonic() - t0 < 0.3)
        assert time.monotonic() - t0 < 1.3 and not c.alive


def test_the_worker_is_started_hidden_on_windows():
    """What Slicer's launchConsoleProcess does for its console programs (STARTF_USESHOWWINDOW = 1, SW_HIDE = 0)."""
    from types import SimpleNamespace

    from MSInstanceSaliencyLib.worker_client import popen_options

    windows = SimpleNamespace(STARTUPINFO=lambda: SimpleNamespace(dwFlags=0, wShowWindow=1), STARTF_USESHOWWINDOW=1, SW_HIDE=0,
                              CREATE_NEW_PROCESS_GROUP=0x200)
    kw = popen_options("nt", windows)
    assert kw["creationflags"] == 0x200 and kw["startupinfo"].dwFlags == 1 and kw["startupinfo"].wShowWindow == 0
    assert popen_options("posix") == {"start_new_session": True}
