"""Dask-level layers other than conv and pooling: ReLU, BatchNorm, linear, dropout, flatten,
softmax cross-entropy and accuracy, each with its VJP.  All lazy; reductions over chunks are
Dask's tree reductions, so BatchNorm statistics are global over (N, H, W) for any chunking.
"""

from __future__ import annotations

import functools
import numbers
from itertools import product

import dask.array as da
import numpy as np
from dask.array.core import Array
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ..backend import on_device_of, to_dask_array
from ..kernels import (
    bn_backward,
    bn_backward_partial,
    bn_forward,
    bn_partial_stats,
    bn_running,
    combine_stats,
    cross_entropy_sum,
    dropout_block,
    linear_forward,
    linear_grad_w,
    linear_grad_x,
    log_softmax,
    onehot,
)
from ._tree_sum import tree_sum
from ._validate import check_plain

__all__ = [
    "accuracy",
    "batch_norm",
    "batch_norm_running_update",
    "batch_norm_stats",
    "batch_norm_vjp",
    "dropout",
    "dropout_key",
    "leaky_relu",
    "leaky_relu_vjp",
    "linear",
    "linear_vjp",
    "relu",
    "relu_vjp",
    "softmax_cross_entropy",
    "softmax_cross_entropy_vjp",
]


def _plain(**arrays):
    """Refuse masked arrays and PyTorch tensors among the arguments (see ``check_plain``): the
    block kernels would drop a mask and use the masked values."""
    for name, a in arrays.items():
        if a is not None:
            check_plain(a, name)


def relu(x):
    """``max(x, 0)`` elementwise."""
    _plain(x=x)
    return da.maximum(x, x.dtype.type(0))


def relu_vjp(x, g):
    """Gradient of :func:`relu`: ``g`` where ``x > 0``, else 0."""
    _plain(x=x, g=g)
    return da.where(x > 0, g, g.dtype.type(0))


def _slope(negative_slope, dtype):
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a real number, got {negative_slope!r}")
    # PyTorch's kernels cast the slope to the tensor's dtype before multiplying
    return np.dtype(dtype).type(negative_slope)


def _leaky_factor(x, slope):
    """1 where ``x > 0``, else ``slope`` (of ``slope``'s dtype): exact for the positive part."""
    return da.where(x > 0, slope.dtype.type(1), slope)


def leaky_relu(x, negative_slope=0.01):
    """``x`` where ``x > 0``, else ``negative_slope * x``, elementwise
    (``torch.nn.functional.leaky_relu``; NaN propagates)."""
    _plain(x=x)
    # a factor per element rather than where(x > 0, x, slope * x): that would multiply every
    # element, +inf by a zero slope too (a NaN it then throws away, with NumPy's warning)
    return x * _leaky_factor(x, _slope(negative_slope, x.dtype))


def leaky_relu_vjp(x, g, negative_slope=0.01):
    """Gradient of :func:`leaky_relu`: ``g`` where ``x > 0``, else ``negative_slope * g``
    (at ``x == 0`` too, as in PyTorch)."""
    _plain(x=x, g=g)
    return g * _leaky_factor(x, _slope(negative_slope, g.dtype))


def _bn_index(x):
    if x.ndim == 4:
        return "nchw"
    if x.ndim == 2:
        return "nc"
    raise ValueError(f"batch_norm expects (N, C) or (N, C, H, W), got shape {x.shape}")


def _per_channel(v, x, dtype=None):
    """A (C,) vector as a Dask array chunked like ``x``'s channel axis (axis 1), with blocks
    of ``x``'s library (a NumPy vector meeting CuPy blocks is copied to the device)."""
    v = on_device_of(to_dask_array(v, -1), x).rechunk((x.chunks[1],))
    return v.astype(dtype or x.dtype, copy=False)


def _per_channel_reduce(name, func, blocks, rows, channel=()):
    """``(rows, C)`` float64: ``func`` on the matching blocks of the arrays ``blocks`` (all
    chunked alike, channels on axis 1) and the channel chunk's block of each ``(k, C)`` array in
    ``channel``, combined per channel chunk as a tree over the other axes."""
    x = blocks[0]
    dsk = {}
    part = name + "-part"
    for c in range(x.numblocks[1]):
        parts = [
            (
                (part,) + idx,
                (func,) + tuple((a.name,) + idx for a in blocks) + tuple((a.name, 0, c) for a in channel),
            )
            for idx in product(*(range(n) for n in x.numblocks))
            if idx[1] == c
        ]
        tree_sum(dsk, (name, 0, c), parts, combine=combine_stats if rows == 3 else None)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[*blocks, *channel])
    meta = meta_from_array(x._meta, ndim=2, dtype=np.float64)
    return Array(graph, name, ((rows,), x.chunks[1]), meta=meta)


