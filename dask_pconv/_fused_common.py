"""What the fused step graphs (:mod:`dask_pconv.fused` for chains, :mod:`dask_pconv._fused_dag`
for programs with branches) share: the per-block math of each layer kind inside a stage task,
the loss on a chunk, the optimizer's and the running statistics' tasks, and how the tasks of a
step become its output Dask arrays.

Everything here runs on one block of whole images of one batch chunk (NumPy or CuPy, through
the block's namespace); a layer's forward appends what its backward reads to a ``saved`` list
and its backward pops it again.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ._fused_tiles import batch_norm_forward, conv_bias, relu_backward, relu_forward
from ._fused_tiles import sum_parts as _sum_parts
from .backend import array_namespace, to_dask_array
from .geometry import normalize_pair, resolve_padding
from .kernels import (
    Padded,
    avg_pool2d_backward,
    avg_pool2d_forward,
    bn_running,
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
from .models.layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Upsample,
)
from .ops.nn import dropout_key
from .ops.upsample import _scale_pair
from .optim import apply_velocity, velocity

__all__ = [
    "BLOCK_LAYERS",
    "CHAIN_LAYERS",
    "Ctx",
    "StageGraph",
    "apply_velocity",
    "conv_geometry",
    "first_key",
    "layer_backward",
    "layer_forward",
    "loss_block",
    "mean_of",
    "pick",
    "running",
    "sgd_velocity",
]

#: The layer kinds of the chain's stages (:mod:`dask_pconv.fused`; on tiles too).
CHAIN_LAYERS = (Conv2d, BatchNorm, ReLU, MaxPool2d, Dropout, Flatten, Linear)
#: The layer kinds :func:`layer_forward` and :func:`layer_backward` run on a block of whole
#: images.
BLOCK_LAYERS = (
    *CHAIN_LAYERS,
    ConvTranspose2d,
    AvgPool2d,
    AdaptiveAvgPool2d,
    Upsample,
    LeakyReLU,
    Identity,
)


class Ctx:
    """What every stage task of a step shares: the dropout keys, where the chunk lies."""

    def __init__(self, seed, step, dropout, n_total, offset):
        self.seed, self.step, self.dropout, self.n_total, self.offset = seed, step, dropout, n_total, offset

    def location(self, h):
        n0 = self.offset
        return ((n0, n0 + h.shape[0]),) + tuple((0, s) for s in h.shape[1:])

    def full_shape(self, h):
        return (self.n_total, *h.shape[1:])


def conv_geometry(layer):
    """``(kernel, stride, pads, dilation, groups)`` of a :class:`Conv2d` layer as pairs, ``pads``
    as ``(top, bottom, left, right)`` (:func:`~dask_pconv.geometry.resolve_padding`)."""
    k, s = normalize_pair(layer.kernel_size, "kernel_size"), normalize_pair(layer.stride, "stride")
    d = normalize_pair(layer.dilation, "dilation")
    (top, bottom), (left, right) = resolve_padding(layer.padding, k, s, d)
    return k, s, (top, bottom, left, right), d, layer.groups


def _conv_forward(layer, h, p, saved):
    k, s, pads, d, groups = conv_geometry(layer)
    saved.append(h)
    return conv_bias(conv2d_forward(Padded(h, pads, 0), p["W"], s, d, groups), layer, p)


def _conv_backward(layer, g, p, saved, grads):
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
    gx = conv2d_grad_x(g, W, s, d, groups, crop=crop)
    if gx.shape[2:] != (H, Wd):
        full = array_namespace(g).zeros(h.shape, dtype=gx.dtype)
        full[:, :, : gx.shape[2], : gx.shape[3]] = gx
        gx = full
    return gx


def _transposed_geometry(layer):
    k, s = normalize_pair(layer.kernel_size, "kernel_size"), normalize_pair(layer.stride, "stride")
    d, p = normalize_pair(layer.dilation, "dilation"), normalize_pair(layer.padding, "padding", minimum=0)
    op = normalize_pair(layer.output_padding, "output_padding", minimum=0)
    return k, s, d, p, op


def _transposed_forward(layer, h, p, saved):
    """A transposed convolution of a block of whole images: the input-gradient of the
    convolution with ``W``, the full window cut by the padding (and grown by the output
    padding, which only the bias reaches)."""
    k, s, d, pad, op = _transposed_geometry(layer)
    full_hw = tuple((n - 1) * si + di * (ki - 1) + 1 for n, si, di, ki in zip(h.shape[2:], s, d, k))
    out_hw = tuple(f - 2 * pi + o for f, pi, o in zip(full_hw, pad, op))
    crop = tuple((pi, min(pi + o, f)) for pi, o, f in zip(pad, out_hw, full_hw))
    y = conv2d_grad_x(h, p["W"], s, d, layer.groups, crop=crop)
    if y.shape[2:] != out_hw:
        full = array_namespace(y).zeros(y.shape[:2] + out_hw, dtype=y.dtype)
        full[:, :, : y.shape[2], : y.shape[3]] = y
        y = full
    saved.append((h, full_hw))
    return conv_bias(y, layer, p)


def _transposed_backward(layer, g, p, saved, grads):
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


def _avg_pool_args(layer, hw):
    """The kernel's arguments for a padded block of whole images of size ``hw`` (floor mode)."""
    k = normalize_pair(layer.kernel_size, "kernel_size")
    s = normalize_pair(layer.stride or layer.kernel_size, "stride")
    ph, pw = normalize_pair(layer.padding, "padding", minimum=0)
    return k, s, (-ph, -pw), tuple(hw), (ph, pw), layer.count_include_pad, layer.divisor_override


