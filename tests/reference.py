"""Independent dense references: whole arrays, no chunks, no code from dask_pconv.

The conv reference accumulates one kernel tap at a time with ``einsum`` on a zero-padded copy
(not im2col + matmul as the engine does); the pooling reference is
PyTorch's CPU loop written out one output position at a time, and ``np.add.at``.
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


def _pool_out(L, k, s, p, d, ceil_mode):
    """PyTorch's ``pooling_output_shape``."""
    n = (L + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (n - 1) * s >= L + p:
        n -= 1
    return n


def _pool_argmax(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Values and flat indices of PyTorch's CPU max-pool loop, one output position at a time:
    taps in row-major order inside the image only, a tap wins if greater or NaN, and a window
    whose taps never win points at its first tap inside the image."""
    x = np.asarray(x, np.float64)
    (kh, kw), (ph, pw), (dy, dx) = _pair(kernel_size), _pair(padding), _pair(dilation)
    sy, sx = _pair(stride if stride is not None else kernel_size)
    N, C, H, W = x.shape
    oH, oW = _pool_out(H, kh, sy, ph, dy, ceil_mode), _pool_out(W, kw, sx, pw, dx, ceil_mode)
    val = np.full((N, C, oH, oW), -np.inf)
    idx = np.zeros((N, C, oH, oW), np.int64)
    some = np.zeros((oH, oW), bool)  # the window has a tap inside the image
    flat = x.reshape(N, C, H * W)
    for oh in range(oH):
        for ow in range(oW):
            r0, c0 = oh * sy - ph, ow * sx - pw
            rows = [r0 + t * dy for t in range(kh) if 0 <= r0 + t * dy < H]
            cols = [c0 + t * dx for t in range(kw) if 0 <= c0 + t * dx < W]
            first_r = r0 + dy * -(r0 // dy) if r0 < 0 else r0
            first_c = c0 + dx * -(c0 // dx) if c0 < 0 else c0
            idx[:, :, oh, ow] = first_r * W + first_c
            some[oh, ow] = bool(rows and cols)
            for r in rows:
                for c in cols:
                    v = flat[:, :, r * W + c]
                    win = (v > val[:, :, oh, ow]) | np.isnan(v)
                    val[:, :, oh, ow] = np.where(win, v, val[:, :, oh, ow])
                    idx[:, :, oh, ow] = np.where(win, r * W + c, idx[:, :, oh, ow])
    return val, idx, some


def max_pool2d_ref(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    val, idx, _ = _pool_argmax(x, kernel_size, stride, padding, dilation, ceil_mode)
    return (val, idx) if return_indices else val


def max_pool2d_vjp_ref(x, gy, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    _, idx, some = _pool_argmax(x, kernel_size, stride, padding, dilation, ceil_mode)
    N, C, H, W = np.shape(x)
    g = np.zeros((N, C, H * W))
    gy = np.asarray(gy, np.float64)
    for oh, ow in zip(*np.nonzero(some)):  # a window with no tap in the image passes nothing on
        for n in range(N):
            np.add.at(g[n], (np.arange(C), idx[n, :, oh, ow]), gy[n, :, oh, ow])
    return g.reshape(N, C, H, W)


def _avg_windows(shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """PyTorch's CPU average-pool loop, one output position at a time: ``(oh, ow, rows,
    cols, divisor)`` with the window's rows and columns inside the image."""
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    sy, sx = _pair(stride if stride is not None else kernel_size)
    H, W = shape[2:]
    oH, oW = _pool_out(H, kh, sy, ph, 1, ceil_mode), _pool_out(W, kw, sx, pw, 1, ceil_mode)
    for oh in range(oH):
        for ow in range(oW):
            h0, w0 = oh * sy - ph, ow * sx - pw
            h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
            size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            if divisor_override is not None:
                div = divisor_override
            else:
                div = size if count_include_pad else (h1 - h0) * (w1 - w0)
            yield oh, ow, slice(h0, h1), slice(w0, w1), div


def avg_pool2d_ref(
    x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    x = np.asarray(x, np.float64)
    wins = list(
        _avg_windows(x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    )
    oH, oW = wins[-1][0] + 1, wins[-1][1] + 1
    y = np.zeros(x.shape[:2] + (oH, oW))
    for oh, ow, rows, cols, div in wins:
        y[:, :, oh, ow] = x[:, :, rows, cols].sum(axis=(2, 3)) / div
    return y


def avg_pool2d_vjp_ref(
    x, gy, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    gy = np.asarray(gy, np.float64)
    g = np.zeros(np.shape(x))
    for oh, ow, rows, cols, div in _avg_windows(
        g.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    ):
        g[:, :, rows, cols] += (gy[:, :, oh, ow] / div)[:, :, None, None]
    return g


def adaptive_avg_pool2d_ref(x):
    """Output size 1: the mean of each plane."""
    return np.asarray(x, np.float64).mean(axis=(2, 3), keepdims=True)


def adaptive_avg_pool2d_vjp_ref(x, gy):
    H, W = np.shape(x)[2:]
    return np.broadcast_to(np.asarray(gy, np.float64) / (H * W), np.shape(x)).copy()


def upsample_nearest_ref(x, scale_factor):
    sh, sw = _pair(scale_factor)
    return np.repeat(np.repeat(np.asarray(x, np.float64), sh, axis=2), sw, axis=3)


def upsample_nearest_vjp_ref(gy, scale_factor):
    sh, sw = _pair(scale_factor)
    N, C, H, W = np.shape(gy)
    return np.asarray(gy, np.float64).reshape(N, C, H // sh, sh, W // sw, sw).sum(axis=(3, 5))


def leaky_relu_ref(x, negative_slope=0.01):
    x = np.asarray(x, np.float64)
    return x * np.where(x > 0, 1.0, negative_slope)


def leaky_relu_vjp_ref(x, gy, negative_slope=0.01):
    gy = np.asarray(gy, np.float64)
    return np.where(np.asarray(x) > 0, gy, negative_slope * gy)
