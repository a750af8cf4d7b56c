"""Convolution of one window block: forward, grad-x (transposed conv) and grad-w.

Shapes (one task):

- ``x``: ``(N, C, Hw, Ww)`` window, halo and zero padding included;
- ``W``: ``(O, C/groups, kh, kw)``;
- ``gy`` and the output: ``(N, O, oH, oW)`` with ``oH = (Hw - dy*(kh-1) - 1) // sy + 1``.

The window of ``oH`` outputs is exactly ``Hw = (oH-1)*sy + dy*(kh-1) + 1`` long, which is what
the Dask-level ops hand in, so grad-x returns a block of the window's shape.  Both sizes, the
slices each tap reads and the crop of a tile come from :mod:`dask_pconv.geometry`.
"""

from __future__ import annotations

import dask
import numpy as np

from .. import geometry as geo
from ..backend import array_namespace, is_numpy
from . import _torch
from ._namespace import layout_invariant
from ._window import cropped, materialize


def _im2col(x, kh, kw, oH, oW, stride, dilation):
    xp = array_namespace(x)
    N, C = x.shape[:2]
    col = xp.empty((N, C, kh, kw, oH, oW), dtype=x.dtype)  # (N, C, kh, kw, oH, oW)
    for i, j, (sl_y, sl_x) in geo.taps((kh, kw), (oH, oW), stride, dilation):
        col[:, :, i, j] = x[:, :, sl_y, sl_x]
    return col


def _single_channel_ok(x, W):
    block = getattr(x, "block", x)
    return (
        dask.config.get(_torch.CONFIG_KEY, "auto") == "auto"
        and is_numpy(block)
        and is_numpy(W)
        and x.shape[1] == 1
    )


def _correlate_single(x, W, stride, dilation):
    """One input and one output channel (a 2-D filter): SciPy's direct correlation, which
    beats im2col and PyTorch there (no column buffer, no channel contraction)."""
    from scipy import ndimage

    (dy, dx), (sy, sx) = dilation, stride
    kh, kw = W.shape[2:]
    # the dilated filter spans the window of one output
    k = np.zeros(
        geo.block_window_hw((1, 1), (kh, kw), stride, dilation), dtype=np.result_type(x.dtype, W.dtype)
    )
    k[::dy, ::dx] = W[0, 0]
    oH, oW = geo.block_output_hw(x.shape[2:], (kh, kw), stride, dilation)
    out = np.empty((x.shape[0], 1, oH, oW), dtype=k.dtype)
    ch, cw = k.shape[0] // 2, k.shape[1] // 2  # ndimage centres the kernel at k // 2
    for n in range(x.shape[0]):
        full = ndimage.correlate(x[n, 0].astype(k.dtype, copy=False), k, mode="constant")
        out[n, 0] = full[ch : ch + (oH - 1) * sy + 1 : sy, cw : cw + (oW - 1) * sx + 1 : sx]
    return out


#: the im2col kernels build the column matrix in bands of output rows of about this size, so it
#: stays in cache and is never a huge allocation (450 MB for one 2048x2048, 3-channel image)
COL_BYTES = 4 * 2**20
#: the band size for device (CuPy) blocks: there is no cache to fit, and each band is one GEMM
#: plus a kernel launch per tap, so small bands would leave the GPU idle
DEVICE_COL_BYTES = 256 * 2**20


