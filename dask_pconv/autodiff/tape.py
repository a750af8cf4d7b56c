"""A small reverse-mode tape over lazy (Dask) arrays.

The tracer knows nothing about the primitives (as in HIPS/autograd's ``tracer.py``): a
:class:`Tensor` wraps a value, calling a :func:`primitive` on tensors records a node, and
:func:`grad` walks the nodes backwards in topological order, asking each primitive's
registered VJP rule for its inputs' gradients.  Rules are keyed by the primitive itself, so
two primitives of the same name keep their own.
Everything stays lazy: gradients are Dask arrays built from Dask arrays.
"""

from __future__ import annotations

import functools

__all__ = ["Tensor", "defvjp", "defvjp_all", "grad", "primitive", "rule_names"]

# primitive (the wrapper :func:`primitive` returns) -> ("each", makers) or ("all", maker)
_RULES: dict[object, tuple] = {}


class Tensor:
    """A value on the tape.  Leaves (parameters, inputs) have no node."""

    __slots__ = ("value", "node", "name")

    def __init__(self, value, node=None, name=None):
        self.value = value
        self.node = node
        self.name = name

    shape = property(lambda self: self.value.shape)
    dtype = property(lambda self: self.value.dtype)
    ndim = property(lambda self: self.value.ndim)

    def __repr__(self):
        op = self.node.prim.__name__ if self.node else "leaf"
        return f"Tensor({op}, shape={self.shape}, dtype={self.dtype})"

    # The operators (``+``, ``*``) are bound in :mod:`.rules`, next to the primitives they
    # record: the tracer itself knows none.


class _Node:
    __slots__ = ("prim", "args", "kwargs", "ans", "parents")

    def __init__(self, prim, args, kwargs, ans, parents):
        self.prim, self.args, self.kwargs, self.ans, self.parents = prim, args, kwargs, ans, parents


def primitive(fn):
    """Make ``fn`` (a function of raw values) record itself when called on tensors.

    The returned function is the primitive: :func:`defvjp` registers its rule under it, and
    ``.raw`` is ``fn`` itself.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        parents = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
        raw = tuple(a.value if isinstance(a, Tensor) else a for a in args)
        ans = fn(*raw, **kwargs)
        if not parents:
            return ans
        return Tensor(ans, _Node(wrapper, raw, kwargs, ans, parents))

    wrapper.raw = fn
    return wrapper


def _check_primitive(prim, caller):
    if not callable(getattr(prim, "raw", None)):
        raise TypeError(f"{caller}: prim must be a function made by @primitive, got {prim!r}")


def defvjp(prim, *makers):
    """Register one VJP maker per positional argument of ``prim``.

    ``maker(ans, *args, **kwargs)`` returns ``lambda g: grad_wrt_that_argument``; ``None`` for
    an argument that has no gradient.
    """
    _check_primitive(prim, "defvjp")
    _RULES[prim] = ("each", makers)


def defvjp_all(prim, maker):
    """Register a maker returning ``lambda g: (grad_arg0, grad_arg1, ...)`` for all arguments
    at once (for primitives whose gradients share work, such as conv2d)."""
    _check_primitive(prim, "defvjp_all")
    _RULES[prim] = ("all", maker)


def rule_names():
    """Names of the primitives that have a VJP rule."""
    return sorted(prim.__name__ for prim in _RULES)


def _vjps(node, g):
    name = node.prim.__name__
    rule = _RULES.get(node.prim)
    if rule is None:
        raise NotImplementedError(f"no VJP rule registered for primitive '{name}'")
    kind, makers = rule
    if kind == "all":
        grads = makers(node.ans, *node.args, **node.kwargs)(g)
        return [(t, grads[i]) for i, t in node.parents]
    out = []
    for i, t in node.parents:
        maker = makers[i] if i < len(makers) else None
        if maker is None:
            raise NotImplementedError(f"no VJP rule registered for argument {i} of primitive '{name}'")
        out.append((t, maker(node.ans, *node.args, **node.kwargs)(g)))
    return out


def _toposort(out):
    order, seen = [], set()
    stack = [(out, False)]
    while stack:
        t, done = stack.pop()
        if done:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        if t.node is not None:
            stack.extend((p, False) for _, p in t.node.parents)
    return order[::-1]  # output first


def grad(out, wrt, g=None):
    """Gradients of ``out`` with respect to each tensor in ``wrt`` (a list or a dict).

    ``g`` seeds the output gradient (ones by default).  A tensor ``out`` does not depend on
    gets ``None``.  Returns the same container type as ``wrt``.
    """
    import dask.array as da

    if g is None:
        g = da.ones_like(out.value) if hasattr(out.value, "chunks") else 1.0
    grads = {id(out): g}
    for t in _toposort(out):
        gt = grads.pop(id(t), None) if t.node is not None else grads.get(id(t))
        if gt is None or t.node is None:
            continue
        for parent, gp in _vjps(t.node, gt):
            if gp is None:
                continue
            k = id(parent)
            grads[k] = gp if k not in grads else grads[k] + gp
    if isinstance(wrt, dict):
        return {name: grads.get(id(t)) for name, t in wrt.items()}
    return [grads.get(id(t)) for t in wrt]
