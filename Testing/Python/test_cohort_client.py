"""`msis cohort` and its dask client: a --scheduler that is not a dask scheduler is refused in one line,
exit 2, within a bounded time and before any work; a local cluster listens on loopback only and serves
no dask page without --dashboard; Ctrl-C ends a run with one line and exit 130.

Real servers in threads of the test (an HTTP server, a listener that says nothing, a closed port), a
real LocalCluster and real `msis cohort` processes on a 2 mm phantom with the bundled demo model.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from MSInstanceSaliencyLib import cli, cohort
from MSInstanceSaliencyLib.cli import main

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = cohort.SCHEDULER_TIMEOUT + 15  # the promised timeout, and the start of a Python process with the CLI


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MSIS_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, phantom_files):
    d = tmp_path_factory.mktemp("cohort_client")
    m = d / "manifest.csv"
    m.write_text(f"case_id,flair,mprage\na,{phantom_files['flair']},{phantom_files['mprage']}\n")
    return m


@pytest.fixture()
def http_server():
    """An HTTP server on a free loopback port (a dashboard, a web app: it waits for a request)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def silent_listener():
    """A socket that accepts connections and never says anything."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(s.accept()), daemon=True).start()
    yield f"127.0.0.1:{s.getsockname()[1]}"  # the bare HOST:PORT form, which dask also takes
    s.close()


@pytest.fixture()
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}"


def _refused(address, manifest, tmp_path, *fragments):
    """`msis cohort --scheduler address` in a process: exit 2 with one line, in bounded time, nothing written."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "MSInstanceSaliencyLib", "cohort", str(manifest), "--out", str(out), "--scheduler", address],
                       capture_output=True, text=True, env=_env(), timeout=120)
    seconds = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert (r.returncode, len(lines)) == (2, 1), r.stderr
    assert lines[0].startswith(f"msis: error: --scheduler {address}") and "tcp://10.1.2.3:8786" in lines[0], lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    assert seconds < BOUND_S, seconds
    assert not out.exists()  # refused before any work: not even the results folder
    return lines[0]


def test_http_server_is_not_a_scheduler(http_server, manifest, tmp_path):
    _refused(http_server, manifest, tmp_path, "no dask handshake", "HTTP server")


def test_silent_listener_is_not_a_scheduler(silent_listener, manifest, tmp_path):
    _refused(silent_listener, manifest, tmp_path, f"within {cohort.SCHEDULER_TIMEOUT} s")


def test_closed_port_is_refused_at_once(closed_port, manifest, tmp_path):
    t0 = time.monotonic()
    _refused(closed_port, manifest, tmp_path, "Connection refused")
    assert time.monotonic() - t0 < 15  # no retries for a port nobody listens on


