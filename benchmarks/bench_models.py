"""7. The shipped ResNet-18 and U-Net on a LocalCluster of 2 workers x 1 thread against
PyTorch on the same network (2 threads) in the same run, float32.

Training steps (``--only steps``): ResNet-18 (:class:`dask_pconv.models.ResNet18`,
CIFAR-sized images, batch split ``batch:2``) and the U-Net (:class:`dask_pconv.models.UNet`,
depth 3, per-pixel labels, 2x2 spatial tiles), momentum SGD through
:class:`~dask_pconv.train.Trainer`: the step time (median of the timed steps, after a warm-up
step), PyTorch's step of the same network (:mod:`dask_pconv.models.torch_reference`) with
``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4) on the whole batch, their ratio, the
step graph's tasks
(``Trainer.tasks_per_step``) and critical path (:func:`dask_pconv.graphstats.graph_stats`),
and which graph the step is (``Trainer.step_graph``: stages or fine-grained).

U-Net inference (:meth:`dask_pconv.models.UNet.predict`, evaluation mode) on one large
single-channel image in spatial tiles: the image is persisted on the workers first; timed:
building the graph, running it and waiting for the logits persisted on the workers (they are
not gathered).  Baselines: PyTorch's module on the whole image (2 threads, ``no_grad``) and
our model on the image as one chunk on the same cluster (one task per layer, one worker).
Where MONAI is installed (an optional benchmark dependency, ``pip install -e '.[monai]'``), MONAI's
``sliding_window_inference`` runs the PyTorch module on windows of the tile size (overlap 0.25,
Gaussian blending: its usual settings) beside them.  All are timed round-robin (medians), and
the tiled logits and MONAI's are checked against PyTorch's on the whole image (max abs
difference: ours is exact to float32 rounding, MONAI's blends windows that each saw zero
padding at their edges).

    python benchmarks/bench_models.py --json models.json
    python benchmarks/bench_models.py --quick          # small sizes (the test suite runs it)
"""

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np
from distributed import get_client, wait

import dask_pconv as dp
from dask_pconv.cluster import connect
from dask_pconv.data import Dataset
from dask_pconv.graphstats import graph_stats
from dask_pconv.models import ResNet18, UNet
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer

from _common import interleaved, step_graphs, table, write_json

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4

#: (label, network, width, batch, image size, split); the U-Net (depth 3) with per-pixel labels
RESNET_CASES = [
    ("ResNet-18 width 1, batch 64, 32x32, batch:2", "resnet", 1.0, 64, 32, {"batch": 2}),
    ("U-Net width 16 depth 3, batch 4, 256x256, spatial:2x2", "unet", 16, 4, 256, {"spatial": (2, 2)}),
]
RESNET_QUICK = [
    ("ResNet-18 width 1/16, batch 8, 32x32, batch:2", "resnet", 1 / 16, 8, 32, {"batch": 2}),
    ("U-Net width 4 depth 3, batch 2, 32x32, spatial:2x2", "unet", 4, 2, 32, {"spatial": (2, 2)}),
]
#: (width, depth, image size, spatial tiles per axis); PyTorch takes about 2.4 s on 2 threads
#: for the 2048x2048 image on the machine of docs/benchmarks.md
UNET_CASES = [(8, 2, 2048, (2, 2)), (8, 2, 2048, (4, 4)), (16, 3, 2048, (4, 4))]
UNET_QUICK = [(4, 2, 128, (2, 2))]

RESNET_COLUMNS = [
    "case",
    "dask_pconv step s",
    "torch step s",
    "ratio",
    "tasks per step",
    "critical path",
    "step graph",
]
UNET_COLUMNS = [
    "case",
    "tiled s",
    "torch whole s",
    "ours one chunk s",
    "tiled / torch",
    "tiled / one chunk",
    "tasks",
    "critical path",
    "one-chunk tasks",
    "max abs diff",
    "monai s",
    "monai / torch",
    "monai max abs diff",
]


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _have_monai():
    try:
        from monai.inferers import sliding_window_inference  # noqa: F401
    except ImportError:
        return False
    return True


