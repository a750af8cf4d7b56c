"""The block interpreter: a program's nodes run on one block (a batch chunk, a tile's window,
or both), forward and backward, calling :mod:`dask_pconv.kernels`.

Every stage task of every mode runs its nodes through here: the training step's stages,
``predict``, ``features`` and evaluation on batch chunks and tiles, and the tiles of
``predict_to_zarr``.  A block holds whole images of its batch chunk, or a tile's window read
with the halo its stage needs (:func:`dask_pconv.models.tiling.plan_tiles`): each node runs on
it as on a whole image, and the stage crops what the window's edges spoilt.

A layer kind's block rule is one pair of functions in :data:`FORWARD` and :data:`BACKWARD`
(keyed by the layer's class, looked up along its MRO).  A forward rule appends what its
backward reads to a ``saved`` list, and the backward pops it again.  A layer with no rule
(or whose rule declines the layer's settings: a max pool with padding, an average pool in ceil
mode) runs through the fine-grained reference inside the task: its ``apply`` on one-chunk Dask
arrays of the block, forward, and recorded on the tape again for its vector-Jacobian product
backward (:func:`_tape_forward`, :func:`_tape_backward`).  So a stage never refuses a layer the
program accepts; it only runs that node slower.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from .. import autodiff as ad
from ..backend import array_namespace
from ..geometry import normalize_pair, resolve_padding
from ..kernels import (
    Padded,
    avg_pool2d_backward,
    avg_pool2d_forward,
    bn_forward,
    combine_stats,
    conv2d_forward,
    conv2d_grad_b,
    conv2d_grad_w,
    conv2d_grad_x,
    cross_entropy_sum,
    dropout_keep,
    dropout_scale,
    linear_forward,
    linear_grad_w,
    linear_grad_x,
    log_softmax,
    max_pool2d_forward_taps,
    max_pool2d_scatter,
    onehot,
    plane_mean,
    plane_mean_backward,
    plane_sums,
    upsample_nearest_backward,
    upsample_nearest_forward,
)
from ..models.layers import (
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    RunMode,
    Upsample,
)
from ..models.program import INPUT
from ..ops.nn import dropout_key
from ..ops.upsample import _scale_pair

__all__ = [
    "BACKWARD",
    "FORWARD",
    "Ctx",
    "batch_norm_forward",
    "conv_bias",
    "conv_geometry",
    "layer_backward",
    "layer_forward",
    "loss_block",
    "named",
    "node_backward",
    "node_forward",
    "relu_backward",
    "relu_forward",
    "run_forward",
    "sum_parts",
    "trainable",
]


class Ctx:
    """What every node of a block shares: the dropout keys (``seed``, ``step``, ``dropout``),
    the batch's size ``n_total`` and the block's first image ``offset``, and the mode
    (``train``: BatchNorm on batch statistics; otherwise on the running ones)."""

    def __init__(self, seed, step, dropout, n_total, offset, train=True):
        self.seed, self.step, self.dropout, self.n_total, self.offset = seed, step, dropout, n_total, offset
        self.train = train

    def location(self, h, i=None):
        """Where block ``h`` (node ``i``'s output) lies in the whole batch's value."""
        n0 = self.offset
        return ((n0, n0 + h.shape[0]),) + tuple((0, s) for s in h.shape[1:])

    def full_shape(self, h, i=None):
        """The shape of the whole batch's value of which ``h`` (node ``i``'s output) is a block."""
        return (self.n_total, *h.shape[1:])


def named(seg, flat):
    """Per-node parameter dicts from the flat list a task receives (``seg``: ``(index, node)``
    pairs, each taking ``node.layer.params()`` in order)."""
    out, it = [], iter(flat)
    for _, node in seg:
        out.append({k: next(it) for k in node.layer.params()})
    return out


def sum_parts(parts):
    """The sum of ``parts`` in their order (a copy of the first, then the others added)."""
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


# -- the rules, one layer kind at a time ----------------------------------------------------------
def conv_geometry(layer):
    """``(kernel, stride, pads, dilation, groups)`` of a :class:`Conv2d` layer as pairs, ``pads``
    as ``(top, bottom, left, right)`` (:func:`~dask_pconv.geometry.resolve_padding`)."""
    k, s = normalize_pair(layer.kernel_size, "kernel_size"), normalize_pair(layer.stride, "stride")
    d = normalize_pair(layer.dilation, "dilation")
    (top, bottom), (left, right) = resolve_padding(layer.padding, k, s, d)
    return k, s, (top, bottom, left, right), d, layer.groups


def conv_bias(y, layer, p):
    """A convolution's output plus its bias, if the layer has one."""
    return y + p["b"].reshape(1, -1, 1, 1) if layer.bias else y


