"""A PyTorch module as a :class:`~dask_pconv.models.Model`: its graph captured by ``torch.fx``
symbolic tracing, one program node per traced call, its weights and buffers copied.

PyTorch is needed only here, and imported only when :func:`from_torch` runs.  What can be
converted is three tables: ``MODULES`` (a ``torch.nn`` module class -> a function building our
layer from the module), ``FUNCTIONS`` (a function such as ``torch.relu`` or ``operator.add``)
and ``METHODS`` (a tensor method such as ``x.flatten``), the last two mapping to a function
building our layer (or a chain of layers) and its inputs from the call.  A layer that
:mod:`.layers` gains is one entry.  Anything else (a module, function or method not in a
table, an attribute value our layer does not have, a tensor read by an in-place operation's
later users, a module whose weights two calls share) is refused at conversion, naming the
traced node, what it calls and where in the source, never approximated.

Names: a parameter keeps its ``module.named_parameters()`` name (``features.0.weight``), a
BatchNorm's running statistics their buffer names (``bn1.running_mean``, ``bn1.running_var``;
``num_batches_tracked`` is not kept: nothing here reads it), through ``Node.names``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import numbers
import operator
import os
import re

import dask.array as da
import numpy as np

from ..geometry import resolve_padding
from .layers import (
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
from .model import Model
from .program import INPUT, Node, Program

__all__ = ["FUNCTIONS", "METHODS", "MODULES", "from_torch", "to_torch_state_dict", "torch_name"]

#: Our layers' local array names -> the PyTorch module attribute each is copied from.
TORCH_ARRAYS = {
    "W": "weight",
    "b": "bias",
    "gamma": "weight",
    "beta": "bias",
    "avg_mean": "running_mean",
    "avg_var": "running_var",
}


def torch_name(name):
    """A program's array name as PyTorch's module attribute path: ``layer1.0.conv1.W`` ->
    ``layer1.0.conv1.weight``, ``bn1.gamma`` -> ``bn1.weight``, ``bn1.avg_var`` ->
    ``bn1.running_var`` (:data:`TORCH_ARRAYS`).  The names of the shipped networks' programs
    map so onto their PyTorch definitions (:mod:`dask_pconv.models.torch_reference`)."""
    node, local = name.rsplit(".", 1)
    return f"{node}.{TORCH_ARRAYS.get(local, local)}"


class _Unsupported(Exception):
    """A call the converter refuses; the message says what and what would be accepted."""


def _need(ok, what, supported):
    if not ok:
        raise _Unsupported(f"{what} is not supported (supported: {supported})")


def _pair(v):
    """A pair from a value, a pair or a one-element sequence (PyTorch's reading of each)."""
    if isinstance(v, (tuple, list)):
        return (v[0], v[0]) if len(v) == 1 else tuple(v)
    return (v, v)


def _square(name, value):
    """An int from an int or an equal pair (for layers that take one value for both axes)."""
    a, b = _pair(value)
    _need(a == b, f"{name}={value}", f"one {name} for both axes")
    return int(a)


def _compact(name, value):
    """An int from an int or an equal pair, else the pair: the layers take both, and an int
    keeps the layer as a model written by hand would hold it."""
    pair = _pair(value)
    ints = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)
    _need(len(pair) == 2 and ints, f"{name}={value!r}", f"an int or a pair of ints as {name}")
    a, b = int(pair[0]), int(pair[1])
    return a if a == b else (a, b)


def _zeros_padding(m):
    _need(m.padding_mode == "zeros", f"padding_mode={m.padding_mode!r}", "'zeros'")


