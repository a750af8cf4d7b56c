"""5. Larger than memory: zarr in, conv2d (or the VGG16 feature stack) tile by tile, zarr out, on
a LocalCluster whose workers together have a quarter of the image's size in memory.

Records every worker's peak resident memory against its limit (``dask_pconv.profiling.
peak_memory``: RSS sampled every 10 ms), the wall time and the throughput, and compares with a
plain sequential loop in one process (read a stripe and its halo rows from the store, SciPy's
correlation, write the stripe), timed on the first stripes and scaled per pixel.  Dask's
spilling and pausing are off, so resident memory is what the graph holds; the nanny still
restarts a worker at 95% of its limit (reported as lost workers).

    python benchmarks/bench_zarr.py --gib 4 --limit-mib 512 --json zarr.json
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import dask_pconv as dp
from dask_pconv.models import VGG16
from dask_pconv.profiling import peak_memory

from _common import table, write_json

MiB = 2**20
NO_SPILL = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "pconv.conv-kernel": "numpy",  # PyTorch's import alone costs each worker ~180 MiB
}


def _pattern(block_info=None):
    (r0, r1), (c0, c1) = block_info[None]["array-location"][-2:]
    r, c = np.arange(r0, r1, dtype=np.float64), np.arange(c0, c1, dtype=np.float64)
    out = np.add.outer(np.sin(0.37 * r).astype("f4"), np.cos(0.61 * c).astype("f4"))
    out *= (1 + 0.5 * np.sin(0.13 * r).astype("f4"))[:, None]
    return out[None, None]


def _image(H, W, rows):
    chunks = da.core.normalize_chunks((1, 1, rows, W), (1, 1, H, W))
    return da.map_blocks(_pattern, chunks=chunks, dtype="f4")


def _sequential(src, dst, w, rows, n_stripes):
    """The hand-written loop: stripe by stripe in one process, halo rows read from the store."""
    import zarr
    from scipy import ndimage

    x = zarr.open_array(src, mode="r")
    H, W = x.shape[-2:]
    kh = w.shape[-1]
    p = kh // 2
    y = zarr.create_array(dst, shape=x.shape, chunks=x.chunks, dtype="f4", compressors=None, overwrite=True)
    t0 = time.perf_counter()
    for s in range(n_stripes):
        r0, r1 = s * rows, min((s + 1) * rows, H)
        a0, a1 = max(r0 - p, 0), min(r1 + p, H)
        win = np.zeros((r1 - r0 + 2 * p, W), "f4")
        win[a0 - (r0 - p) : a1 - (r0 - p)] = x[0, 0, a0:a1]
        out = ndimage.correlate(win, w[0, 0], mode="constant")[p : p + r1 - r0]
        y[0, 0, r0:r1] = out
    return time.perf_counter() - t0


def _row(case, mem, wall, nbytes, limit):
    peaks = [m["peak"] / MiB for m in mem["workers"].values()]
    return {
        "case": case,
        "image GiB": nbytes / 2**30,
        "limit MiB": limit / MiB,
        "image / total limit": nbytes / (limit * len(peaks)),
        "peak MiB per worker": ", ".join(f"{p:.0f}" for p in peaks),
        "max peak / limit": max(peaks) * MiB / limit,
        "lost workers": len(mem["lost"]),
        "wall s": wall,
        "MB/s": nbytes / wall / 1e6,
    }


def run(gib=4.0, limit_mib=512, rows=32, workers=2, vgg_side=4096, root=None):
    limit = limit_mib * MiB
    W = 32768 if gib >= 2 else 16384
    H = int(gib * 2**30 / 4 / W) // rows * rows
    nbytes = H * W * 4
    tmp = Path(root or tempfile.mkdtemp(prefix="bench-zarr-"))
    tmp.mkdir(parents=True, exist_ok=True)
    w = np.array([[[[1, -2, 0.5], [3, 0.25, -1], [-0.5, 2, 1.5]]]], dtype="f4")
    rows_out = []
    try:
        with (
            dask.config.set(NO_SPILL),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=limit,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(lambda: __import__("zarr") and __import__("scipy.ndimage"))
            t0 = time.perf_counter()
            with peak_memory(client) as mem:
                dp.to_zarr(_image(H, W, rows), tmp / "x.zarr", compressors=None)
            rows_out.append(_row(f"write {H}x{W} test image", mem, time.perf_counter() - t0, nbytes, limit))
            t0 = time.perf_counter()
            with peak_memory(client) as mem:
                dp.conv2d_to_zarr(tmp / "x.zarr", tmp / "y.zarr", w, padding=1, compressors=None)
            row = _row(f"conv 1->1 3x3, {rows}-row stripes", mem, time.perf_counter() - t0, nbytes, limit)
            n = max(1, H // rows // 16)  # the sequential loop on 1/16 of the stripes, scaled
            t_seq = _sequential(str(tmp / "x.zarr"), str(tmp / "seq.zarr"), w, rows, n) * (H / (n * rows))
            row["sequential loop s (scaled)"] = t_seq
            row["wall / sequential"] = row["wall s"] / t_seq
            rows_out.append(row)
            shutil.rmtree(tmp / "seq.zarr", ignore_errors=True)
            shutil.rmtree(tmp / "y.zarr", ignore_errors=True)
            if vgg_side:
                m = VGG16(width=0.125, in_channels=1, seed=0)
                side = vgg_side
                with dask.config.set(scheduler="synchronous"):
                    dp.to_zarr(_image(side, side, 128), tmp / "v.zarr")
                t0 = time.perf_counter()
                with peak_memory(client) as mem:
                    dp.features_to_zarr(m, tmp / "v.zarr", tmp / "f.zarr")
                # every conv's output is an image: 2x8 channels at full size, 2x16 at 1/4, 3x32 at 1/16, ...
                act = side * side * 4 * (8 * 2 + 16 * 2 / 4 + 32 * 3 / 16 + 64 * 3 / 64 + 64 * 3 / 256)
                row = _row(
                    f"VGG16 features (width 1/8), {side}x{side}, 128-row stripes",
                    mem,
                    time.perf_counter() - t0,
                    side * side * 4,
                    limit,
                )
                row["conv outputs GiB"] = act / 2**30
                rows_out.append(row)
    finally:
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows_out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="image size (float32, one channel)")
    ap.add_argument("--limit-mib", type=int, default=512, help="memory limit per worker")
    ap.add_argument("--rows", type=int, default=32, help="stripe height (tiles span the width)")
    ap.add_argument("--vgg-side", type=int, default=4096, help="VGG16 feature image side; 0 skips it")
    ap.add_argument("--dir", help="where the stores go (default: a temporary directory, removed)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.gib, args.limit_mib, args.rows, vgg_side=args.vgg_side, root=args.dir)
    table(
        rows,
        [
            "case",
            "image GiB",
            "image / total limit",
            "peak MiB per worker",
            "max peak / limit",
            "lost workers",
            "wall s",
            "MB/s",
            "wall / sequential",
        ],
    )
    write_json(args.json, "zarr", rows, limit_mib=args.limit_mib, workers=2)
    return rows


if __name__ == "__main__":
    main()
