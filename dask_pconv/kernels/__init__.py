"""Per-block math.

Every function takes and returns blocks of one array library and uses only that library's
namespace (slicing, ``zeros``, ``matmul``, ``maximum``, ``where``), so the same code runs on
NumPy blocks on CPUs and CuPy blocks on GPUs.  Inputs are *windows*: blocks that already hold
their halo and padding, so no function here knows about chunks.  Every kernel computes on
C-contiguous blocks and returns them (:func:`layout_invariant`), so that its result does not
depend on where its inputs were computed.
"""

from ..backend import array_namespace as get_namespace  # the name kernels users know
from ._namespace import canonical, layout_invariant
from ._window import Padded, cropped, materialize
from .avg_pool import avg_pool2d_backward, avg_pool2d_forward, plane_mean, plane_mean_backward, plane_sums
from .conv import conv2d_forward, conv2d_grad_b, conv2d_grad_w, conv2d_grad_x
from .dropout import dropout_block, dropout_keep, dropout_scale
from .labels import onehot
from .linear import linear_forward, linear_grad_w, linear_grad_x
from .loss import cross_entropy_sum, log_softmax
from .norm import bn_backward, bn_backward_partial, bn_forward, bn_partial_stats, bn_running, combine_stats
from .pool import (
    max_pool2d_argmax,
    max_pool2d_backward,
    max_pool2d_forward,
    max_pool2d_forward_taps,
    max_pool2d_scatter,
)
from .upsample import upsample_nearest_backward, upsample_nearest_forward

__all__ = [
    "Padded",
    "canonical",
    "cropped",
    "layout_invariant",
    "materialize",
    "bn_backward",
    "bn_backward_partial",
    "bn_forward",
    "bn_partial_stats",
    "bn_running",
    "combine_stats",
    "dropout_block",
    "dropout_keep",
    "dropout_scale",
    "conv2d_forward",
    "conv2d_grad_b",
    "conv2d_grad_w",
    "conv2d_grad_x",
    "cross_entropy_sum",
    "get_namespace",
    "linear_forward",
    "linear_grad_w",
    "linear_grad_x",
    "log_softmax",
    "max_pool2d_argmax",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "max_pool2d_forward_taps",
    "max_pool2d_scatter",
    "onehot",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "plane_mean",
    "plane_mean_backward",
    "plane_sums",
    "upsample_nearest_backward",
    "upsample_nearest_forward",
]