def _bands(N, oH, row_bytes, xp):
    """``(n0, n1, r0, r1)`` bands of images and output rows whose columns fit ``COL_BYTES``
    (``DEVICE_COL_BYTES`` for blocks not in NumPy)."""
    rows = max(1, (COL_BYTES if xp is np else DEVICE_COL_BYTES) // max(row_bytes, 1))
    if rows >= oH:  # whole images: group several
        per = max(1, rows // oH)
        for n0 in range(0, N, per):
            yield n0, min(N, n0 + per), 0, oH
        return
    for n in range(N):
        for r0 in range(0, oH, rows):
            yield n, n + 1, r0, min(oH, r0 + rows)


def _band_rows(r0, r1, k, s, d):
    """Window rows read by output rows ``[r0, r1)``."""
    return slice(*geo.window(r0, r1, k, s, (0, 0), d))


@layout_invariant
def conv2d_forward(x, W, stride=(1, 1), dilation=(1, 1), groups=1):
    """Cross-correlation of a padded window ``x`` with ``W`` (no padding added here)."""
    if W.shape[:2] == (1, 1) and _single_channel_ok(x, W):
        return _correlate_single(materialize(x), W, stride, dilation)
    if _torch.use_torch(x, W, k=W[0].size):
        return _torch.conv2d_forward(x, W, stride, dilation, groups)
    x = materialize(x)
    xp = array_namespace(x, W)
    N, C, Hw, Ww = x.shape
    O, Cg, kh, kw = W.shape
    G = groups
    K = Cg * kh * kw
    oH, oW = geo.block_output_hw((Hw, Ww), (kh, kw), stride, dilation)
    Wm = W.reshape(1, G, O // G, K)  # (1, G, Og, Cg*kh*kw)
    y = xp.empty((N, O, oH, oW), dtype=xp.result_type(x.dtype, W.dtype))
    for n0, n1, r0, r1 in _bands(N, oH, C * kh * kw * oW * x.dtype.itemsize, xp):
        xs = x[n0:n1, :, _band_rows(r0, r1, kh, stride[0], dilation[0])]
        col = _im2col(xs, kh, kw, r1 - r0, oW, stride, dilation)
        col = col.reshape(n1 - n0, G, K, (r1 - r0) * oW)  # (n, G, Cg*kh*kw, rows*oW)
        y[n0:n1, :, r0:r1] = xp.matmul(Wm, col).reshape(n1 - n0, O, r1 - r0, oW)
    return y


@layout_invariant
def conv2d_grad_x(gy, W, stride=(1, 1), dilation=(1, 1), groups=1, crop=None):
    """Gradient with respect to the window: a transposed conv of ``gy`` with ``W``.

    Returns ``(N, C, Hw, Ww)`` for the window that produced ``gy``, or with ``crop = ((y0, y1),
    (x0, x1))`` only that part of it (a tile inside its padded window).
    """
    if _torch.use_torch(gy, W, k=W[0].size):
        return _torch.conv2d_grad_x(gy, W, stride, dilation, groups, crop)
    xp = array_namespace(gy, W)
    N, O, oH, oW = gy.shape
    _, Cg, kh, kw = W.shape
    G = groups
    Hw, Ww = geo.block_window_hw((oH, oW), (kh, kw), stride, dilation)
    Wt = W.reshape(1, G, O // G, Cg * kh * kw).transpose(0, 1, 3, 2)  # (1, G, Cg*kh*kw, Og)
    gx = xp.zeros((N, G * Cg, Hw, Ww), dtype=xp.result_type(gy.dtype, W.dtype))
    for n0, n1, r0, r1 in _bands(N, oH, G * Cg * kh * kw * oW * gx.dtype.itemsize, xp):
        n, rb = n1 - n0, r1 - r0
        g = gy[n0:n1, :, r0:r1].reshape(n, G, O // G, rb * oW)
        col = xp.matmul(Wt, g).reshape(n, G * Cg, kh, kw, rb, oW)  # (n, C, kh, kw, rows, oW)
        band = gx[n0:n1, :, _band_rows(r0, r1, kh, stride[0], dilation[0])]
        for i, j, (sl_y, sl_x) in geo.taps((kh, kw), (rb, oW), stride, dilation):
            band[:, :, sl_y, sl_x] += col[:, :, i, j]
    return cropped(gx, crop)


@layout_invariant
def conv2d_grad_b(gy):
    """Gradient with respect to the bias from one block of ``gy``: its sum over (N, H, W), as a
    ``(1, O, 1, 1)`` block."""
    return gy.sum(axis=(0, 2, 3), keepdims=True)


@layout_invariant
def conv2d_grad_w(x, gy, kernel_size, stride=(1, 1), dilation=(1, 1), groups=1):
    """Gradient with respect to ``W`` from one window ``x`` and its ``gy``: ``(O, C/groups, kh, kw)``."""
    if _torch.use_torch(x, gy, k=x.shape[1] // groups * kernel_size[0] * kernel_size[1]):
        return _torch.conv2d_grad_w(x, gy, kernel_size, stride, dilation, groups)
    x = materialize(x)
    xp = array_namespace(x, gy)
    N, C, Hw, Ww = x.shape
    _, O, oH, oW = gy.shape
    kh, kw = kernel_size
    G = groups
    Cg = C // G
    K = Cg * kh * kw
    gW = xp.zeros((G, O // G, K), dtype=xp.result_type(x.dtype, gy.dtype))
    for n0, n1, r0, r1 in _bands(N, oH, C * kh * kw * oW * x.dtype.itemsize, xp):
        n, rb = n1 - n0, r1 - r0
        xs = x[n0:n1, :, _band_rows(r0, r1, kh, stride[0], dilation[0])]
        col = _im2col(xs, kh, kw, rb, oW, stride, dilation)
        col = col.reshape(n, G, K, rb * oW).transpose(1, 0, 3, 2).reshape(G, n * rb * oW, K)
        g = gy[n0:n1, :, r0:r1].reshape(n, G, O // G, rb * oW).transpose(1, 2, 0, 3)  # (G, Og, n, P)
        gW += xp.matmul(g.reshape(G, O // G, n * rb * oW), col)  # (G, Og, Cg*kh*kw)
    return gW.reshape(O, Cg, kh, kw)