# -- torch.nn modules -> layers ----------------------------------------------------------------
def conv2d_options(m):
    """``Conv2d`` keyword arguments from a ``torch.nn.Conv2d``'s attributes: the one place that
    says which of them our layer takes.  Kernel size, stride, padding and dilation are ints or
    pairs (an equal pair becomes an int); ``padding`` ``'valid'`` is 0 and ``'same'`` the
    symmetric padding where there is one (``d * (k - 1)`` even on both axes), else ``'same'``
    itself (the extra row and column at the end, as PyTorch pads); any ``groups``; only
    ``padding_mode='zeros'``."""
    _zeros_padding(m)
    k, stride, dilation = (
        _compact("kernel_size", m.kernel_size),
        _compact("stride", m.stride),
        _compact("dilation", m.dilation),
    )
    padding = m.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        (top, bottom), (left, right) = resolve_padding("same", _pair(k), _pair(stride), _pair(dilation))
        if top == bottom and left == right:
            padding = _compact("padding", (top, left))
    else:
        padding = _compact("padding", padding)
    return dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, groups=int(m.groups))


def _conv2d(m):
    return Conv2d(m.in_channels, m.out_channels, bias=m.bias is not None, **conv2d_options(m))


def _conv_transpose2d(m):
    _zeros_padding(m)
    return ConvTranspose2d(
        m.in_channels,
        m.out_channels,
        kernel_size=_compact("kernel_size", m.kernel_size),
        stride=_compact("stride", m.stride),
        padding=_compact("padding", m.padding),
        output_padding=_compact("output_padding", m.output_padding),
        groups=int(m.groups),
        dilation=_compact("dilation", m.dilation),
        bias=m.bias is not None,
    )


def _batch_norm(m):
    _need(m.affine, "affine=False", "affine=True")
    _need(m.track_running_stats, "track_running_stats=False", "track_running_stats=True")
    _need(m.momentum is not None, "momentum=None (a cumulative average)", "a float momentum")
    # PyTorch: new = (1 - momentum) * old + momentum * batch, the batch variance unbiased: ours
    # with decay = 1 - momentum
    return BatchNorm(m.num_features, eps=float(m.eps), decay=1.0 - float(m.momentum))


