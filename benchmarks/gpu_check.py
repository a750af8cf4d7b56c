"""GPU check: the correctness checks with CuPy blocks, and speed against PyTorch/cuDNN on the same GPU.

One command on a machine with an NVIDIA GPU and CuPy (PyTorch with CUDA is optional: it adds
the cuDNN block kernel and the baseline):

    python benchmarks/gpu_check.py --out gpu-results

(a) Correctness (float64): ``conv2d``, ``conv2d_vjp``, ``max_pool2d`` and its VJP on CuPy blocks
    under batch, channel, spatial 2x2 and mixed splits against the unsplit computation on NumPy
    copies on the host, once per conv kernel (im2col in CuPy, i.e. cuBLAS; PyTorch's cuDNN
    through DLPack); every result must keep CuPy ``meta`` and come back as a CuPy array.  Then
    two VGG16 training steps (BatchNorm, dropout, momentum SGD) through
    ``Trainer(to_device=cupy.asarray)`` against the same steps on NumPy blocks: loss, accuracy
    and every parameter must agree to 1e-8 (relative), and the parameters must stay CuPy.
(b) Speed (float32): ``conv2d`` forward and forward + backward, and a VGG16 training step, on
    CuPy blocks against PyTorch (cuDNN) on the same GPU; ratio = ours / PyTorch.  Each VGG16
    row gives the step graph's task count and critical path (longest chain of dependent
    tasks); the floor rows (width 1/16, batch 4, 32x32: batch:2, spatial 2x2, unsplit) are
    steps whose compute is negligible, so their time is what the graph's shape costs.  Two PyTorch
    baselines: ``torch``, with the numerics our cuDNN path uses (full float32, deterministic
    algorithms), and ``torch TF32``, PyTorch's defaults (TF32 convolutions, any algorithm).

    The U-Net's ``predict`` on spatial tiles (the stages: one task per tile, each on its
    receptive field's window) against PyTorch's module on the whole image, on the same device;
    and (in (a)) the staged predict and the staged training-mode forward_backward on tiles of
    device blocks against NumPy blocks, float64.

(c) On a cluster: a VGG16 training step, an evaluation and a checkpoint through
    ``connect(cuda=True)`` (dask-cuda's LocalCUDACluster), against the same on NumPy blocks.

Apart from (c), the synchronous scheduler runs every graph (one GPU, no worker processes).
Without CuPy or a GPU the script exits with status 2 saying what is missing.  ``--numpy`` runs the same checks
and timings with NumPy blocks on the CPU (PyTorch's CPU kernels as the baseline), so the script
itself is exercised on machines without a GPU; ``--quick`` shrinks every size.  Writes
``gpu_check.json`` into ``--out``; exits 1 if a check fails.
"""

import argparse
import pathlib
import sys
import time

import dask
import dask.array as da
import numpy as np

import dask_pconv as dp
from dask_pconv.data import Dataset
from dask_pconv.graphstats import graph_stats
from dask_pconv.kernels import _torch
from dask_pconv.models import VGG16, UNet
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer

from _common import interleaved, step_graphs, table, write_json
from bench_vgg_step import torch_step_time

SPLITS = {
    "none": ({}, 1),
    "batch": ({"batch": 2}, 1),
    "channel": ({"channel": 2}, 2),  # x's channels and w's output channels in 2 chunks
    "spatial 2x2": ({"spatial": 2}, 1),
    "mixed": ({"batch": 2, "channel": 2, "spatial": (2, 3)}, 2),
}
TOL = 1e-8  # float64, relative to the largest reference value
# cuDNN settings of the PyTorch baselines on a GPU: the numerics our cuDNN path uses (full
# float32, deterministic algorithms), and PyTorch's defaults (TF32 convolutions on Ampere and
# later, any algorithm).  The flags are process-wide, so every timed run sets its own.
NUMERICS = {
    "torch": {"allow_tf32": False, "deterministic": True},
    "torch TF32": {"allow_tf32": True, "deterministic": False},
}


