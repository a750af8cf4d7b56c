"""The one block layout every kernel computes on.

One code path serves NumPy and CuPy (and look-alikes): a kernel asks a block for its namespace
(:func:`dask_pconv.backend.array_namespace`) and uses only that.

Layout: a block's bits after a kernel may depend on how its inputs are stored, not only on
their values.  NumPy's ``matmul`` hands an operand that is not aligned to its item size to its
own loop instead of BLAS, which rounds differently from OpenBLAS's AVX-512 kernels; those
kernels also give other bits for F- and C-ordered operands; and NumPy's reductions round by
layout (``x.sum(axis=(0, 2, 3))`` of a permuted block).  Where a block was computed decides
how it is stored: the worker that made it may hand on a strided view (a crop, a channel slice,
a transpose), while a copy that crossed to another worker arrives re-laid out by distributed's
serialisation: a non-contiguous view as a C-contiguous copy, and the first array of a message
read into one buffer with the message's header, so it starts at whatever byte offset the
header ends and is often not aligned (``TCP.read``/``TCP.write`` in distributed's
``comm/tcp.py``, 2026.8).  So every kernel takes its blocks through :func:`canonical` and
returns canonical blocks (:func:`layout_invariant`): its result is then a function of the
values alone, the same on any worker, whatever the number of workers or the order the
scheduler ran the tasks in.
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import array_namespace, is_device


def canonical(a):
    """``a`` as a C-contiguous block aligned to its item size: ``a`` itself when it already is
    one, else a copy.

    Anything that is not an array (scalars, tuples, a :class:`~dask_pconv.kernels.Padded`
    window, whose block is made canonical) passes through.  Device blocks go through their
    library's ``ascontiguousarray``, which returns a contiguous block as it is.
    """
    if isinstance(a, (type, np.generic)):  # dtypes and NumPy scalars
        return a
    if isinstance(a, np.ndarray):
        if a.flags.c_contiguous and a.flags.aligned:
            return a
        return np.require(a, requirements=("C", "A"))
    if is_device(a):
        return array_namespace(a).ascontiguousarray(a)
    if hasattr(a, "canonical"):  # a Padded window
        return a.canonical()
    return a


def _canonical_args(v):
    if isinstance(v, list):  # lists of blocks (the statistics merged by combine_stats)
        return [canonical(p) for p in v]
    return canonical(v)


def layout_invariant(kernel):
    """Decorate a kernel so that it sees only canonical blocks and returns canonical blocks
    (a tuple of results: each one), see the module's docstring."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        out = kernel(
            *(_canonical_args(a) for a in args), **{k: _canonical_args(v) for k, v in kwargs.items()}
        )
        return tuple(canonical(o) for o in out) if isinstance(out, tuple) else canonical(out)

    return run
