"""Start or connect to a dask.distributed cluster.  Only the training entry points use this:
every op returns a lazy Dask array and runs on whatever scheduler is active.  What the rest of
the package needs of a cluster (the active client, scattering arrays to it) is in
:mod:`dask_pconv._client`, which does not import distributed."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import dask
from distributed import Client, LocalCluster

__all__ = ["WORKER_MALLOC", "connect", "worker_malloc"]

logger = logging.getLogger(__name__)


class _OwningClient(Client):
    """A client that closes the cluster :func:`connect` started for it."""

    def close(self, *args, **kwargs):
        out = super().close(*args, **kwargs)
        self.cluster.close()
        return out


class _ClosingClient(Client):
    """A client that, when it cannot reach its scheduler, stops the event-loop thread it
    started instead of leaving it running (a later cluster in the same process then failed
    to start its own loop)."""

    def start(self, **kwargs):
        try:
            return super().start(**kwargs)
        except BaseException:
            # close() does nothing for a client that never connected, and close() is where
            # distributed stops a client's loop runner (https://github.com/dask/distributed/pull/4112):
            # stop its loop directly.
            # The connection error is what the caller needs, even if the loop is slow to stop.
            try:
                self._loop_runner.stop()
            except Exception as stop_error:
                logger.warning("the failed client's event loop did not stop: %s", stop_error)
            raise


def _loopback_dashboard(address):
    """``address`` with 127.0.0.1 filled in where it names only a port (``":8799"``, ``":0"``,
    ``8799``): distributed binds such an address on every interface
    (https://github.com/dask/distributed/pull/3941), and a cluster started here listens on
    loopback unless the user names the host.  ``""`` or spaces mean no dashboard (None)."""
    if isinstance(address, int) and not isinstance(address, bool):
        return f"127.0.0.1:{address}"
    if isinstance(address, str):
        text = address.strip()
        if not text:  # no dashboard, as the CLI's --dashboard '' (distributed: every interface, port 8787)
            return None
        if text.startswith(":"):
            return f"127.0.0.1{text}"
        if text.isdigit():
            return f"127.0.0.1:{text}"
    return address


def connect(
    address=None,
    *,
    cuda=False,
    n_workers=None,
    threads_per_worker=None,
    memory_limit="auto",
    dashboard_address="127.0.0.1:8787",
    security=None,
):
    """A ``distributed.Client``.

    Parameters
    ----------
    address : str, optional
        Connect to this existing scheduler (``tcp://host:8786``, ``tls://...``).  Otherwise a
        new cluster is started on this machine, listening on 127.0.0.1 only.
    cuda : bool
        Start dask-cuda's ``LocalCUDACluster`` (one worker per GPU) instead of a LocalCluster.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        For a new cluster.  ``dashboard_address=None`` turns the dashboard off, and so does
        ``""`` (or only spaces), as ``dask-pconv train --dashboard ''`` does; a port alone
        (``":8799"``, ``":0"`` for a free one) listens on 127.0.0.1, and a named host
        (``"0.0.0.0:8799"``) is taken as given.  With
        ``cuda=True``, ``None`` workers or threads mean dask-cuda's defaults: one worker per
        GPU, one thread each.
    security : distributed.Security or bool, optional
        TLS settings (``distributed.Security``, e.g. from certificate files).  ``True`` runs a
        new cluster over TLS with temporary self-signed credentials (needs ``cryptography``:
        ``pip install 'dask-pconv[tls]'``).

    Returns
    -------
    distributed.Client
        Closing the client also closes a cluster it started.  The worker processes of a
        cluster started here ignore SIGINT, so a Ctrl-C in the terminal (which reaches the
        whole process group) interrupts the client only, and training stops cleanly.  While
        the new cluster starts (seconds), Ctrl-C is ignored: its worker processes, still
        starting, would print a traceback each.

    Every socket of a new cluster (the scheduler, its dashboard or, without one, its HTTP
    server for ``/health`` and ``/metrics``, the nannies, the workers and their HTTP servers)
    listens on 127.0.0.1 only, unless ``dashboard_address`` names another host.
    """
    if address is not None:
        return _connect_to_scheduler(address, security)
    kwargs = _new_cluster_kwargs(n_workers, threads_per_worker, memory_limit, dashboard_address, security)
    with _sigint_ignored():
        cluster = _local_cuda_cluster(**kwargs) if cuda else _local_cluster(**kwargs)
        return _OwningClient(cluster)


def _check_scheduler_address(address):
    """``ValueError`` unless ``address`` can be a scheduler's (``tcp://host:port``, ...)."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"scheduler address must look like 'tcp://host:port', got {address!r}")
    if address.split("://", 1)[0] in ("http", "https"):
        raise ValueError(
            f"{address!r} looks like a dashboard (HTTP) address; the scheduler's is "
            "'tcp://host:8786' (or 'tls://...')"
        )


def _connect_to_scheduler(address, security):
    """A client of the running scheduler at ``address`` (``security=True`` means none: there
    are no temporary credentials for a cluster started elsewhere)."""
    _check_scheduler_address(address)
    try:
        return _ClosingClient(address, security=None if security is True else security)
    except OSError as e:
        raise OSError(
            f"could not connect to the scheduler at {address!r}: {e} "
            "(is it running, and reachable from here? distributed.comm.timeouts.connect sets "
            "how long to try)"
        ) from e


def _check_tls_credentials(security):
    """``ImportError`` if ``security=True`` asks for temporary credentials without cryptography."""
    if security is True:
        try:
            import cryptography  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "security=True (temporary TLS credentials) needs cryptography: pip install 'dask-pconv[tls]'"
            ) from e


def _new_cluster_kwargs(n_workers, threads_per_worker, memory_limit, dashboard_address, security):
    """The keyword arguments of a new cluster, for either kind, listening on loopback."""
    kwargs = dict(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        dashboard_address=_loopback_dashboard(dashboard_address),
        # the workers ignore Ctrl-C: the client stops cleanly between steps, then closes them
        preload=["dask_pconv._worker_init"],
    )
    _check_tls_credentials(security)
    if security not in (None, False):
        kwargs["security"] = security
    if kwargs["dashboard_address"] is None:
        # no dashboard, but the scheduler still serves /health and /metrics over HTTP: on a free
        # loopback port (by default it tries port 8787 and warns when that is taken;
        # https://github.com/dask/distributed/issues/7207)
        kwargs["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    return kwargs


#: glibc malloc settings for the worker processes of the clusters started here.  distributed
#: sets ``MALLOC_TRIM_THRESHOLD_=65536`` before it spawns a worker, so that freed memory goes
#: back to the OS (https://distributed.dask.org/en/stable/worker-memory.html#automatically-trim-memory);
#: setting any threshold also fixes glibc's mmap threshold at 128 KiB (mallopt(3): the dynamic
#: adjustment is off), so every large temporary array a kernel makes is a fresh mmap whose pages
#: fault in one by one.  A VGG16 training step (width 1, batch 64, one thread) computed in 0.96 s
#: in a plain process and in 1.64 s with that setting; with both thresholds at 64 MiB, 0.98 s,
#: and at most 64 MiB of freed memory stays with a worker.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}


@contextlib.contextmanager
def worker_malloc():
    """Within it, a nanny starts its worker with :data:`WORKER_MALLOC` in the environment (the
    variables must be set before the process starts, so they go through distributed's
    ``distributed.nanny.pre-spawn-environ``)."""
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    # A variable in this process's environment overrides the config (distributed's nanny.py,
    # _get_env_variables), and every nanny copies its settings into this process's environment
    # before it spawns: an earlier cluster's MALLOC_TRIM_THRESHOLD_=65536 would win.  A value
    # that is distributed's own goes; one set to anything else (by the user) stays.
    for name in WORKER_MALLOC:
        if name in environ and os.environ.get(name) == str(environ[name]):
            del os.environ[name]
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {**environ, **WORKER_MALLOC}}):
        yield


