"""6. The non-convolution block kernels of a VGG16 step against PyTorch's CPU ops (float32).

Each kernel runs on the blocks a batch-64, 32x32 VGG16 step split ``batch:2`` hands it (32
images per block, one shape per stage of the network) on one thread, as a worker of a
``2 workers x 1 thread`` cluster does; the baseline is the PyTorch op that does the same work in
PyTorch's own step, in the same run, with ``torch.set_num_threads(1)``:

=====================  ==========================================================================
ours                   PyTorch
=====================  ==========================================================================
bn_partial_stats       ``torch.batch_norm_update_stats`` (per-channel mean and biased variance)
combine_stats          - (merging two ``(3, C)`` blocks: nothing to compare)
bn_forward (ReLU)      ``relu(batch_norm(x, mean, var, ...))``, the normalisation alone
bn_grad (ReLU)         ``threshold_backward`` then ``native_batch_norm_backward`` (train): the same
                       work as ours, bn_backward_partial + (the tree) + bn_backward, whose parts
                       are timed too
dropout_block          ``torch.dropout(x, p, train=True)``: a Bernoulli mask times ``x``
max_pool2d_backward    ``max_pool2d_with_indices_backward`` (2x2, stride 2); ours also finds the
                       argmax again from ``x`` (the forward's indices are not kept)
=====================  ==========================================================================

Times are medians of interleaved runs (``_common.interleaved``); ``ratio`` is PyTorch's time
over ours (above 1: ours is faster).  NumPy's BLAS runs on one thread too (threadpoolctl).

    python benchmarks/bench_nonconv.py --json nonconv.json
"""

import argparse
import contextlib

import numpy as np

from dask_pconv import kernels

from _common import interleaved, table, write_json

#: (N, C, H, W) of one block: the five stages of VGG16 on 32x32 images, batch 64 split in two
SHAPES = [(32, 64, 32, 32), (32, 128, 16, 16), (32, 256, 8, 8), (32, 512, 4, 4), (32, 512, 2, 2)]
EPS = 2e-5
RATIO = 0.4


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _cases(shape, torch):
    """name -> (ours, PyTorch's or None) for one block shape."""
    rng = np.random.default_rng(0)
    N, C, H, W = shape
    # a conv output: non-zero means, so that the statistics are not trivially centred
    x = rng.standard_normal(shape, dtype=np.float32) + rng.standard_normal((1, C, 1, 1), dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    gamma = (rng.random(C, dtype=np.float32) + 0.5).astype(np.float32)
    beta = rng.standard_normal(C, dtype=np.float32)
    stats = kernels.bn_partial_stats(x)
    other = kernels.bn_partial_stats(x[::-1].copy())
    y = kernels.bn_forward(x, stats, gamma, beta, EPS, True)
    sums = kernels.bn_backward_partial(x, y, g, stats, EPS, True)
    count = N * H * W
    whole = (2 * N, C, H, W)  # the second half of the batch
    loc = ((N, 2 * N), (0, C), (0, H), (0, W))
    gy = rng.standard_normal((N, C, H // 2, W // 2), dtype=np.float32)

    ours = {
        "bn_partial_stats": lambda: kernels.bn_partial_stats(x),
        "combine_stats": lambda: kernels.combine_stats([stats, other]),
        "bn_forward": lambda: kernels.bn_forward(x, stats, gamma, beta, EPS, True),
        "bn_backward_partial": lambda: kernels.bn_backward_partial(x, y, g, stats, EPS, True),
        "bn_backward": lambda: kernels.bn_backward(x, y, g, stats, sums, gamma, count, EPS, True, True),
        "bn_grad": lambda: kernels.bn_backward(
            x,
            y,
            g,
            stats,
            kernels.bn_backward_partial(x, y, g, stats, EPS, True),
            gamma,
            count,
            EPS,
            True,
            True,
        ),
        "dropout_block": lambda: kernels.dropout_block(x, RATIO, 0x9E3779B97F4A7C15, whole, loc),
        "max_pool2d_backward": lambda: kernels.max_pool2d_backward(y, gy, (2, 2), (2, 2)),
    }
    theirs = dict.fromkeys(ours)
    if torch is not None:
        tx, tg, ty = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(y)
        tgamma, tbeta = torch.from_numpy(gamma), torch.from_numpy(beta)
        rm, rv = torch.zeros(C), torch.ones(C)
        mean = torch.from_numpy(stats[1].astype(np.float32))
        var = torch.from_numpy((stats[2] / stats[0]).astype(np.float32))
        invstd = 1 / torch.sqrt(var + EPS)
        _, pidx = torch.nn.functional.max_pool2d(ty, 2, return_indices=True)
        tgy = torch.from_numpy(gy)

        def bn_grad():
            gg = torch.ops.aten.threshold_backward(tg, ty, 0)
            torch.ops.aten.native_batch_norm_backward(
                gg, tx, tgamma, rm, rv, mean, invstd, True, EPS, [True, False, False]
            )

        theirs.update(
            bn_partial_stats=lambda: torch.batch_norm_update_stats(tx, rm, rv, 0.1),
            bn_forward=lambda: torch.relu(
                torch.batch_norm(tx, tgamma, tbeta, mean, var, False, 0.0, EPS, False)
            ),
            bn_grad=bn_grad,
            dropout_block=lambda: torch.dropout(tx, RATIO, True),
            max_pool2d_backward=lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                tgy, ty, [2, 2], [2, 2], [0, 0], [1, 1], False, pidx
            ),
        )
    return ours, theirs


def run(repeat=15, shapes=SHAPES):
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
    rows = []
    with _one_blas_thread(), torch.no_grad() if torch is not None else contextlib.nullcontext():
        for shape in shapes:
            ours, theirs = _cases(shape, torch)
            for name, fn in ours.items():
                fns = {"ours": fn}
                if theirs[name] is not None:
                    fns["torch"] = theirs[name]
                t = interleaved(fns, repeat, warmup=2)
                row = {"shape": ",".join(map(str, shape)), "kernel": name, "ours ms": t["ours"] * 1e3}
                if "torch" in t:
                    row["torch ms"] = t["torch"] * 1e3
                    row["ratio"] = t["torch"] / t["ours"]
                rows.append(row)
    totals = {}
    for r in rows:
        tot = totals.setdefault(r["kernel"], {"shape": "all", "kernel": r["kernel"], "ours ms": 0.0})
        tot["ours ms"] += r["ours ms"]
        if "torch ms" in r:
            tot["torch ms"] = tot.get("torch ms", 0.0) + r["torch ms"]
    for tot in totals.values():
        if "torch ms" in tot:
            tot["ratio"] = tot["torch ms"] / tot["ours ms"]
    return rows + list(totals.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.repeat)
    table(rows, ["shape", "kernel", "ours ms", "torch ms", "ratio"])
    write_json(args.json, "nonconv", rows, threads=1)
    return rows


if __name__ == "__main__":
    main()