def _cudnn(torch, flags):
    torch.backends.cudnn.allow_tf32 = flags["allow_tf32"]
    torch.backends.cudnn.deterministic = flags["deterministic"]


class Backend:
    """Where the blocks live: CuPy on the GPU, or NumPy (``--numpy``, the CPU dry run)."""

    def __init__(self, use_numpy):
        if use_numpy:
            self.name, self.xp, self.torch_device = "numpy", np, "cpu"
            self.to_device = np.asarray
            self.info = {}
            return
        try:
            import cupy
        except ImportError as e:
            _missing(f"CuPy is not installed ({e}): pip install 'dask-pconv[gpu]'")
        try:
            n_gpus = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as e:
            _missing(f"CUDA reports no usable GPU ({e})")
        if n_gpus == 0:
            _missing("CUDA reports no GPU")
        self.name, self.xp, self.torch_device = "cupy", cupy, "cuda"
        self.to_device = cupy.asarray
        props = cupy.cuda.runtime.getDeviceProperties(0)
        self.info = {"gpu": props["name"].decode(), "cupy": cupy.__version__, "gpus": n_gpus}

    @property
    def array_type(self):
        return self.xp.ndarray

    def blocks(self, a, chunks):
        """``a`` (NumPy) as a Dask array with these chunks and blocks on the device."""
        meta = self.to_device(np.empty((0,) * a.ndim, a.dtype))
        return da.from_array(a, chunks=chunks).map_blocks(self.to_device, dtype=a.dtype, meta=meta)

    def host(self, a):
        return a.get() if self.name == "cupy" else np.asarray(a)

    def sync(self):
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()  # every stream, PyTorch's (cuDNN path) too

    def torch(self):
        """PyTorch for this backend's device, or None."""
        try:
            import torch
        except ImportError:
            return None
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return None
        return torch

    def kernels(self):
        """The conv kernel choices to check: im2col in the blocks' namespace, and PyTorch's."""
        return ["numpy"] + (["torch"] if self.torch() is not None else [])

    def baselines(self):
        """The PyTorch baselines to time: on a GPU with both cuDNN settings of ``NUMERICS``;
        on the CPU, where those flags do nothing, one."""
        if self.torch() is None:
            return []
        return list(NUMERICS) if self.torch_device == "cuda" else ["torch"]


def _missing(why):
    print(
        f"gpu_check: {why}.  This check needs CuPy and a CUDA GPU; --numpy runs it on the CPU.",
        file=sys.stderr,
    )
    raise SystemExit(2)


