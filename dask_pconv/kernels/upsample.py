"""Nearest-neighbour upsampling by integer factors of one block, and its gradient."""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant


@layout_invariant
def upsample_nearest_forward(x, scale):
    """Each element of ``x`` (N, C, H, W) repeated ``scale = (sh, sw)`` times along H and W:
    ``(N, C, H*sh, W*sw)``."""
    xp = array_namespace(x)
    (sh, sw), (N, C, H, W) = scale, x.shape
    out = xp.empty((N, C, H * sh, W * sw), dtype=x.dtype)
    for i in range(sh):
        for j in range(sw):
            out[:, :, i::sh, j::sw] = x
    return out


@layout_invariant
def upsample_nearest_backward(gy, scale):
    """The sum of each ``sh x sw`` block of ``gy`` (N, C, H*sh, W*sw): ``(N, C, H, W)``.

    The ``sh * sw`` terms are added in row-major order (the order PyTorch's CPU loop adds
    them), element by element, so a result depends on its own block of ``gy`` only."""
    sh, sw = scale
    out = gy[:, :, 0::sh, 0::sw].copy()
    for i in range(sh):
        for j in range(sw):
            if i or j:
                out += gy[:, :, i::sh, j::sw]
    return out
