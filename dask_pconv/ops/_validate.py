"""Argument checks shared by the Dask-level ops.  Each error names the argument."""

from __future__ import annotations

import math
import numbers

import dask.array as da
import numpy as np

from ._device import wrap


def as_dask(a, name, ndim):
    """``a`` as a Dask array of ``ndim`` dims with known chunks and a floating dtype.

    NumPy (or CuPy) arrays are wrapped in a single chunk.
    """
    if not isinstance(a, da.Array):
        if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim")):
            raise TypeError(f"{name} must be a Dask, NumPy or CuPy array, got {type(a).__name__}")
        a = wrap(a, a.shape or ())
    if a.ndim != ndim:
        layout = {4: " (N, C, H, W)", 1: ""}.get(ndim, "")
        raise ValueError(f"{name} must be {ndim}-D{layout}, got shape {a.shape}")
    if any(isinstance(c, float) and math.isnan(c) for cs in a.chunks for c in cs):
        raise ValueError(f"{name} has unknown (nan) chunk sizes; call {name}.compute_chunk_sizes() first")
    if 0 in a.shape:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def check_groups(groups):
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    return int(groups)


def check_kernel_fits(in_hw, kernel, pads, dilation, out_hw):
    if min(out_hw) < 1:
        padded = tuple(n + p[0] + p[1] for n, p in zip(in_hw, pads))
        span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        raise ValueError(
            f"kernel of effective size {span} (kernel_size {tuple(kernel)}, dilation "
            f"{tuple(dilation)}) is larger than the padded input {padded}"
        )