def _conv_forward(i, layer, h, p, ctx, saved, aux):
    k, s, pads, d, groups = conv_geometry(layer)
    saved.append(h)
    return conv_bias(conv2d_forward(Padded(h, pads, 0), p["W"], s, d, groups), layer, p)


def _grown(g, x, shape):
    """``x`` (the gradient of the rows and columns a window reached) in a block of zeros of
    ``shape`` (the input's: the rows and columns past the last window get no gradient)."""
    if x.shape[2:] == tuple(shape[2:]):
        return x
    full = array_namespace(g).zeros(shape, dtype=x.dtype)
    full[:, :, : x.shape[2], : x.shape[3]] = x
    return full


def _conv_backward(i, layer, g, p, ctx, saved, grads):
    h, W = saved.pop(), p["W"]
    k, s, pads, d, groups = conv_geometry(layer)
    grads["W"] = conv2d_grad_w(Padded(h, pads, 0), g, k, s, d, groups)
    if layer.bias:
        grads["b"] = conv2d_grad_b(g).reshape(-1)
    H, Wd = h.shape[2:]
    # the window the outputs read may stop short of the padded input (a stride that does not
    # divide it): the input rows and columns past it get no gradient
    Hw, Ww = ((o - 1) * si + di * (ki - 1) + 1 for o, si, di, ki in zip(g.shape[2:], s, d, k))
    top, left = pads[0], pads[2]
    crop = ((top, min(top + H, Hw)), (left, min(left + Wd, Ww)))
    return _grown(g, conv2d_grad_x(g, W, s, d, groups, crop=crop), h.shape)


def _transposed_geometry(layer):
    k, s = normalize_pair(layer.kernel_size, "kernel_size"), normalize_pair(layer.stride, "stride")
    d, p = normalize_pair(layer.dilation, "dilation"), normalize_pair(layer.padding, "padding", minimum=0)
    op = normalize_pair(layer.output_padding, "output_padding", minimum=0)
    return k, s, d, p, op


def _transposed_forward(i, layer, h, p, ctx, saved, aux):
    """A transposed convolution of a block: the input-gradient of the convolution with ``W``,
    the full window cut by the padding (and grown by the output padding, which only the bias
    reaches)."""
    k, s, d, pad, op = _transposed_geometry(layer)
    full_hw = tuple((n - 1) * si + di * (ki - 1) + 1 for n, si, di, ki in zip(h.shape[2:], s, d, k))
    out_hw = tuple(f - 2 * pi + o for f, pi, o in zip(full_hw, pad, op))
    crop = tuple((pi, min(pi + o, f)) for pi, o, f in zip(pad, out_hw, full_hw))
    y = conv2d_grad_x(h, p["W"], s, d, layer.groups, crop=crop)
    y = _grown(y, y, y.shape[:2] + out_hw)
    saved.append((h, full_hw))
    return conv_bias(y, layer, p)


def _transposed_backward(i, layer, g, p, ctx, saved, grads):
    """``g`` at the output back to the window coordinates of the convolution it transposes:
    then the input's gradient is that convolution, and ``W``'s its weight gradient."""
    h, full_hw = saved.pop()
    k, s, d, pad, _ = _transposed_geometry(layer)
    if layer.bias:
        grads["b"] = conv2d_grad_b(g).reshape(-1)
    g = g[:, :, : full_hw[0] - pad[0], : full_hw[1] - pad[1]]  # less the rows only the bias reached
    pads = (pad[0], full_hw[0] - pad[0] - g.shape[2], pad[1], full_hw[1] - pad[1] - g.shape[3])
    window = Padded(g, pads, 0)
    grads["W"] = conv2d_grad_w(window, h, k, s, d, layer.groups)
    return conv2d_forward(window, p["W"], s, d, layer.groups)


def batch_norm_forward(layer, h, p, saved, stats_parts):
    """A BatchNorm (and its ReLU) on one block with every block's partial statistics, merged
    in their order; saves what its backward reads."""
    stats = combine_stats(list(stats_parts))
    y = bn_forward(h, stats, p["gamma"], p["beta"], layer.eps, layer.relu)
    saved.append((h, y, stats))
    return y