def _max_pool(kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """``MaxPool2d`` from ``nn.MaxPool2d``'s or ``F.max_pool2d``'s arguments: our layer takes
    one kernel size, stride, padding and dilation for both axes, and no indices."""
    k = _square("kernel_size", kernel_size)
    stride = _square("stride", k if stride is None or stride == () else stride)
    _need(not return_indices, "return_indices=True", "return_indices=False")
    return MaxPool2d(k, stride, _square("padding", padding), _square("dilation", dilation), bool(ceil_mode))


def _max_pool2d(m):
    return _max_pool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _avg_pool(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``AvgPool2d`` from ``nn.AvgPool2d``'s or ``F.avg_pool2d``'s arguments (all of them)."""
    k = _compact("kernel_size", kernel_size)
    stride = k if stride is None or stride == () else _compact("stride", stride)
    _need(
        divisor_override is None or (isinstance(divisor_override, int) and divisor_override > 0),
        f"divisor_override={divisor_override!r}",
        "None or a positive int",
    )
    return AvgPool2d(
        k,
        stride,
        _compact("padding", padding),
        count_include_pad=bool(count_include_pad),
        ceil_mode=bool(ceil_mode),
        divisor_override=divisor_override,
    )


def _avg_pool2d(m):
    args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
    return _avg_pool(*args)


def _adaptive_avg_pool(output_size):
    """``AdaptiveAvgPool2d(1)``: only the global mean (output size 1 or (1, 1))."""
    pair = _pair(output_size)
    _need(len(pair) == 2 and all(v == 1 for v in pair), f"output_size={output_size!r}", "1 or (1, 1)")
    return AdaptiveAvgPool2d(1)


def _upsample(size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None):
    """``Upsample`` from ``nn.Upsample``'s or ``F.interpolate``'s arguments: nearest, by integer
    factors (``recompute_scale_factor`` changes nothing then: the output is the input times the
    factor, exactly)."""
    _need(mode == "nearest", f"mode={mode!r}", "mode='nearest'")
    _need(size is None, f"size={size!r}", "an integer scale_factor= instead of size=")
    _need(align_corners is None, f"align_corners={align_corners!r}", "align_corners=None")
    pair = _pair(scale_factor)
    whole = all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer() and v >= 1
        for v in pair
    )
    _need(
        scale_factor is not None and len(pair) == 2 and whole,
        f"scale_factor={scale_factor!r}",
        "integers >= 1",
    )
    return Upsample(_compact("scale_factor", tuple(int(v) for v in pair)))


def _upsample_module(m):
    return _upsample(m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor)


def _dropout_layer(p):
    _need(isinstance(p, numbers.Real) and 0 <= p < 1, f"p={p!r}", "0 <= p < 1")
    return Dropout(float(p))


def _dropout(m):
    return _dropout_layer(m.p)


def _leaky_relu(negative_slope):
    _need(isinstance(negative_slope, numbers.Real), f"negative_slope={negative_slope!r}", "a number")
    return LeakyReLU(float(negative_slope))


def _flatten(m):
    _need((m.start_dim, m.end_dim) == (1, -1), f"start_dim={m.start_dim}, end_dim={m.end_dim}", "(1, -1)")
    return Flatten()


def _linear(m):
    return Linear(m.in_features, m.out_features, bias=m.bias is not None)


#: ``torch.nn`` class (dotted path) -> a function of the module returning our layer.
MODULES = {
    "torch.nn.Conv2d": _conv2d,
    "torch.nn.ConvTranspose2d": _conv_transpose2d,
    "torch.nn.BatchNorm1d": _batch_norm,
    "torch.nn.BatchNorm2d": _batch_norm,
    "torch.nn.ReLU": lambda m: ReLU(),
    "torch.nn.LeakyReLU": lambda m: _leaky_relu(m.negative_slope),
    "torch.nn.MaxPool2d": _max_pool2d,
    "torch.nn.AvgPool2d": _avg_pool2d,
    "torch.nn.AdaptiveAvgPool2d": lambda m: _adaptive_avg_pool(m.output_size),
    "torch.nn.Upsample": _upsample_module,
    "torch.nn.UpsamplingNearest2d": _upsample_module,
    "torch.nn.Dropout": _dropout,
    "torch.nn.Identity": lambda m: Identity(),
    "torch.nn.Flatten": _flatten,
    "torch.nn.Linear": _linear,
}


# -- functions and tensor methods -> layers ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ref:
    """A tensor argument of a traced call: the program node that computes it."""

    name: str


#: The batch size, as ``x.size(0)`` or ``x.shape[0]`` gives it (unknown at conversion).
BATCH = "N"


@dataclasses.dataclass
class Call:
    """A traced function or method call: ``args``, ``kwargs`` (tensors as :class:`Ref`, the
    batch size as :data:`BATCH`) and ``shape(ref)``, a tensor's shape with the batch as
    :data:`BATCH` (None where ``input_shape`` was not given)."""

    args: tuple
    kwargs: dict
    shape: object


def _bind(call, *names, **defaults):
    """The call's arguments by parameter name, like Python's binding of ``f(*names,
    **defaults)`` (``names`` required, then ``defaults`` in order)."""
    order = list(names) + list(defaults)
    if len(call.args) > len(order):
        raise _Unsupported(f"{len(call.args)} positional arguments (at most {len(order)})")
    out = dict(defaults)
    out.update(zip(order, call.args))
    for k, v in call.kwargs.items():
        _need(k in order, f"argument {k}=", ", ".join(order))
        out[k] = v
    missing = [n for n in names if n not in out]
    _need(not missing, f"a call without {missing}", "the tensor argument")
    if not isinstance(out[order[0]], Ref):
        raise _Unsupported(f"{order[0]}={out[order[0]]!r}, not a tensor")
    return out


def _relu_call(call):
    a = _bind(call, "input", inplace=False)
    return ReLU(), [a["input"]]


def _add_call(call):
    a = _bind(call, "input", "other", alpha=1)
    _need(isinstance(a["other"], Ref), f"adding {a['other']!r}", "the sum of two tensors")
    _need(a["alpha"] == 1, f"alpha={a['alpha']}", "alpha 1")
    return Add(), [a["input"], a["other"]]


def _flatten_call(call):
    a = _bind(call, "input", start_dim=0, end_dim=-1)
    _need((a["start_dim"], a["end_dim"]) == (1, -1), f"flatten({a['start_dim']}, {a['end_dim']})", "(1, -1)")
    return Flatten(), [a["input"]]


def _reshape_call(call):
    """``x.view(N, -1)``, ``x.reshape(x.size(0), -1)``, ``x.view(-1, C*H*W)``: a flatten."""
    x, dims = call.args[0], call.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    _need(isinstance(x, Ref) and not call.kwargs, "this call", "x.view(x.size(0), -1)")
    shape = call.shape(x)
    rest = None if shape is None or None in shape[1:] else math.prod(shape[1:])
    flat = len(dims) == 2 and (
        (dims[0] == BATCH and (dims[1] == -1 or dims[1] == rest)) or (dims[0] == -1 and dims[1] == rest)
    )
    supported = "(N, -1) with N = x.size(0), or (-1, C*H*W) once input_shape is given"
    _need(flat, f"a reshape to {tuple(dims)}", supported)
    return Flatten(), [x]


def _leaky_relu_call(call):
    a = _bind(call, "input", negative_slope=0.01, inplace=False)
    return _leaky_relu(a["negative_slope"]), [a["input"]]


def _max_pool2d_call(call):
    a = _bind(
        call,
        "input",
        "kernel_size",
        stride=None,
        padding=0,
        dilation=1,
        ceil_mode=False,
        return_indices=False,
    )
    args = (a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], a["return_indices"])
    return _max_pool(*args), [a["input"]]


def _avg_pool2d_call(call):
    a = _bind(
        call,
        "input",
        "kernel_size",
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    )
    args = (a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
    return _avg_pool(*args, a["divisor_override"]), [a["input"]]


def _adaptive_avg_pool2d_call(call):
    a = _bind(call, "input", "output_size")
    return _adaptive_avg_pool(a["output_size"]), [a["input"]]


def _mean_call(call):
    """``x.mean((2, 3), keepdim=True)``: the global average pool; without ``keepdim`` it is
    followed by a flatten, (N, C, 1, 1) -> (N, C)."""
    a = _bind(call, "input", dim=None, keepdim=False, dtype=None)
    dims = a["dim"] if isinstance(a["dim"], tuple) else (a["dim"],)
    # a 4-D input (an AdaptiveAvgPool2d refuses any other), so -1 is 3
    plane = all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]
    _need(
        plane and len(dims) == 2, f"a mean over dim={a['dim']!r}", "the mean over dim=(2, 3) of (N, C, H, W)"
    )
    _need(a["dtype"] is None, f"dtype={a['dtype']!r}", "the input's dtype")
    if a["keepdim"]:
        return AdaptiveAvgPool2d(1), [a["input"]]
    return [AdaptiveAvgPool2d(1), Flatten()], [a["input"]]


def _interpolate_call(call):
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")
    a = _bind(
        call,
        "input",
        size=None,
        scale_factor=None,
        mode="nearest",
        align_corners=None,
        recompute_scale_factor=None,
        antialias=False,
    )
    _need(not a["antialias"], "antialias=True", "antialias=False")
    return _upsample(*(a[n] for n in names)), [a["input"]]


def _dropout_call(call):
    """``F.dropout(x, p, training)``: ``training`` is a constant once traced (``self.training``
    is read at tracing).  False: nothing is dropped, an identity.  True: our ``Dropout``, on in
    :meth:`~Model.forward_backward` and off in :meth:`~Model.predict`, which is what
    ``training=self.training`` means (PyTorch's ``F.dropout(x, p)``, whose ``training``
    defaults to True, drops in evaluation mode too: random, which no prediction reproduces)."""
    a = _bind(call, "input", p=0.5, training=True, inplace=False)
    _need(isinstance(a["training"], bool), f"training={a['training']!r}", "True or False")
    layer = _dropout_layer(a["p"]) if a["training"] else Identity()
    return layer, [a["input"]]


def _cat_call(call):
    """``torch.cat(tensors, dim)`` (``axis=`` too) along a channel or spatial axis."""
    _need(len(call.args) <= 2, f"{len(call.args)} positional arguments", "at most 2")
    a = dict(zip(("tensors", "dim"), call.args))
    for k, v in call.kwargs.items():
        key = "dim" if k == "axis" else k
        _need(key in ("tensors", "dim") and key not in a, f"argument {k}=", "tensors, dim (or axis)")
        a[key] = v
    tensors, dim = a.get("tensors"), a.get("dim", 0)
    ok = isinstance(tensors, tuple) and len(tensors) > 0 and all(isinstance(t, Ref) for t in tensors)
    _need(ok, "concatenating something other than a list of tensors", "torch.cat([a, b], dim=1)")
    _need(isinstance(dim, int) and not isinstance(dim, bool), f"dim={dim!r}", "an int")
    if dim < 0:
        shape = call.shape(tensors[0])
        _need(shape is not None or dim == -1, f"dim={dim}", "a dim >= 1, or a negative one with input_shape")
        dim = dim + len(shape) if shape is not None else dim
    # the batch axis would pair the output's images with other labels (and a stage's
    # block holds some of the batch's images only)
    _need(dim != 0, "dim=0 (the batch axis)", "a channel or spatial axis, dim >= 1")
    if len(tensors) == 1:
        return Identity(), list(tensors)
    return Concat(dim), list(tensors)


#: Function (dotted path) -> a function of the :class:`Call` returning ``(layer, inputs)``
#: (or ``([layer, ...], inputs)``: a chain of layers, the first reading ``inputs``).
FUNCTIONS = {
    "operator.add": _add_call,
    "operator.iadd": _add_call,
    "torch.add": _add_call,
    "torch.relu": _relu_call,
    "torch.relu_": _relu_call,
    "torch.nn.functional.relu": _relu_call,
    "torch.nn.functional.leaky_relu": _leaky_relu_call,
    "torch.nn.functional.leaky_relu_": _leaky_relu_call,
    "torch.nn.functional.max_pool2d": _max_pool2d_call,
    "torch.nn.functional.avg_pool2d": _avg_pool2d_call,
    "torch.nn.functional.adaptive_avg_pool2d": _adaptive_avg_pool2d_call,
    "torch.mean": _mean_call,
    "torch.nn.functional.interpolate": _interpolate_call,
    "torch.nn.functional.dropout": _dropout_call,
    "torch.cat": _cat_call,
    "torch.concat": _cat_call,
    "torch.concatenate": _cat_call,
    "torch.flatten": _flatten_call,
    "torch.reshape": _reshape_call,
}

#: Tensor method name -> as in ``FUNCTIONS`` (the tensor is the first argument).
METHODS = {
    "add": _add_call,
    "add_": _add_call,
    "relu": _relu_call,
    "relu_": _relu_call,
    "mean": _mean_call,
    "flatten": _flatten_call,
    "view": _reshape_call,
    "reshape": _reshape_call,
}


# -- the conversion ----------------------------------------------------------------------------
def from_torch(module, input_shape=None, dtype=None, seed=0, channel_split=1):
    """A :class:`~dask_pconv.models.Model` computing what ``module`` computes.

    ``module``'s ``forward`` is captured by ``torch.fx`` symbolic tracing: each traced call of
    a supported module, function or method (:data:`MODULES`, :data:`FUNCTIONS`,
    :data:`METHODS`) becomes one program node; parameters and BatchNorm running statistics are
    copied.  The model then runs as Dask graphs without PyTorch: :meth:`~Model.predict` is
    ``module.eval()(x)``; :meth:`~Model.forward_backward` is a training-mode pass (batch
    statistics, running statistics updated PyTorch's way; dropout masks are this library's own,
    so they differ from PyTorch's) with the mean softmax cross-entropy of the output.
    ``forward`` is traced once, in the module's current mode (a branch on ``self.training``
    in it is fixed by that mode).

    Parameters
    ----------
    module : torch.nn.Module
        Its ``forward`` takes one tensor (N, C, H, W) and returns one tensor.
    input_shape : tuple of int, optional
        ``(C, H, W)``.  If given, every layer's shapes are checked at conversion (a mismatch is
        a ``ValueError`` naming the node) and every input must have this shape.
    dtype : numpy dtype, optional
        float32 or float64; default the module's (which must then be one of those).
    seed : int
        The model's seed (its dropout masks).
    channel_split : int
        As :class:`~dask_pconv.models.Model`'s; the output layer's parameters stay whole.

    Returns
    -------
    Model
        ``params`` keyed by ``module.named_parameters()`` names, ``state`` by the BatchNorm
        buffers' names (``num_batches_tracked`` left out).

    Raises
    ------
    NotImplementedError
        For anything the tables do not convert exactly, naming the traced node, what it calls
        and its source line.
    ValueError
        For shapes that do not fit (with ``input_shape``), a bad ``input_shape`` or ``dtype``.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    dtype = _dtype(module, dtype)
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in input_shape):
            raise ValueError(f"input_shape must be (C, H, W), positive ints, got {input_shape!r}")
    gm = _trace(module)
    conv = _Converter(gm, dtype, input_shape)
    program, params, state = conv.run()
    model = Model(program, seed=seed, dtype=dtype, channel_split=channel_split, input_shape=input_shape)
    model.load_params(params, state)
    return model


