"""BatchNorm (+ optional ReLU) on one block, and the per-channel statistics it combines.

Statistics travel as a ``(3, C)`` float64 block ``(count, mean, M2)`` per channel (M2 is the
sum of squared deviations) and are merged with Chan et al.'s parallel formula, which is exact
and stable in any order, so a tree over chunks gives the same mean and variance as one pass.
"""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant


def _axes(x):
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _bcast(v, x):
    """A (C,) vector shaped to broadcast along ``x``'s channel axis (axis 1)."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


@layout_invariant
def bn_partial_stats(x):
    """``(count, mean, M2)`` per channel of one block: ``(3, C)`` float64."""
    xp = array_namespace(x)
    axes = _axes(x)
    xf = x.astype(xp.float64)
    n = 1
    for a in axes:
        n *= x.shape[a]
    mean = xf.mean(axis=axes)
    m2 = ((xf - _bcast(mean, xf)) ** 2).sum(axis=axes)
    out = xp.empty((3, x.shape[1]), dtype=xp.float64)
    out[0] = n
    out[1] = mean
    out[2] = m2
    return out


@layout_invariant
def combine_stats(parts):
    """Merge ``(count, mean, M2)`` blocks of the same channels (Chan et al., 1979)."""
    acc = parts[0].copy()
    for p in parts[1:]:
        na, nb = acc[0], p[0]
        n = na + nb
        delta = p[1] - acc[1]
        acc[1] = acc[1] + delta * (nb / n)
        acc[2] = acc[2] + p[2] + delta * delta * (na * nb / n)
        acc[0] = n
    return acc


def _mean_invstd(stats, eps, dtype):
    xp = array_namespace(stats)
    mean = stats[1]
    var = stats[2] / stats[0]
    return mean.astype(dtype), (1.0 / xp.sqrt(var + eps)).astype(dtype)


@layout_invariant
def bn_forward(x, stats, gamma, beta, eps, relu):
    """``gamma * (x - mean) * invstd + beta`` (then ``max(., 0)`` if ``relu``)."""
    xp = array_namespace(x)
    mean, invstd = _mean_invstd(stats, eps, x.dtype)
    scale = invstd * gamma.astype(x.dtype)
    y = (x - _bcast(mean, x)) * _bcast(scale, x) + _bcast(beta.astype(x.dtype), x)
    return xp.maximum(y, x.dtype.type(0)) if relu else y


def _masked(g, y, relu):
    xp = array_namespace(g)
    return xp.where(y > 0, g, g.dtype.type(0)) if relu else g


@layout_invariant
def bn_backward_partial(x, y, g, stats, eps, relu):
    """Per-channel ``(sum g', sum g' * xhat)`` of one block, ``(2, C)`` float64, where ``g'``
    is ``g`` through the ReLU mask (``y > 0``)."""
    xp = array_namespace(x)
    axes = _axes(x)
    gg = _masked(g, y, relu).astype(xp.float64)
    mean, invstd = _mean_invstd(stats, eps, xp.float64)
    xhat = (x.astype(xp.float64) - _bcast(mean, x)) * _bcast(invstd, x)
    out = xp.empty((2, x.shape[1]), dtype=xp.float64)
    out[0] = gg.sum(axis=axes)
    out[1] = (gg * xhat).sum(axis=axes)
    return out


@layout_invariant
def bn_backward(x, y, g, stats, sums, gamma, count, eps, relu, train):
    """``g_x`` of one block.  In training mode the batch statistics depend on ``x`` too:
    ``g_x = gamma * invstd * (g' - sum(g')/m - xhat * sum(g' xhat)/m)``."""
    gg = _masked(g, y, relu)
    mean, invstd = _mean_invstd(stats, eps, x.dtype)
    scale = _bcast(invstd * gamma.astype(x.dtype), x)
    if not train:
        return gg * scale
    xhat = (x - _bcast(mean, x)) * _bcast(invstd, x)
    mg = _bcast((sums[0] / count).astype(x.dtype), x)
    mgx = _bcast((sums[1] / count).astype(x.dtype), x)
    return scale * (gg - mg - xhat * mgx)
