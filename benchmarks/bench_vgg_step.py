"""3. One VGG16 training step (forward, backward, momentum SGD) on a LocalCluster of 2 workers
x 1 thread, against a PyTorch CPU step of the same network (2 threads), float32.

Reports per case: the step time (median of the timed steps, after a warm-up step), PyTorch's
step and the ratio; the step's graph: tasks per step (the Trainer's count) and its critical
path (the longest chain of dependent tasks, :func:`dask_pconv.graphstats.graph_stats`); the
client's time per step: building the graph (``client build s``, the ``training_step`` call in
``Trainer.submit_step``) and all of ``submit_step`` (``client submit s``: the build plus the
graph's optimisation and hand-off to the scheduler); the share of compute spent outside the
convolution kernels, from the task stream of one fine-grained step (``non-conv share``: one
kernel per task) and from a profile of the step as it runs (``non-conv share, profiled``: for a
staged step, whose tasks run several kernels each; cProfile's cost per call falls mostly on the
many small non-convolution calls, so it errs high); and the scheduler overhead (wall time minus
the busiest worker's compute time).

The floor cases (width 1/16, batch 4, 32x32) have negligible compute: their step time is what
the graph's shape costs, about critical path x one dependent hop through the scheduler.

    python benchmarks/bench_vgg_step.py --json vgg_step.json
"""

import argparse
import time
from collections import defaultdict

import dask
import numpy as np
from distributed import get_task_stream, wait

from dask_pconv.cluster import connect
from dask_pconv.data import Dataset
from dask_pconv.graphstats import graph_stats
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer

from _common import interleaved, kernel_share, non_conv_share, step_graphs, table, write_json

CASES = [
    ("batch 64, 32x32, batch:2", 64, 32, {"batch": 2}),
    ("batch 16, 128x128, spatial:2x2", 16, 128, {"spatial": (2, 2)}),
]
#: compute negligible: the step time is the graph's shape (issue 12); always at FLOOR_WIDTH
FLOOR_CASES = [
    ("floor: batch 4, 32x32, batch:2", 4, 32, {"batch": 2}),
    ("floor: batch 4, 32x32, spatial:2x2", 4, 32, {"spatial": (2, 2)}),
    ("floor: batch 4, 32x32, unsplit", 4, 32, {}),
]
FLOOR_WIDTH = 1 / 16
COLUMNS = [
    "case",
    "dask_pconv step s",
    "torch step s",
    "ratio",
    "tasks per step",
    "critical path",
    "client build s",
    "client submit s",
    "non-conv share",
    "non-conv share, profiled",
    "overhead s",
]


def _torch_forward(program, p, x):
    """The model's program in PyTorch (training mode: batch statistics, dropout on)."""
    import torch.nn.functional as F

    from dask_pconv.models import INPUT, Add, BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU

    values = {INPUT: x}
    for node in program.nodes:
        layer, (h, *rest) = node.layer, [values[i] for i in node.inputs]
        w = {k: p[f"{node.name}.{k}"] for k in layer.params()}
        if isinstance(layer, Conv2d):
            h = F.conv2d(h, w["W"], w.get("b"), stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, BatchNorm):
            h = F.batch_norm(h, None, None, w["gamma"], w["beta"], True, 1 - layer.decay, layer.eps)
            h = F.relu(h) if layer.relu else h
        elif isinstance(layer, ReLU):
            h = F.relu(h)
        elif isinstance(layer, MaxPool2d):
            h = F.max_pool2d(h, layer.kernel_size, layer.stride)
        elif isinstance(layer, Dropout):
            h = F.dropout(h, layer.ratio, True)
        elif isinstance(layer, Flatten):
            h = h.flatten(1)
        elif isinstance(layer, Linear):
            h = h @ w["W"].T
        elif isinstance(layer, Add):
            h = sum(rest, h)
        else:
            raise NotImplementedError(f"no PyTorch equivalent here for {type(layer).__name__}")
        values[node.name] = h
    return h


def torch_step_time(model, x, t, steps, device="cpu"):
    """Median seconds of a PyTorch training step of ``model``'s network on ``device``."""
    import torch
    import torch.nn.functional as F

    if device == "cpu":
        torch.set_num_threads(2)
    (params,) = dask.compute(model.params)
    p = {k: torch.tensor(np.asarray(v), requires_grad=True, device=device) for k, v in params.items()}
    vel = {k: torch.zeros_like(v) for k, v in p.items()}
    tx, tt = torch.from_numpy(x).to(device), torch.from_numpy(t).to(device)

    def step():
        h = _torch_forward(model.program, p, tx)
        loss = F.cross_entropy(h, tt)
        for v in p.values():
            v.grad = None
        loss.backward()
        with torch.no_grad():
            for k, v in p.items():
                vel[k].mul_(0.9).sub_(0.05 * (v.grad + 5e-4 * v))
                v.add_(vel[k])
        return loss.item()

    return interleaved({"torch": step}, repeat=steps)["torch"]  # the median after a warm-up step