def to_torch_state_dict(model):
    """``model``'s parameters and state as a dict of CPU ``torch`` tensors (computed), for
    ``module.load_state_dict(..., strict=False)`` of the module it came from (strict=False:
    ``num_batches_tracked`` is not kept)."""
    import dask
    import torch

    arrays = {**model.params, **model.state}
    values = dask.compute(*arrays.values())
    return {k: torch.from_numpy(np.array(v)) for k, v in zip(arrays, values)}


def _dtype(module, dtype):
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    found = sorted({str(t.dtype) for t in tensors})
    if not found:
        return np.dtype(np.float32)
    if len(found) != 1 or found[0] not in ("torch.float32", "torch.float64"):
        raise ValueError(f"the module holds {found}; pass dtype=float32 or float64 to convert it")
    return np.dtype(found[0].removeprefix("torch."))


def _trace(module):
    import torch.fx

    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True  # so that an error can name the source line
    try:
        graph = tracer.trace(module)
    except Exception as e:  # any tracing failure: data-dependent control flow, ...
        raise NotImplementedError(
            f"torch.fx cannot trace {type(module).__name__}.forward ({type(e).__name__}: {e}); "
            "from_torch needs a forward that symbolic tracing follows"
        ) from e
    return torch.fx.GraphModule(tracer.root, graph)


