"""The layer kinds a model program is made of: what parameters and state each declares, and
how it runs on the tape.

A layer is data (its hyperparameters) plus one method, :meth:`Layer.apply`, that computes its
output from its inputs with the differentiable primitives of :mod:`dask_pconv.autodiff`.  The
same call serves training (inputs and parameters are tape tensors, so the backward pass is
recorded) and evaluation or feature extraction (plain Dask arrays: the primitives then just
compute, nothing is recorded).  Parameters and state are declared with :class:`ArraySpec`, so
that a program knows every array's shape, initial value and how a channel split chunks it
without running anything.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from .. import autodiff as ad
from ..geometry import Reach, normalize_pair, resolve_padding
from ..ops.nn import batch_norm_running_update, batch_norm_stats
from ..ops.upsample import _scale_pair

__all__ = [
    "Add",
    "ArraySpec",
    "BatchNorm",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "Flatten",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Need",
    "ReLU",
    "SPLIT_AXES",
    "RunMode",
]


class ArraySpec(NamedTuple):
    """One parameter or state array a layer declares.

    ``init`` is ``"lecun_normal"`` (Chainer's default, N(0, 1/fan_in)), ``"ones"`` or
    ``"zeros"``.  ``channel_split``: axis 0 (the output channels) is chunked by a model's
    channel split; False keeps the array whole.  ``nonnegative``: a value loaded into it must
    be >= 0 (a running variance).
    """

    shape: tuple
    init: str
    fan_in: int = 1
    channel_split: bool = True
    nonnegative: bool = False

    def initial(self, rng, dtype):
        """The initial value; ``lecun_normal`` draws from ``rng`` (in program order)."""
        if self.init == "lecun_normal":
            return (rng.standard_normal(self.shape) * np.sqrt(1.0 / self.fan_in)).astype(dtype)
        if self.init == "ones":
            return np.ones(self.shape, dtype)
        if self.init == "zeros":
            return np.zeros(self.shape, dtype)
        raise ValueError(f"unknown initializer {self.init!r}")


@dataclass(frozen=True)
class RunMode:
    """How a program runs: BatchNorm on batch statistics (``train``) or running ones; dropout
    masks from ``(seed, step, layer)`` when ``train and dropout``."""

    train: bool = True
    dropout: bool = True
    seed: int = 0
    step: int = 0


def _value(a):
    return getattr(a, "value", a)


class Layer:
    """A layer kind.  Subclasses are frozen dataclasses of their hyperparameters."""

    def params(self):
        """Trainable parameters: local name -> :class:`ArraySpec`."""
        return {}

    def state(self):
        """Non-trainable state (running statistics): local name -> :class:`ArraySpec`."""
        return {}

    def apply(self, inputs, params, state, mode, index):
        """``(output, new_state)``: the output from ``inputs`` (a tuple, tensors or Dask arrays)
        and this layer's ``params`` and ``state`` (local name -> value); ``new_state`` holds the
        state after a training step (local names), empty if unchanged.  ``index`` is the node's
        position in its program (what makes dropout masks of two layers differ)."""
        raise NotImplementedError

    def reach(self):
        """What the layer reads across a tile's border in evaluation mode: ``(rh, rw)``, a
        :class:`~dask_pconv.geometry.Reach` per spatial axis, or None when an output needs its
        whole input (a global pooling, Flatten, Linear), so that no tile can run it alone."""
        raise NotImplementedError(
            f"layer {type(self).__name__} declares no reach (what it reads across tiles)"
        )

    def needs(self, axis, train):
        """What the layer needs across the blocks of split ``axis`` (one of
        :data:`SPLIT_AXES`) in training (``train``) or evaluation mode: a :class:`Need`.  The
        stage planner cuts the program where a layer needs more than :attr:`Need.LOCAL`."""
        raise NotImplementedError(
            f"layer {type(self).__name__} declares no needs (what it reads across blocks)"
        )


#: The reach of a layer whose output ``(y, x)`` reads its input's ``(y, x)`` only.
LOCAL = (Reach(), Reach())


class Need(str, Enum):
    """What a layer needs across the blocks of one split axis (:meth:`Layer.needs`)."""

    LOCAL = "local"  #: nothing: each block computes its part alone
    HALO = "halo"  #: a border of its neighbours' blocks (the reach, :meth:`Layer.reach`)
    STATISTIC = "statistic"  #: a sum over every block of the axis (BatchNorm's batch statistics)
    GATHER = "gather"  #: every block of the axis (a convolution reads every input channel)
    PARTIAL_SUM = "partial sum"  #: each block makes a part of the output, summed over blocks


#: The split axes a layer declares its needs for: the batch's chunks, spatial tiles, chunks of
#: the input's channels and chunks of the parameters' output channels.
SPLIT_AXES = ("batch", "spatial", "in_channel", "out_channel")


def _needs(axis, batch=Need.LOCAL, spatial=Need.LOCAL, in_channel=Need.LOCAL, out_channel=Need.LOCAL):
    table = {"batch": batch, "spatial": spatial, "in_channel": in_channel, "out_channel": out_channel}
    if axis not in table:
        raise ValueError(f"unknown split axis {axis!r}; the axes are {SPLIT_AXES}")
    return table[axis]


def _window_reach(kernel, stride, padding, dilation, ceil_mode=False):
    """Per-axis reaches of a convolution or pooling (``padding`` as :func:`resolve_padding`)."""
    k, s, d = (
        normalize_pair(kernel, "kernel_size"),
        normalize_pair(stride, "stride"),
        normalize_pair(dilation, "dilation"),
    )
    pads = resolve_padding(padding, k, s, d)
    return tuple(Reach("window", k[a], s[a], pads[a], d[a], ceil_mode) for a in range(2))


@dataclass(frozen=True)
class Conv2d(Layer):
    """``torch.nn.Conv2d`` without padding modes: ``W`` (out, in/groups, kh, kw), optional ``b``.

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints or pairs; ``padding``
    may also be ``'same'`` or ``'valid'`` (as in :func:`dask_pconv.conv2d`).  ``W`` is LeCun
    normal with ``fan_in = in/groups * kh * kw``.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple = 3
    stride: int | tuple = 1
    padding: int | tuple | str = 0
    bias: bool = False
    dilation: int | tuple = 1
    groups: int = 1

    def __post_init__(self):
        _check_conv_layer(self)
        if not isinstance(self.padding, str):
            normalize_pair(self.padding, "padding", minimum=0)

    def params(self):
        kh, kw = normalize_pair(self.kernel_size, "kernel_size")
        cg = self.in_channels // self.groups
        out = {"W": ArraySpec((self.out_channels, cg, kh, kw), "lecun_normal", cg * kh * kw)}
        if self.bias:
            out["b"] = ArraySpec((self.out_channels,), "zeros")
        return out

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return ad.conv2d(x, params["W"], params.get("b"), **kw), {}

    def reach(self):
        return _window_reach(self.kernel_size, self.stride, self.padding, self.dilation)

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.HALO, in_channel=Need.PARTIAL_SUM, out_channel=Need.GATHER)