def _avg_pool_forward(layer, h, saved):
    args = _avg_pool_args(layer, h.shape[2:])
    ph, pw = args[4]
    saved.append(h.shape)
    return avg_pool2d_forward(Padded(h, (ph, ph, pw, pw), 0), *args)


def _avg_pool_backward(layer, g, saved):
    shape = saved.pop()
    args = _avg_pool_args(layer, shape[2:])
    ph, pw = args[4]
    win = avg_pool2d_backward(g, *args)  # the windows' extent, from the padded image's corner
    gx = array_namespace(g).zeros(shape, dtype=g.dtype)
    rows, cols = min(win.shape[2] - ph, shape[2]), min(win.shape[3] - pw, shape[3])
    gx[:, :, :rows, :cols] = win[:, :, ph : ph + rows, pw : pw + cols]
    return gx


def _leaky_factor(h, slope):
    xp = array_namespace(h)
    s = h.dtype.type(slope)  # cast to the block's dtype, as PyTorch does
    return xp.where(h > 0, h.dtype.type(1), s)


def layer_forward(i, layer, h, p, ctx, saved, stats_parts=None):
    """One layer of a stage forward on a block; appends what its backward reads to ``saved``.
    ``i`` is the node's position in its program (its dropout key), ``stats_parts`` every
    chunk's partial statistics of a BatchNorm's input."""
    if isinstance(layer, Conv2d):
        return _conv_forward(layer, h, p, saved)
    if isinstance(layer, BatchNorm):
        return batch_norm_forward(layer, h, p, saved, stats_parts)
    if isinstance(layer, ReLU):
        return relu_forward(h, saved)
    if isinstance(layer, MaxPool2d):
        k, s = layer.kernel_size, layer.stride or layer.kernel_size
        best, taps = max_pool2d_forward_taps(h, (k, k), (s, s))
        saved.append((h.shape, taps))  # the backward routes by these taps, not searching h again
        return best
    if isinstance(layer, Dropout):
        if not ctx.dropout:
            return h
        key = dropout_key(ctx.seed, ctx.step, i)
        keep = dropout_keep(h, layer.ratio, key, ctx.full_shape(h), ctx.location(h))
        saved.append(keep)  # the backward applies the same mask, not hashed again
        return dropout_scale(h, keep, layer.ratio)
    if isinstance(layer, Flatten):
        saved.append(h.shape)
        return h.reshape(h.shape[0], -1)
    if isinstance(layer, ConvTranspose2d):
        return _transposed_forward(layer, h, p, saved)
    if isinstance(layer, AvgPool2d):
        return _avg_pool_forward(layer, h, saved)
    if isinstance(layer, AdaptiveAvgPool2d):
        saved.append(h.shape[2:])
        return plane_mean(plane_sums(h), h.shape[2] * h.shape[3], h.dtype)
    if isinstance(layer, Upsample):
        return upsample_nearest_forward(h, _scale_pair(layer.scale_factor))
    if isinstance(layer, LeakyReLU):
        factor = _leaky_factor(h, layer.negative_slope)
        saved.append(factor)
        return h * factor
    if isinstance(layer, Identity):
        return h
    saved.append(h)  # Linear
    y = linear_forward(h, p["W"])
    return y + p["b"] if layer.bias else y


