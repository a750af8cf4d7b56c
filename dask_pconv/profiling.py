"""Where the time went: distributed's performance report plus a per-operator summary.

    from dask_pconv.profiling import profile
    with profile("report.html"):          # writes report.html, report-summary.json, report-summary.png
        trainer.run(1)

Task keys are named by operator (``conv2d-fwd``, ``conv2d-gx``, ``conv2d-gw``, ``conv2d-halo``,
``batch_norm-stats``, ``sgd-update``, ...), so the dashboard's task stream and this summary
read as the network does.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path

__all__ = ["CATEGORIES", "categorize", "profile", "summarize"]

#: summary category -> task-name prefixes (matched in order; the first match wins)
CATEGORIES = {
    "halo slicing": ("conv2d-halo", "max_pool2d-halo"),
    "conv forward": ("conv2d-fwd",),
    "conv grad-x": ("conv2d-gx",),
    "conv grad-w": ("conv2d-gw",),
    "pooling": ("max_pool2d",),
    "batchnorm": ("batch_norm",),
    "dropout": ("dropout",),
    "optimizer": ("sgd-",),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [summary[n] for n in names], color="tab:blue")
    ax.set_xlabel("seconds (summed over workers)")
    ax.set_title("time per operator")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def profile(path):
    """Record what runs inside on the active ``distributed.Client``.

    Writes ``path`` (distributed's performance report, self-contained HTML: ``mode="inline"``
    so it opens with no network), and beside it ``<stem>-summary.json`` and
    ``<stem>-summary.png``: seconds per operator (conv forward, grad-x, grad-w, halo slicing,
    BatchNorm, pooling, reductions, optimizer, transfers, ...).  Yields a dict that holds the
    summary once the block ends.
    """
    from distributed import get_task_stream, performance_report

    path = Path(path)
    result = {}
    with performance_report(filename=str(path), mode="inline"), get_task_stream() as ts:
        yield result
    summary = summarize(ts.data)
    result.update(summary)
    stem = path.with_suffix("")
    Path(f"{stem}-summary.json").write_text(json.dumps({"seconds": summary, "tasks": len(ts.data)}, indent=2))
    _chart(summary, f"{stem}-summary.png")