@dataclass(frozen=True)
class ConvTranspose2d(Layer):
    """``torch.nn.ConvTranspose2d`` (:func:`dask_pconv.conv_transpose2d`): ``W`` (in,
    out/groups, kh, kw), optional ``b``.

    ``kernel_size``, ``stride``, ``padding``, ``output_padding`` and ``dilation`` are ints or
    pairs.  ``W`` is LeCun normal with ``fan_in = out/groups * kh * kw`` (``W.shape[1] * kh *
    kw``), the fan-in that PyTorch and Chainer's ``Deconvolution2D`` compute from this layout.
    A model's channel split chunks ``W``'s axis 0, the input channels (the partial outputs are
    summed as a tree); ``b`` stays whole, as the output channels are one chunk.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple = 2
    stride: int | tuple = 1
    padding: int | tuple = 0
    output_padding: int | tuple = 0
    groups: int = 1
    dilation: int | tuple = 1
    bias: bool = False

    def __post_init__(self):
        _check_conv_layer(self)
        normalize_pair(self.padding, "padding", minimum=0)
        normalize_pair(self.output_padding, "output_padding", minimum=0)

    def params(self):
        kh, kw = normalize_pair(self.kernel_size, "kernel_size")
        og = self.out_channels // self.groups
        out = {"W": ArraySpec((self.in_channels, og, kh, kw), "lecun_normal", og * kh * kw)}
        if self.bias:
            out["b"] = ArraySpec((self.out_channels,), "zeros", channel_split=False)
        return out

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        kw = dict(
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            dilation=self.dilation,
        )
        return ad.conv_transpose2d(x, params["W"], params.get("b"), **kw), {}

    def reach(self):
        k, s, d = (normalize_pair(getattr(self, n), n) for n in ("kernel_size", "stride", "dilation"))
        p = normalize_pair(self.padding, "padding", minimum=0)
        op = normalize_pair(self.output_padding, "output_padding", minimum=0)
        return tuple(Reach("transposed", k[a], s[a], (p[a], p[a]), d[a], extra=op[a]) for a in range(2))

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.HALO, in_channel=Need.PARTIAL_SUM, out_channel=Need.GATHER)


def _check_conv_layer(layer):
    """Errors when a convolution layer is declared rather than when it first runs."""
    for name in ("kernel_size", "stride", "dilation"):
        normalize_pair(getattr(layer, name), name)
    g = layer.groups
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ValueError(f"groups must be a positive int, got {g!r}")
    if layer.in_channels % g or layer.out_channels % g:
        raise ValueError(
            f"groups={g} must divide in_channels={layer.in_channels} and out_channels={layer.out_channels}"
        )


@dataclass(frozen=True)
class BatchNorm(Layer):
    """BatchNorm over axis 1 of (N, C) or (N, C, H, W), Chainer's running averages (``decay``,
    unbiased variance), optionally followed by ReLU in the same task (``relu``)."""

    channels: int
    eps: float = 2e-5
    decay: float = 0.9
    relu: bool = False

    def params(self):
        return {"gamma": ArraySpec((self.channels,), "ones"), "beta": ArraySpec((self.channels,), "zeros")}

    def state(self):
        c = (self.channels,)
        return {"avg_mean": ArraySpec(c, "zeros"), "avg_var": ArraySpec(c, "ones", nonnegative=True)}

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        if x.ndim not in (2, 4) or x.shape[1] != self.channels:
            raise ValueError(
                f"BatchNorm({self.channels}) needs input (N, {self.channels}) or (N, {self.channels}, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        gamma, beta = params["gamma"], params["beta"]
        if not mode.train:
            mean, var = state["avg_mean"], state["avg_var"]
            return ad.batch_norm(x, gamma, beta, mean, var, eps=self.eps, relu=self.relu), {}
        # the batch statistics, computed once: the normalisation and the running update read them
        stats = batch_norm_stats(_value(x))
        mean, var = batch_norm_running_update(stats, state["avg_mean"], state["avg_var"], self.decay)
        y = ad.batch_norm(x, gamma, beta, eps=self.eps, relu=self.relu, stats=stats)
        return y, {"avg_mean": mean, "avg_var": var}

    def reach(self):
        return LOCAL  # evaluation mode: the running statistics, per pixel

    def needs(self, axis, train):
        # training mode: the batch statistics over every image and pixel; evaluation: per pixel
        whole = Need.STATISTIC if train else Need.LOCAL
        return _needs(axis, batch=whole, spatial=whole)


@dataclass(frozen=True)
class ReLU(Layer):
    """``max(x, 0)``."""

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return ad.relu(x), {}

    def reach(self):
        return LOCAL

    def needs(self, axis, train):
        return _needs(axis)


@dataclass(frozen=True)
class MaxPool2d(Layer):
    """``torch.nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode)`` (stride
    defaults to the kernel size; -inf padding; :func:`dask_pconv.max_pool2d`)."""

    kernel_size: int = 2
    stride: int | None = None
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    def plain(self):
        """No padding, dilation or ceil mode (what the block interpreter pools itself)."""
        return self.padding == 0 and self.dilation == 1 and not self.ceil_mode

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        s = self.stride or self.kernel_size
        return ad.max_pool2d(x, self.kernel_size, s, self.padding, self.dilation, self.ceil_mode), {}

    def reach(self):
        s = self.stride or self.kernel_size
        return _window_reach(self.kernel_size, s, self.padding, self.dilation, self.ceil_mode)

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.HALO)


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout in training mode (identity otherwise); the mask is a function of
    ``(seed, step, index)`` and each element's global index."""

    ratio: float

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        if mode.train and mode.dropout:
            x = ad.dropout(x, self.ratio, mode.seed, mode.step, index)
        return x, {}

    def reach(self):
        return LOCAL  # evaluation mode: the identity

    def needs(self, axis, train):
        return _needs(axis)


