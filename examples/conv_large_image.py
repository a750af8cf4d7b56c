"""Convolve a real photograph with a filter bank in 4x4 tiles on a LocalCluster.

The photograph is scikit-image's bundled ``astronaut`` (512x512 RGB, no download), enlarged
``--scale`` times.  The tiled result is checked against an unsplit reference computed with
SciPy (``scipy.ndimage.correlate``, one channel pair at a time), and both are timed.

    python examples/conv_large_image.py                  # LocalCluster, 2 workers
    python examples/conv_large_image.py --scheduler tcp://127.0.0.1:8786
"""

import argparse
import time

import dask.array as da
import numpy as np
import scipy.ndimage as ndi
from distributed import Client, LocalCluster, progress

import dask_pconv as dp


def filter_bank(size=5):
    """8 filters per colour channel: Gaussian, its x/y derivatives, Laplacian, 4 Gabors."""
    r = np.arange(size) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(xx**2 + yy**2) / 2.0)
    g /= g.sum()
    bank = [g, -xx * g, -yy * g, (xx**2 + yy**2 - 2) * g]
    for theta in np.linspace(0, np.pi, 4, endpoint=False):
        u = xx * np.cos(theta) + yy * np.sin(theta)
        bank.append(g * np.cos(2 * np.pi * u / 3.0))
    bank = np.stack(bank)  # (8, kh, kw)
    # one bank per output over all 3 input channels, weighted by luminance
    lum = np.array([0.299, 0.587, 0.114])
    return (bank[:, None] * lum[None, :, None, None]).astype(np.float32)  # (8, 3, kh, kw)


def reference(image, w):
    """Unsplit correlation with zero padding ('same'), summed over input channels."""
    out = np.zeros((w.shape[0],) + image.shape[1:], dtype=np.float64)
    for o in range(w.shape[0]):
        for c in range(w.shape[1]):
            out[o] += ndi.correlate(image[c].astype(np.float64), w[o, c], mode="constant")
    return out


def difference_line(err, scale):
    """The line that reports the largest difference from the reference, and that relative to
    the largest output value."""
    return f"max |difference| {err:.2g}, relative to max |y|: {err / scale:.2g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4, help="enlarge the 512x512 photo this many times")
    ap.add_argument("--tiles", type=int, default=4, help="tiles per spatial axis")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheduler", default=None, help="address of an existing scheduler")
    args = ap.parse_args(argv)

    from skimage import data

    photo = data.astronaut().astype(np.float32).transpose(2, 0, 1) / 255.0  # (3, 512, 512)
    image = np.kron(photo, np.ones((1, args.scale, args.scale), np.float32))
    w = filter_bank()
    # enlarge on the workers: the graph carries the 3 MB photo, not the enlarged image
    big = da.from_array(photo[None], chunks=(1, 3, 128, 128))
    big = big.repeat(args.scale, axis=2).repeat(args.scale, axis=3)
    x = dp.split(big, spatial=(args.tiles, args.tiles))
    print(
        f"image {image.shape[1]}x{image.shape[2]}x3, {w.shape[0]} filters {w.shape[2]}x{w.shape[3]}, "
        f"chunks {x.chunks[2]} x {x.chunks[3]}"
    )

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(
            n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        )
        client = Client(cluster)
    with client:
        y = dp.conv2d(x, w, padding="same")
        t0 = time.perf_counter()
        y = y.persist()
        progress(y)
        tiled = y.compute()[0]
        t_tiled = time.perf_counter() - t0
    print()
    t0 = time.perf_counter()
    ref = reference(image, w)
    t_ref = time.perf_counter() - t0
    err = np.abs(tiled - ref).max()
    scale = np.abs(ref).max()
    print(f"tiled conv2d ({args.tiles}x{args.tiles} tiles, {args.workers} workers): {t_tiled:.2f} s")
    print(f"unsplit reference (scipy.ndimage.correlate):  {t_ref:.2f} s")
    print(difference_line(err, scale))
    if err / scale > 1e-4:
        raise SystemExit("tiled result differs from the unsplit reference")


if __name__ == "__main__":
    main()
