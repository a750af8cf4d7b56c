"""Pure geometry of chunked convolutions and poolings (no Dask, no arrays).

Everything here works on plain integers, tuples and slices so it can be tested on its own.

Per spatial axis, with kernel ``k``, stride ``s``, padding ``(p_lo, p_hi)``, dilation ``d``
and input length ``L``::

    L_out = floor((L + p_lo + p_hi - d*(k-1) - 1) / s) + 1

Output index ``o`` reads padded-input indices ``[o*s, o*s + d*(k-1)]``, i.e. unpadded indices
``[o*s - p_lo, o*s - p_lo + d*(k-1)]``.  An output chunk ``[o0, o1)`` therefore needs the
unpadded input window ``[o0*s - p_lo, (o1-1)*s - p_lo + d*(k-1) + 1)``: its own tile plus an
asymmetric halo, read from as many neighbouring input chunks as it reaches, with padding only
where the window leaves the true image.

Inside one block the window already holds its halo and padding, so the kernels use the same
arithmetic with no padding: :func:`block_output_hw` and :func:`block_window_hw` go from a
window's size to its output's and back, :func:`taps` gives the strided slices each kernel tap
reads, and :func:`crop_index` / :func:`symmetric_crop` describe a tile cut out of a window.

Output chunking rule: output ``o`` belongs to the input chunk that holds the centre of its
window, ``o*s - p_lo + d*(k-1)/2``.  For a 'same' convolution with stride 1 the output chunks
are exactly the input chunks; with stride ``s`` they are the input chunks divided by ``s``.
Output chunks that would be empty are dropped, so an output may have fewer chunks than its
input (never more).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "AxisPlan",
    "ChannelSegment",
    "Reach",
    "block_output_hw",
    "block_window_hw",
    "channel_segments",
    "crop_index",
    "even_chunks",
    "normalize_pair",
    "output_chunks",
    "output_length",
    "plan_axis",
    "pool_pads",
    "resolve_padding",
    "symmetric_crop",
    "taps",
    "window",
    "window_length",
    "window_pieces",
]


def normalize_pair(value, name, *, minimum=1):
    """Return ``value`` as a pair of ints, each ``>= minimum``.

    ``value`` is an int, or a tuple or list of one int (the same on both axes, as PyTorch
    reads it) or of two.  Raises ``TypeError`` for anything else and ``ValueError`` for values
    below ``minimum``, naming the argument.
    """
    seq = (value,) if isinstance(value, numbers.Integral) else value
    if not (
        isinstance(seq, (tuple, list))
        and len(seq) in (1, 2)
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in seq)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    pair = (int(seq[0]), int(seq[-1]))
    if min(pair) < minimum:
        if minimum == 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def resolve_padding(padding, kernel, stride, dilation):
    """Padding as ``((ph_lo, ph_hi), (pw_lo, pw_hi))``.

    ``padding`` is an int, a pair of ints, ``'valid'`` (no padding) or ``'same'`` (output
    length equals input length; stride must be 1, as in PyTorch).  For 'same' an odd total
    padding puts the extra element at the end, as PyTorch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = normalize_pair(padding, "padding", minimum=0)
    return ((ph, ph), (pw, pw))


def output_length(length, kernel, stride, pad, dilation):
    """Output length along one axis; ``pad`` is ``(lo, hi)``.  May be <= 0 (caller rejects)."""
    span = dilation * (kernel - 1) + 1
    return (length + pad[0] + pad[1] - span) // stride + 1


def window_length(n_out, kernel, stride, dilation):
    """Length of the window read by ``n_out`` consecutive outputs along one axis:
    ``(n_out - 1)*s + d*(k-1) + 1``, the inverse of :func:`output_length` with no padding for a
    window that ends on its last tap."""
    return (n_out - 1) * stride + dilation * (kernel - 1) + 1


def block_output_hw(window_hw, kernel, stride, dilation):
    """``(oH, oW)`` of a window block of size ``window_hw = (Hw, Ww)`` that already holds its
    halo and padding: :func:`output_length` of each axis with no padding."""
    return tuple(output_length(n, k, s, (0, 0), d) for n, k, s, d in zip(window_hw, kernel, stride, dilation))


def block_window_hw(out_hw, kernel, stride, dilation):
    """``(Hw, Ww)`` of the window block whose outputs are ``out_hw = (oH, oW)``: its
    :func:`window_length` on each axis."""
    return tuple(window_length(n, k, s, d) for n, k, s, d in zip(out_hw, kernel, stride, dilation))


def taps(kernel, out_hw, stride, dilation):
    """The window slices read by each kernel tap of a ``(oH, oW)`` output block.

    Yields ``(i, j, (rows, cols))`` for taps ``i < kh``, ``j < kw`` in row-major order:
    ``window[:, :, rows, cols]`` is the ``(oH, oW)`` plane of the window elements that tap
    ``(i, j)`` meets, one per output.
    """
    (kh, kw), (oH, oW), (sy, sx), (dy, dx) = kernel, out_hw, stride, dilation
    for i in range(kh):
        for j in range(kw):
            yield (
                i,
                j,
                (
                    slice(i * dy, i * dy + sy * (oH - 1) + 1, sy),
                    slice(j * dx, j * dx + sx * (oW - 1) + 1, sx),
                ),
            )