@dataclass(frozen=True)
class Flatten(Layer):
    """(N, ...) -> (N, prod(...))."""

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return ad.flatten(x), {}

    def reach(self):
        return None

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.GATHER, in_channel=Need.GATHER, out_channel=Need.GATHER)


@dataclass(frozen=True)
class Linear(Layer):
    """``x @ W.T`` (``W`` (out, in), PyTorch's layout), plus ``b`` (out,) if ``bias``.
    ``channel_split=False`` keeps ``W`` (and ``b``) whole under a model's channel split (a
    network's last layer: its outputs are the logits, which the loss reads whole)."""

    in_features: int
    out_features: int
    channel_split: bool = True
    bias: bool = False

    def params(self):
        shape = (self.out_features, self.in_features)
        out = {"W": ArraySpec(shape, "lecun_normal", self.in_features, self.channel_split)}
        if self.bias:
            out["b"] = ArraySpec((self.out_features,), "zeros", channel_split=self.channel_split)
        return out

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear({self.in_features}, {self.out_features}) needs input (N, {self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        y = ad.linear(x, params["W"])
        if self.bias:  # (N, out) + (out,): b is chunked like W's rows, so like y's columns
            y = ad.add(y, params["b"])
        return y, {}

    def reach(self):
        return None

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.GATHER, in_channel=Need.PARTIAL_SUM, out_channel=Need.GATHER)


@dataclass(frozen=True)
class Add(Layer):
    """The elementwise sum of its inputs (a residual connection): a node reading two or more
    nodes of the same shape."""

    def apply(self, inputs, params, state, mode, index):
        if len(inputs) < 2:
            raise ValueError(f"Add needs two or more inputs, got {len(inputs)}")
        shapes = {tuple(a.shape) for a in inputs}
        if len(shapes) != 1:
            raise ValueError(f"Add needs inputs of one shape, got {sorted(shapes)}")
        out = inputs[0]
        for a in inputs[1:]:
            out = ad.add(out, _rechunked_like(a, out))
        return out, {}

    def reach(self):
        return LOCAL

    def needs(self, axis, train):
        return _needs(axis)


def _rechunked_like(a, like):
    """``a`` chunked like ``like`` (a residual branch may come back chunked otherwise)."""
    target = _value(like).chunks
    if _value(a).chunks == target:
        return a
    if isinstance(a, ad.Tensor):
        return ad.rechunk(a, target)
    return a.rechunk(target)


@dataclass(frozen=True)
class AvgPool2d(Layer):
    """``torch.nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override)`` (stride defaults to the kernel size)."""

    kernel_size: int = 2
    stride: int | None = None
    padding: int = 0
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: int | None = None

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        y = ad.avg_pool2d(
            x,
            self.kernel_size,
            self.stride or self.kernel_size,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )
        return y, {}

    def reach(self):
        return _window_reach(
            self.kernel_size, self.stride or self.kernel_size, self.padding, 1, self.ceil_mode
        )

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.HALO)


