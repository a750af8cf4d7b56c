"""Where the time went: distributed's performance report plus a per-operator summary.

    from dask_pconv.profiling import profile
    with profile("report.html"):          # writes report.html, report-summary.json, report-summary.png
        trainer.run(1)

Task keys are named by operator (``conv2d-fwd``, ``conv2d-gx``, ``conv2d-gw``, ``conv2d-halo``,
``batch_norm-stats``, ``sgd-update``, ...), so the dashboard's task stream and this summary
read as the network does.

:func:`peak_memory` records each worker's peak resident memory during a block against its
memory limit (distributed's own monitors sample every 0.1-0.5 s and keep no peak).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import defaultdict
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["CATEGORIES", "PeakMemory", "categorize", "peak_memory", "profile", "report_paths", "summarize"]

#: summary category -> task-name prefixes (matched in order; the first match wins)
CATEGORIES = {
    "halo slicing": ("conv2d-halo", "max_pool2d-halo"),
    "conv forward": ("conv2d-fwd",),
    "conv grad-x": ("conv2d-gx",),
    "conv grad-w": ("conv2d-gw",),
    "conv grad-b": ("conv2d-gb",),
    "linear": ("linear-",),
    "pooling": ("max_pool2d",),
    "batchnorm": ("batch_norm",),
    "dropout": ("dropout",),
    "optimizer": ("sgd-", "step-velocity", "step-param"),
    # a staged step (dask_pconv.stages.step): whole stages, the small picks other chunks read, the
    # running statistics
    "forward stages": ("step-fwd", "step-last"),
    "backward stages": ("step-bwd",),
    "exchange": ("step-stats", "step-sums", "step-grad", "step-borders", "step-strips"),
    "running statistics": ("step-running",),
    "loss": ("step-loss", "step-accuracy"),
    "reductions": ("sum", "mean", "max", "arg", "chunk_", "tree"),
}


def categorize(task_name):
    """The summary category of a task name (its key prefix), or ``"other"``."""
    for category, prefixes in CATEGORIES.items():
        if task_name.startswith(prefixes):
            return category
    return "other"


def summarize(task_stream):
    """Seconds of compute per category, plus ``"transfers"`` and ``"disk"``, from the records of
    ``distributed.get_task_stream``."""
    from dask.utils import key_split

    out = defaultdict(float)
    for rec in task_stream:
        name = key_split(rec["key"])
        for ss in rec.get("startstops", ()):
            dt = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                out[categorize(name)] += dt
            elif ss["action"] == "transfer":
                out["transfers"] += dt
            else:
                out["disk"] += dt
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _chart(summary, path):
    # no pyplot: the user's backend and figures stay alone
    # (https://matplotlib.org/stable/gallery/user_interfaces/web_application_server_sgskip.html)
    from matplotlib.figure import Figure

    names = list(summary)[::-1]
    fig = Figure(figsize=(7, 0.4 * len(names) + 1.2))
    ax = fig.subplots()
    ax.barh(names, [summary[n] for n in names], color="tab:blue")
    ax.set_xlabel("seconds (summed over workers)")
    ax.set_title("time per operator")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def _drop_remote_icon(path):
    """distributed's report template links its favicon from docs.dask.org
    (https://github.com/dask/distributed/issues/3754): the one request the report would make
    (an error logged in an offline browser).  Drop the link."""
    html = path.read_text(encoding="utf-8")
    out = re.sub(r'<link rel="(?:shortcut )?icon" href="https?://[^"]*"\s*/?>\s*', "", html)
    if out != html:
        path.write_text(out, encoding="utf-8")


def report_paths(path):
    """The files :func:`profile` writes for ``path``.

    Parameters
    ----------
    path : str or path
        The performance report's file name, e.g. ``"report.html"``.

    Returns
    -------
    tuple of pathlib.Path
        ``(path, <stem>-summary.json, <stem>-summary.png)``, in that order.
    """
    path = Path(path)
    stem = path.with_suffix("")
    return path, Path(f"{stem}-summary.json"), Path(f"{stem}-summary.png")


@contextlib.contextmanager
def profile(path):
    """Record what runs inside on the active ``distributed.Client``.

    Writes ``path`` (distributed's performance report, self-contained HTML: ``mode="inline"``
    so it opens with no network, https://github.com/dask/distributed/issues/4999), and beside
    it ``<stem>-summary.json`` and ``<stem>-summary.png``: seconds per operator (conv forward,
    grad-x, grad-w, halo slicing, BatchNorm, pooling, reductions, optimizer, transfers, ...);
    :func:`report_paths` names the three.  Yields a dict that holds the summary once the block ends.
    """
    from distributed import get_task_stream, performance_report

    path, summary_json, summary_png = report_paths(path)
    result = {}
    with performance_report(filename=str(path), mode="inline"), get_task_stream() as ts:
        yield result
    _drop_remote_icon(path)
    summary = summarize(ts.data)
    result.update(summary)
    summary_json.write_text(json.dumps({"seconds": summary, "tasks": len(ts.data)}, indent=2))
    _chart(summary, summary_png)


class PeakMemory(WorkerPlugin):
    """A ``distributed`` worker plugin that samples the worker process's resident memory (RSS,
    the figure the nanny holds against the memory limit) every ``interval`` seconds in a
    thread of its own and keeps the peak.  Use it through :func:`peak_memory`.
    """

    name = "dask-pconv-peak-memory"
    idempotent = False

    def __init__(self, interval=0.01):
        self.interval = interval

    def setup(self, worker):
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self.samples = 0
        self.limit = worker.memory_manager.memory_limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=self.name, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = self._process.memory_info().rss
            self.samples += 1
            if rss > self.peak:
                self.peak = rss

    def teardown(self, worker):
        self._stop.set()
        self._thread.join()

    def record(self):
        """``{"peak", "start", "limit"}`` in bytes (``limit`` None if the worker has none) and
        the number of ``samples``."""
        rss = self._process.memory_info().rss  # the last moment counts too
        self.peak = max(self.peak, rss)
        return {"peak": self.peak, "start": self.start, "limit": self.limit, "samples": self.samples}


def _record(name, dask_worker):
    return dask_worker.plugins[name].record()


@contextlib.contextmanager
def peak_memory(client=None, interval=0.01):
    """Record every worker's peak resident memory while the block runs.

    Registers :class:`PeakMemory` on the workers of ``client`` (the current client if None)
    on entry and removes it on exit.  Yields a dict that, once the block ends, holds
    ``"workers"``: address -> ``{"peak", "start", "limit", "samples"}`` (bytes; ``start`` is
    the resident memory on entry, ``limit`` the worker's memory limit or None), and
    ``"lost"``: the addresses of workers that were there on entry and are gone on exit (a
    worker restarted by its nanny, e.g. for crossing its memory limit, comes back under a new
    address, and its peak restarts from zero).

    Example::

        with peak_memory(client) as mem:
            dp.to_zarr(y, "out.zarr")
        for addr, m in mem["workers"].items():
            print(addr, m["peak"] / m["limit"])
    """
    import distributed

    client = client or distributed.get_client()
    plugin = PeakMemory(interval)
    before = set(client.scheduler_info()["workers"])
    client.register_plugin(plugin, name=PeakMemory.name)
    result = {}
    try:
        yield result
        result["workers"] = client.run(_record, PeakMemory.name)
        result["lost"] = sorted(before - set(client.scheduler_info()["workers"]))
    finally:
        client.unregister_worker_plugin(PeakMemory.name)
