"""2. Chunked conv2d end to end on a LocalCluster (2 workers x 1 thread) against PyTorch on the
whole array (2 threads) and against our own kernel on the whole array (unsplit), float32.

The input is persisted on the workers first; the timed part builds the graph, runs it and
waits for the output to be persisted on the workers (it is not gathered to the client).

    python benchmarks/bench_chunked.py --json chunked.json
"""

import argparse
import time

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

import dask_pconv as dp
from dask_pconv import kernels
from dask_pconv.cluster import worker_malloc

from _common import best_of, table, write_json

CASES = [
    ("1,64->64,2048x2048 spatial 2x2", (1, 64, 64, 2048, 2048), dict(spatial=(2, 2)), 1),
    ("64,64->64,32x32 batch:2", (64, 64, 64, 32, 32), dict(batch=2), 1),
    ("64,64->64,32x32 channel:2", (64, 64, 64, 32, 32), dict(), 2),
]


def run(repeat=3, cases=CASES):
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    rng = np.random.default_rng(0)
    with (
        worker_malloc(),  # the workers' malloc settings of the clusters the library starts
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        for label, (N, C, O, H, W), split, w_pieces in cases:
            flop = 2.0 * N * O * C * 9 * H * W
            # the input is made on the workers in its chunks (no 1 GiB graph from the client)
            chunks = dp.split(da.empty((N, C, H, W), chunks=(N, C, H, W), dtype=np.float32), **split).chunks
            xd = da.random.default_rng(0).standard_normal((N, C, H, W), chunks=chunks, dtype=np.float32)
            xd = client.persist(xd)
            w = rng.standard_normal((O, C, 3, 3), dtype=np.float32)
            # a differently named copy of w per run, so no run finds the last one's results
            wds = iter(
                client.persist(da.from_array(w, chunks=(O // w_pieces, C, 3, 3), name=f"w-{label}-{i}"))
                for i in range(repeat + 1)
            )
            wait(xd)

            def chunked():
                y = client.persist(dp.conv2d(xd, next(wds), padding=1))
                wait(y)

            t_chunked = best_of(chunked, repeat)
            x = xd.compute()
            xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            t_ours = best_of(lambda: kernels.conv2d_forward(xp, w, (1, 1), (1, 1), 1), repeat)
            row = {
                "case": label,
                "chunked s": t_chunked,
                "our kernel unsplit s": t_ours,
                "chunked GFLOP/s": flop / t_chunked / 1e9,
                "chunked / our unsplit": t_chunked / t_ours,
            }
            if torch is not None:
                torch.set_num_threads(2)
                tx, tw = torch.from_numpy(x), torch.from_numpy(w)

                def whole():
                    with torch.no_grad():
                        torch.nn.functional.conv2d(tx, tw, padding=1)

                row["torch whole s"] = best_of(whole, repeat)
                row["chunked / torch"] = t_chunked / row["torch whole s"]
            rows.append(row)
            time.sleep(0.5)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    with dask.config.set(
        {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}
    ):
        rows = run(args.repeat)
    table(
        rows,
        [
            "case",
            "chunked s",
            "torch whole s",
            "our kernel unsplit s",
            "chunked / torch",
            "chunked / our unsplit",
        ],
    )
    write_json(args.json, "chunked", rows)
    return rows


if __name__ == "__main__":
    main()
