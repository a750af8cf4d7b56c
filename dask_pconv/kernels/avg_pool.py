"""Average pooling of one window block (zero padding, if any, already in the window) and the
per-block pieces of a global mean over ``(H, W)``.

The divisor of each output is the number of elements its window covers, as in PyTorch's
``avg_pool2d``: with ``count_include_pad`` the window clipped to the padded image (``H + p``
at the bottom, so the extra rows of ``ceil_mode`` never count), otherwise the window clipped
to the image itself.  It depends on where the window lies in the *image*, so the kernels take
``origin``, the image position ``(y0, x0)`` of the block's first window element (negative in
the top or left padding), and never confuse a tile edge with the image edge.
"""

from __future__ import annotations

import numpy as np

from .. import geometry as geo
from ..backend import array_namespace
from ._namespace import layout_invariant
from ._window import materialize

_NO_DILATION = (1, 1)


def _axis_counts(xp, n_out, start, stride, kernel, length, pad, count_include_pad):
    """Elements each of ``n_out`` windows (the first starting at image position ``start``)
    covers along one axis: clipped to ``[-pad, length + pad)``, or to ``[0, length)`` without
    ``count_include_pad`` (int64, shape ``(n_out,)``)."""
    lo = xp.arange(n_out, dtype=xp.int64) * stride + start
    hi = xp.minimum(lo + kernel, length + pad)
    if count_include_pad:
        return hi - lo
    return xp.minimum(hi, length) - xp.maximum(lo, 0)


def _divisor(xp, out_hw, kernel, stride, origin, image_hw, padding, count_include_pad, dtype):
    """``(oH, oW)`` divisors of the outputs of a window block (see the module docstring)."""
    (oH, oW), (kh, kw), (sy, sx), (y0, x0), (H, W), (ph, pw) = (
        out_hw,
        kernel,
        stride,
        origin,
        image_hw,
        padding,
    )
    dh = _axis_counts(xp, oH, y0, sy, kh, H, ph, count_include_pad)
    dw = _axis_counts(xp, oW, x0, sx, kw, W, pw, count_include_pad)
    return (dh.reshape(oH, 1) * dw.reshape(1, oW)).astype(dtype)


def _divide(xp, a, out_hw, kernel, stride, origin, image_hw, padding, count_include_pad, divisor_override):
    if divisor_override is not None:
        return a / a.dtype.type(divisor_override)
    return a / _divisor(xp, out_hw, kernel, stride, origin, image_hw, padding, count_include_pad, a.dtype)


@layout_invariant
def avg_pool2d_forward(
    x, kernel_size, stride, origin, image_hw, padding, count_include_pad=True, divisor_override=None
):
    """Mean over each ``kernel_size`` window of the window block ``x``: ``(N, C, oH, oW)``.

    ``origin`` is the image position of ``x``'s first element, ``image_hw`` the image's
    ``(H, W)`` and ``padding`` the user's ``(ph, pw)`` (the windows' bounds for the divisor);
    ``divisor_override`` replaces every divisor.  Each window is summed tap by tap in
    row-major order (the order of PyTorch's CPU loop), then divided.
    """
    x = materialize(x)
    xp = array_namespace(x)
    out_hw = geo.block_output_hw(x.shape[2:], kernel_size, stride, _NO_DILATION)
    total = None
    for _, _, (sl_y, sl_x) in geo.taps(kernel_size, out_hw, stride, _NO_DILATION):
        v = x[:, :, sl_y, sl_x]
        if total is None:
            total = v.copy()
        else:
            total += v
    args = (out_hw, kernel_size, stride, origin, image_hw, padding, count_include_pad, divisor_override)
    return _divide(xp, total, *args)


@layout_invariant
def avg_pool2d_backward(
    gy, kernel_size, stride, origin, image_hw, padding, count_include_pad=True, divisor_override=None
):
    """Spread each ``gy / divisor`` evenly over its window (arguments as
    :func:`avg_pool2d_forward`'s): a block of the window's shape,
    ``geometry.block_window_hw`` of ``gy``'s; overlapping windows add up."""
    xp = array_namespace(gy)
    N, C, oH, oW = gy.shape
    args = ((oH, oW), kernel_size, stride, origin, image_hw, padding, count_include_pad, divisor_override)
    q = _divide(xp, gy, *args)
    Hw, Ww = geo.block_window_hw((oH, oW), kernel_size, stride, _NO_DILATION)
    gx = xp.zeros((N, C, Hw, Ww), dtype=gy.dtype)
    for _, _, (sl_y, sl_x) in geo.taps(kernel_size, (oH, oW), stride, _NO_DILATION):
        gx[:, :, sl_y, sl_x] += q
    return gx


@layout_invariant
def plane_sums(x):
    """``(N, C)`` float64: the sum of each ``(H, W)`` plane of the block ``x``.

    Each plane is summed on its own (a reduction over one contiguous axis of ``H*W``
    elements, in ``x``'s dtype), so its sum does not depend on the block's other planes;
    the float64 result is what the sums over tiles add up."""
    N, C, H, W = x.shape
    return x.reshape(N, C, H * W).sum(axis=-1).astype(np.float64)


@layout_invariant
def plane_mean(sums, count, dtype):
    """``(N, C, 1, 1)`` of ``dtype``: the plane ``sums`` (float64, ``(N, C)``) over ``count``."""
    N, C = sums.shape
    return (sums / count).astype(dtype).reshape(N, C, 1, 1)


@layout_invariant
def plane_mean_backward(gy, hw, count):
    """``gy`` (``(N, C, 1, 1)``) over ``count``, spread over an ``(N, C, *hw)`` block."""
    xp = array_namespace(gy)
    N, C = gy.shape[:2]
    out = xp.empty((N, C) + tuple(hw), dtype=gy.dtype)
    out[...] = gy / count
    return out