def batch_norm_stats(x):
    """Batch statistics per channel over N (and H, W) across all chunks, as a lazy ``(3, C)``
    float64 array of ``(count, mean, M2)`` (merged exactly, in a tree)."""
    _plain(x=x)
    _bn_index(x)
    return _per_channel_reduce(f"batch_norm-stats-{tokenize(x)}", bn_partial_stats, [x], rows=3)


def _stats(x, mean, var, stats=None):
    """The ``(3, C)`` statistics a BatchNorm block reads: ``stats`` (the batch statistics of
    ``x``, given), the batch statistics computed here, or the running ``mean``/``var``."""
    if stats is not None:
        if mean is not None or var is not None:
            raise ValueError(
                "pass either stats (training: x's batch statistics) or mean and var (evaluation)"
            )
        if not isinstance(stats, da.Array) or stats.shape != (3, x.shape[1]):
            raise ValueError(
                f"stats must be batch_norm_stats(x), a (3, {x.shape[1]}) Dask array, got "
                f"{type(stats).__name__} of shape {getattr(stats, 'shape', None)}"
            )
        return stats.rechunk(((3,), x.chunks[1]))
    if mean is None:
        return batch_norm_stats(x)
    mean = _per_channel(mean, x, np.float64)
    var = _per_channel(var, x, np.float64)
    return da.stack([da.ones_like(mean), mean, var]).rechunk({0: 3})  # count 1, M2 = var