def layer_backward(i, layer, g, p, ctx, saved, grads):
    """One layer backward on a block (not BatchNorm: its backward needs every chunk's sums):
    ``g`` at its output in, ``g`` at its input out; its parameters' gradient parts into
    ``grads`` (local name -> array)."""
    xp = array_namespace(g)
    if isinstance(layer, Conv2d):
        return _conv_backward(layer, g, p, saved, grads)
    if isinstance(layer, ReLU):
        return relu_backward(g, saved)
    if isinstance(layer, MaxPool2d):
        (shape, taps), k = saved.pop(), layer.kernel_size
        s = layer.stride or k
        gx = max_pool2d_scatter(g, taps, (k, k), (s, s))
        if gx.shape != shape:  # the rows and columns no window reached (floor)
            full = xp.zeros(shape, dtype=g.dtype)
            full[:, :, : gx.shape[2], : gx.shape[3]] = gx
            gx = full
        return gx
    if isinstance(layer, Dropout):
        return dropout_scale(g, saved.pop(), layer.ratio) if ctx.dropout else g
    if isinstance(layer, Flatten):
        return g.reshape(saved.pop())
    if isinstance(layer, ConvTranspose2d):
        return _transposed_backward(layer, g, p, saved, grads)
    if isinstance(layer, AvgPool2d):
        return _avg_pool_backward(layer, g, saved)
    if isinstance(layer, AdaptiveAvgPool2d):
        hw = saved.pop()
        return plane_mean_backward(g, hw, hw[0] * hw[1])
    if isinstance(layer, Upsample):
        return upsample_nearest_backward(g, _scale_pair(layer.scale_factor))
    if isinstance(layer, LeakyReLU):
        return g * saved.pop()
    if isinstance(layer, Identity):
        return g
    h = saved.pop()  # Linear
    grads["W"] = linear_grad_w(g, h)
    if layer.bias:
        grads["b"] = g.sum(axis=0)
    return linear_grad_x(g, p["W"])


def loss_block(z, t, ctx):
    """``(loss sum, correct count, g at z)`` on one chunk: softmax cross-entropy of logits
    ``z`` ((N, K), or per-pixel (N, K, H, W) with (N, H, W) labels ``t``), the gradient of
    the mean over the whole batch's rows (pixels)."""
    xp = array_namespace(z)
    rows = onehot(t, z.shape[1], z.dtype)
    loss = cross_entropy_sum(z, rows)
    correct = (z.argmax(axis=1) == t).astype(xp.float64).sum().reshape((1,))
    count = ctx.n_total * int(np.prod(z.shape[2:]))
    return loss, correct, (xp.exp(log_softmax(z)) - rows) * z.dtype.type(1.0 / count)


def sgd_velocity(v, p, parts, momentum, lr, weight_decay, row=None):
    """Momentum SGD's new velocity (:func:`dask_pconv.optim.velocity`) from the gradient's
    per-chunk parts, summed in chunk order (``row`` of the sum: a BatchNorm's gradient sums
    hold beta's in row 0, gamma's in row 1)."""
    g = _sum_parts(parts)
    return velocity(v, g if row is None else g[row], p, momentum, lr, weight_decay)


def running(parts, old_mean, old_var, decay, which):
    """A running mean or variance (:func:`~dask_pconv.kernels.bn_running`) from every chunk's
    partial statistics, merged in chunk order."""
    return bn_running(combine_stats(list(parts)), old_mean, old_var, decay, which)


def pick(x, *path):
    """``x[path[0]][path[1]]...``: an element of a stage's result, inside the task reading it."""
    for i in path:
        x = x[i]
    return x


def mean_of(parts, n, dtype):
    xp = array_namespace(parts[0])
    return xp.asarray(_sum_parts(parts)[0] / n, dtype=dtype)


def first_key(a):
    return next(iter(flatten(a.__dask_keys__())))


