"""Shared helpers for the benchmark scripts: timing, tables, JSON output, machine info."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from datetime import datetime, timezone

import dask


def best_of(fn, repeat=5, warmup=1):
    """Minimum wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(fns, repeat=5, warmup=1):
    """Median wall time of each function in ``fns`` (name -> callable), timed round-robin so
    that drifts of the machine's speed hit all of them alike (medians: on this shared 2-core
    machine single runs vary by up to 2x, and minima reward lucky outliers)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


class StepGraphs:
    """What :func:`step_graphs` records: the seconds each step's graph took to build, and the
    latest step's lazy outputs (only the latest: each holds the inputs of its step alive)."""

    def __init__(self):
        self.build_seconds = []
        self.latest = None


@contextlib.contextmanager
def step_graphs():
    """Record the step graphs :class:`~dask_pconv.train.Trainer` builds inside the block.

    Wraps ``dask_pconv.train.training_step``, the function ``Trainer.submit_step`` calls to
    build a step's graph, so what is timed is the client's graph construction of the real
    step, whatever the model's internals; restored on exit.
    """
    import dask_pconv.train as train

    rec, original = StepGraphs(), train.training_step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        outs = original(*args, **kwargs)
        rec.build_seconds.append(time.perf_counter() - t0)
        rec.latest = outs
        return outs

    train.training_step = timed
    try:
        yield rec
    finally:
        train.training_step = original


#: task-stream categories (:data:`dask_pconv.profiling.CATEGORIES`) that are convolution work
CONV_CATEGORIES = ("conv forward", "conv grad-x", "conv grad-w", "conv grad-b")


def non_conv_share(task_stream):
    """Share of the workers' compute time (from ``distributed.get_task_stream`` records) spent
    in tasks that are not convolutions: halo slicing, BatchNorm, pooling, reductions, the
    optimizer...; transfers and disk are not compute and not counted.  None if nothing ran."""
    from dask_pconv.profiling import summarize

    compute = {k: v for k, v in summarize(task_stream).items() if k not in ("transfers", "disk")}
    total = sum(compute.values())
    if total == 0:
        return None
    return 1 - sum(compute.get(c, 0.0) for c in CONV_CATEGORIES) / total


def machine():
    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy

    info["numpy"] = numpy.__version__
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def table(rows, columns):
    """Print ``rows`` (dicts) as a fixed-width table with these columns."""
    widths = [max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_json(path, name, rows, **extra):
    if path is None:
        return
    out = {"benchmark": name, "machine": machine(), "rows": rows, **extra}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


#: the per-block convolution kernels, by function name (dask_pconv/kernels/conv.py)
CONV_KERNELS = ("conv2d_forward", "conv2d_grad_x", "conv2d_grad_w", "conv2d_grad_b")


#: the task functions of a staged step, by module
STEP_TASKS = {
    "dask_pconv/stages/train_block.py": ("unit_forward", "unit_last", "unit_backward"),
    "dask_pconv/stages/outputs.py": ("sgd_velocity", "running", "mean_of"),
    "dask_pconv/optim.py": ("apply_velocity",),
}


def kernel_share(compute):
    """Share of the staged step tasks' time in ``compute()`` (run here, on the synchronous
    scheduler, one BLAS thread as on a worker) spent outside the convolution kernels, from
    :mod:`cProfile`: a stage runs several kernels in one task, so only a profile tells
    them apart.  Returns ``(share, seconds per kernel)``; None for a step that is not staged."""
    import cProfile
    import pstats

    from threadpoolctl import threadpool_limits

    prof = cProfile.Profile()
    with threadpool_limits(1), dask.config.set(scheduler="sync"):
        torch = _torch_threads(1)
        prof.enable()
        compute()
        prof.disable()
        _torch_threads(torch)
    stats = pstats.Stats(prof).stats
    # the tasks' own time: the staged step's task functions, not the scheduler's bookkeeping
    total = sum(
        ct
        for (path, _, fn), (_, _, _, ct, _) in stats.items()
        if any(path.endswith(module) and fn in names for module, names in STEP_TASKS.items())
    )
    per = {}
    for (path, _, fn), (_, _, _, ct, _) in stats.items():
        if fn in CONV_KERNELS and path.endswith("kernels/conv.py"):
            per[fn] = per.get(fn, 0.0) + ct
    return (1 - sum(per.values()) / total if total else None), per


def _torch_threads(n):
    """Set PyTorch's thread count (if it is installed); returns the previous one."""
    try:
        import torch
    except ImportError:
        return None
    if n is None:
        return None
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old
