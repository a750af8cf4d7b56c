"""Optional faster CPU conv kernels: PyTorch's (oneDNN) reached zero-copy via ``torch.from_numpy``.

Used only for NumPy blocks, only when PyTorch is importable, and only when the
``pconv.conv-kernel`` config is ``"auto"`` (the default) or ``"torch"``; ``"numpy"`` forces the
im2col kernels.  Results agree with the im2col kernels to floating-point rounding (the tests
run both).  PyTorch is never a dependency of the package.
"""

from __future__ import annotations

import functools

import dask
import numpy as np

CONFIG_KEY = "pconv.conv-kernel"
CHOICES = ("auto", "numpy", "torch")


@functools.lru_cache(maxsize=1)
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def use_torch(*arrays):
    """True when these blocks should go through PyTorch's kernels."""
    choice = dask.config.get(CONFIG_KEY, "auto")
    if choice not in CHOICES:
        raise ValueError(f"config {CONFIG_KEY!r} must be one of {CHOICES}, got {choice!r}")
    if choice == "numpy" or not all(type(a) is np.ndarray for a in arrays):
        return False
    if _torch() is None:
        if choice == "torch":
            raise ImportError(f"config {CONFIG_KEY!r} is 'torch' but PyTorch is not installed")
        return False
    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def _t(a, dtype):
    return _torch().from_numpy(np.ascontiguousarray(a, dtype=dtype))


def conv2d_forward(x, W, stride, dilation, groups):
    torch = _torch()
    dt = np.result_type(x.dtype, W.dtype)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(_t(x, dt), _t(W, dt), None, stride, 0, dilation, groups)
    return y.numpy()


def conv2d_grad_x(gy, W, stride, dilation, groups):
    torch = _torch()
    dt = np.result_type(gy.dtype, W.dtype)
    with torch.no_grad():
        # the window is exactly (oH - 1) * s + d * (k - 1) + 1 long: no output padding needed
        gx = torch.nn.functional.conv_transpose2d(_t(gy, dt), _t(W, dt), None, stride, 0, 0, groups, dilation)
    return gx.numpy()


def conv2d_grad_w(x, gy, kernel_size, stride, dilation, groups):
    torch = _torch()
    dt = np.result_type(x.dtype, gy.dtype)
    O, C = gy.shape[1], x.shape[1]
    with torch.no_grad():
        tx, tg = _t(x, dt), _t(gy, dt)
        w_shape = (O, C // groups) + tuple(kernel_size)
        _, gw, _ = torch.ops.aten.convolution_backward(
            tg,
            tx,
            torch.empty(w_shape, dtype=tx.dtype),
            None,
            list(stride),
            [0, 0],
            list(dilation),
            False,
            [0, 0],
            groups,
            [False, True, False],
        )
    return gw.numpy()
