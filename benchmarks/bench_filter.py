"""4. A single-channel 2-D filter on an 8192x8192 image in 1024x1024 chunks, against
``dask_image.ndfilters.correlate`` with the same chunks (threaded scheduler, 2 threads).

Both compute a zero-padded ('constant', cval 0) correlation; results are checked equal.  Ours
runs twice: the default (SciPy's direct correlation per block for one channel in and out) and
the im2col kernel (``pconv.conv-kernel = numpy``); all three are timed round-robin (medians).

    python benchmarks/bench_filter.py --json filter.json
"""

import argparse

import dask
import dask.array as da
import numpy as np

import dask_pconv as dp

from _common import interleaved, table, write_json


def run(size=8192, chunk=1024, kernels_=(3, 9), repeat=3):
    from dask_image.ndfilters import correlate

    rng = np.random.default_rng(0)
    img = rng.standard_normal((size, size), dtype=np.float32)
    rows = []
    with dask.config.set(scheduler="threads", num_workers=2):
        image = da.from_array(img, chunks=chunk).persist()
        for k in kernels_:
            w = rng.standard_normal((k, k), dtype=np.float32)
            ours = dp.conv2d(image[None, None], w[None, None], padding="same")[0, 0]
            theirs = correlate(image, w, mode="constant", cval=0.0)
            a, b = dask.compute(ours[:512, :512], theirs[:512, :512])
            err = float(np.abs(a - b).max())

            def im2col(ours=ours):
                with dask.config.set({"pconv.conv-kernel": "numpy"}):
                    ours.persist()

            t = interleaved({"auto": ours.persist, "im2col": im2col, "dask-image": theirs.persist}, repeat)
            rows.append(
                {
                    "kernel": f"{k}x{k}",
                    "dask_pconv s": t["auto"],
                    "dask_pconv im2col s": t["im2col"],
                    "dask-image s": t["dask-image"],
                    "ratio (ours / dask-image)": t["auto"] / t["dask-image"],
                    "max abs diff": err,
                }
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.size, repeat=args.repeat)
    table(
        rows,
        [
            "kernel",
            "dask_pconv s",
            "dask_pconv im2col s",
            "dask-image s",
            "ratio (ours / dask-image)",
            "max abs diff",
        ],
    )
    write_json(args.json, "filter", rows)
    return rows


if __name__ == "__main__":
    main()
