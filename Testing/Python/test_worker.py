"""The worker process as the Slicer module uses it: a real subprocess, the bundled demo model, a phantom."""

import os
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import Cancelled, InputError, WorkerError
from MSInstanceSaliencyLib.explain import explain
from MSInstanceSaliencyLib.inference import predict_probability
from MSInstanceSaliencyLib.model import load_model
from MSInstanceSaliencyLib.preprocessing import prepare_case
from MSInstanceSaliencyLib.worker import load_array, save_array
from MSInstanceSaliencyLib.worker_client import WorkerClient


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


def test_bad_requests_are_input_errors_and_the_worker_stays(client):
    pid = client.pid
    with pytest.raises(InputError, match="lesion 9999 does not exist"):
        client.request("explain", lesion_id=9999)
    with pytest.raises(InputError, match="unknown worker command"):
        client.request("no_such_command")
    with pytest.raises(InputError, match="threshold"):
        client.request("segment", threshold=1.5)
    assert client.pid == pid


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
                      progress=lambda d, t: os.kill(first, signal.SIGKILL))
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

        def hang_then_cancel(done, total):
            os.kill(first, signal.SIGSTOP)  # a worker that no longer answers, whatever the machine's speed
            return False

        with pytest.raises(Cancelled, match="restarted"):
            c.request("prepare", flair=c.path("flair.nrrd"), mprage=c.path("mprage.nrrd"), register=True, n4=True,
                      progress=hang_then_cancel)
        assert not c.alive
        assert c.request("ping")["pid"] != first
