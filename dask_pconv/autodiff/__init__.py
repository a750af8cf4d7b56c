"""Reverse-mode autodiff over Dask arrays: a tape (:mod:`.tape`) that knows nothing about
the primitives, and one VJP rule per primitive (:mod:`.rules`)."""

from . import rules
from .rules import (
    accuracy,
    adaptive_avg_pool2d,
    add,
    avg_pool2d,
    batch_norm,
    concatenate,
    conv2d,
    conv_transpose2d,
    dropout,
    flatten,
    leaky_relu,
    linear,
    max_pool2d,
    mean,
    mul,
    rechunk,
    relu,
    reshape,
    softmax_cross_entropy,
    upsample_nearest,
)
from .rules import sum as sum_
from .tape import Tensor, defvjp, defvjp_all, grad, primitive, rule_names

__all__ = [
    "Tensor",
    "accuracy",
    "add",
    "batch_norm",
    "conv2d",
    "conv_transpose2d",
    "defvjp",
    "defvjp_all",
    "dropout",
    "flatten",
    "grad",
    "linear",
    "max_pool2d",
    "mean",
    "mul",
    "primitive",
    "rechunk",
    "relu",
    "reshape",
    "rule_names",
    "rules",
    "softmax_cross_entropy",
    "sum_",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "concatenate",
    "leaky_relu",
    "upsample_nearest",
]
