"""BatchNorm (+ optional ReLU) on one block, and the per-channel statistics it combines.

Statistics travel as a ``(3, C)`` float64 block ``(count, mean, M2)`` per channel (M2 is the
sum of squared deviations) and are merged with Chan et al.'s parallel formula, which is exact
and stable in any order, so a tree over chunks gives the same mean and variance as one pass.

The kernels read a block in its own dtype and never copy it whole into float64: every
per-channel sum is accumulated in float64 straight from the block (or from one temporary of
the block's dtype, such as ``x - mean``), see :func:`_channel_sums`.  The statistics are two
passes (the mean, then the squares of ``x - mean``), so their error does not grow with
``mean / std`` as a one-pass ``sum(x**2) - n * mean**2`` would; the elementwise parts
compute their per-channel coefficients in float64 and round them once to the block's dtype.
"""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant
from ._select import where_zero


def _rows(x):
    """``x`` as a ``(N, C, K)`` view (``K = H * W``, or 1 for a ``(N, C)`` block): a view,
    not a copy, of the C-contiguous blocks the kernels see."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channel_sums(a):
    """Per-channel sums ``(C,)`` float64 of a C-contiguous ``(N, C, K)`` block.

    First over N: the ``N`` rows of ``C * K`` contiguous elements are added into one float64
    row (NumPy casts them in buffered pieces, no float64 copy of the block; the inner loop
    is long whatever ``K``, where a reduction over ``(0, 2)`` would loop over rows of ``K``,
    only 4 elements in VGG16's last stage); then over K in the small ``(C, K)`` float64 row.
    The order of additions is fixed by the shape, so the bits are a function of the values.
    """
    N, C, K = a.shape
    return a.reshape(N, C * K).sum(axis=0, dtype=_f64(a)).reshape(C, K).sum(axis=1)


def _f64(a):
    return array_namespace(a).float64


def _bcast(v, x):
    """A (C,) vector shaped to broadcast along ``x``'s channel axis (axis 1)."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


@layout_invariant
def bn_partial_stats(x):
    """``(count, mean, M2)`` per channel of one block: ``(3, C)`` float64.

    The mean is a float64 sum of the block; ``M2`` the float64 sum of ``(x - m)**2`` with
    ``m`` the mean rounded to ``x``'s dtype (for float32, ``M2`` then exceeds the exact one by
    ``n * (mean - m)**2``, a relative ``(2**-25 * mean / std)**2``: below float32's precision
    unless ``|mean| > 100 * std``, and never negative).
    """
    xp = array_namespace(x)
    a = _rows(x)
    n = a.shape[0] * a.shape[2]
    mean = _channel_sums(a) / n
    d = a - mean.astype(x.dtype).reshape(1, -1, 1)  # (N, C, K), x's dtype
    d *= d
    out = xp.empty((3, x.shape[1]), dtype=xp.float64)
    out[0] = n
    out[1] = mean
    out[2] = _channel_sums(d)
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


def _mean_invstd(stats, eps):
    """Mean and ``1 / sqrt(var + eps)`` per channel, float64."""
    xp = array_namespace(stats)
    return stats[1], 1.0 / xp.sqrt(stats[2] / stats[0] + eps)


@layout_invariant
def bn_forward(x, stats, gamma, beta, eps, relu):
    """``gamma * (x - mean) * invstd + beta`` (then ``max(., 0)`` if ``relu``).

    Computed as ``x * scale + shift`` with ``scale = gamma * invstd`` and
    ``shift = beta - mean * scale`` per channel (in float64, then rounded to ``x``'s dtype),
    as PyTorch's CPU kernel does: one multiply and one add per element.
    """
    xp = array_namespace(x)
    mean, invstd = _mean_invstd(stats, eps)
    scale = invstd * gamma.astype(xp.float64)
    shift = beta.astype(xp.float64) - mean * scale
    y = x * _bcast(scale.astype(x.dtype), x)
    y += _bcast(shift.astype(x.dtype), x)
    return xp.maximum(y, x.dtype.type(0)) if relu else y


def _masked(g, y, relu):
    """``g`` through the ReLU: ``g`` where ``y > 0``, else 0 (a new array if ``relu``, ``g``
    itself otherwise: never write into it)."""
    return where_zero(y > 0, g) if relu else g


@layout_invariant
def bn_backward_partial(x, y, g, stats, eps, relu):
    """Per-channel ``(sum g', sum g' * xhat)`` of one block, ``(2, C)`` float64, where ``g'``
    is ``g`` through the ReLU mask (``y > 0``).

    ``sum g' * xhat = invstd * (sum g' * (x - m) + (m - mean) * sum g')`` with ``m`` the mean
    rounded to ``x``'s dtype: the products are one temporary of ``x``'s dtype, summed in
    float64, and the second term makes up for the rounding of the mean exactly.
    """
    xp = array_namespace(x)
    mean, invstd = _mean_invstd(stats, eps)
    m = mean.astype(x.dtype)
    gg = _rows(_masked(g, y, relu))
    sum_g = _channel_sums(gg)
    d = _rows(x) - m.reshape(1, -1, 1)  # (N, C, K), x's dtype
    d *= gg
    out = xp.empty((2, x.shape[1]), dtype=xp.float64)
    out[0] = sum_g
    out[1] = (_channel_sums(d) + (m.astype(xp.float64) - mean) * sum_g) * invstd
    return out


@layout_invariant
def bn_backward(x, y, g, stats, sums, gamma, count, eps, relu, train):
    """``g_x`` of one block.  In training mode the batch statistics depend on ``x`` too:
    ``g_x = gamma * invstd * (g' - sum(g')/m - xhat * sum(g' xhat)/m)``.

    Computed with one temporary: ``t = (x - mean) * (invstd * sum(g' xhat)/m) + sum(g')/m``
    (``xhat * mgx`` with one per-channel coefficient), then ``g_x = (t - g') * -scale``, the
    same bits as ``(g' - t) * scale`` (IEEE negation and ``a - b = -(b - a)`` are exact).
    """
    xp = array_namespace(x)
    mean, invstd = _mean_invstd(stats, eps)
    scale = invstd * gamma.astype(xp.float64)
    gg = _masked(g, y, relu)
    if not train:
        return gg * _bcast(scale.astype(x.dtype), x)
    mg = sums[0] / count
    k = invstd * (sums[1] / count)
    t = x - _bcast(mean.astype(x.dtype), x)
    t *= _bcast(k.astype(x.dtype), x)
    t += _bcast(mg.astype(x.dtype), x)
    t -= gg
    t *= _bcast((-scale).astype(x.dtype), x)
    return t


@layout_invariant
def bn_running(stats, old_mean, old_var, decay, which):
    """Chainer's running mean (``which="mean"``) or variance (``"var"``) after a step:
    ``decay * old + (1 - decay) * batch``, the batch variance unbiased (``m / (m - 1)``), from
    the merged ``(3, C)`` statistics; in ``old``'s dtype."""
    count, mean = stats[0], stats[1]
    if which == "mean":
        return (decay * old_mean + (1 - decay) * mean).astype(old_mean.dtype)
    unbiased = stats[2] / array_namespace(stats).maximum(count - 1.0, 1.0)
    return (decay * old_var + (1 - decay) * unbiased).astype(old_var.dtype)
