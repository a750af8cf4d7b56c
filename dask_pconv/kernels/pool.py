"""Max pooling of one window block (padding, if any, is already in the window as -inf)."""

from __future__ import annotations

from ._namespace import get_namespace, layout_invariant
from ._window import materialize
from .conv import _out_size, _taps, _window_size


def _argmax_taps(x, kernel_size, stride):
    """Max and the index ``i*kw + j`` of the first maximal tap (NaN counts as maximal)."""
    x = materialize(x)
    xp = get_namespace(x)
    kh, kw = kernel_size
    oH = _out_size(x.shape[2], kh, stride[0], 1)
    oW = _out_size(x.shape[3], kw, stride[1], 1)
    best = idx = None
    for i, j, (sl_y, sl_x) in _taps(kh, kw, oH, oW, stride, (1, 1)):
        v = x[:, :, sl_y, sl_x]
        if best is None:
            best = v.copy()
            idx = xp.zeros(v.shape, dtype=xp.int32)
            continue
        # strict '>' keeps the first maximum, as PyTorch does; a NaN wins and stays
        better = (v > best) | (xp.isnan(v) & ~xp.isnan(best))
        best = xp.where(better, v, best)
        idx = xp.where(better, i * kw + j, idx)  # a Python int: no host-to-device copy
    return best, idx


@layout_invariant
def max_pool2d_forward(x, kernel_size, stride):
    """Max over each ``kernel_size`` window of ``x``: ``(N, C, oH, oW)``."""
    return _argmax_taps(x, kernel_size, stride)[0]


@layout_invariant
def max_pool2d_backward(x, gy, kernel_size, stride):
    """Route ``gy`` to the argmax of each window; returns a block of ``x``'s shape."""
    x = materialize(x)
    xp = get_namespace(x, gy)
    kh, kw = kernel_size
    _, idx = _argmax_taps(x, kernel_size, stride)
    N, C, oH, oW = gy.shape
    Hw, Ww = _window_size(oH, kh, stride[0], 1), _window_size(oW, kw, stride[1], 1)
    gx = xp.zeros((N, C, Hw, Ww), dtype=gy.dtype)
    zero = xp.zeros((), dtype=gy.dtype)
    for i, j, (sl_y, sl_x) in _taps(kh, kw, oH, oW, stride, (1, 1)):
        gx[:, :, sl_y, sl_x] += xp.where(idx == i * kw + j, gy, zero)
    return gx