def _local_cluster(**kwargs):
    """A ``distributed.LocalCluster`` of worker processes on 127.0.0.1 (:func:`worker_malloc`)."""
    with worker_malloc():
        return LocalCluster(host="127.0.0.1", processes=True, **kwargs)


def _local_cuda_cluster(**kwargs):
    """dask-cuda's ``LocalCUDACluster`` on 127.0.0.1; ``n_workers`` or ``threads_per_worker``
    None mean its defaults."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise ImportError(
            "cuda=True needs dask-cuda and CuPy: pip install 'dask-pconv[gpu]' "
            "(or: pip install dask-cuda 'cupy-cuda12x[ctk]')"
        ) from e
    # dask-cuda's own defaults: one worker per GPU, one thread each (it refuses None;
    # https://docs.nvidia.com/dask-cuda/26.10/api/)
    for name in ("n_workers", "threads_per_worker"):
        if kwargs[name] is None:
            del kwargs[name]
    with worker_malloc():
        return LocalCUDACluster(host="127.0.0.1", **kwargs)


# --- Ctrl-C while a cluster starts or closes, and a quiet shutdown ------------------------


@contextlib.contextmanager
def _sigint_ignored():
    """Within it, SIGINT (Ctrl-C) is ignored by this process, when called from its main thread,
    and by the processes it starts meanwhile, which inherit the setting: a Ctrl-C reaches the
    whole process group, and one while a cluster started printed a traceback from every worker
    process still importing (the preload that makes them ignore it had not run yet) and left a
    half-built cluster that failed again at exit: 113 lines on standard error (issue 18).
    (Blocking the signal instead, to act on it later, does not reach the workers: a new
    process starts with no signal blocked.)"""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None  # None too: not set from Python
    if previous is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


#: the loggers whose records a cluster's shutdown makes: a worker's heartbeat cut short by its
#: own closing connections logs a 30-line CommClosedError traceback (issue 18;
#: https://github.com/dask/distributed/issues/7192), a nanny that has to kill its worker warns
_SHUTDOWN_LOGGERS = ("distributed", "tornado", "asyncio")


@contextlib.contextmanager
def _loggers_off(prefixes):
    """Within it, every logger named by ``prefixes`` or under them is disabled in this process."""
    loggers = [
        lg
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and any(name == p or name.startswith(f"{p}.") for p in prefixes)
    ]
    was = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, disabled in zip(loggers, was):
            lg.disabled = disabled


def _worker_logs_off(client_pid):
    """Run on each worker of a closing cluster: its process ends with the cluster, and nothing
    it logs from now on is about the work.  Not where the worker shares the client's process."""
    if os.getpid() != client_pid:
        logging.disable(logging.CRITICAL)


def _close_quietly(client):
    """Close ``client`` and the cluster :func:`connect` started for it without distributed's
    shutdown noise: its workers stop logging first, and this process's distributed, tornado and
    asyncio loggers are off while it closes.  What the run itself logged is not touched: this
    starts when the run is over.  A Ctrl-C meanwhile is ignored (closing takes seconds)."""
    with _sigint_ignored(), _loggers_off(_SHUTDOWN_LOGGERS):
        with contextlib.suppress(Exception):  # a lost scheduler: nothing left to quiet
            client.run(_worker_logs_off, os.getpid(), on_error="ignore")
        client.close()
