"""Dask-level layers other than conv and pooling: ReLU, BatchNorm, linear, dropout, flatten,
softmax cross-entropy and accuracy, each with its VJP.  All lazy; reductions over chunks are
Dask's tree reductions, so BatchNorm statistics are global over (N, H, W) for any chunking.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from ..kernels import get_namespace

__all__ = [
    "accuracy",
    "batch_norm",
    "batch_norm_stats",
    "batch_norm_vjp",
    "dropout",
    "dropout_mask",
    "linear",
    "linear_vjp",
    "relu",
    "relu_vjp",
    "softmax_cross_entropy",
    "softmax_cross_entropy_vjp",
]


def relu(x):
    """``max(x, 0)`` elementwise."""
    return da.maximum(x, x.dtype.type(0))


def relu_vjp(x, g):
    """Gradient of :func:`relu`: ``g`` where ``x > 0``, else 0."""
    return da.where(x > 0, g, g.dtype.type(0))


def _bn_axes(x):
    if x.ndim == 4:
        return (0, 2, 3)
    if x.ndim == 2:
        return (0,)
    raise ValueError(f"batch_norm expects (N, C) or (N, C, H, W), got shape {x.shape}")


def _per_channel(v, x):
    """A (C,) vector shaped and chunked to broadcast against ``x``'s channel axis."""
    v = v if isinstance(v, da.Array) else da.from_array(v, chunks=-1)
    v = v.rechunk((x.chunks[1],)).astype(x.dtype, copy=False)
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_norm_stats(x):
    """Batch mean and (biased) variance per channel over N (and H, W): two lazy (C,) arrays."""
    axes = _bn_axes(x)
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=axes)
    return mean, var


def batch_norm(x, gamma, beta, mean=None, var=None, eps=2e-5):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel.

    With ``mean``/``var`` None (training) they are the batch statistics over N, H, W across all
    chunks; otherwise (evaluation) the given running statistics.  ``eps`` defaults to
    Chainer's 2e-5.
    """
    if mean is None:
        mean, var = batch_norm_stats(x)
    invstd = 1.0 / da.sqrt(_per_channel(var, x) + eps)
    return (x - _per_channel(mean, x)) * (invstd * _per_channel(gamma, x)) + _per_channel(beta, x)


def batch_norm_vjp(x, gamma, g, mean=None, var=None, eps=2e-5):
    """Gradients ``(g_x, g_gamma, g_beta)`` of :func:`batch_norm`.

    In training mode (statistics from the batch) ``g_x`` includes the paths through the mean
    and the variance: ``g_x = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))``.
    """
    axes = _bn_axes(x)
    train = mean is None
    if train:
        mean, var = batch_norm_stats(x)
    invstd = 1.0 / da.sqrt(_per_channel(var, x) + eps)
    xhat = (x - _per_channel(mean, x)) * invstd
    g_beta = g.sum(axis=axes)
    g_gamma = (g * xhat).sum(axis=axes)
    scale = invstd * _per_channel(gamma, x)
    if not train:
        return g * scale, g_gamma, g_beta
    m = np.prod([x.shape[a] for a in axes])
    g_x = scale * (g - _per_channel(g_beta / m, x) - xhat * _per_channel(g_gamma / m, x))
    return g_x, g_gamma, g_beta


def linear(x, W):
    """``x @ W.T`` for ``x`` (N, in) and ``W`` (out, in) (PyTorch layout); chunks of ``W`` on
    axis 0 split the outputs, chunks of ``x`` on axis 1 are contracted as a tree."""
    W = W if isinstance(W, da.Array) else da.from_array(W, chunks=-1)
    return da.matmul(x, W.T.rechunk((x.chunks[1], W.chunks[0])))


def linear_vjp(x, W, g):
    """Gradients ``(g_x, g_W)`` of :func:`linear`."""
    W = W if isinstance(W, da.Array) else da.from_array(W, chunks=-1)
    g_x = da.matmul(g, W.rechunk((g.chunks[1], x.chunks[1])))
    g_W = da.matmul(g.T, x).rechunk((W.chunks[0], W.chunks[1]))
    return g_x, g_W


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _mask_block(like, ratio, key, shape, block_info=None):
    """Keep-mask scaled by 1/(1-ratio) for one block, from the *global* element indices.

    Each element's random number is a hash of (key, its flat index in the whole array), so the
    mask does not depend on the chunking and a recomputed task gives the same mask.
    """
    xp = get_namespace(like)
    loc = block_info[0]["array-location"]
    flat = None
    for ax, (lo, hi) in enumerate(loc):
        stride = int(np.prod(shape[ax + 1 :]))
        idx = xp.arange(lo, hi, dtype=xp.uint64) * np.uint64(stride)
        idx = idx.reshape((-1,) + (1,) * (len(shape) - ax - 1))
        flat = idx if flat is None else flat + idx
    with np.errstate(over="ignore"):
        h = _splitmix64(flat + np.uint64(key))
    u = (h >> np.uint64(11)).astype(xp.float64) * (1.0 / 2**53)  # uniform in [0, 1)
    scale = like.dtype.type(1.0 / (1.0 - ratio))
    return xp.where(u >= ratio, scale, like.dtype.type(0)).astype(like.dtype)


def dropout_mask(x, ratio, seed, step, layer):
    """The (lazy) scaled keep-mask of :func:`dropout`, a pure function of
    ``(seed, step, layer)`` and each element's global index (so of its block too)."""
    key = np.random.SeedSequence([seed, step, layer]).generate_state(1, dtype=np.uint64)[0]
    return x.map_blocks(
        _mask_block, ratio, int(key), x.shape, dtype=x.dtype, name=f"dropout-mask-{seed}-{step}-{layer}"
    )


def dropout(x, ratio, seed, step, layer):
    """Inverted dropout: zero each element with probability ``ratio``, scale the rest."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return x
    return x * dropout_mask(x, ratio, seed, step, layer)


def _onehot(t, n_classes, dtype):
    return (t[:, None] == da.arange(n_classes, chunks=-1)[None, :]).astype(dtype)


def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - da.log(da.exp(z - m).sum(axis=1, keepdims=True))


def softmax_cross_entropy(z, t):
    """Mean over the batch of ``-log softmax(z)[t]``; ``z`` (N, K) logits, ``t`` (N,) labels."""
    onehot = _onehot(t, z.shape[1], z.dtype).rechunk(z.chunks)
    return -(_log_softmax(z) * onehot).sum() / z.shape[0]


def softmax_cross_entropy_vjp(z, t, g):
    """Gradient of :func:`softmax_cross_entropy` with respect to ``z``."""
    onehot = _onehot(t, z.shape[1], z.dtype).rechunk(z.chunks)
    return (da.exp(_log_softmax(z)) - onehot) * (g / z.shape[0])


def accuracy(z, t):
    """Fraction of rows whose arg-max equals the label (a lazy scalar)."""
    return (z.argmax(axis=1) == t).mean()