def batch_norm(x, gamma, beta, mean=None, var=None, eps=2e-5, relu=False, stats=None):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, then ReLU if ``relu``.

    With ``mean``/``var`` None (training) they are the batch statistics over N (and H, W)
    across all chunks, biased variance; otherwise (evaluation) the given running statistics.
    ``eps`` defaults to Chainer's 2e-5.  One task per block, plus a tree for the statistics.

    ``stats`` (training only) is :func:`batch_norm_stats` of ``x``, computed once by a caller
    that also needs it (a model's running-statistics update): the normalisation then reads
    that array instead of building its own.
    """
    _plain(x=x, gamma=gamma, beta=beta, mean=mean, var=var)
    ind = _bn_index(x)
    stats = _stats(x, mean, var, stats)
    # tokenized as Dask arrays: a raw device (CuPy) array would be pickled, a copy to the host
    # (Dask has no deterministic tokenizer for CuPy: https://github.com/dask/dask/issues/6718)
    gamma, beta = _per_channel(gamma, x), _per_channel(beta, x)
    return da.blockwise(
        bn_forward,
        ind,
        x,
        ind,
        stats,
        "z" + ind[1],
        gamma,
        "c",
        beta,
        "c",
        eps=eps,
        relu=relu,
        dtype=x.dtype,
        meta=x._meta,
        concatenate=True,
        name=f"batch_norm-fwd-{tokenize(x, stats, gamma, beta, eps, relu)}",
    )


def batch_norm_vjp(x, gamma, g, mean=None, var=None, eps=2e-5, relu=False, y=None, stats=None):
    """Gradients ``(g_x, g_gamma, g_beta)`` of :func:`batch_norm` (``stats`` as there).

    In training mode ``g_x`` includes the paths through the batch mean and variance:
    ``g_x = gamma * invstd * (g' - mean(g') - xhat * mean(g' * xhat))`` with ``g'`` the
    gradient through the ReLU: ``y``, the forward output, gives its mask and is required when
    ``relu`` is true.
    """
    ind = _bn_index(x)
    if relu and y is None:
        raise ValueError(
            "batch_norm_vjp with relu=True needs y, the forward output (its sign is the ReLU mask)"
        )
    train = mean is None
    stats = _stats(x, mean, var, stats)
    y = x if y is None else y  # read only for the ReLU mask
    g = g if g.chunks == x.chunks else g.rechunk(x.chunks)
    name = f"batch_norm-gsum-{tokenize(x, y, g, stats, eps, relu)}"
    partial = functools.partial(bn_backward_partial, eps=eps, relu=relu)
    sums = _per_channel_reduce(name, partial, [x, y, g], rows=2, channel=[stats])
    count = x.size // x.shape[1]
    gamma = _per_channel(gamma, x)  # tokenized as a Dask array (see batch_norm)
    g_x = da.blockwise(
        bn_backward,
        ind,
        x,
        ind,
        y,
        ind,
        g,
        ind,
        stats,
        "z" + ind[1],
        sums,
        "s" + ind[1],
        gamma,
        "c",
        count=count,
        eps=eps,
        relu=relu,
        train=train,
        dtype=x.dtype,
        meta=x._meta,
        concatenate=True,
        name=f"batch_norm-gx-{tokenize(name, gamma, train)}",
    )
    return g_x, _row(sums, 1, x.dtype), _row(sums, 0, x.dtype)


def _take_row(block, i, dtype):
    return block[i].astype(dtype)


def _row(a, i, dtype):
    """Row ``i`` of a per-channel ``(k, C)`` array as a blockwise op (so it fuses into its
    consumers, unlike slicing)."""
    return a.map_blocks(
        _take_row, i, dtype, drop_axis=0, dtype=dtype, meta=meta_from_array(a._meta, ndim=1, dtype=dtype)
    )


def batch_norm_running_update(stats, mean, var, decay=0.9):
    """Chainer's running statistics after a training step: ``decay * old + (1 - decay) *
    batch``, with the unbiased batch variance.  ``stats`` is :func:`batch_norm_stats`'s
    ``(3, C)``; returns the new ``(mean, var)``, chunked like ``stats``'s channels."""
    _plain(stats=stats, mean=mean, var=var)
    mean, var = _per_channel(mean, stats, mean.dtype), _per_channel(var, stats, var.dtype)
    out = []
    for which in ("mean", "var"):
        out.append(
            da.blockwise(
                bn_running,
                "c",
                stats,
                "zc",
                mean,
                "c",
                var,
                "c",
                decay=decay,
                which=which,
                dtype=mean.dtype,
                meta=mean._meta,
                concatenate=True,
                name=f"batch_norm-running-{which}-{tokenize(stats, mean, var, decay)}",
            )
        )
    return tuple(out)


def linear(x, W):
    """``x @ W.T`` for ``x`` (N, in) and ``W`` (out, in) (PyTorch layout); chunks of ``W`` on
    axis 0 split the outputs.  The contraction is whole in each task: chunks of ``x`` on axis 1
    (and of ``W``) are concatenated there, so the result does not depend on them."""
    _plain(x=x, W=W)
    W = on_device_of(to_dask_array(W, -1), x)
    return da.blockwise(
        linear_forward,
        "no",
        x,
        "ni",
        W,
        "oi",
        concatenate=True,
        dtype=np.result_type(x.dtype, W.dtype),
        meta=x._meta,
        name=f"linear-fwd-{tokenize(x, W)}",
    )


def linear_vjp(x, W, g):
    """Gradients ``(g_x, g_W)`` of :func:`linear`, chunked like ``x`` and ``W``; each task's
    contraction is whole (over the output features for ``g_x``, the batch for ``g_W``)."""
    _plain(x=x, W=W, g=g)
    W = on_device_of(to_dask_array(W, -1), x)
    tok = tokenize(x, W, g)
    g_x = da.blockwise(
        linear_grad_x,
        "ni",
        g,
        "no",
        W.rechunk((g.chunks[1], x.chunks[1])),
        "oi",
        concatenate=True,
        dtype=g.dtype,
        meta=g._meta,
        name=f"linear-gx-{tok}",
    )
    g_W = da.blockwise(
        linear_grad_w,
        "oi",
        g,
        "no",
        x.rechunk({0: g.chunks[0]}),
        "ni",
        concatenate=True,
        dtype=g.dtype,
        meta=g._meta,
        name=f"linear-gw-{tok}",
    )
    return g_x, g_W.rechunk(W.chunks)


def _dropout_map(x, ratio, key, shape, block_info=None):
    return dropout_block(x, ratio, key, shape, block_info[0]["array-location"])


def dropout_key(seed, step, layer):
    """The 64-bit key of a dropout layer's masks in a training step: a hash of ``(seed, step,
    layer)`` (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, step, layer]).generate_state(1, dtype=np.uint64)[0])


def dropout(x, ratio, seed, step, layer):
    """Inverted dropout: zero each element with probability ``ratio``, scale the rest by
    ``1/(1-ratio)``.

    The mask is a pure function of ``(seed, step, layer)`` and each element's global index
    (hence of its block), so it does not depend on the chunking and a task recomputed after a
    lost worker gives the same mask.  Applying the same call to a gradient gives the VJP.
    """
    _plain(x=x)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return x
    key = dropout_key(seed, step, layer)
    return x.map_blocks(
        _dropout_map,
        ratio,
        key,
        x.shape,
        dtype=x.dtype,
        meta=x._meta,
        name=f"dropout-{tokenize(x, ratio, key)}",
    )


def _labels(t, z):
    """The labels as a Dask array chunked like ``z`` without its class axis (axis 1): ``(N,)``
    for ``(N, K)`` logits, ``(N, H, W)`` for per-pixel ``(N, K, H, W)`` logits."""
    want = (z.shape[0],) + tuple(z.shape[2:])
    t = on_device_of(to_dask_array(t, -1), z)
    if tuple(t.shape) != want:
        raise ValueError(f"labels must have shape {want} for logits of shape {z.shape}, got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {t.dtype}")
    chunks = (z.chunks[0],) + z.chunks[2:]
    return t if t.chunks == chunks else t.rechunk(chunks)


def _onehot(t, z):
    """One-hot labels along axis 1, shaped and chunked like ``z`` (``(N, K)`` rows or
    ``(N, K, H, W)`` pixels), in ``z``'s library."""
    t = _labels(t, z)
    K = z.shape[1]
    meta = meta_from_array(z._meta, ndim=z.ndim, dtype=z.dtype)
    chunks = (t.chunks[0], (K,)) + t.chunks[1:]
    rows = t.map_blocks(onehot, K, z.dtype, new_axis=1, chunks=chunks, dtype=z.dtype, meta=meta)
    return rows.rechunk(z.chunks)


def _whole_rows(z):
    """``z`` with every class in one chunk (the kernels work on whole rows)."""
    return z if z.numblocks[1] == 1 else z.rechunk({1: -1})


def _log_softmax(z):
    return z.map_blocks(log_softmax, dtype=z.dtype, meta=z._meta, name=f"log-softmax-{tokenize(z)}")


def _check_logits(z):
    if z.ndim not in (2, 4):
        raise ValueError(f"logits must be (N, K) or per-pixel (N, K, H, W), got shape {z.shape}")


def softmax_cross_entropy(z, t):
    """Mean of ``-log softmax(z)[t]`` over the batch (and the pixels).

    ``z`` are (N, K) logits with (N,) labels ``t``, or per-pixel (N, K, H, W) logits (a
    segmentation network's output, classes on axis 1) with (N, H, W) labels: then the mean is
    over all ``N * H * W`` pixels, as ``torch.nn.functional.cross_entropy`` takes it.  Any
    chunking of the batch and spatial axes; the class axis is made whole.

    One task per block sums its rows' (pixels') losses (a kernel: the same bits for any layout
    of the block), then a tree sums those partial sums, in an order fixed by the chunking."""
    _plain(z=z, t=t)
    _check_logits(z)
    z = _whole_rows(z)
    meta = meta_from_array(z._meta, ndim=z.ndim - 1, dtype=z.dtype)
    parts = da.map_blocks(
        _block_loss,
        z,
        _onehot(t, z),
        drop_axis=1,
        chunks=tuple((1,) * n for i, n in enumerate(z.numblocks) if i != 1),
        dtype=z.dtype,
        meta=meta,
        name=f"cross-entropy-sum-{tokenize(z, t)}",
    )
    return parts.sum() / (z.size // z.shape[1])


def _block_loss(z, rows):
    """The block's summed loss, shaped like one element of the partial-sum array."""
    return cross_entropy_sum(z, rows).reshape((1,) * (z.ndim - 1))


def softmax_cross_entropy_vjp(z, t, g):
    """Gradient of :func:`softmax_cross_entropy` with respect to ``z``, chunked like ``z``."""
    _plain(z=z, t=t, g=g)
    _check_logits(z)
    whole = _whole_rows(z)
    g_z = (da.exp(_log_softmax(whole)) - _onehot(t, whole)) * (g / (z.size // z.shape[1]))
    return g_z if g_z.chunks == z.chunks else g_z.rechunk(z.chunks)


def _argmax_rows(block):
    return block.argmax(axis=1)


def accuracy(z, t):
    """Fraction of rows (of pixels, for (N, K, H, W) logits and (N, H, W) labels) whose
    arg-max over the classes equals the label (a lazy scalar).

    The arg-max is taken block by block over whole rows (the class axis is one chunk, rechunked
    if it was split): Dask's general arg-reduction across chunks goes through a structured
    dtype that CuPy supports only partly (https://github.com/dask/dask/issues/7997)."""
    _plain(z=z, t=t)
    _check_logits(z)
    if z.numblocks[1] > 1:
        z = z.rechunk({1: -1})
    meta = meta_from_array(z._meta, ndim=z.ndim - 1, dtype=np.intp)
    pred = z.map_blocks(
        _argmax_rows, drop_axis=1, dtype=np.intp, meta=meta, name=f"accuracy-argmax-{tokenize(z)}"
    )
    return (pred == _labels(t, z)).mean()