def _bn_forward(i, layer, h, p, ctx, saved, aux):
    """A BatchNorm (and its ReLU) on one block: in training mode with every block's partial
    statistics of its input (``aux``, merged in their order; saves what its backward reads),
    in evaluation mode with the running statistics (``aux``: ``(mean, var)``)."""
    if ctx.train:
        return batch_norm_forward(layer, h, p, saved, aux)
    xp = array_namespace(h)
    stats = xp.empty((3, h.shape[1]), dtype=xp.float64)  # count 1, M2 = var: ops.nn's evaluation
    stats[0] = 1
    stats[1], stats[2] = aux
    return bn_forward(h, stats, p["gamma"], p["beta"], layer.eps, layer.relu)


def relu_forward(h, saved):
    y = array_namespace(h).maximum(h, h.dtype.type(0))
    saved.append(y)
    return y


def relu_backward(g, saved):
    y = saved.pop()
    return array_namespace(g).where(y > 0, g, g.dtype.type(0))


def _relu_forward(i, layer, h, p, ctx, saved, aux):
    return relu_forward(h, saved)


def _relu_backward(i, layer, g, p, ctx, saved, grads):
    return relu_backward(g, saved)


def _max_pool_forward(i, layer, h, p, ctx, saved, aux):
    k, s = layer.kernel_size, layer.stride or layer.kernel_size
    best, taps = max_pool2d_forward_taps(h, (k, k), (s, s))
    saved.append((h.shape, taps))  # the backward routes by these taps, not searching h again
    return best


def _max_pool_backward(i, layer, g, p, ctx, saved, grads):
    (shape, taps), k = saved.pop(), layer.kernel_size
    s = layer.stride or k
    return _grown(g, max_pool2d_scatter(g, taps, (k, k), (s, s)), shape)  # floor: rows no window reached


def _dropout_forward(i, layer, h, p, ctx, saved, aux):
    if not ctx.dropout:
        return h
    key = dropout_key(ctx.seed, ctx.step, i)
    keep = dropout_keep(h, layer.ratio, key, ctx.full_shape(h, i), ctx.location(h, i))
    saved.append(keep)  # the backward applies the same mask, not hashed again
    return dropout_scale(h, keep, layer.ratio)


def _dropout_backward(i, layer, g, p, ctx, saved, grads):
    return dropout_scale(g, saved.pop(), layer.ratio) if ctx.dropout else g


def _flatten_forward(i, layer, h, p, ctx, saved, aux):
    saved.append(h.shape)
    return h.reshape(h.shape[0], int(np.prod(h.shape[1:])))


def _flatten_backward(i, layer, g, p, ctx, saved, grads):
    return g.reshape(saved.pop())


def _avg_pool_args(layer, hw):
    """The kernel's arguments for a padded block of whole images of size ``hw`` (floor mode)."""
    k = normalize_pair(layer.kernel_size, "kernel_size")
    s = normalize_pair(layer.stride or layer.kernel_size, "stride")
    ph, pw = normalize_pair(layer.padding, "padding", minimum=0)
    return k, s, (-ph, -pw), tuple(hw), (ph, pw), layer.count_include_pad, layer.divisor_override


def _avg_pool_forward(i, layer, h, p, ctx, saved, aux):
    args = _avg_pool_args(layer, h.shape[2:])
    ph, pw = args[4]
    saved.append(h.shape)
    return avg_pool2d_forward(Padded(h, (ph, ph, pw, pw), 0), *args)


def _avg_pool_backward(i, layer, g, p, ctx, saved, grads):
    shape = saved.pop()
    args = _avg_pool_args(layer, shape[2:])
    ph, pw = args[4]
    win = avg_pool2d_backward(g, *args)  # the windows' extent, from the padded image's corner
    gx = array_namespace(g).zeros(shape, dtype=g.dtype)
    rows, cols = min(win.shape[2] - ph, shape[2]), min(win.shape[3] - pw, shape[3])
    gx[:, :, :rows, :cols] = win[:, :, ph : ph + rows, pw : pw + cols]
    return gx


def _global_mean_forward(i, layer, h, p, ctx, saved, aux):
    saved.append(h.shape[2:])
    return plane_mean(plane_sums(h), h.shape[2] * h.shape[3], h.dtype)


def _global_mean_backward(i, layer, g, p, ctx, saved, grads):
    hw = saved.pop()
    return plane_mean_backward(g, hw, hw[0] * hw[1])


def _upsample_forward(i, layer, h, p, ctx, saved, aux):
    return upsample_nearest_forward(h, _scale_pair(layer.scale_factor))


def _upsample_backward(i, layer, g, p, ctx, saved, grads):
    return upsample_nearest_backward(g, _scale_pair(layer.scale_factor))


