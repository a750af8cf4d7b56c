"""Optional faster conv kernels: PyTorch's, reached zero-copy (``torch.from_numpy`` for NumPy
blocks on the CPU, DLPack for CuPy blocks on the GPU).

Used only when PyTorch is importable.  The ``pconv.conv-kernel``
config picks: ``"numpy"`` forces the im2col kernels, ``"torch"`` forces PyTorch's, and
``"auto"`` (the default) takes PyTorch's unless the contraction is short (``C/groups * kh * kw``
below ``MIN_TORCH_K``): with few input channels PyTorch's CPU kernel is slow and the im2col
kernels are about 4x faster (benchmarks/bench_kernels.py, 3->64 channels at 2048x2048).
Results agree with the im2col kernels to floating-point rounding (the tests run both).
PyTorch is never a dependency of the package.

CuPy blocks go to PyTorch's CUDA kernels (cuDNN) the same way, zero-copy through DLPack
(``torch.from_dlpack`` and back with ``cupy.from_dlpack``), when PyTorch with CUDA is
installed, for any contraction length; otherwise they use the im2col kernels in CuPy (cuBLAS).
Only genuine ``cupy.ndarray`` blocks qualify, never other array types.  PyTorch's default of
TF32 for float32 convolutions on recent GPUs (about 1e-3 relative) is switched off in the
worker process (``torch.backends.cudnn.allow_tf32 = False``) unless the ``pconv.allow-tf32``
config is true, and cuDNN is held to its deterministic algorithms
(``torch.backends.cudnn.deterministic = True``), so that a task computed again (a lost worker)
gives the same bits.  Both configs are read by the tasks, on the workers: set them before the
cluster starts (workers take the config they start with), e.g. ``DASK_PCONV__ALLOW_TF32=True``
or ``DASK_PCONV__CONV_KERNEL=numpy`` in the environment.  Blocks made by ``cupy.from_dlpack``
own memory from PyTorch's caching allocator while CuPy keeps its own pool, so memory freed by
one is not reused by the other
(``torch.cuda.empty_cache()`` / CuPy's ``free_all_blocks()`` release it).  CI has no GPU:
this path is checked by ``benchmarks/gpu_check.py`` on a machine with one, not by the test
suite.
"""

from __future__ import annotations

import functools

import dask
import numpy as np

from .. import geometry as geo
from ..backend import is_cupy, is_numpy
from ._window import Padded, cropped

CONFIG_KEY = "pconv.conv-kernel"
TF32_KEY = "pconv.allow-tf32"
CHOICES = ("auto", "numpy", "torch")
MIN_TORCH_K = 64


@functools.lru_cache(maxsize=1)
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def use_torch(*arrays, k):
    """True when these blocks should go through PyTorch's kernels; ``k`` is the contraction
    length ``C/groups * kh * kw``."""
    choice = dask.config.get(CONFIG_KEY, "auto")
    if choice not in CHOICES:
        raise ValueError(f"config {CONFIG_KEY!r} must be one of {CHOICES}, got {choice!r}")
    arrays = [getattr(a, "block", a) for a in arrays]  # a Padded window: its block decides
    if choice == "numpy":
        return False
    if all(is_cupy(a) for a in arrays):
        return _cuda_ok(arrays, choice)
    if not all(is_numpy(a) for a in arrays):
        return False
    if choice == "auto" and k < MIN_TORCH_K:
        return False  # before importing PyTorch: the import alone costs a worker ~180 MiB
    if _torch() is None:
        if choice == "torch":
            raise ImportError(f"config {CONFIG_KEY!r} is 'torch' but PyTorch is not installed")
        return False
    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def _cuda_ok(arrays, choice):
    """Whether CuPy blocks go through PyTorch's CUDA kernels."""
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        if choice == "torch":
            raise ImportError(f"config {CONFIG_KEY!r} is 'torch' but PyTorch with CUDA is not installed")
        return False
    # PyTorch runs float32 convs in TF32 on Ampere and later by default (about 1e-3 relative):
    # keep full float32, as the im2col path in CuPy has, unless asked (set both ways: the flag
    # is process-wide and outlives one task)
    torch.backends.cudnn.allow_tf32 = bool(dask.config.get(TF32_KEY, False))
    # cuDNN may otherwise pick backward algorithms with atomics, whose sums differ in the last
    # bits from run to run: a recomputed task would not equal the lost one
    torch.backends.cudnn.deterministic = True
    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def _t(a, dtype):
    if is_cupy(a):  # zero-copy on the same device and stream-ordered (DLPack)
        import cupy

        return _torch().from_dlpack(cupy.ascontiguousarray(a.astype(dtype, copy=False)))
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.writeable:
        # PyTorch only reads it, but warns about any read-only buffer (an empty or broadcast
        # block Dask made, say)
        a = a.copy()
    return _torch().from_numpy(a)


def _out(t):
    """A result tensor as a block of the input's library: NumPy, or CuPy for CUDA tensors."""
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    return t.numpy()


def _unpad(x):
    """``(array, padding)``: a symmetric zero-padded window goes to PyTorch unpadded."""
    pad = x.symmetric() if isinstance(x, Padded) else (0, 0)
    if pad is None:
        return x.materialize(), (0, 0)
    return getattr(x, "block", x), pad


def conv2d_forward(x, W, stride, dilation, groups):
    torch = _torch()
    dt = np.result_type(x.dtype, W.dtype)
    x, pad = _unpad(x)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(_t(x, dt), _t(W, dt), None, stride, pad, dilation, groups)
    return _out(y)


def _backward(gy, x, w, stride, pad, dilation, groups, which):
    """One output of PyTorch's conv backward: ``which`` 0 is grad-x, 1 is grad-w (NumPy or
    CuPy, as the inputs)."""
    torch = _torch()
    mask = [which == 0, which == 1, False]
    with torch.no_grad():
        out = torch.ops.aten.convolution_backward(
            gy, x, w, None, list(stride), list(pad), list(dilation), False, [0, 0], groups, mask
        )
    return _out(out[which])


def conv2d_grad_x(gy, W, stride, dilation, groups, crop=None):
    dt = np.result_type(gy.dtype, W.dtype)
    N, _, oH, oW = gy.shape
    _, Cg, kh, kw = W.shape
    Hw, Ww = geo.block_window_hw((oH, oW), (kh, kw), stride, dilation)
    pad, after = (0, 0), None
    if crop is not None:
        # a symmetric crop is PyTorch's padding: grad-x of the unpadded input is the tile
        pad = geo.symmetric_crop(crop, (Hw, Ww))
        if pad is None:
            pad, after = (0, 0), crop
    shape = (N, Cg * groups, Hw - 2 * pad[0], Ww - 2 * pad[1])
    tw = _t(W, dt)
    # only the input's shape is read for grad-x: a zero-stride stand-in allocates nothing
    x = tw.new_empty(1).expand(shape)
    return cropped(_backward(_t(gy, dt), x, tw, stride, pad, dilation, groups, 0), after)


def conv2d_grad_w(x, gy, kernel_size, stride, dilation, groups):
    dt = np.result_type(x.dtype, gy.dtype)
    O, C = gy.shape[1], x.shape[1]
    x, pad = _unpad(x)
    tx = _t(x, dt)
    # only the weight's shape is read for grad-w
    w = tx.new_empty(1).expand((O, C // groups) + tuple(kernel_size))
    return _backward(_t(gy, dt), tx, w, stride, pad, dilation, groups, 1)
