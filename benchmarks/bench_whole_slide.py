"""8. Whole-slide inference: a U-Net over a 32768 x 32768 single-channel float32 image (4 GiB)
with :func:`dask_pconv.predict_to_zarr` on a LocalCluster of 2 workers with 1 GiB each, against
PyTorch run tile by tile with the same windows (the same halo) in one process.

The image is written to a zarr store first (a synthetic pattern, made on the workers).  Timed:
``predict_to_zarr`` from store to store (independent tiles: one task per tile reads its
window, runs the network, writes its chunk), with every worker's peak resident memory
(``dask_pconv.profiling.peak_memory``).  The baseline reads each window of the same plan from
the store, runs the PyTorch module on it (2 threads, ``no_grad``), crops the tile and writes it
to a zarr store; it runs on the first ``--sample`` tiles and is scaled to the whole image per
tile.  Both outputs of the sampled tiles are compared (max abs difference).

    python benchmarks/bench_whole_slide.py --json whole_slide.json
    python benchmarks/bench_whole_slide.py --side 4096 --tile 1024   # a quick run
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
from distributed import Client, LocalCluster

import dask_pconv as dp
from dask_pconv import tiled
from dask_pconv.models import UNet
from dask_pconv.profiling import peak_memory

from _common import table, write_json
from bench_zarr import _image

MiB = 2**20
NO_SPILL = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}


def _torch_tiles(model, src, dst, plan, n_tiles):
    """Seconds for the first ``n_tiles`` tiles of ``plan`` through PyTorch, window by window."""
    import torch
    import zarr

    from dask_pconv.models.torch_reference import UNet as TorchUNet

    from bench_models import _torch_module

    torch.set_num_threads(2)
    module = _torch_module(TorchUNet, model, 1, 2, model.width, model.depth).eval()
    x = zarr.open_array(src, mode="r")
    y = zarr.open_array(dst, mode="r+")
    done, t0 = 0, time.perf_counter()
    for ro, rw, rc in zip(*plan.rows):
        for co, cw, cc in zip(*plan.cols):
            if done == n_tiles:
                return time.perf_counter() - t0
            window = torch.from_numpy(np.asarray(x[:, :, slice(*rw), slice(*cw)]))
            with torch.no_grad():
                out = module(window).numpy()
            y[:, :, slice(*ro), slice(*co)] = out[:, :, slice(*rc), slice(*cc)]
            done += 1
    return time.perf_counter() - t0


def run(side, tile, limit_mib, sample, width, depth, root=None):
    limit = limit_mib * MiB
    tmp = Path(root or tempfile.mkdtemp(prefix="bench-slide-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = UNet(in_channels=1, n_classes=2, width=width, depth=depth, seed=0)
    nbytes = side * side * 4
    try:
        with (
            dask.config.set(NO_SPILL),
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=limit,
            ) as cluster,
            Client(cluster) as client,
        ):
            dp.to_zarr(_image(side, side, tile).rechunk((1, 1, tile, tile)), tmp / "x.zarr", compressors=None)
            t0 = time.perf_counter()
            with peak_memory(client) as mem:
                n = dp.predict_to_zarr(model, tmp / "x.zarr", tmp / "y.zarr", tile=tile, compressors=None)
            wall = time.perf_counter() - t0
        plan = tiled.plan(model, (1, 1, side, side), (tile, tile))
        row = {
            "case": f"U-Net width {width}, depth {depth}, {side}x{side} float32 ({nbytes / 2**30:.2f} GiB), "
            f"{tile}x{tile} tiles, 2 workers x {limit_mib} MiB",
            "tiles": plan.n_tiles,
            "wall s": wall,
            "Mpixel/s": side * side / wall / 1e6,
            "peak MiB per worker": ", ".join(f"{m['peak'] / MiB:.0f}" for m in mem["workers"].values()),
            "lost workers": len(mem["lost"]),
        }
        assert n.shape == (1, 2, side, side)
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch is not installed: no baseline (pip install torch==2.13.0)")
            return [row]
        import zarr

        zarr.create_array(
            tmp / "t.zarr", shape=(1, 2, side, side), chunks=(1, 2, tile, tile), dtype="f4", compressors=None
        )
        k = min(sample, plan.n_tiles)
        t_torch = _torch_tiles(model, str(tmp / "x.zarr"), str(tmp / "t.zarr"), plan, k) * plan.n_tiles / k
        ours, theirs = zarr.open_array(tmp / "y.zarr"), zarr.open_array(tmp / "t.zarr")
        sampled = [(ro, co) for ro in plan.rows.outputs for co in plan.cols.outputs][:k]
        diff = max(
            float(np.abs(ours[:, :, slice(*ro), slice(*co)] - theirs[:, :, slice(*ro), slice(*co)]).max())
            for ro, co in sampled
        )
        row["torch tile by tile s (scaled)"] = t_torch
        row["wall / torch"] = wall / t_torch
        row["max abs diff (sampled tiles)"] = diff
        return [row]
    finally:
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=32768, help="image side (float32, one channel)")
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--limit-mib", type=int, default=1024, help="memory limit per worker")
    ap.add_argument("--sample", type=int, default=16, help="tiles the PyTorch baseline runs")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--dir", help="where the stores go (default: a temporary directory, removed)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.side, args.tile, args.limit_mib, args.sample, args.width, args.depth, args.dir)
    cols = ["case", "tiles", "wall s", "Mpixel/s", "peak MiB per worker", "lost workers"]
    table(rows, cols + ["torch tile by tile s (scaled)", "wall / torch", "max abs diff (sampled tiles)"])
    write_json(args.json, "whole_slide", rows, side=args.side, tile=args.tile)
    return rows


if __name__ == "__main__":
    main()