def _monai(module, tx, roi):
    """MONAI's sliding-window inference of ``module`` on ``tx`` in ``roi`` windows."""
    import torch
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(tx, roi, 1, module, overlap=0.25, mode="gaussian")


def _torch_module(cls, model, *args):
    """``cls(*args)`` (a :mod:`dask_pconv.models.torch_reference` network) holding ``model``'s
    parameters and running statistics, float32."""
    import torch

    from dask_pconv.models.torch_reference import torch_name

    module = cls(*args)
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for k, v in {**model.params, **model.state}.items():
            own[torch_name(k)].copy_(torch.from_numpy(np.asarray(v, np.float32)))
    return module


def torch_step(model, x, t, steps):
    """Median seconds of a PyTorch training step (forward, backward, momentum SGD) of
    ``model``'s network (ResNet-18 or the U-Net) on the whole batch ``(x, t)``, 2 threads."""
    import torch
    import torch.nn.functional as F

    from dask_pconv.models.torch_reference import ResNet18 as TorchResNet18
    from dask_pconv.models.torch_reference import UNet as TorchUNet

    torch.set_num_threads(2)
    if isinstance(model, UNet):
        args = (TorchUNet, model, model.in_channels, model.n_classes, model.width, model.depth)
    else:
        args = (TorchResNet18, model, model.n_classes, model.in_channels, model.width)
    module = _torch_module(*args).train()
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    tx, tt = torch.from_numpy(x), torch.from_numpy(t)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(module(tx), tt)
        loss.backward()
        opt.step()
        return loss.item()

    return interleaved({"torch": step}, repeat=steps)["torch"]  # the median after a warm-up step


def run_steps(cases, steps, torch_ok):
    rows, rng = [], np.random.default_rng(0)
    for label, kind, width, n, size, split in cases:
        x = rng.random((n, 3, size, size), dtype=np.float32)
        if kind == "unet":  # per-pixel labels
            t = rng.integers(0, 2, (n, size, size))
            data = Dataset(x, t, 2, "random")
            make = lambda: UNet(in_channels=3, n_classes=2, width=width, depth=3)  # noqa: E731
        else:
            t = rng.integers(0, 10, n)
            data = Dataset(x, t, 10, "random")
            make = lambda: ResNet18(n_classes=10, in_channels=3, width=width)  # noqa: E731
        model = make()
        # the torch network starts from the same parameters as ours (the trainer replaces them)
        torch_model = make()
        tr = Trainer(
            model,
            data,
            data,
            batch_size=n,
            split=split,
            progress=False,
            optimizer=MomentumSGD(LR, MOMENTUM, WEIGHT_DECAY),
        )
        tr.train_step(x, t)  # warm-up: parameters move to the workers
        walls = []
        with step_graphs() as built:
            for _ in range(steps):
                t0 = time.perf_counter()
                tr.train_step(x, t)
                walls.append(time.perf_counter() - t0)
        stats = graph_stats(built.latest)
        built.latest = None  # it holds its step's inputs on the workers
        row = {
            "case": label,
            "width": width,
            "dask_pconv step s": float(np.median(walls)),
            "tasks per step": tr.tasks_per_step,
            "critical path": stats.critical_path,
            "graph": stats._asdict(),
            "step graph": tr.step_graph,
        }
        if torch_ok:
            row["torch step s"] = torch_step(torch_model, x, t, steps)
            row["ratio"] = row["dask_pconv step s"] / row["torch step s"]
        print(row, flush=True)
        rows.append(row)
    return rows


