"""Nearest-neighbour upsampling by integer factors, and its vector-Jacobian product.

Each output block is its input block repeated, so the op is blockwise: no halo, output chunks
are the input chunks times the factor, and the result does not depend on the chunking.
"""

from __future__ import annotations

import numbers

from dask.base import tokenize

from ..backend import on_device_of
from ..kernels import upsample_nearest_backward, upsample_nearest_forward
from ._validate import check_same_dtype, checked_operand

__all__ = ["upsample_nearest", "upsample_nearest_vjp"]


def _scale_pair(scale_factor):
    """``(sh, sw)``, positive ints, from an int or a pair (integral floats such as 2.0 too)."""
    pair = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
    if len(pair) != 2:
        raise ValueError(f"scale_factor must be a number or a pair, got {scale_factor!r}")
    out = []
    for s in pair:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not float(s).is_integer():
            raise ValueError(f"upsample_nearest supports integer scale factors only, got {scale_factor!r}")
        if s < 1:
            raise ValueError(f"scale_factor must be at least 1, got {scale_factor!r}")
        out.append(int(s))
    return tuple(out)


def _out_chunks(x, scale):
    sh, sw = scale
    return x.chunks[:2] + (tuple(c * sh for c in x.chunks[2]), tuple(c * sw for c in x.chunks[3]))


def upsample_nearest(x, scale_factor):
    """Nearest-neighbour upsampling by integer factors
    (``torch.nn.functional.interpolate(x, scale_factor=s, mode='nearest')``).

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W)
        Any chunking; NumPy/CuPy arrays are wrapped.  ``N`` may be 0.
    scale_factor : int or (int, int)
        ``(sh, sw)``, each at least 1; a float must be integral (2.0).

    Returns
    -------
    y : dask.array.Array, shape (N, C, H*sh, W*sw)
        ``y[..., i, j] = x[..., i // sh, j // sw]``; one task per block, chunks those of ``x``
        times the factors on H and W.
    """
    scale = _scale_pair(scale_factor)
    x = checked_operand(x, "x", 4, empty_batch=True)
    return x.map_blocks(
        upsample_nearest_forward,
        scale,
        chunks=_out_chunks(x, scale),
        dtype=x.dtype,
        meta=x._meta,
        name=f"upsample-nearest-{tokenize(x, scale)}",
    )


def upsample_nearest_vjp(x, g_y, scale_factor):
    """Gradient of ``<g_y, upsample_nearest(x, scale_factor)>`` with respect to ``x``: the sum
    of each ``sh x sw`` block of ``g_y``, chunked like ``x`` (only ``x``'s shape and chunks are
    read).  ``g_y`` has the output's shape and ``x``'s dtype; it is rechunked to the output's
    chunks if it has others.  Each sum is taken in row-major order in one task, so the result
    is the same in every chunking."""
    scale = _scale_pair(scale_factor)
    x = checked_operand(x, "x", 4, empty_batch=True)
    g_y = checked_operand(g_y, "g_y", 4, empty_batch=True)
    g_y = on_device_of(check_same_dtype(g_y, "g_y", x), x)
    out_shape = x.shape[:2] + (x.shape[2] * scale[0], x.shape[3] * scale[1])
    if g_y.shape != out_shape:
        raise ValueError(f"g_y must have the output shape {out_shape}, got {g_y.shape}")
    chunks = _out_chunks(x, scale)
    g_y = g_y if g_y.chunks == chunks else g_y.rechunk(chunks)
    return g_y.map_blocks(
        upsample_nearest_backward,
        scale,
        chunks=x.chunks,
        dtype=x.dtype,
        meta=x._meta,
        name=f"upsample-nearest-gx-{tokenize(g_y, scale)}",
    )
