"""Dask-level operators: they build lazy task graphs and never compute."""

from .conv import conv2d, conv2d_vjp
from .pool import max_pool2d, max_pool2d_vjp
from .split import split

__all__ = ["conv2d", "conv2d_vjp", "max_pool2d", "max_pool2d_vjp", "split"]

from .avg_pool import adaptive_avg_pool2d, adaptive_avg_pool2d_vjp, avg_pool2d, avg_pool2d_vjp  # noqa: E402
from .nn import leaky_relu, leaky_relu_vjp  # noqa: E402
from .upsample import upsample_nearest, upsample_nearest_vjp  # noqa: E402

__all__ += [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_vjp",
    "avg_pool2d",
    "avg_pool2d_vjp",
    "leaky_relu",
    "leaky_relu_vjp",
    "upsample_nearest",
    "upsample_nearest_vjp",
]