def _leaky_forward(i, layer, h, p, ctx, saved, aux):
    xp = array_namespace(h)
    factor = xp.where(h > 0, h.dtype.type(1), h.dtype.type(layer.negative_slope))  # PyTorch's cast
    saved.append(factor)
    return h * factor


def _leaky_backward(i, layer, g, p, ctx, saved, grads):
    return g * saved.pop()


def _identity(i, layer, h, p, ctx, saved, aux):
    return h


def _linear_forward(i, layer, h, p, ctx, saved, aux):
    saved.append(h)
    y = linear_forward(h, p["W"])
    return y + p["b"] if layer.bias else y


def _linear_backward(i, layer, g, p, ctx, saved, grads):
    h = saved.pop()
    grads["W"] = linear_grad_w(g, h)
    if layer.bias:
        grads["b"] = g.sum(axis=0)
    return linear_grad_x(g, p["W"])


#: layer class -> forward rule ``(index, layer, h, params, ctx, saved, aux) -> output``
FORWARD = {
    Conv2d: _conv_forward,
    ConvTranspose2d: _transposed_forward,
    BatchNorm: _bn_forward,
    ReLU: _relu_forward,
    MaxPool2d: _max_pool_forward,
    Dropout: _dropout_forward,
    Flatten: _flatten_forward,
    AvgPool2d: _avg_pool_forward,
    AdaptiveAvgPool2d: _global_mean_forward,
    Upsample: _upsample_forward,
    LeakyReLU: _leaky_forward,
    Identity: _identity,
    Linear: _linear_forward,
}
#: layer class -> backward rule ``(index, layer, g, params, ctx, saved, grads) -> g at the
#: input`` (BatchNorm's backward needs every block's sums: the stages run it themselves)
BACKWARD = {
    Conv2d: _conv_backward,
    ConvTranspose2d: _transposed_backward,
    ReLU: _relu_backward,
    MaxPool2d: _max_pool_backward,
    Dropout: _dropout_backward,
    Flatten: _flatten_backward,
    AvgPool2d: _avg_pool_backward,
    AdaptiveAvgPool2d: _global_mean_backward,
    Upsample: _upsample_backward,
    LeakyReLU: _leaky_backward,
    Identity: _identity,
    Linear: _linear_backward,
}
#: settings a rule does not cover: layer class -> why, given the layer (None: covered)
_DECLINES = {
    MaxPool2d: lambda layer: None if layer.plain() else "pools with padding, dilation or ceil mode",
    AvgPool2d: lambda layer: "pools in ceil mode" if layer.ceil_mode else None,
}


def _lookup(table, layer):
    for cls in type(layer).__mro__:
        if cls in table:
            return table[cls]
    return None


def trainable(node):
    """Why a training stage cannot run ``node`` on a block, or None."""
    layer = node.layer
    if isinstance(layer, Concat) and (layer.axis == 0 or layer.axis < -1):
        # a block holds some of the images: it cannot concatenate along the batch
        return f"node {node.name!r} concatenates along axis {layer.axis}, not 1 or later"
    return None


def _rule(table, layer):
    """The block rule of ``layer`` in ``table``, or None where there is none or it declines the
    layer's settings."""
    rule = _lookup(table, layer)
    decline = _lookup(_DECLINES, layer)
    return None if rule is None or (decline and decline(layer)) else rule


def layer_forward(i, layer, h, p, ctx, saved, aux=None):
    """One single-input layer forward on a block; appends what its backward reads to
    ``saved``.  ``i`` is the node's position in its program (its dropout key); ``aux`` a
    BatchNorm's statistics (training: every block's partial statistics of its input;
    evaluation: the running ``(mean, var)``).  A layer with no block rule runs through the
    fine-grained reference (:func:`_tape_forward`)."""
    rule = _rule(FORWARD, layer) or _tape_forward
    return rule(i, layer, h, p, ctx, saved, aux)


def layer_backward(i, layer, g, p, ctx, saved, grads):
    """One layer backward on a block (not BatchNorm: its backward needs every block's sums):
    ``g`` at its output in, ``g`` at its input out; its parameters' gradient parts into
    ``grads`` (local name -> array)."""
    rule = _rule(BACKWARD, layer) if _rule(FORWARD, layer) else None
    return (rule or _tape_backward)(i, layer, g, p, ctx, saved, grads)


def _lazy(a):
    return da.from_array(a, chunks=a.shape, asarray=False)


def _mode(ctx):
    return RunMode(train=ctx.train, dropout=ctx.dropout, seed=ctx.seed, step=ctx.step)