@pytest.mark.parametrize("address, fragment", [
    ("garbage://x", "over tcp:// only"),
    ("inproc://", "over tcp:// only"),
    ("http://127.0.0.1:8787", "over tcp:// only"),
    ("tls://127.0.0.1:8786", "certificates"),
    ("tcp://127.0.0.1", "not a scheduler address"),
    ("tcp://127.0.0.1:0", "not a scheduler address"),
    ("127.0.0.1:70000", "not a scheduler address"),
    ("tcp://:8786", "not a scheduler address"),
    ("nosuchhost.invalid:8786", "unknown host"),
])
def test_other_addresses_are_refused(address, fragment, manifest, tmp_path, capsys):
    t0 = time.monotonic()
    assert main(["cohort", str(manifest), "--out", str(tmp_path / "out"), "--scheduler", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"msis: error: --scheduler {address}") and fragment in err[0], err
    assert time.monotonic() - t0 < cohort.SCHEDULER_TIMEOUT and not (tmp_path / "out").exists()


def test_help_states_the_bound():
    assert cli.SCHEDULER_TIMEOUT == cohort.SCHEDULER_TIMEOUT
    r = subprocess.run([sys.executable, "-m", "MSInstanceSaliencyLib", "cohort", "--help"], capture_output=True, text=True, env=_env())
    text = " ".join(r.stdout.split())
    assert f"within {cohort.SCHEDULER_TIMEOUT} s" in text and "tcp://HOST:PORT" in text, text


# ----------------------------------------------------------------------------- a local cluster: loopback, no pages

def _listening(processes):
    import psutil

    return [c.laddr for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def _page(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("dashboard", [False, True])
def test_local_cluster_listens_on_loopback_and_serves_pages_only_when_asked(dashboard):
    psutil = pytest.importorskip("psutil")
    client, lc = cohort._start_client(None, 1, dashboard=dashboard)
    try:
        me = psutil.Process()
        addresses = _listening([me, *me.children(recursive=True)])  # the client's process (scheduler, nanny) and the worker
        assert len(addresses) >= 4, addresses  # the scheduler, its HTTP server, the nanny and the worker
        assert {a.ip for a in addresses} == {"127.0.0.1"}, addresses  # nothing on 0.0.0.0 or another interface
        http_port = lc.scheduler.http_server.port
        assert ("127.0.0.1", http_port) in [(a.ip, a.port) for a in addresses]
        worker_ports = list(client.run(lambda dask_worker: dask_worker.http_server.port).values())
        pages = ["/status", "/info/main/workers.html", "/json/identity.json", "/health", "/metrics"]
        if dashboard:
            assert client.dashboard_link.startswith("http://127.0.0.1:")
            assert [_page(http_port, p) for p in pages] == [200] * len(pages)
        else:  # dask starts the HTTP servers anyway: they serve nothing, and not on the dashboard's usual port
            assert http_port != 8787
            assert [_page(port, p) for port in [http_port, *worker_ports] for p in pages] == [404] * len(pages) * (1 + len(worker_ports))
    finally:
        cohort._close(client, lc)


def test_a_running_scheduler_is_accepted(manifest):
    client, lc = cohort._start_client(None, 1)
    try:
        assert cohort.check_scheduler(lc.scheduler_address) == lc.scheduler_address
        assert cohort.check_scheduler(lc.scheduler_address.removeprefix("tcp://")) == lc.scheduler_address
        # its HTTP port is not the scheduler (the easy mistake with a dashboard's :8787)
        with pytest.raises(cohort.InputError, match="no dask handshake"):
            cohort.check_scheduler(f"tcp://127.0.0.1:{lc.scheduler.http_server.port}", timeout=2)
        other, none = cohort._start_client(lc.scheduler_address)
        assert none is None and len(other.scheduler_info()["workers"]) == 1
        other.close()

        def logged(message):  # on the worker: would its logger pass this error on to its handlers?
            import logging

            log = logging.getLogger("distributed.worker")
            return log.filter(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)) is not False

        # the local cluster's worker drops only the heartbeat failure a stopping msis causes (Ctrl-C to msis alone)
        assert list(client.run(logged, "Failed to communicate with scheduler during heartbeat.").values()) == [False]
        assert list(client.run(logged, "Compute Failed").values()) == [True]
        # and the client drops tornado's log of dask's own sync() callback failing after a Ctrl-C (before msis's one line)
        import logging

        tornado = logging.getLogger("tornado.application")
        record = tornado.makeRecord(tornado.name, logging.ERROR, __file__, 0,
                                    "Exception in callback functools.partial(<function sync.<locals>.cancel at 0x7f>)", (), None)
        assert tornado.filter(record) is False
        assert tornado.filter(tornado.makeRecord(tornado.name, logging.ERROR, __file__, 0, "Exception in callback other", (), None))
    finally:
        cohort._close(client, lc)


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("whole_group, moment", [(True, "lesions of"), (False, "dask workers")],
                         ids=["terminal-ctrl-c-during-lesions", "kill-INT-main-during-segmentation"])
def test_ctrl_c_is_one_line(whole_group, moment, manifest, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, the dask worker processes too; `kill -INT` the
    main process alone. Either way: `msis: interrupted`, exit 130, and nothing else after it. At `moment`:
    the progress bar (the worker runs lesions) or the workers' start (the worker segments the case)."""
    argv = [sys.executable, "-m", "MSInstanceSaliencyLib", "cohort", str(manifest), "--out", str(tmp_path / "out"), "--workers", "1"]
    # as from a terminal: SIGINT at its default (a suite started in the background inherits it ignored), and a
    # process group of its own, so that the group's signal reaches msis and its workers but not pytest
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, reached = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line.rstrip("\n"))
            if moment in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(180), "\n".join(lines)
        before = len(lines)
        (os.killpg if whole_group else os.kill)(p.pid, signal.SIGINT)
        p.wait(60)
        reader.join(30)  # until every process that holds the pipe (the workers too) has ended
        after = [line for line in lines[before:] if line.strip()]
        assert p.returncode == 130, (p.returncode, lines)
        # a progress line may still come before the interrupt is handled; nothing but the one line after it
        assert after[-1:] == ["msis: interrupted"] and all("lesions of" in line for line in after[:-1]), "\n".join(lines)
        assert not reader.is_alive(), "a worker process outlived msis"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