class StageGraph:
    """The tasks of one fused step, built into ``self.dsk``, and its output arrays.

    Subclasses add the stage tasks; :meth:`updates` adds momentum SGD per parameter and the
    running statistics per BatchNorm from where the stages left each gradient's parts."""

    def __init__(self, model, optimizer, params, state, velocities, x, t, step, dropout):
        self.model, self.opt = model, optimizer
        self.P, self.n = x.numblocks[0], x.shape[0]
        labels = (x.chunks[0],) + (x.chunks[2:] if t.ndim == 3 else ())
        self.x, self.t = x, t if t.chunks == labels else t.rechunk(labels)
        self.inputs = {}
        for group, arrays in (("param", params), ("state", state), ("velocity", velocities)):
            for k, v in arrays.items():
                if not isinstance(v, da.Array):
                    v = to_dask_array(v, v.shape)
                self.inputs[group, k] = v if v.npartitions == 1 else v.rechunk(v.shape)
        self.tok = tokenize(model.program, self.inputs, x, self.t, step, dropout, model.seed, vars(optimizer))
        offsets = np.cumsum((0,) + x.chunks[0][:-1])
        self.ctxs = [Ctx(model.seed, step, dropout, self.n, int(o)) for o in offsets]
        self.dsk, self.outs = {}, {}

    def key(self, group, name):
        return first_key(self.inputs[group, name])

    def label_block(self, c):
        """The key of chunk ``c``'s labels."""
        return (self.t.name, c) + (0, 0) * (self.t.ndim == 3)

    def task(self, kind, *index, value):
        k = (f"fused-{kind}-{self.tok}", *index)
        self.dsk[k] = value
        return k

    def updates(self, grad_parts, bn_sums, bn_stats):
        """Momentum SGD per parameter (the velocity task sums the parts) and the running
        statistics per BatchNorm.

        ``grad_parts``: parameter (full) name -> per-chunk gradient parts (keys or inline tasks);
        ``bn_sums``: BatchNorm node name -> per-chunk gradient sums (beta's row 0, gamma's row 1);
        ``bn_stats``: BatchNorm node name -> per-chunk partial statistics of its input."""
        o = self.opt
        new_p, new_v, new_s = {}, {}, {}
        nodes = {n.name: n for n in self.model.program.nodes}
        for node in nodes.values():
            for local in node.layer.params():
                name = node.full_name(local)
                if node.name in bn_sums:
                    parts, row = list(bn_sums[node.name]), {"beta": 0, "gamma": 1}[local]
                else:
                    parts, row = grad_parts[name], None
                p, v = self.key("param", name), self.key("velocity", name)
                like = self.inputs["param", name]
                value = (sgd_velocity, v, p, parts, o.momentum, o.lr, o.weight_decay, row)
                new_v[name] = self.output("velocity", name, like.shape, like.dtype, value)
                # a task of its own: computing the velocity again here costs more than the hop
                value = (apply_velocity, p, new_v[name])
                new_p[name] = self.output("param", name, like.shape, like.dtype, value, after=[new_v[name]])
        for node_name, parts in bn_stats.items():
            node = nodes[node_name]
            old = tuple(self.key("state", node.full_name(k)) for k in ("avg_mean", "avg_var"))
            for which, local in (("mean", "avg_mean"), ("var", "avg_var")):
                name = node.full_name(local)
                like = self.inputs["state", name]
                value = (running, list(parts), *old, node.layer.decay, which)
                new_s[name] = self.output("running", name, like.shape, like.dtype, value)
        return new_p, new_v, new_s

    def results(self, grad_parts, bn_sums, bn_stats, loss_parts, correct_parts):
        """``(params, velocities, state, loss, accuracy)``: the update tasks and the arrays."""
        loss = self.output("loss", "", (), self.x.dtype, (mean_of, loss_parts, self.t.size, self.x.dtype))
        acc = self.output("accuracy", "", (), np.float64, (mean_of, correct_parts, self.t.size, np.float64))
        new_p, new_v, new_s = self.updates(grad_parts, bn_sums, bn_stats)
        names = [(g, k) for g, d in (("p", new_p), ("v", new_v), ("s", new_s)) for k in d]
        arrays = self.arrays([{"p": new_p, "v": new_v, "s": new_s}[g][k] for g, k in names] + [loss, acc])
        out = {"p": {}, "v": {}, "s": {}}
        for (g, k), a in zip(names, arrays):
            out[g][k] = a
        return out["p"], out["v"], out["s"], arrays[-2], arrays[-1]

    def output(self, kind, name, like_shape, dtype, value, after=()):
        """An output array's one task, in a layer of its own (the array's name; ``after``: the
        keys of other outputs it reads); returns its key."""
        out = f"fused-{kind}-{name}-{self.tok}"
        key = (out,) + (0,) * len(like_shape)
        meta = meta_from_array(self.x._meta, ndim=len(like_shape), dtype=dtype)
        self.outs[out] = ({key: value}, tuple((n,) for n in like_shape), meta, {k[0] for k in after})
        return key

    def arrays(self, keys):
        """The Dask arrays of output keys, over one graph: the stage tasks in one layer, each
        output in its own, every layer depending on the stage layer and the inputs."""
        main = f"fused-stages-{self.tok}"
        deps = [self.x, self.t, *self.inputs.values()]
        graph = HighLevelGraph.from_collections(main, self.dsk, dependencies=deps)
        layers, dependencies = dict(graph.layers), dict(graph.dependencies)
        for out, (d, _, _, after) in self.outs.items():
            layers[out] = MaterializedLayer(d)
            dependencies[out] = {main} | set(graph.dependencies[main]) | after
        hlg = HighLevelGraph(layers, dependencies)
        return [da.Array(hlg, k[0], self.outs[k[0]][1], meta=self.outs[k[0]][2]) for k in keys]