def _resolve(path):
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


def _where(node):
    """The first source line outside PyTorch in the node's recorded stack, or ''."""
    import torch

    trace = getattr(node, "stack_trace", None) or node.meta.get("stack_trace") or ""
    torch_dir = os.path.dirname(torch.__file__)
    for file, line, code in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace):
        if not file.startswith(torch_dir):
            return f' at {file}:{line} ("{code.strip()}")'
    return ""


def _dotted(obj):
    """``torch.nn.modules.conv.Conv2d``, ``torch.sigmoid``, ``operator.getitem``; else repr."""
    module, name = inspect.getmodule(obj), getattr(obj, "__qualname__", None)
    if module is None or name is None:
        return repr(obj)
    prefix = "operator" if module.__name__ == "_operator" else module.__name__
    return f"{prefix}.{name.split('.')[-1]}"


def _what(gm, node):
    """What a traced node calls, for messages: ``torch.nn.modules.conv.Conv2d 'features.0'``,
    ``function torch.sigmoid``, ``method .sigmoid()``."""
    if node.op == "call_module":
        return f"{_dotted(type(gm.get_submodule(node.target)))} {node.target!r}"
    if node.op == "call_function":
        return f"function {_dotted(node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target!r}"


@dataclasses.dataclass(frozen=True)
class _ShapeOf:
    """``x.shape`` or ``x.size()``: read only by indexing (``x.shape[0]``)."""

    ref: Ref