def _profiled_share(width, size, x, t, split):
    """The non-convolution share of one step of the same network computed here, profiled
    (``_common.kernel_share``): for staged steps, whose tasks hold several kernels each."""
    from dask_pconv.data import chunk_batch
    from dask_pconv.step import training_step

    m, opt = VGG16(width=width, image_size=size), MomentumSGD(0.05, 0.9, 5e-4)
    xd, td = chunk_batch(x, t, split)
    params = m.dask_params(like=xd)
    outs = training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, 0)
    share, _ = kernel_share(lambda: dask.compute(outs))
    return share


def _is_staged(outputs):
    """Whether a step's graph is the stages (dask_pconv.stages.step) or the fine-grained one."""
    loss = outputs[3] if isinstance(outputs, tuple) else outputs.loss
    return loss.name.startswith("step-")


def run(steps=3, width=1.0, cases=CASES, floor_cases=FLOOR_CASES, floor_width=FLOOR_WIDTH):
    rows = []
    rng = np.random.default_rng(0)
    runs = [(c, width) for c in cases] + [(c, floor_width) for c in floor_cases]
    # the library's own cluster (dask_pconv.cluster.connect): its workers' malloc settings
    with connect(n_workers=2, threads_per_worker=1, dashboard_address=None):
        for (label, n, size, split), w in runs:
            x = rng.random((n, 3, size, size), dtype=np.float32)
            t = rng.integers(0, 10, n)
            data = Dataset(x, t, 10, "random")
            model = VGG16(width=w, image_size=size)
            tr = Trainer(
                model,
                data,
                data,
                batch_size=n,
                split=split,
                progress=False,
                optimizer=MomentumSGD(0.05, 0.9, 5e-4),
            )
            tr.train_step(x, t)  # warm-up: parameters move to the workers
            walls, overheads, submits = [], [], []
            with step_graphs() as built:
                for _ in range(steps):
                    with get_task_stream() as ts:
                        t0 = time.perf_counter()
                        loss, acc = tr.submit_step(x, t)  # train_step, with the client's part timed
                        submits.append(time.perf_counter() - t0)
                        dask.compute(loss, acc)
                        wall = time.perf_counter() - t0
                    busy = defaultdict(float)
                    for d in ts.data:
                        for s in d["startstops"]:
                            if s["action"] == "compute":
                                busy[d["worker"]] += s["stop"] - s["start"]
                    walls.append(wall)
                    overheads.append(wall - max(busy.values()))
            stats = graph_stats(built.latest)  # after the timed steps: it optimises the whole graph
            # a stage runs several kernels in one task, so the task stream cannot tell them
            # apart: the non-convolution share comes from one more step on the fine-grained graph,
            # the same kernels one per task
            # the same kernels one per task (the step's backward and update included: wait for
            # the persisted results, before and after, as train_step waits only for the loss)
            wait([*tr.model.params.values(), *tr.velocities.values()])
            with dask.config.set({"pconv.staged": False}), get_task_stream() as ts:
                tr.train_step(x, t)
                wait([*tr.model.params.values(), *tr.velocities.values()])
            share = non_conv_share(ts.data)
            row = {
                "case": label,
                "width": w,
                "dask_pconv step s": float(np.median(walls)),
                "tasks per step": tr.tasks_per_step,
                "critical path": stats.critical_path,
                "graph": stats._asdict(),
                "client build s": float(np.median(built.build_seconds)),
                "client submit s": float(np.median(submits)),
                "staged": _is_staged(built.latest),
                "non-conv share": share,
                "non-conv share, profiled": _profiled_share(w, size, x, t, split),
                "overhead s": float(np.median(overheads)),
            }
            built.latest = None  # it holds its step's inputs on the workers
            print(row, flush=True)
            try:
                row["torch step s"] = torch_step_time(model, x, t, steps)
                row["ratio"] = row["dask_pconv step s"] / row["torch step s"]
            except ImportError:
                pass
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--cases", choices=["all", "main", "floor"], default="all", help="main: CASES at --width")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cases = CASES if args.cases != "floor" else []
    floor_cases = FLOOR_CASES if args.cases != "main" else []
    rows = run(args.steps, args.width, cases, floor_cases)
    table(rows, COLUMNS)
    write_json(args.json, "vgg_step", rows, width=args.width, floor_width=FLOOR_WIDTH)
    return rows


if __name__ == "__main__":
    main()
