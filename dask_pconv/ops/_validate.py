"""Argument checks shared by the Dask-level ops.  Each error names the argument."""

from __future__ import annotations

import math
import numbers
import sys

import dask.array as da
import numpy as np

from ..backend import on_device_of, to_dask_array

_LAYOUTS = {4: "(N, C, H, W)", 3: "(C, H, W)", 1: ""}


def check_plain(a, name):
    """Refuse arrays whose meaning the ops would silently change: masked arrays (NumPy's or
    ``dask.array.ma``'s, whose mask every kernel would ignore) and PyTorch tensors (Dask cannot
    take their dtype).  Returns ``a``."""
    meta = getattr(a, "_meta", None) if isinstance(a, da.Array) else a
    if isinstance(meta, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array: the ops would ignore its mask and use the masked values; "
            f"fill it first (e.g. {name}.filled(0)) or pass its data"
        )
    # a tensor can exist only if the user imported torch: look, never import it
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        raise TypeError(
            f"{name} is a torch.Tensor; pass a NumPy array instead: {name}.detach().cpu().numpy()"
        )
    return a


def checked_operand(a, name, ndim, empty_batch=False):
    """An op's operand ``a`` (named ``name`` in the errors), checked and as a Dask array: of
    ``ndim`` dims (an int or a tuple of allowed ones), with known chunks and a floating dtype,
    neither masked nor a tensor (:func:`check_plain`).

    NumPy (or CuPy) arrays are wrapped in a single chunk
    (:func:`~dask_pconv.backend.to_dask_array`).  Empty arrays are refused, except that with
    ``empty_batch`` the first axis of a 4-D array may be 0 (as in PyTorch).
    """
    check_plain(a, name)
    if not isinstance(a, da.Array):
        if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim")):
            raise TypeError(f"{name} must be a Dask, NumPy or CuPy array, got {type(a).__name__}")
        a = to_dask_array(a, a.shape or ())
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if a.ndim not in allowed:
        want = " or ".join(f"{n}-D {_LAYOUTS.get(n, '')}".rstrip() for n in allowed)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if any(isinstance(c, float) and math.isnan(c) for cs in a.chunks for c in cs):
        raise ValueError(f"{name} has unknown (nan) chunk sizes; call {name}.compute_chunk_sizes() first")
    rest = a.shape[1:] if empty_batch and a.ndim == 4 else a.shape
    if 0 in rest:
        only = " (only the batch axis may be 0)" if empty_batch else ""
        raise ValueError(f"{name} must not be empty{only}, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def check_same_dtype(a, name, x, x_name="x"):
    """``a`` must have ``x``'s dtype: like PyTorch, the ops never promote one operand to the
    other's precision (that would silently change what the kernels compute)."""
    if a.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {a.dtype} but {x_name} has dtype {x.dtype}; convert one of them "
            f"(e.g. {name}.astype({x_name}.dtype)): dtypes are not promoted, as in PyTorch"
        )
    return a


def batched(a):
    """``a`` (a Dask array) with a batch axis: an unbatched ``(C, H, W)`` input is a batch of
    one, as in PyTorch, and the op drops the axis from its results again."""
    return a[None] if a.ndim == 3 else a


def output_gradient(g_y, setup):
    """``g_y`` for a VJP whose forward is described by ``setup`` (a
    :class:`~dask_pconv.ops._halo.WindowedSetup`: its ``x``, ``unbatched``, ``out_shape`` and
    ``out_chunks``): checked against the output's shape and ``x``'s dtype,
    batched, on ``x``'s device and chunked like the output."""
    return gradient_like(g_y, "g_y", setup.x, setup.unbatched, setup.out_shape, setup.out_chunks)


def gradient_like(g, name, x, unbatched, shape, chunks):
    """``g`` (named ``name``), the gradient of a batched array of ``shape`` and ``chunks``:
    checked against that shape (less the batch axis where ``unbatched``) and ``x``'s dtype,
    batched, on ``x``'s device and chunked by ``chunks``."""
    g = checked_operand(g, name, 3 if unbatched else 4, empty_batch=True)
    g = on_device_of(check_same_dtype(g, name, x), x)
    want = tuple(shape[1:]) if unbatched else tuple(shape)
    if g.shape != want:
        raise ValueError(f"{name} must have the output shape {want}, got {g.shape}")
    g = batched(g)
    return g if g.chunks == chunks else g.rechunk(chunks)


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