def _tape_forward(i, layer, h, p, ctx, saved, aux):
    """The per-node fallback for a layer with no block rule (a max pool with padding, say):
    its ``apply`` (the fine-grained reference) on one-chunk Dask arrays of the block, computed
    here on the synchronous scheduler; saves its input for :func:`_tape_backward`."""
    out, _ = layer.apply((_lazy(h),), {k: _lazy(v) for k, v in p.items()}, {}, _mode(ctx), i)
    saved.append(h)
    return out.compute(scheduler="sync")


def _tape_backward(i, layer, g, p, ctx, saved, grads):
    """The fallback's backward: the layer's ``apply`` recorded on the tape again, and its
    vector-Jacobian product with ``g`` (the tape's own rules), computed here."""
    x = ad.Tensor(_lazy(saved.pop()))
    params = {k: ad.Tensor(_lazy(v)) for k, v in p.items()}
    out, _ = layer.apply((x,), params, {}, _mode(ctx), i)
    wrt = [x, *params.values()]
    found = ad.grad(out, wrt, g=_lazy(g))
    values = dask.compute(
        *[gv if gv is not None else da.zeros_like(t.value) for gv, t in zip(found, wrt)], scheduler="sync"
    )
    grads.update(zip(params, values[1:]))
    return values[0]


def node_forward(i, node, inputs, p, ctx, saved, aux=None):
    """A node forward on a block: an addition or concatenation of its inputs, or its layer."""
    layer = node.layer
    if isinstance(layer, Add):
        out = inputs[0].copy()
        for a in inputs[1:]:
            out += a
        return out
    if isinstance(layer, Concat):
        saved.append([a.shape[layer.axis] for a in inputs])
        return array_namespace(inputs[0]).concatenate(inputs, axis=layer.axis)
    return layer_forward(i, layer, inputs[0], p, ctx, saved, aux)


def node_backward(i, node, g, p, ctx, saved, grads):
    """A node backward on a block (not BatchNorm): the gradients at its inputs, a list."""
    layer = node.layer
    if isinstance(layer, Add):
        return [g] * len(node.inputs)
    if isinstance(layer, Concat):
        return _split_along(g, saved.pop(), layer.axis)
    return [layer_backward(i, layer, g, p, ctx, saved, grads)]


def _split_along(g, sizes, axis):
    """``g`` cut into the pieces of ``sizes`` along ``axis`` (the gradients of a concatenation's
    inputs), each a copy: a view would keep the whole of ``g`` alive."""
    out, start = [], 0
    for n in sizes:
        index = [slice(None)] * g.ndim
        index[axis] = slice(start, start + n)
        out.append(g[tuple(index)].copy())
        start += n
    return out


def run_forward(nodes, values, params, state, ctx, keep=False):
    """The nodes ``(index, node)`` forward in evaluation mode (``ctx.train`` False), nothing
    saved: ``values`` (name -> block, holding what they read; the program's input as
    ``"input"``) gains each node's output, and an output is dropped after its last reader
    (the last node's is kept).  ``params`` and ``state`` hold each node's local arrays, in
    ``nodes``' order.  ``keep``: drop nothing (every node's output stays in ``values``)."""
    last = {}
    for t, (_, node) in enumerate(nodes):
        for v in node.inputs:
            last[v] = t
    final = nodes[-1][1].name
    for t, ((i, node), p, s) in enumerate(zip(nodes, params, state)):
        inputs = [values[v] for v in node.inputs]
        aux = (s["avg_mean"], s["avg_var"]) if isinstance(node.layer, BatchNorm) else None
        values[node.name] = node_forward(i, node, inputs, p, ctx, [], aux)
        for v in set(node.inputs):
            if last[v] == t and v != final and v != INPUT and not keep:
                del values[v]
    return values[final]


def loss_block(z, t, ctx):
    """``(loss sum, correct count, g at z)`` on one chunk: softmax cross-entropy of logits
    ``z`` ((N, K), or per-pixel (N, K, H, W) with (N, H, W) labels ``t``), the gradient of
    the mean over the whole batch's rows (pixels)."""
    xp = array_namespace(z)
    rows = onehot(t, z.shape[1], z.dtype)
    loss = cross_entropy_sum(z, rows)
    correct = (z.argmax(axis=1) == t).astype(xp.float64).sum().reshape((1,))
    pixels = getattr(ctx, "pixels", None) or int(np.prod(z.shape[2:]))  # a tile's: the image's
    count = ctx.n_total * pixels
    return loss, correct, (xp.exp(log_softmax(z)) - rows) * z.dtype.type(1.0 / count)