@dataclass(frozen=True)
class AdaptiveAvgPool2d(Layer):
    """``torch.nn.AdaptiveAvgPool2d(1)``: the mean of each ``(H, W)`` plane, ``(N, C, 1, 1)``.
    Only ``output_size`` 1 (or ``(1, 1)``) is supported; others raise ``ValueError`` here."""

    output_size: int | tuple = 1

    def __post_init__(self):
        size = self.output_size
        values = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        ones = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v == 1 for v in values)
        if not (ones and len(values) == 2):
            raise ValueError(f"AdaptiveAvgPool2d supports output_size 1 (a global mean) only, got {size!r}")

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return ad.adaptive_avg_pool2d(x, self.output_size), {}

    def reach(self):
        return None

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.STATISTIC)


@dataclass(frozen=True)
class Upsample(Layer):
    """``torch.nn.Upsample(scale_factor=s, mode='nearest')`` for integer ``s`` (an int or a
    pair); another ``mode`` raises ``ValueError`` here."""

    scale_factor: int | tuple = 2
    mode: str = "nearest"

    def __post_init__(self):
        if self.mode != "nearest":
            raise ValueError(f"Upsample supports mode 'nearest' only, got {self.mode!r}")
        _scale_pair(self.scale_factor)  # ValueError for a scale that is not a positive integer

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return ad.upsample_nearest(x, self.scale_factor), {}

    def reach(self):
        return tuple(Reach("upscale", stride=f) for f in _scale_pair(self.scale_factor))

    def needs(self, axis, train):
        return _needs(axis, spatial=Need.HALO)


