"""Max pooling of one window block (padding, if any, is already in the window as -inf).

Which element of a window is its maximum follows PyTorch's CPU and CUDA kernels exactly: the
taps are visited in row-major order, skipping those in the padding; a tap wins if it is
greater than the maximum so far or if it is NaN (so the *last* NaN of a window wins, otherwise
the first maximum); before any tap wins, the window's first tap inside the image is its
argmax (a window of -inf values points there).  ``origin`` is the image position ``(y0, x0)``
of the window's first element (negative in the top or left padding).
"""

from __future__ import annotations

from .. import geometry as geo
from ..backend import array_namespace
from ._namespace import layout_invariant
from ._select import where_zero
from ._window import materialize


def _first_taps(xp, shape, kernel_size, stride, dilation, origin):
    """Tap index ``i*kw + j`` of each window's first tap inside the image (int32)."""
    kw = kernel_size[1]
    idx = xp.zeros(shape, dtype=xp.int32)
    # only windows that start in the top or left padding skip taps: a few rows and columns
    for axis, (o0, s, d, k) in enumerate(zip(origin, stride, dilation, (kw, 1))):
        for o in range(shape[2 + axis]):
            start = o0 + o * s
            if start >= 0:
                break
            skip = -(start // d)  # taps before the first one at or after 0 (ceil(-start / d))
            sl = (slice(None), slice(None), o) if axis == 0 else (slice(None), slice(None), slice(None), o)
            idx[sl] = idx[sl] + skip * k  # Python ints: no host-to-device copy
    return idx


def _argmax_taps(x, kernel_size, stride, dilation, origin):
    """Max and tap index ``i*kw + j`` of each window's argmax (see the module docstring)."""
    x = materialize(x)
    xp = array_namespace(x)
    kh, kw = kernel_size
    N, C, Hw, Ww = x.shape
    oH, oW = geo.block_output_hw((Hw, Ww), kernel_size, stride, dilation)
    best = xp.full((N, C, oH, oW), float("-inf"), dtype=x.dtype)
    idx = _first_taps(xp, best.shape, kernel_size, stride, dilation, origin)
    for i, j, (sl_y, sl_x) in geo.taps(kernel_size, (oH, oW), stride, dilation):
        v = x[:, :, sl_y, sl_x]
        # padding is -inf: never greater than the maximum so far, never NaN, so never chosen
        better = (v > best) | xp.isnan(v)
        best = xp.where(better, v, best)
        idx = xp.where(better, i * kw + j, idx)  # a Python int: no host-to-device copy
    return best, idx


@layout_invariant
def max_pool2d_forward(x, kernel_size, stride, dilation=(1, 1)):
    """Max over each ``kernel_size`` window of ``x`` (taps ``dilation`` apart): ``(N, C, oH, oW)``.
    NaN propagates."""
    x = materialize(x)
    xp = array_namespace(x)
    out_hw = geo.block_output_hw(x.shape[2:], kernel_size, stride, dilation)
    best = None
    for _, _, (sl_y, sl_x) in geo.taps(kernel_size, out_hw, stride, dilation):
        v = x[:, :, sl_y, sl_x]
        if best is None:
            best = v.copy()
            continue
        best = xp.where((v > best) | xp.isnan(v), v, best)
    return best


@layout_invariant
def max_pool2d_argmax(x, kernel_size, stride, dilation, origin, width):
    """Max and argmax of each window: ``(values, indices)``, both ``(N, C, oH, oW)``.

    ``indices`` (int64) are flat positions ``row * width + col`` in the image plane, as
    ``torch.nn.functional.max_pool2d(..., return_indices=True)`` gives them; ``origin`` is the
    window's image position and ``width`` the image's.
    """
    best, idx = _argmax_taps(x, kernel_size, stride, dilation, origin)
    xp = array_namespace(best)
    kw, (sy, sx), (dy, dx) = kernel_size[1], stride, dilation
    oH, oW = best.shape[2:]
    rows = xp.arange(oH, dtype=xp.int64).reshape(oH, 1) * (sy * width) + (origin[0] * width + origin[1])
    base = rows + xp.arange(oW, dtype=xp.int64).reshape(1, oW) * sx  # (oH, oW): each window's origin
    idx = idx.astype(xp.int64)
    return best, base + (idx // kw) * (dy * width) + (idx % kw) * dx


def _argmax_index(x, kernel_size, stride, dilation, origin):
    """Max and tap index of each window's argmax, as :func:`_argmax_taps` gives them, without a
    ``where`` per tap (NumPy's branches on every element, slow on the random comparisons of
    pooling, see ``_select``): ``maximum`` keeps the maximum so far (it propagates NaN, so it
    takes the same decisions as ``where(better, v, best)``), and since the taps are visited in
    increasing order, a tap that wins is the largest index so far: ``idx = maximum(idx, better
    * t)``."""
    xp = array_namespace(x)
    kw = kernel_size[1]
    N, C, Hw, Ww = x.shape
    oH, oW = geo.block_output_hw((Hw, Ww), kernel_size, stride, dilation)
    best = xp.full((N, C, oH, oW), float("-inf"), dtype=x.dtype)
    idx = _first_taps(xp, best.shape, kernel_size, stride, dilation, origin)
    for i, j, (sl_y, sl_x) in geo.taps(kernel_size, (oH, oW), stride, dilation):
        v = x[:, :, sl_y, sl_x]
        better = v > best  # padding is -inf: never greater, never NaN, never chosen
        better |= xp.isnan(v)
        best = xp.maximum(best, v)
        won = better.astype(idx.dtype)
        won *= i * kw + j  # a Python int: no host-to-device copy
        idx = xp.maximum(idx, won)
    return best, idx


@layout_invariant
def max_pool2d_forward_taps(x, kernel_size, stride, dilation=(1, 1)):
    """``(values, taps)``: the max of each window and the tap index ``i*kw + j`` it came from
    (int32), as :func:`max_pool2d_backward` finds them; a backward that keeps ``taps`` routes
    the gradient with :func:`max_pool2d_scatter` without searching ``x`` again."""
    return _argmax_index(materialize(x), kernel_size, stride, dilation, (0, 0))


@layout_invariant
def max_pool2d_scatter(gy, taps, kernel_size, stride, dilation=(1, 1)):
    """Route ``gy`` to each window's tap ``taps`` (from :func:`max_pool2d_forward_taps`):
    a block of the window's shape, ``geometry.block_window_hw`` of ``gy``'s."""
    xp = array_namespace(gy)
    kw = kernel_size[1]
    N, C, oH, oW = gy.shape
    Hw, Ww = geo.block_window_hw((oH, oW), kernel_size, stride, dilation)
    gx = xp.zeros((N, C, Hw, Ww), dtype=gy.dtype)
    for i, j, (sl_y, sl_x) in geo.taps(kernel_size, (oH, oW), stride, dilation):
        gx[:, :, sl_y, sl_x] += where_zero(taps == i * kw + j, gy)
    return gx


@layout_invariant
def max_pool2d_backward(x, gy, kernel_size, stride, dilation=(1, 1), origin=(0, 0)):
    """Route ``gy`` to the argmax of each window; returns a block of ``x``'s shape."""
    _, taps = _argmax_index(materialize(x), kernel_size, stride, dilation, origin)
    return max_pool2d_scatter(gy, taps, kernel_size, stride, dilation)
