"""Rechunking into a given number of pieces per axis."""

from __future__ import annotations

from .. import geometry as geo
from ._validate import checked_operand


def split(x, batch=None, channel=None, spatial=None, *, in_channel=None):
    """Rechunk ``x`` (N, C, H, W) into that many pieces per axis, as even as possible.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
        A Dask array (or a NumPy/CuPy array, wrapped first).
    batch : int, optional
        Number of pieces along N (data parallel).  ``None`` keeps the axis as it is.
    in_channel : int, optional
        Number of pieces along C, the input channels of the convolution that reads ``x``
        (each piece a partial convolution, summed).  Not the command line's
        ``--split out_channel:N``, which splits the weights' output channels.
    channel : int, optional
        The same as ``in_channel`` (its first name, kept); give one or the other.
    spatial : int or (int, int), optional
        Number of tiles along (H, W); an int means the same on both.

    Returns
    -------
    dask.array.Array
        The same values, chunked ``(batch, in_channel, nh, nw)`` ways; the larger pieces come
        first when an axis does not divide evenly.

    Examples
    --------
    >>> import numpy as np, dask_pconv as dp
    >>> x = dp.split(np.zeros((8, 3, 10, 10), "f4"), batch=2, spatial=(2, 3))
    >>> x.chunks
    ((4, 4), (3,), (5, 5), (4, 3, 3))
    """
    if channel is not None and in_channel is not None:
        raise TypeError("split: give in_channel or channel (the same thing, its first name), not both")
    name = "channel" if in_channel is None else "in_channel"
    in_channel = channel if in_channel is None else in_channel
    x = checked_operand(x, "x", 4, empty_batch=True)
    chunks = dict()
    if batch is not None:
        chunks[0] = geo.even_chunks(x.shape[0], batch, "batch")
    if in_channel is not None:
        chunks[1] = geo.even_chunks(x.shape[1], in_channel, name)
    if spatial is not None:
        nh, nw = geo.normalize_pair(spatial, "spatial")
        chunks[2] = geo.even_chunks(x.shape[2], nh, "spatial")
        chunks[3] = geo.even_chunks(x.shape[3], nw, "spatial")
    return x.rechunk(chunks) if chunks else x


__all__ = ["split"]
