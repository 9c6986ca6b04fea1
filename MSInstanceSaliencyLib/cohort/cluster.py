"""The dask cluster of a run: the check of a --scheduler address (a dask scheduler answers there), the
client on it or on a local cluster sized for the model (model_cluster), and their close."""

from __future__ import annotations

import contextlib
import time

from ..errors import InputError

LOOPBACK = "127.0.0.1"  # a local cluster listens here only: its pages and ports show case ids
SCHEDULER_TIMEOUT = 10  # seconds to reach a --scheduler and hear its handshake, then to connect the client
SCHEDULER_FORM = "a scheduler's address looks like tcp://10.1.2.3:8786: its port (8786 by default), not its dashboard's (8787)"
MAX_HANDSHAKE_BYTES = 1 << 20  # a dask scheduler's first message (its handshake) is some 100 bytes


def _scheduler_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a --scheduler address, tcp://HOST:PORT or HOST:PORT; any other form is refused."""
    from distributed.comm.addressing import parse_host_port

    scheme, sep, location = address.strip().partition("://")
    if not sep:
        scheme, location = "tcp", address.strip()
    if scheme == "tls":
        raise InputError(f"--scheduler {address}: a tls:// scheduler needs the cluster's certificates, which msis cohort does not take; "
                         f"give one reached over tcp:// ({SCHEDULER_FORM})")
    if scheme != "tcp":
        raise InputError(f"--scheduler {address}: msis cohort reaches schedulers over tcp:// only; {SCHEDULER_FORM}")
    try:
        host, port = parse_host_port(location)
    except (ValueError, TypeError):
        host, port = "", 0
    if not host or not 0 < int(port) < 65536:
        raise InputError(f"--scheduler {address} is not a scheduler address; {SCHEDULER_FORM}")
    return host, int(port)


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> str:
    """The tcp:// address of the dask scheduler at `address`, after making sure, within `timeout` seconds,
    that one answers there (InputError otherwise, before any work starts). A dask scheduler speaks first:
    it sends its handshake, 8 bytes of length and a small message, as a connection opens. dask's own
    client waits for that handshake without a time limit and trusts the length, so an HTTP server (a
    dashboard), a silent listener or another protocol would hang it or make it allocate exabytes."""
    import socket
    import struct

    host, port = _scheduler_host_port(address)
    deadline = time.monotonic() + timeout

    def refuse(why):
        raise InputError(f"--scheduler {address}: {why}; {SCHEDULER_FORM}. Start the cluster first (docs/COHORTS.md), or leave "
                         "--scheduler out for a local one")

    def receive(sock, n):
        data = b""
        while len(data) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(n - len(data))
            if not chunk:
                refuse("the server there closed the connection without a dask handshake, so it is not a dask scheduler")
            data += chunk
        return data

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        refuse(f"no answer within {timeout:g} s (the host is unreachable, or a firewall drops the connection)")
    except socket.gaierror as exc:
        refuse(f"unknown host {host!r} ({exc.strerror})")
    except OSError as exc:
        refuse(f"cannot connect ({exc.strerror or exc})")
    try:
        with sock:
            (length,) = struct.unpack("Q", receive(sock, 8))  # dask's frame header: native unsigned 64 bits
            if not 0 < length <= MAX_HANDSHAKE_BYTES:
                refuse("the server there answered, but not as a dask scheduler does (an HTTP server, a dashboard or another service?)")
            receive(sock, length)
    except socket.timeout:
        refuse(f"something listens there but sent no dask handshake within {timeout:g} s (an HTTP server, such as a dask dashboard?)")
    except OSError as exc:
        refuse(f"the connection failed before a dask handshake ({exc.strerror or exc})")
    return f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}"


