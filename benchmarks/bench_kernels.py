"""1. Block kernels: conv forward, grad-x and grad-w GFLOP/s against PyTorch (float32).

Our kernels run on one padded window block, as a Dask task does (the padding copy is timed
too), once with the im2col kernels (``pconv.conv-kernel = numpy``) and once with the default
(``auto``: PyTorch's kernel through ``torch.from_numpy`` when PyTorch is installed).  The
baseline is ``torch.nn.functional.conv2d`` and its autograd backward
(``aten.convolution_backward``) in the same run, with the same number of threads.

    python benchmarks/bench_kernels.py --json kernels.json
"""

import argparse

import dask
import numpy as np

from dask_pconv import kernels

from _common import best_of, table, write_json

SHAPES = [(64, 64, 64, 32, 32), (64, 256, 256, 8, 8), (1, 3, 64, 2048, 2048), (1, 64, 64, 1024, 1024)]


def _pad(a):
    out = np.zeros(a.shape[:2] + (a.shape[2] + 2, a.shape[3] + 2), a.dtype)
    out[:, :, 1:-1, 1:-1] = a
    return out


def run(threads=2, repeat=3, shapes=SHAPES):
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    rng = np.random.default_rng(0)
    for N, C, O, H, W in shapes:
        x = rng.standard_normal((N, C, H, W), dtype=np.float32)
        w = rng.standard_normal((O, C, 3, 3), dtype=np.float32)
        gy = rng.standard_normal((N, O, H, W), dtype=np.float32)
        flop = 2.0 * N * O * C * 9 * H * W
        st, dl = (1, 1), (1, 1)
        fns = {
            "fwd": lambda: kernels.conv2d_forward(_pad(x), w, st, dl, 1),
            "gx": lambda: kernels.conv2d_grad_x(gy, w, st, dl, 1)[:, :, 1:-1, 1:-1],
            "gw": lambda: kernels.conv2d_grad_w(_pad(x), gy, (3, 3), st, dl, 1),
        }
        base = {}
        if torch is not None:
            torch.set_num_threads(threads)
            tx, tw, tg = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(gy)

            def back(mask):
                with torch.no_grad():
                    torch.ops.aten.convolution_backward(
                        tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
                    )

            def fwd():
                with torch.no_grad():
                    torch.nn.functional.conv2d(tx, tw, padding=1)

            base = {
                "fwd": best_of(fwd, repeat),
                "gx": best_of(lambda: back([True, False, False]), repeat),
                "gw": best_of(lambda: back([False, True, False]), repeat),
            }
        for op, fn in fns.items():
            row = {"shape": f"{N},{C}->{O},{H}x{W}", "op": op}
            for kernel in ("numpy", "auto"):
                with dask.config.set({"pconv.conv-kernel": kernel}), threadpool_limits(threads):
                    t = best_of(fn, repeat)
                row[f"{kernel} GFLOP/s"] = flop / t / 1e9
            if op in base:
                row["torch GFLOP/s"] = flop / base[op] / 1e9
                row["ratio numpy"] = row["numpy GFLOP/s"] / row["torch GFLOP/s"]
                row["ratio auto"] = row["auto GFLOP/s"] / row["torch GFLOP/s"]
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.threads, args.repeat)
    table(
        rows, ["shape", "op", "numpy GFLOP/s", "auto GFLOP/s", "torch GFLOP/s", "ratio numpy", "ratio auto"]
    )
    write_json(args.json, "kernels", rows, threads=args.threads)
    return rows


if __name__ == "__main__":
    main()