@dataclass(frozen=True)
class LeakyReLU(Layer):
    """``torch.nn.LeakyReLU(negative_slope)``: ``x`` where positive, else ``negative_slope * x``."""

    negative_slope: float = 0.01

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return ad.leaky_relu(x, self.negative_slope), {}

    def reach(self):
        return LOCAL

    def needs(self, axis, train):
        return _needs(axis)


@dataclass(frozen=True)
class Concat(Layer):
    """``torch.cat(inputs, axis)`` of a node's two or more inputs (axis 1: channels, as in
    U-Net skips and Inception branches).  The inputs must agree on every other axis; their
    chunks on those axes are made the first input's."""

    axis: int = 1

    def apply(self, inputs, params, state, mode, index):
        if len(inputs) < 2:
            raise ValueError(f"Concat needs two or more inputs, got {len(inputs)}")
        ndims = {len(a.shape) for a in inputs}
        if len(ndims) != 1:
            raise ValueError(f"Concat needs inputs with one number of axes, got {sorted(ndims)}")
        (ndim,) = ndims
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"Concat axis {self.axis} is out of range for {ndim}-D inputs")
        axis = self.axis % ndim
        others = {tuple(n for i, n in enumerate(a.shape) if i != axis) for a in inputs}
        if len(others) != 1:
            shapes = [tuple(a.shape) for a in inputs]
            raise ValueError(f"Concat needs inputs that agree on every axis but {axis}, got shapes {shapes}")
        first = _value(inputs[0]).chunks
        out = [inputs[0]]
        for a in inputs[1:]:
            target = tuple(c if i == axis else first[i] for i, c in enumerate(_value(a).chunks))
            out.append(_rechunked_to(a, target))
        return ad.concatenate(out, axis=axis), {}

    def reach(self):
        return LOCAL if self.axis in (1, -3) else None  # channels: pixel by pixel

    def needs(self, axis, train):
        along = {0: "batch", 1: "channel", 2: "spatial", 3: "spatial"}.get(self.axis % 4, "spatial")
        if along == "channel":  # the chunks of each input's channels, one after the other
            return _needs(axis, in_channel=Need.GATHER, out_channel=Need.GATHER)
        return _needs(axis, **{along: Need.GATHER})


@dataclass(frozen=True)
class Identity(Layer):
    """Its input, unchanged (``torch.nn.Identity``)."""

    def apply(self, inputs, params, state, mode, index):
        (x,) = inputs
        return x, {}

    def reach(self):
        return LOCAL

    def needs(self, axis, train):
        return _needs(axis)


def _rechunked_to(a, chunks):
    """``a`` (a tensor or a Dask array) with ``chunks``."""
    if _value(a).chunks == chunks:
        return a
    if isinstance(a, ad.Tensor):
        return ad.rechunk(a, chunks)
    return a.rechunk(chunks)


__all__ += ["AdaptiveAvgPool2d", "AvgPool2d", "Concat", "Identity", "LeakyReLU", "Upsample"]
