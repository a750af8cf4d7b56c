"""Dask-level operators: they build lazy task graphs and never compute."""

from .avg_pool import adaptive_avg_pool2d, adaptive_avg_pool2d_vjp, avg_pool2d, avg_pool2d_vjp
from .conv import conv2d, conv2d_vjp, conv_transpose2d, conv_transpose2d_vjp
from .nn import leaky_relu, leaky_relu_vjp
from .pool import max_pool2d, max_pool2d_vjp
from .split import split
from .upsample import upsample_nearest, upsample_nearest_vjp

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_vjp",
    "avg_pool2d",
    "avg_pool2d_vjp",
    "conv2d",
    "conv2d_vjp",
    "conv_transpose2d",
    "conv_transpose2d_vjp",
    "leaky_relu",
    "leaky_relu_vjp",
    "max_pool2d",
    "max_pool2d_vjp",
    "split",
    "upsample_nearest",
    "upsample_nearest_vjp",
]