def crop_index(crop):
    """The index of the tile ``crop = ((y0, y1), (x0, x1))`` in an ``(N, C, H, W)`` block."""
    (y0, y1), (x0, x1) = crop
    return (slice(None), slice(None), slice(y0, y1), slice(x0, x1))


def symmetric_crop(crop, window_hw):
    """``(py, px)`` if the tile ``crop = ((y0, y1), (x0, x1))`` leaves equal margins on both
    sides of each axis of a ``window_hw`` window (the tile is the window less a padding of
    ``(py, px)``), else None."""
    (y0, y1), (x0, x1) = crop
    Hw, Ww = window_hw
    return (y0, x0) if y0 == Hw - y1 and x0 == Ww - x1 else None


def pool_pads(length, kernel, stride, pad, dilation, ceil_mode):
    """Padding ``(lo, hi)`` of one axis of a max-pooling with padding ``pad`` on both sides.

    With ``ceil_mode`` the output length rounds up, as in PyTorch:
    ``L_out = ceil((L + 2p - d*(k-1) - 1) / s) + 1``, less one if the last window would start
    past the input and its left padding (``(L_out - 1)*s >= L + p``).  The windows the extra
    outputs read run past the padding; ``hi`` grows to cover them, so that
    ``output_length(length, kernel, stride, (lo, hi), dilation)`` is the pooled length in
    either mode.  Without ``ceil_mode`` it is ``(pad, pad)``.
    """
    if not ceil_mode:
        return (pad, pad)
    span = dilation * (kernel - 1) + 1
    n = -(-(length + 2 * pad - span) // stride) + 1
    if n >= 1 and (n - 1) * stride >= length + pad:
        n -= 1
    if n < 1:
        return (pad, pad)  # no output at all; the caller rejects it
    return (pad, max(pad, (n - 1) * stride + span - length - pad))


def output_chunks(in_chunks, kernel, stride, pad, dilation):
    """Output chunks along one axis from the input chunks (see the module docstring)."""
    length = sum(in_chunks)
    n_out = output_length(length, kernel, stride, pad, dilation)
    bounds = [0]
    b = 0
    for c in in_chunks[:-1]:
        b += c
        # first o whose window centre o*s - p_lo + d(k-1)/2 >= b, in exact integer arithmetic:
        # o >= (2b + 2p_lo - d(k-1)) / 2s
        num = 2 * b + 2 * pad[0] - dilation * (kernel - 1)
        o = -((-num) // (2 * stride))  # ceil division
        bounds.append(min(max(o, 0), n_out))
    bounds.append(n_out)
    return tuple(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo)


def window(o0, o1, kernel, stride, pad, dilation):
    """Unpadded input window ``[start, stop)`` read by outputs ``[o0, o1)`` along one axis."""
    start = o0 * stride - pad[0]
    return start, start + window_length(o1 - o0, kernel, stride, dilation)


def window_pieces(start, stop, in_chunks):
    """Where the window ``[start, stop)`` comes from.

    Returns ``(pad_before, pad_after, pieces)`` where ``pieces`` is a tuple of
    ``(chunk_index, lo, hi)``: rows ``lo:hi`` of input chunk ``chunk_index``, in order.  The
    pieces cover the part of the window inside ``[0, sum(in_chunks))``; ``pad_before`` and
    ``pad_after`` count the window's elements outside the image (the padding).
    """
    length = sum(in_chunks)
    pad_before = max(0, -start)
    pad_after = max(0, stop - length)
    lo, hi = max(start, 0), min(stop, length)
    pieces = []
    offset = 0
    for j, c in enumerate(in_chunks):
        a, b = max(lo, offset), min(hi, offset + c)
        if a < b:
            pieces.append((j, a - offset, b - offset))
        offset += c
    if lo >= hi:  # the window lies entirely in the padding
        pad_before, pad_after = stop - start, 0
    return pad_before, pad_after, tuple(pieces)


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis of a chunked conv or pooling is computed.

    Attributes
    ----------
    out_chunks : tuple of int
        Output chunk lengths.
    windows : tuple of (int, int)
        Unpadded input window ``[start, stop)`` of each output chunk.
    sources : tuple of (int, int, tuple)
        ``window_pieces`` of each window: ``(pad_before, pad_after, pieces)``.
    """

    out_chunks: tuple
    windows: tuple
    sources: tuple

    @property
    def window_lengths(self):
        return tuple(b - a for a, b in self.windows)


def plan_axis(in_chunks, kernel, stride, pad, dilation):
    """Output chunks, windows and window sources along one axis."""
    out = output_chunks(tuple(in_chunks), kernel, stride, pad, dilation)
    windows, sources = [], []
    o0 = 0
    for n in out:
        w = window(o0, o0 + n, kernel, stride, pad, dilation)
        windows.append(w)
        sources.append(window_pieces(*w, in_chunks))
        o0 += n
    return AxisPlan(out, tuple(windows), tuple(sources))


def even_chunks(length, pieces, name="pieces"):
    """Split ``length`` into ``pieces`` chunks as even as possible (larger ones first)."""
    if not isinstance(pieces, numbers.Integral) or isinstance(pieces, bool):
        raise TypeError(f"{name} must be an int, got {pieces!r}")
    if pieces < 1:
        raise ValueError(f"{name} must be positive, got {pieces}")
    if pieces > length:
        raise ValueError(f"{name}={pieces} is more than the axis length {length}")
    q, r = divmod(length, pieces)
    return tuple(q + 1 if i < r else q for i in range(pieces))


@dataclass(frozen=True)
class ChannelSegment:
    """A part of one (output-chunk, input-chunk) pair that lies in a single group.

    ``o`` are rows local to the output-channel chunk, ``c`` channels local to the input
    chunk of ``x`` and ``wc`` the matching columns of ``w`` (its axis 1, C/groups wide).
    """

    group: int
    o: tuple
    c: tuple
    wc: tuple


def channel_segments(o_range, c_range, out_channels, in_channels, groups):
    """Segments linking output channels ``o_range`` to input channels ``c_range``.

    With ``groups`` groups, output channel ``o`` reads input channels of group
    ``o // (out_channels // groups)`` only.  Returns a tuple of :class:`ChannelSegment` (empty
    when the two ranges share no group, i.e. the pair contributes nothing).
    """
    og, cg = out_channels // groups, in_channels // groups
    (o0, o1), (c0, c1) = o_range, c_range
    segs = []
    for g in range(max(o0 // og, c0 // cg), min((o1 - 1) // og, (c1 - 1) // cg) + 1):
        oa, ob = max(o0, g * og), min(o1, (g + 1) * og)
        ca, cb = max(c0, g * cg), min(c1, (g + 1) * cg)
        if oa < ob and ca < cb:
            segs.append(ChannelSegment(g, (oa - o0, ob - o0), (ca - c0, cb - c0), (ca - g * cg, cb - g * cg)))
    return tuple(segs)


@dataclass(frozen=True)
class Reach:
    """How one spatial axis of a layer's output reads its input, for a tile that runs a whole
    network on a window of the image (:mod:`dask_pconv.models.tiling`).

    ``kind`` is ``"local"`` (output ``o`` reads input ``o``: pointwise layers, additions,
    channel concatenations), ``"window"`` (a convolution or pooling: output ``o`` reads
    ``[o*s - p_lo, o*s - p_lo + d*(k-1)]``; ``ceil_mode`` as in PyTorch's pools), ``"transposed"``
    (a transposed convolution: input ``i`` adds into outputs ``i*s - p + d*j``, ``j < k``, and
    ``extra`` is its ``output_padding``) or ``"upscale"`` (nearest upsampling by ``stride``: output
    ``o`` reads input ``floor(o / s)``).
    """

    kind: str = "local"
    kernel: int = 1
    stride: int = 1
    pad: tuple = (0, 0)
    dilation: int = 1
    ceil_mode: bool = False
    extra: int = 0

    def __post_init__(self):
        if self.kind not in ("local", "window", "transposed", "upscale"):
            raise ValueError(f"unknown reach kind {self.kind!r}")

    @property
    def scale(self):
        """Output length per input length, as a fraction (``1/s`` for a window)."""
        if self.kind == "window":
            return Fraction(1, self.stride)
        if self.kind in ("transposed", "upscale"):
            return Fraction(self.stride)
        return Fraction(1)

    def length(self, n):
        """The output length for an input of length ``n`` (may be <= 0: too short)."""
        k, s, d = self.kernel, self.stride, self.dilation
        if self.kind == "window":
            pad = pool_pads(n, k, s, self.pad[0], d, True) if self.ceil_mode else self.pad
            return output_length(n, k, s, pad, d)
        if self.kind == "transposed":
            return (n - 1) * s - 2 * self.pad[0] + d * (k - 1) + self.extra + 1
        if self.kind == "upscale":
            return n * s
        return n

    def needs(self, o0, o1):
        """The input range ``[i0, i1)`` that outputs ``[o0, o1)`` read (not clipped to the
        input: indices outside it are the layer's padding)."""
        k, s, d = self.kernel, self.stride, self.dilation
        if self.kind == "window":
            return window(o0, o1, k, s, self.pad, d)
        if self.kind == "transposed":
            p = self.pad[0]
            return -((d * (k - 1) - o0 - p) // s), (o1 - 1 + p) // s + 1
        if self.kind == "upscale":
            return o0 // s, (o1 - 1) // s + 1
        return o0, o1