def run_unet(cases, steps, torch_ok):
    client = get_client()
    rows = []
    for width, depth, size, tiles in cases:
        model = UNet(in_channels=1, n_classes=2, width=width, depth=depth)
        shape = (1, 1, size, size)
        # made on the workers in its tiles (no image travelling in the graph from the client)
        tile_chunks = dp.split(da.empty(shape, chunks=shape, dtype=np.float32), spatial=tiles).chunks
        xd = da.random.default_rng(0).standard_normal(shape, chunks=tile_chunks, dtype=np.float32)
        xd, x1 = client.persist([xd, xd.rechunk(shape)])
        wait([xd, x1])

        def ours(x):
            # predict makes fresh keys for the parameters each call: no run reuses another's
            y = client.persist(model.predict(x))
            wait(y)
            return y

        fns = {"tiled": lambda: ours(xd), "one chunk": lambda: ours(x1)}
        if torch_ok:
            import torch

            from dask_pconv.models.torch_reference import UNet as TorchUNet

            torch.set_num_threads(2)
            module = _torch_module(TorchUNet, model, 1, 2, width, depth).eval()
            tx = torch.from_numpy(x1.compute())

            def whole():
                with torch.no_grad():
                    return module(tx)

            fns["torch"] = whole
            roi = (size // tiles[0], size // tiles[1])
            if _have_monai():
                fns["monai"] = lambda: _monai(module, tx, roi)
        secs = interleaved(fns, repeat=steps)
        row = {
            "case": f"U-Net width {width}, depth {depth}, 1x1x{size}x{size}, spatial {tiles[0]}x{tiles[1]}",
            "tiled s": secs["tiled"],
            "ours one chunk s": secs["one chunk"],
            "tiled / one chunk": secs["tiled"] / secs["one chunk"],
            "one-chunk tasks": graph_stats(model.predict(x1)).tasks,
        }
        stats = graph_stats(model.predict(xd))
        row.update({"tasks": stats.tasks, "critical path": stats.critical_path, "graph": stats._asdict()})
        if torch_ok:
            row["torch whole s"] = secs["torch"]
            row["tiled / torch"] = secs["tiled"] / secs["torch"]
            ref = whole().numpy()
            row["max abs diff"] = float(np.abs(ours(xd).compute() - ref).max())
            if "monai" in fns:
                row["monai s"] = secs["monai"]
                row["monai / torch"] = secs["monai"] / secs["torch"]
                row["monai max abs diff"] = float(np.abs(fns["monai"]().numpy() - ref).max())
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (ResNet) and runs (U-Net)")
    ap.add_argument("--quick", action="store_true", help="small widths and images: a dry run")
    ap.add_argument(
        "--only",
        choices=["steps", "unet"],
        help="run one of the two benchmarks: training steps or U-Net inference",
    )
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch_ok = _have_torch()
    if not torch_ok:
        print("PyTorch is not installed: no PyTorch baselines (pip install torch==2.13.0)", flush=True)
    load = [os.getloadavg()[0]]  # the machine's 1-minute load average, before and after
    resnet_cases, unet_cases = (RESNET_QUICK, UNET_QUICK) if args.quick else (RESNET_CASES, UNET_CASES)
    # the library's own cluster (dask_pconv.cluster.connect): its workers' malloc settings;
    # no spilling, so that a large image's times are compute, not disk
    with (
        dask.config.set(
            {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}
        ),
        connect(n_workers=2, threads_per_worker=1, dashboard_address=None),
    ):
        resnet = [] if args.only == "unet" else run_steps(resnet_cases, args.steps, torch_ok)
        unet = [] if args.only == "steps" else run_unet(unet_cases, args.steps, torch_ok)
    load.append(os.getloadavg()[0])
    table(resnet, RESNET_COLUMNS)
    print()
    table(unet, UNET_COLUMNS)
    print(f"load average (1 min) before and after: {load[0]:.2f}, {load[1]:.2f}")
    extra = {"quick": args.quick, "steps": args.steps, "torch": torch_ok, "load_average": load}
    write_json(args.json, "models", resnet + unet, **extra)
    return resnet + unet


if __name__ == "__main__":
    main()
