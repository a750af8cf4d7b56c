"""What a training run reports: Chainer's LogReport table rows, ``log.json`` and the loss and
accuracy plots, each file written atomically."""

from __future__ import annotations

import json
import os

__all__ = ["LOG_KEYS", "format_row", "write_log"]

LOG_KEYS = (
    "epoch",
    "main/loss",
    "validation/main/loss",
    "main/accuracy",
    "validation/main/accuracy",
    "elapsed_time",
)


def format_row(values):
    """One row of the table: ``values`` under the :data:`LOG_KEYS` columns (floats to 6
    significant digits)."""
    return "".join(f"{_fmt(v):<{max(len(k), 12) + 2}}" for k, v in zip(LOG_KEYS, values))


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_log(out, log):
    """``out/log.json`` and the plots ``out/loss.png``, ``out/accuracy.png`` of ``log`` (a list
    of per-epoch dicts with Chainer's LogReport keys)."""
    tmp = out / f".log.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(log, indent=2))
    os.replace(tmp, out / "log.json")
    _plot(log, ["main/loss", "validation/main/loss"], out / "loss.png", "loss")
    _plot(log, ["main/accuracy", "validation/main/accuracy"], out / "accuracy.png", "accuracy")


def _plot(log, keys, path, ylabel):
    """A line plot per key over the epochs, written atomically; pyplot's global state (and the
    user's matplotlib backend) is left alone: a ``Figure`` of its own, as
    https://matplotlib.org/stable/gallery/user_interfaces/web_application_server_sgskip.html
    does."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [e["epoch"] for e in log]
    for k in keys:
        ax.plot(epochs, [e[k] for e in log], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
