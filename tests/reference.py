"""Independent dense references: whole arrays, no chunks, no code from dask_pconv.

The conv reference accumulates one kernel tap at a time with ``einsum`` on a zero-padded copy
(not im2col + matmul as the engine does); the pooling reference uses NumPy's
``sliding_window_view`` and ``np.add.at``.
"""

import numpy as np


def _pads(padding, kernel, dilation):
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            t = d * (k - 1)
            out.append((t // 2, t - t // 2))
        return tuple(out)
    p = (padding, padding) if np.isscalar(padding) else tuple(padding)
    return ((p[0], p[0]), (p[1], p[1]))


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sy, sx), (dy, dx) = _pair(stride), _pair(dilation)
    O, Cg, kh, kw = w.shape
    (ph0, ph1), (pw0, pw1) = _pads(padding, (kh, kw), (dy, dx))
    xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1)))
    N, C, H, W = xp.shape
    oH = (H - dy * (kh - 1) - 1) // sy + 1
    oW = (W - dx * (kw - 1) - 1) // sx + 1
    Og = O // groups
    y = np.zeros((N, O, oH, oW))
    for g in range(groups):
        xs = xp[:, g * Cg : (g + 1) * Cg]
        ws = w[g * Og : (g + 1) * Og]
        for i in range(kh):
            for j in range(kw):
                tap = xs[
                    :, :, i * dy : i * dy + sy * (oH - 1) + 1 : sy, j * dx : j * dx + sx * (oW - 1) + 1 : sx
                ]
                y[:, g * Og : (g + 1) * Og] += np.einsum("ncij,oc->noij", tap, ws[:, :, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_vjp_ref(x, w, gy, stride=1, padding=0, dilation=1, groups=1):
    x, w, gy = (np.asarray(a, np.float64) for a in (x, w, gy))
    (sy, sx), (dy, dx) = _pair(stride), _pair(dilation)
    O, Cg, kh, kw = w.shape
    (ph0, ph1), (pw0, pw1) = _pads(padding, (kh, kw), (dy, dx))
    xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1)))
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    _, _, oH, oW = gy.shape
    Og = O // groups
    for g in range(groups):
        cs, os_ = slice(g * Cg, (g + 1) * Cg), slice(g * Og, (g + 1) * Og)
        for i in range(kh):
            for j in range(kw):
                sl = (
                    slice(None),
                    cs,
                    slice(i * dy, i * dy + sy * (oH - 1) + 1, sy),
                    slice(j * dx, j * dx + sx * (oW - 1) + 1, sx),
                )
                gxp[sl] += np.einsum("noij,oc->ncij", gy[:, os_], w[os_, :, i, j])
                gw[os_, :, i, j] += np.einsum("noij,ncij->oc", gy[:, os_], xp[sl])
    H, W = x.shape[2:]
    return gxp[:, :, ph0 : ph0 + H, pw0 : pw0 + W], gw, gy.sum((0, 2, 3))


def _pool_windows(x, kernel_size, stride, padding):
    kh, kw = _pair(kernel_size)
    sy, sx = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    return xp, win[:, :, ::sy, ::sx], (kh, kw, sy, sx, ph, pw)


def max_pool2d_ref(x, kernel_size, stride=None, padding=0):
    _, win, _ = _pool_windows(x, kernel_size, stride, padding)
    return win.max(axis=(4, 5))


def max_pool2d_vjp_ref(x, gy, kernel_size, stride=None, padding=0):
    xp, win, (kh, kw, sy, sx, ph, pw) = _pool_windows(x, kernel_size, stride, padding)
    N, C, oH, oW = win.shape[:4]
    flat = win.reshape(N, C, oH, oW, kh * kw)
    arg = np.argmax(flat, axis=-1)  # first maximum; NaN counts as maximal
    rows = np.arange(oH)[None, None, :, None] * sy + arg // kw
    cols = np.arange(oW)[None, None, None, :] * sx + arg % kw
    n = np.arange(N)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    g = np.zeros_like(xp)
    np.add.at(g, (n, c, rows, cols), np.asarray(gy, np.float64))
    return g[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]]