class _Converter:
    """One pass over a traced graph, building the program nodes and copying the arrays; with
    ``input_shape`` each node also runs lazily on zeros (no computation: the Dask graph's
    shapes), so that a shape mismatch is found at the node that has it."""

    def __init__(self, gm, dtype, input_shape):
        self.gm, self.dtype, self.input_shape = gm, dtype, input_shape
        self.modules = {_resolve(k): f for k, f in MODULES.items()}
        self.functions = {_resolve(k): f for k, f in FUNCTIONS.items()}
        self.values = {}  # fx node -> Ref, BATCH, an int or _ShapeOf
        self.lazy = {}  # program node name -> its output on zeros (input_shape given)
        self.nodes, self.params, self.state = [], {}, {}
        self.called, self.tensors, self.output = set(), {}, None

    def describe(self, node):
        return f"node {node.name!r} ({_what(self.gm, node)}{_where(node)})"

    def run(self):
        """``(program, params, state)``."""
        graph = self.gm.graph
        _check_in_place(graph, self.gm, self.describe)
        live = _live(graph)
        for node in graph.nodes:
            if node not in live:
                continue  # dead code: nothing the output reads
            try:
                self.convert(node)
            except _Unsupported as e:
                raise NotImplementedError(f"cannot convert {self.describe(node)}: {e}") from None
        if self.output is None or self.output.name == INPUT:
            raise ValueError("the module's forward returns its input: there is no layer to convert")
        last = self.nodes[-1]
        if isinstance(last.layer, Linear):  # the logits: whole under a channel split
            whole = dataclasses.replace(last.layer, channel_split=False)
            self.nodes[-1] = dataclasses.replace(last, layer=whole)
        return Program(tuple(self.nodes)), self.params, self.state

    def convert(self, node):
        op = node.op
        if op == "placeholder":
            _need(not self.values, "a forward with more than one input", "forward(self, x)")
            self.values[node] = Ref(INPUT)
            if self.input_shape is not None:
                self.lazy[INPUT] = da.zeros((2, *self.input_shape), dtype=self.dtype)
        elif op == "output":
            out = self.arg(node.args[0])
            _need(isinstance(out, Ref), f"returning {type(node.args[0]).__name__}", "one tensor")
            self.output = out
        elif op == "call_module":
            self.convert_module(node)
        elif op in ("call_function", "call_method"):
            self.convert_call(node)
        else:
            raise _Unsupported(f"{op}: a parameter or buffer read directly in forward (only module calls)")

    def convert_module(self, node):
        import torch

        m = self.gm.get_submodule(node.target)
        build = self.modules.get(type(m))
        _need(build is not None, f"the module type {type(m).__name__}", ", ".join(MODULES))
        args = [self.arg(a) for a in node.args]
        _need(args and isinstance(args[0], Ref), "this call", "module(x)")
        extra = [repr(a) for a in args[1:]] + [f"{k}={self.arg(v)!r}" for k, v in node.kwargs.items()]
        _need(not extra, f"calling it with {', '.join(extra)}", "module(x)")
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        _need(not (own and node.target in self.called), "a second call of a module with weights", "one")
        self.called.add(node.target)
        layer = build(m)
        names, arrays = {}, {}
        for local in (*layer.params(), *layer.state()):
            full = f"{node.target}.{TORCH_ARRAYS[local]}"
            tensor = getattr(m, TORCH_ARRAYS[local])
            if id(tensor) in self.tensors:
                raise _Unsupported(f"{full} is the tensor {self.tensors[id(tensor)]} (shared weights)")
            self.tensors[id(tensor)] = full
            # through float64 (exact from float32, and NumPy has no bfloat16)
            value = tensor.detach().to("cpu", torch.float64).numpy().astype(self.dtype)
            names[local], arrays[local] = full, value
        self.add(node, layer, args, names, arrays)

    def convert_call(self, node):
        t, args = node.target, tuple(self.arg(a) for a in node.args)
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        if (node.op, t) in (("call_function", getattr), ("call_method", "size")):
            self.values[node] = self.size(args, kwargs, t == getattr)
            return
        if node.op == "call_function" and t is operator.getitem and isinstance(args[0], _ShapeOf):
            self.values[node] = self.dim(args[0].ref, args[1])
            return
        build = (self.functions if node.op == "call_function" else METHODS).get(t)
        if build is None:
            known = FUNCTIONS if node.op == "call_function" else [f".{m}()" for m in METHODS]
            _need(False, _what(self.gm, node), ", ".join(known))
        layer, inputs = build(Call(args, kwargs, self.shape))
        if isinstance(layer, list):  # a chain: each but the last named after the layer kind
            *first, layer = layer
            for step in first:
                inputs = [self.add(node, step, inputs, {}, {}, f"{node.name}_{type(step).__name__}")]
        self.add(node, layer, inputs, {}, {})

    def size(self, args, kwargs, attribute):
        """``x.shape`` (``attribute``), ``x.size()`` or ``x.size(d)``."""
        x = args[0]
        _need(isinstance(x, Ref), "the size of a non-tensor", "x.size(d)")
        if attribute:
            _need(args[1:] == ("shape",) and not kwargs, f"the attribute {args[1:]}", "x.shape")
            return _ShapeOf(x)
        dims = args[1:] or tuple(kwargs.values())
        return self.dim(x, dims[0]) if dims else _ShapeOf(x)

    def dim(self, ref, d):
        _need(isinstance(d, int), f"the size index {d!r}", "an int")
        if d == 0:
            return BATCH
        shape = self.shape(ref)
        _need(shape is not None, f"the size of dimension {d}", "dimension 0; any with input_shape given")
        return shape[d]

    def shape(self, ref):
        a = self.lazy.get(ref.name)
        return None if a is None else (BATCH, *a.shape[1:])

    def arg(self, a):
        if isinstance(a, (tuple, list)):
            return tuple(self.arg(v) for v in a)
        return self.values[a] if hasattr(a, "op") and hasattr(a, "users") else a

    def add(self, node, layer, inputs, names, arrays, name=None):
        """Append the program node for ``node`` (its arrays, its dry run), named ``name``
        (default the fx node's); returns its :class:`Ref`."""
        _need(all(isinstance(r, Ref) for r in inputs), "a non-tensor input", "tensors")
        name = name or node.name
        while name == INPUT or any(n.name == name for n in self.nodes):
            name += "_"
        index = len(self.nodes)
        self.nodes.append(Node(name, layer, tuple(r.name for r in inputs), names))
        for local, value in arrays.items():
            (self.params if local in layer.params() else self.state)[names[local]] = value
        self.values[node] = Ref(name)
        if self.input_shape is None:
            return Ref(name)
        ins = tuple(self.lazy[r.name] for r in inputs)
        p = {k: da.zeros(s.shape, dtype=self.dtype) for k, s in layer.params().items()}
        st = {k: da.ones(s.shape, dtype=self.dtype) for k, s in layer.state().items()}
        try:
            self.lazy[name], _ = layer.apply(ins, p, st, RunMode(train=False, dropout=False), index)
        except (ValueError, TypeError) as e:
            shapes = ", ".join("(N, " + ", ".join(map(str, a.shape[1:])) + ")" for a in ins)
            raise ValueError(
                f"{self.describe(node)} does not fit its input {shapes} (checked on a batch of 2): {e}"
            ) from None
        return Ref(name)


def _live(graph):
    """The nodes the output reads, directly or not (and the output)."""
    (out,) = [n for n in graph.nodes if n.op == "output"]
    live, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    return live


def _in_place(gm, node):
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace") is True or name.endswith("_") or node.target is operator.iadd
    return node.op == "call_method" and node.target.endswith("_")


def _check_in_place(graph, gm, describe):
    """An in-place call whose input a later node reads would hand that node the modified tensor
    in PyTorch, but the unmodified one in the traced graph: refused."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if not (_in_place(gm, node) and node.args and hasattr(node.args[0], "users")):
            continue
        later = [u for u in node.args[0].users if u is not node and order[u] > order[node]]
        if later:
            raise NotImplementedError(
                f"cannot convert {describe(node)}: it works in place on {node.args[0].name!r}, which "
                f"{later[0].name!r} reads afterwards (use the out-of-place call)"
            )