def _rel_err(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


# -- (a) correctness -----------------------------------------------------------------------
def _op_cases(rng, quick):
    N, C, O, H = (4, 4, 6, 10) if quick else (6, 8, 12, 23)
    x = rng.standard_normal((N, C, H, H + 1))
    w = rng.standard_normal((O, C, 3, 3))
    kw = {"padding": 1}
    y_shape = (N, O, H, H + 1)
    gy = rng.standard_normal(y_shape)
    gp = rng.standard_normal((N, C, (H + 2 - 3) // 2 + 1, (H + 3 - 3) // 2 + 1))
    return x, w, gy, gp, kw


def check_ops(be, quick):
    rng = np.random.default_rng(0)
    x, w, gy, gp, kw = _op_cases(rng, quick)
    pool = (3, 2, 1)  # kernel, stride, padding: overlapping windows, -inf padding
    with dask.config.set({_torch.CONFIG_KEY: "numpy"}):  # the reference: NumPy on the host
        want = dask.compute(
            dp.conv2d(x, w, **kw),
            *dp.conv2d_vjp(x, w, gy, **kw)[:2],
            dp.max_pool2d(x, *pool),
            dp.max_pool2d_vjp(x, gp, *pool),
        )
    names = ["conv2d", "conv2d_vjp g_x", "conv2d_vjp g_w", "max_pool2d", "max_pool2d_vjp"]
    rows = []
    for kernel in be.kernels():
        for split, (spec, w_split) in SPLITS.items():
            xs = dp.split(x, **spec)
            xd = be.blocks(x, xs.chunks)
            wd = be.blocks(w, (-(-w.shape[0] // w_split), -1, -1, -1))
            with dask.config.set({_torch.CONFIG_KEY: kernel}):
                y = dp.conv2d(xd, wd, **kw)
                gyd = be.blocks(gy, y.chunks)
                outs = [y, *dp.conv2d_vjp(xd, wd, gyd, **kw)[:2]]
                p = dp.max_pool2d(xd, *pool)
                outs += [p, dp.max_pool2d_vjp(xd, be.blocks(gp, p.chunks), *pool)]
                metas_ok = all(isinstance(o._meta, be.array_type) for o in outs)
                got = dask.compute(*outs)
            for name, g, ref in zip(names, got, want):
                err = _rel_err(be.host(g), ref)
                ok = metas_ok and isinstance(g, be.array_type) and err <= TOL
                rows.append({"check": f"{name}, {split}, kernel {kernel}", "rel err": err, "ok": ok})
    return rows


def _vgg_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.random((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n), 10, "random")


def _trainer(model, data, split, to_device=None, out=None):
    tr = Trainer(
        model,
        data,
        data,
        batch_size=len(data),
        split=split,
        optimizer=MomentumSGD(0.05, 0.9, 5e-4),
        progress=False,
        to_device=to_device,
        out=out,
    )
    tr.tasks_per_step = 0  # not counted: counting optimises the whole graph, as slow as a step
    return tr


def check_vgg(be, quick):
    width, n = (0.0625, 4) if quick else (0.25, 16)
    data = _vgg_data(n)
    rows = []
    splits = [("batch:2", {"batch": 2})] + ([] if quick else [("spatial:2x2", {"spatial": (2, 2)})])
    for label, split in splits:
        ref = _trainer(VGG16(width=width, dtype=np.float64), data, split)
        tr = _trainer(VGG16(width=width, dtype=np.float64), data, split, to_device=be.to_device)
        for step in range(2):
            (l0, a0), (l1, a1) = ref.train_step(data.x, data.t), tr.train_step(data.x, data.t)
            ok = abs(l1 - l0) <= TOL * abs(l0) and a1 == a0
            rows.append(
                {"check": f"VGG16 step {step + 1} loss, {label}", "rel err": abs(l1 - l0) / abs(l0), "ok": ok}
            )
        want, got = dask.compute(ref.model.params, tr.model.params)
        err = max(_rel_err(be.host(got[k]), want[k]) for k in want)
        on_device = all(isinstance(v._meta, be.array_type) for v in tr.model.params.values())
        rows.append(
            {
                "check": f"VGG16 parameters after 2 steps, {label}",
                "rel err": err,
                "ok": err <= TOL and on_device,
            }
        )
    return rows


def check_staged_predict(be, quick):
    """The staged U-Net ``predict`` on tiles of device blocks against the same on NumPy blocks
    (float64): equal to 1e-8, and the output's blocks on the device."""
    model = UNet(in_channels=1, n_classes=2, width=4, depth=2, dtype=np.float64, seed=1)
    side = 64 if quick else 512
    x = np.random.default_rng(5).standard_normal((2, 1, side, side))
    chunks = (1, 1, side // 2 - 3, side // 2 + 5)  # tiles not aligned with the pools
    want = model.predict(da.from_array(x, chunks=chunks)).compute()
    y = model.predict(be.blocks(x, chunks))
    got = y.compute()
    err = _rel_err(be.host(got), want)
    on_device = isinstance(y._meta, be.array_type) and isinstance(got, be.array_type)
    return [
        {"check": f"U-Net predict on tiles ({side}x{side})", "rel err": err, "ok": err <= TOL and on_device}
    ]


def check_staged_tiled_step(be, quick):
    """The U-Net's training-mode ``forward_backward`` as stages on tiles of device blocks
    against the same on NumPy blocks (float64): loss and every gradient equal to 1e-8, the
    gradients on the device."""
    model = UNet(in_channels=1, n_classes=2, width=4, depth=2, dtype=np.float64, seed=1)
    side = 32 if quick else 256
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((2, 1, side, side)), rng.integers(0, 2, (2, side, side))
    chunks = (1, 1, side // 2 - 3, side // 2 + 5)  # tiles not aligned with the pools
    want_loss, want = dask.compute(*model.forward_backward(da.from_array(x, chunks=chunks), t))
    loss, grads = dask.compute(*model.forward_backward(be.blocks(x, chunks), t))
    err = max([_rel_err(be.host(loss), want_loss)] + [_rel_err(be.host(grads[k]), want[k]) for k in want])
    on_device = all(isinstance(g, be.array_type) for g in grads.values())
    return [
        {
            "check": f"U-Net forward_backward on tiles ({side}x{side})",
            "rel err": err,
            "ok": err <= TOL and on_device,
        }
    ]


def time_unet_predict(be, quick, steps):
    """Seconds of the U-Net's staged ``predict`` on 2x2 tiles and PyTorch's module on the whole
    image, float32, on the blocks' device."""
    width, depth, side = (4, 2, 128) if quick else (16, 3, 2048)
    model = UNet(in_channels=1, n_classes=2, width=width, depth=depth, seed=0)
    x = np.random.default_rng(0).random((1, 1, side, side), dtype=np.float32)
    xd = be.blocks(x, (1, 1, side // 2, side // 2))
    stats = graph_stats(model.predict(xd))

    def ours():
        model.predict(xd).compute()
        be.sync()

    fns = {"ours": ours}
    torch = be.torch()
    if torch is not None:
        from dask_pconv.models.torch_reference import UNet as TorchUNet

        from bench_models import _torch_module

        module = _torch_module(TorchUNet, model, 1, 2, width, depth).eval().to(be.torch_device)
        tx = torch.from_numpy(x).to(be.torch_device)

        def whole():
            with torch.no_grad():
                module(tx)
            be.sync()

        fns["torch"] = whole
    secs = interleaved(fns, repeat=steps)
    row = {
        "predict": f"U-Net width {width}, depth {depth}, 1x1x{side}x{side}, spatial 2x2",
        "ours s": secs["ours"],
        "tasks": stats.tasks,
        "critical path": stats.critical_path,
    }
    if "torch" in secs:
        row["torch whole s"] = secs["torch"]
        row["ours / torch"] = secs["ours"] / secs["torch"]
    print(row, flush=True)
    return [row]


def check_cluster(be, quick, out):
    """A training step, an evaluation and a checkpoint on a real cluster, started by
    ``connect``: dask-cuda's LocalCUDACluster (one worker per GPU) for CuPy blocks, a one-worker
    LocalCluster for NumPy blocks; against the same on NumPy blocks, synchronous scheduler."""
    from dask_pconv.cluster import connect
    from dask_pconv.train import load_checkpoint

    width, n = (0.0625, 4) if quick else (0.25, 16)
    data = _vgg_data(n, seed=3)
    split = {"batch": 2}
    with dask.config.set(scheduler="synchronous"):
        ref = _trainer(VGG16(width=width, dtype=np.float64), data, split)
        l0, a0 = ref.train_step(data.x, data.t)
        e0 = ref.evaluate(data)
        (want,) = dask.compute(ref.model.params)
    cuda = be.name == "cupy"
    with connect(
        cuda=cuda, n_workers=None if cuda else 1, threads_per_worker=1, dashboard_address=None
    ) as client:
        workers = len(client.scheduler_info()["workers"])
        tr = _trainer(VGG16(width=width, dtype=np.float64), data, split, be.to_device, out)
        l1, a1 = tr.train_step(data.x, data.t)
        e1 = tr.evaluate(data)
        out.mkdir(parents=True, exist_ok=True)
        tr.save()
        on_device = all(isinstance(v._meta, be.array_type) for v in tr.model.params.values())
    got, _, _, meta = load_checkpoint(tr.checkpoint_path(0))
    err = max(_rel_err(got[k], want[k]) for k in want)
    where = f"{workers} worker(s) of {'LocalCUDACluster' if cuda else 'LocalCluster'}"
    return [
        {
            "check": f"cluster: VGG16 step loss, {where}",
            "rel err": abs(l1 - l0) / abs(l0),
            "ok": abs(l1 - l0) <= TOL * abs(l0) and a1 == a0 and on_device,
        },
        {
            "check": "cluster: evaluate",
            "rel err": abs(e1[0] - e0[0]) / abs(e0[0]),
            "ok": abs(e1[0] - e0[0]) <= TOL * abs(e0[0]) and e1[1] == e0[1],
        },
        {"check": "cluster: checkpoint parameters", "rel err": err, "ok": err <= TOL and meta["step"] == 1},
    ]


# -- (b) speed -----------------------------------------------------------------------------
def time_conv(be, quick):
    """Seconds per conv2d forward and forward + backward, ours (per kernel) and PyTorch's."""
    cases = (
        [(4, 8, 8, 16, {}), (4, 8, 8, 16, {"spatial": 2})]
        if quick
        else [
            (64, 64, 64, 32, {}),
            (64, 64, 64, 32, {"batch": 2}),
            (16, 128, 128, 64, {"spatial": 2}),
            (1, 64, 64, 1024, {"spatial": 2}),
        ]
    )
    torch = be.torch()
    rng = np.random.default_rng(1)
    rows = []
    for N, C, O, H, spec in cases:
        x = rng.standard_normal((N, C, H, H), dtype=np.float32)
        w = rng.standard_normal((O, C, 3, 3), dtype=np.float32)
        gy = rng.standard_normal((N, O, H, H), dtype=np.float32)
        xd = be.blocks(x, dp.split(x, **spec).chunks).persist()
        wd = be.blocks(w, w.shape).persist()
        gyd = be.blocks(gy, dp.conv2d(xd, wd, padding=1).chunks).persist()

        def ours(kernel, backward):
            def run():
                with dask.config.set({_torch.CONFIG_KEY: kernel}):
                    outs = [dp.conv2d(xd, wd, padding=1)]
                    if backward:
                        outs += dp.conv2d_vjp(xd, wd, gyd, padding=1)[:2]
                    dask.persist(*outs)
                be.sync()

            return run

        fns = {}
        for backward in (False, True):
            for kernel in be.kernels():
                fns[(kernel, backward)] = ours(kernel, backward)
            for b in be.baselines():
                fns[("base", b, backward)] = _torch_conv(torch, be, x, w, gy, backward, NUMERICS[b])
        times = interleaved(fns, repeat=3 if quick else 7)
        for backward in (False, True):
            row = {"case": f"{N}, {C}->{O}, {H}x{H}, {_label(spec)}", "op": "fwd+bwd" if backward else "fwd"}
            base = {b: times[("base", b, backward)] for b in be.baselines()}
            for kernel in be.kernels():
                row[f"ours[{kernel}] s"] = times[(kernel, backward)]
                for b, t in base.items():
                    row[f"ours[{kernel}] / {b}"] = times[(kernel, backward)] / t
            row.update({f"{b} s": t for b, t in base.items()})
            rows.append(row)
            print(row, flush=True)
    return rows


def _torch_conv(torch, be, x, w, gy, backward, flags):
    dev = be.torch_device
    tx = torch.from_numpy(x).to(dev).requires_grad_(backward)
    tw = torch.from_numpy(w).to(dev).requires_grad_(backward)
    tgy = torch.from_numpy(gy).to(dev)

    def run():
        _cudnn(torch, flags)
        y = torch.nn.functional.conv2d(tx, tw, padding=1)
        if backward:
            torch.autograd.grad(y, (tx, tw), tgy)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def _label(spec):
    def fmt(v):
        return "x".join(map(str, v)) if isinstance(v, tuple) else v

    return ", ".join(f"{k}:{fmt(v)}" for k, v in spec.items()) or "one block"


#: the step floor: VGG16 at width 1/16, batch 4, 32x32, where compute is negligible and the step
#: time is what the graph's shape costs (per task here, per dependent hop on a cluster)
FLOOR = (0.0625, 4)
FLOOR_SPLITS = [{"batch": 2}, {"spatial": (2, 2)}, {}]


def time_vgg(be, quick, steps):
    """Seconds per VGG16 training step, ours and PyTorch's, with the step graph's task count
    and critical path (:func:`dask_pconv.graphstats.graph_stats`); the floor cases too."""
    main = [] if quick else [(1.0, 64, split, False) for split in ({}, {"batch": 2})]
    floor = [(*FLOOR, split, True) for split in ([{"batch": 2}, {}] if quick else FLOOR_SPLITS)]
    rows = []
    for width, n, split, is_floor in main + floor:
        data = _vgg_data(n, seed=2)
        tr = _trainer(VGG16(width=width), data, split, to_device=be.to_device)
        tr.train_step(data.x, data.t)  # warm-up: parameters move to the device
        walls = []
        with step_graphs() as built:
            for _ in range(steps):
                t0 = time.perf_counter()
                tr.train_step(data.x, data.t)  # returns floats: waits for the device
                walls.append(time.perf_counter() - t0)
        stats = graph_stats(built.latest)  # not timed: it optimises the whole graph
        row = {
            "case": f"{'floor: ' if is_floor else ''}VGG16 width {width}, batch {n}, {_label(split)}",
            "floor": is_floor,
            "ours step s": float(np.median(walls)),
            "tasks": stats.tasks,
            "critical path": stats.critical_path,
        }
        for baseline in be.baselines():
            _cudnn(be.torch(), NUMERICS[baseline])
            row[f"{baseline} step s"] = torch_step_time(
                VGG16(width=width), data.x, data.t, steps, device=be.torch_device
            )
            row[f"ours / {baseline}"] = row["ours step s"] / row[f"{baseline} step s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-results", help="folder for gpu_check.json")
    ap.add_argument("--numpy", action="store_true", help="NumPy blocks on the CPU: a dry run without a GPU")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    ap.add_argument("--steps", type=int, default=3, help="timed VGG16 steps (after one warm-up step)")
    args = ap.parse_args(argv)
    be = Backend(args.numpy)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"blocks: {be.name} {be.info}; conv kernels: {', '.join(be.kernels())}", flush=True)
    with dask.config.set(scheduler="synchronous"):
        checks = check_ops(be, args.quick) + check_vgg(be, args.quick) + check_staged_predict(be, args.quick)
        checks += check_staged_tiled_step(be, args.quick)
    checks += check_cluster(be, args.quick, out / "cluster-checkpoint")
    table(checks, ["check", "rel err", "ok"])
    with dask.config.set(scheduler="synchronous"):
        conv = time_conv(be, args.quick)
        vgg = time_vgg(be, args.quick, args.steps)
        unet = time_unet_predict(be, args.quick, args.steps)
    bases = be.baselines()
    conv_cols = ["case", "op"] + [
        c for k in be.kernels() for c in [f"ours[{k}] s"] + [f"ours[{k}] / {b}" for b in bases]
    ]
    table(conv, conv_cols + [f"{b} s" for b in bases])
    vgg_cols = ["case", "ours step s"] + [c for b in bases for c in (f"{b} step s", f"ours / {b}")]
    table(vgg, vgg_cols + ["tasks", "critical path"])
    table(unet, ["predict", "ours s", "torch whole s", "ours / torch", "tasks", "critical path"])
    failed = [c["check"] for c in checks if not c["ok"]]
    write_json(
        out / "gpu_check.json",
        "gpu_check",
        conv + vgg + unet,
        checks=checks,
        blocks=be.name,
        device=be.info,
        baseline_cudnn={b: NUMERICS[b] for b in bases} if be.torch_device == "cuda" else None,
    )
    if failed:
        print(f"gpu_check: {len(failed)} check(s) failed: {failed}", file=sys.stderr)
        return 1
    print(f"gpu_check: all {len(checks)} checks passed ({be.name} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
