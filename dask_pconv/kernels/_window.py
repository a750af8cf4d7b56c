"""A window block whose edge padding is not yet materialised.

Most windows are one input block plus padding at the image edge.  Copying the block into a
padded buffer costs as much as a fast conv kernel's own memory traffic, and PyTorch's conv pads
on the fly, so the padding travels as a description and only kernels that need a real buffer
(the im2col and pooling kernels) materialise it.  The other way, a kernel that computes a whole
window may hand back only the tile inside it (:func:`cropped`).
"""

from __future__ import annotations

from ..backend import array_namespace
from ..geometry import crop_index
from ._namespace import canonical


class Padded:
    """``block`` (N, C, H, W) with ``pads = (top, bottom, left, right)`` of ``fill`` around it."""

    __slots__ = ("block", "pads", "fill")

    def __init__(self, block, pads, fill):
        self.block, self.pads, self.fill = block, tuple(pads), fill

    @property
    def shape(self):
        N, C, H, W = self.block.shape
        t, b, l, r = self.pads
        return (N, C, H + t + b, W + l + r)

    @property
    def dtype(self):
        return self.block.dtype

    def __getitem__(self, key):
        # channel slices keep the padding lazy; anything else needs the real buffer
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice):
            return Padded(self.block[key], self.pads, self.fill)
        return self.materialize()[key]

    def symmetric(self):
        """``(ph, pw)`` if the padding is zeros and symmetric on each axis, else None."""
        t, b, l, r = self.pads
        return (t, l) if t == b and l == r and self.fill == 0 else None

    def canonical(self):
        """The same window over a canonical block (see
        :func:`~dask_pconv.kernels._namespace.canonical`)."""
        block = canonical(self.block)
        return self if block is self.block else Padded(block, self.pads, self.fill)

    def materialize(self):
        xp = array_namespace(self.block)
        t, _, l, _ = self.pads
        N, C, H, W = self.block.shape
        out = xp.full(self.shape, self.fill, dtype=self.block.dtype)
        out[:, :, t : t + H, l : l + W] = self.block
        return out


def materialize(x):
    """A real array for ``x`` (a block or a :class:`Padded`)."""
    return x.materialize() if isinstance(x, Padded) else x


def cropped(block, crop):
    """The tile ``crop = ((y0, y1), (x0, x1))`` of an ``(N, C, H, W)`` block, as a canonical
    block (a copy, see :func:`~dask_pconv.kernels.canonical`: the tile's layout must not depend on
    the window it was cut from); ``block`` itself when ``crop`` is None."""
    return block if crop is None else canonical(block[crop_index(crop)])
