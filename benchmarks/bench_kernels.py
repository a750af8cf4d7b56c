"""1. Block kernels: conv forward, grad-x and grad-w GFLOP/s against PyTorch (float32).

Our kernels run on one window block with edge padding, as a Dask task does (a lazy
``Padded`` window: the im2col kernels copy it into a padded buffer, which is timed too; grad-x
returns the tile, the window's interior), once with the im2col kernels
(``pconv.conv-kernel = numpy``) and once with the default (``auto``: PyTorch's kernel through
``torch.from_numpy`` when PyTorch is installed, for contractions of 64 or more).  The
baseline is ``torch.nn.functional.conv2d`` and its autograd backward
(``aten.convolution_backward``) in the same run, with the same number of threads.

    python benchmarks/bench_kernels.py --json kernels.json
"""

import argparse

import dask
import numpy as np

from dask_pconv import kernels

from _common import interleaved, table, write_json

SHAPES = [(64, 64, 64, 32, 32), (64, 256, 256, 8, 8), (1, 3, 64, 2048, 2048), (1, 64, 64, 1024, 1024)]


def _pad(a):
    return kernels.Padded(a, (1, 1, 1, 1), 0)


def run(threads=2, repeat=7, shapes=SHAPES):
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
            "gx": lambda: kernels.conv2d_grad_x(gy, w, st, dl, 1, ((1, H + 1), (1, W + 1))),
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
                "fwd": fwd,
                "gx": lambda: back([True, False, False]),
                "gw": lambda: back([False, True, False]),
            }
        for op, fn in fns.items():

            def with_kernel(kernel, fn=fn):
                def run_():
                    with dask.config.set({"pconv.conv-kernel": kernel}):
                        fn()

                return run_

            # the im2col run is timed on its own: its large temporaries, freed back to the OS,
            # would make the next candidate pay page faults for its output
            t = interleaved({"numpy": with_kernel("numpy")}, repeat)
            candidates = {"auto": with_kernel("auto")}
            if op in base:
                candidates["torch"] = base[op]
            t.update(interleaved(candidates, repeat))
            row = {"shape": f"{N},{C}->{O},{H}x{W}", "op": op}
            for k, v in t.items():
                row[f"{k} GFLOP/s"] = flop / v / 1e9
            if "torch" in t:
                row["ratio numpy"] = t["torch"] / t["numpy"]
                row["ratio auto"] = t["torch"] / t["auto"]
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
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