def _start_client(scheduler, n_workers=None, *, gpu=False, dashboard=False):
    """(dask Client, LocalCluster or None): on `scheduler` (an existing cluster's address) or on a
    LocalCluster of n_workers processes of one dask thread each (torch threads are set by the model
    plugin), with one GPU resource each when `gpu`. A local cluster listens on the loopback interface
    only, and serves its dashboard (127.0.0.1:8787, or a free port) only when `dashboard`."""
    import logging

    from distributed import Client, LocalCluster

    if scheduler:
        scheduler = check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever dask met there, the address is the problem: one line
            raise InputError(f"--scheduler {scheduler}: cannot connect a dask client ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}); start the cluster first (docs/COHORTS.md) or leave "
                             "--scheduler out for a local one") from None
        return client, None
    # the case ids are in the task keys that every dask HTTP page shows: without --dashboard the scheduler's and the
    # workers' HTTP servers (dask always starts them) serve no page at all, on a free loopback port
    kw = dict(n_workers=n_workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR, host=LOOPBACK,
              dashboard_address=f"{LOOPBACK}:8787" if dashboard else None,
              scheduler_kwargs=None if dashboard else {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"})
    if gpu:
        kw["resources"] = {"GPU": 1}
    import dask

    # dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which turns off glibc's adaptive mmap
    # threshold: every activation buffer of a backward pass is then mmap'd and unmapped again, and a
    # pass took about 2x as long (profiled by hand, demo model, this CPU). Workers keep the default.
    config = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    if not dashboard:
        config.update({"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []})
    client = cluster = None
    try:
        with dask.config.set(config), _sigint_blocked_in_new_threads():
            cluster = LocalCluster(**kw)
            client = Client(cluster)
            client.register_plugin(_quiet_heartbeat_plugin(), name=_QUIET_HEARTBEAT)
        logging.getLogger("tornado.application").addFilter(_not_an_interrupted_sync)
    except BaseException:  # a Ctrl-C held back while they started arrives as the block ends: stop them again
        _close(client, cluster)
        raise
    return client, cluster


_QUIET_HEARTBEAT = "msis-quiet-heartbeat"
_HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"


def _not_a_heartbeat_failure(record) -> bool:
    return not record.getMessage().startswith(_HEARTBEAT_FAILURE)


_INTERRUPTED_SYNC = "Exception in callback functools.partial(<function sync.<locals>.cancel"


def _not_an_interrupted_sync(record) -> bool:
    """Drops one log record of distributed (2026.8.0 here): a Ctrl-C inside the client's `sync()` before its future
    exists makes sync's own `cancel` callback fail (NameError: free variable 'future'), and tornado logs
    that traceback before msis's one line. The interrupt itself still stops the run."""
    return not record.getMessage().startswith(_INTERRUPTED_SYNC)


def _quiet_heartbeat_plugin():
    """A worker plugin that drops the worker's "Failed to communicate with scheduler during heartbeat"
    log (a traceback, on the terminal): a local cluster's scheduler lives in msis's own process, so the
    worker only misses it when msis is stopping, a Ctrl-C to msis alone for one, and the traceback would
    come before msis's one line. Everything the run needs to know reaches the client as task results."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietHeartbeat(WorkerPlugin):
        name = _QUIET_HEARTBEAT

        def setup(self, worker):
            import logging

            logging.getLogger("distributed.worker").addFilter(_not_a_heartbeat_failure)

    return QuietHeartbeat()


@contextlib.contextmanager
def _sigint_blocked_in_new_threads():
    """Ctrl-C in a terminal signals the whole process group, so local dask worker processes would print
    tracebacks of their own beside the client's one line. Threads inherit the signal mask of the thread
    that creates them, and processes that of the thread that starts them: dask's threads created within
    (its event loop, which starts the workers, now and when it restarts one) keep SIGINT blocked, and so
    do the workers. This thread unblocks it at the end, and gets a Ctrl-C that came meanwhile then."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no process groups' SIGINT)
        yield
        return
    from multiprocessing import resource_tracker

    # whichever thread starts multiprocessing's resource tracker unblocks SIGINT in itself (dask's loop would):
    # start it here, before
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def model_cluster(cfg, *, scheduler=None, workers=None, dashboard=False, max_workers=None, log=None, on_start=None):
    """The cluster a run's model tasks go to, as (client, task resources). A local one has a worker per CPU core
    (torch threads: the cores shared out, or MSIS_THREADS), or per GPU, at most max_workers; `cfg.threads` is set
    to the torch threads of each worker (None: the workers' own, on a --scheduler). on_start() runs once the
    cluster is up; each worker then loads cfg.model once (tasks.model_plugin). Closed when the block ends."""
    import os

    from ..models.device import resolve_device
    from .tasks import model_plugin

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = False
    if not scheduler:
        dev = resolve_device(cfg.model.get("device", "auto"))
        if dev.type == "cuda":
            import torch

            gpu = True
            workers = workers or max(1, torch.cuda.device_count())
        workers = workers or cores
        workers = min(workers, max_workers) if max_workers else workers
        # MSIS_THREADS, as for every msis command, sets the torch threads of each worker
        cfg.threads = 1 if gpu else int(os.environ.get("MSIS_THREADS") or max(1, cores // workers))
    client, cluster = _start_client(scheduler, workers, gpu=gpu, dashboard=dashboard)
    try:
        if on_start is not None:
            on_start()
        gpu = gpu or (scheduler is not None and _workers_have_gpus(client))
        if dashboard and log:
            log(f"Dask dashboard: {client.dashboard_link}")
        if log:
            n_workers = len(client.scheduler_info().get("workers", {}))
            log(f"{n_workers} dask workers" + (f", {cfg.threads} torch thread{'s' if cfg.threads != 1 else ''} each" if cfg.threads else "")
                + (", one GPU each" if gpu else ""))
        client.register_plugin(model_plugin(cfg.model, cfg.threads), name="msis-model")
        yield client, ({"resources": {"GPU": 1}} if gpu else {})
    finally:
        _close(client, cluster)


def _workers_have_gpus(client) -> bool:
    return any((w.get("resources") or {}).get("GPU") for w in client.scheduler_info().get("workers", {}).values())


def _close(client, cluster):
    """Close the client, and the local cluster if any. dask's loggers are quiet meanwhile: a worker that
    ended first (a Ctrl-C, its nanny) makes the scheduler log errors that tell a user nothing (the results
    are written already), after the run's last line."""
    import logging

    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    dask_log.setLevel(logging.CRITICAL)
    try:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
    finally:
        dask_log.setLevel(level)
