"""Dask-level operators: they build lazy task graphs and never compute."""

from .conv import conv2d, conv2d_vjp, conv_transpose2d, conv_transpose2d_vjp
from .pool import max_pool2d, max_pool2d_vjp
from .split import split

__all__ = [
    "conv2d",
    "conv2d_vjp",
    "conv_transpose2d",
    "conv_transpose2d_vjp",
    "max_pool2d",
    "max_pool2d_vjp",
    "split",
]
