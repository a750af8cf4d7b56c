"""Images larger than memory: read from a chunked store, compute tile by tile, write back.

    import dask_pconv as dp
    x = dp.open_image("big.zarr", tile=1024)            # lazy (N, C, H, W), 1024x1024 tiles
    dp.to_zarr(dp.conv2d(x, w, padding="same"), "out.zarr")
    # or in one call:
    dp.conv2d_to_zarr("big.zarr", "out.zarr", w, padding="same", tile=1024)

Nothing here holds the image: every tile is read by the task that needs it, convolved with
the halo strips of its neighbours (:func:`dask_pconv.conv2d`) and written into its own chunk
of the output store by a task of its own, so on a ``distributed`` cluster the workers hold the
tiles in flight plus those waiting for a neighbour's halo (about a row of tiles), whatever the
size of the image.  Needs the ``zarr`` extra (``pip install 'dask-pconv[zarr]'``, zarr 3).
"""

from __future__ import annotations

import copy
import os

import dask.array as da
import numpy as np

from . import geometry as geo
from ._client import active_client, scatter_arrays
from .backend import is_numpy
from .ops import conv2d

__all__ = ["conv2d_to_zarr", "features_to_zarr", "open_image", "predict_to_zarr", "to_zarr"]

_EXTRA_HINT = "pip install 'dask-pconv[zarr]'"


def _zarr():
    try:
        import zarr
    except ImportError as e:
        raise ImportError(f"reading and writing chunked stores needs zarr: {_EXTRA_HINT}") from e
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"dask_pconv needs zarr >= 3, found zarr {zarr.__version__}: {_EXTRA_HINT}")
    return zarr


def _open_array(url, component):
    """The zarr array at ``url`` (a path or a store) and ``component``, read-only, with errors
    that say what is there instead."""
    zarr = _zarr()
    if isinstance(url, zarr.Array):
        return url
    if isinstance(url, (str, os.PathLike)):
        url = os.fspath(url)
        if "://" not in url and not os.path.exists(url):
            raise FileNotFoundError(f"no zarr store at {url!r}")
    try:
        node = zarr.open(store=url, path=component or "", mode="r")
    except FileNotFoundError as e:  # zarr's NodeNotFoundError is one
        raise FileNotFoundError(f"no zarr array at {url!r}, component {component!r}: {e}") from e
    if isinstance(node, zarr.Group):
        names = sorted(name for name, _ in node.arrays())
        where = f"{url!r}" + (f", component {component!r}" if component else "")
        raise ValueError(f"{where} is a zarr group, not an array; pass component= one of its arrays: {names}")
    return node


def _tile_chunks(shape, store_chunks, tile):
    """Dask chunks for an (N, C, H, W) image: the store's chunking, or tiles of ``tile`` on
    H and W."""
    if tile is None:
        return tuple(store_chunks)
    th, tw = geo.normalize_pair(tile, "tile")
    return tuple(store_chunks[:2]) + (min(th, shape[2]), min(tw, shape[3]))


def open_image(url, component=None, tile=None):
    """A zarr array as a lazy ``(N, C, H, W)`` Dask array, read tile by tile.

    Parameters
    ----------
    url : str, os.PathLike, zarr store or zarr.Array
        Where the array lives (a directory store path, a URL that zarr understands, a store
        object or an opened array).
    component : str, optional
        Path of the array inside a zarr group.
    tile : int or (int, int), optional
        Tile height and width of the Dask chunks on H and W (axes N and C keep the store's
        chunking).  ``None`` keeps the store's chunking on every axis.  Tiles that are
        multiples of the store's chunks make each task read whole chunks only.

    Returns
    -------
    dask.array.Array, shape (N, C, H, W)
        A 2-D ``(H, W)`` array is read as ``(1, 1, H, W)`` and a 3-D ``(C, H, W)`` one as
        ``(1, C, H, W)``.  Each block is read by its own task when it is needed.

    Raises
    ------
    ImportError
        zarr (>= 3) is not installed: ``pip install 'dask-pconv[zarr]'``.
    FileNotFoundError
        No store at ``url`` or no array at ``component``.
    ValueError
        ``url``/``component`` is a group (the message lists its arrays) or the array is not
        2-, 3- or 4-D.
    """
    z = _open_array(url, component)
    if z.ndim not in (2, 3, 4):
        raise ValueError(f"an image array must be (H, W), (C, H, W) or (N, C, H, W), got shape {z.shape}")
    lead = (1,) * (4 - z.ndim)
    shape = lead + tuple(z.shape)
    chunks = _tile_chunks(shape, lead + tuple(z.chunks), tile)
    x = da.from_zarr(z, chunks=chunks[4 - z.ndim :])
    return x.reshape(shape) if lead else x


def _regular(chunks):
    """Whether an axis's chunks are all equal except a smaller last one (what zarr stores)."""
    return len(chunks) == 1 or (len(set(chunks[:-1])) == 1 and chunks[-1] <= chunks[0])


def to_zarr(y, url, component=None, overwrite=False, compute=True, **zarr_kwargs):
    """Write a lazy Dask array into a new zarr array, one task per block.

    Each block is computed and written into its own zarr chunk (the zarr chunks are the Dask
    chunks) by a task of its own and then dropped, so a worker never holds more than the
    blocks it is working on.  No lock: blocks never share a zarr chunk.  An axis whose chunks
    are not regular (all equal but a smaller last one) is rechunked to its largest chunk first.

    Parameters
    ----------
    y : dask.array.Array
        What to write; its graph runs on the active scheduler (a ``distributed.Client`` if
        there is one).
    url : str or os.PathLike or zarr store
        Where to create the array (a directory store for a path).  An in-memory store is
        refused while a ``distributed.Client`` is active: the workers would write into copies
        of it.
    component : str, optional
        Name of the array inside a zarr group at ``url``.
    overwrite : bool
        Replace an existing array; otherwise an existing one is an error.
    compute : bool
        Run now (default) or return a ``dask.delayed`` object that writes when computed.
    **zarr_kwargs
        Passed to ``zarr.create_array`` (``compressors=``, ``fill_value=``, ...); ``shape``,
        ``dtype`` and ``chunks`` come from ``y``, and ``shards`` is refused (blocks sharing a
        shard would overwrite each other's writes).  ``y`` must not read from the array being
        replaced (see :func:`conv2d_to_zarr`).  Device (CuPy) blocks are copied to the host
        block by block.

    Returns
    -------
    zarr.Array or dask.delayed.Delayed
        The written array (opened for reading and writing) when ``compute``; otherwise the
        delayed write.
    """
    zarr = _zarr()
    if not isinstance(y, da.Array):
        raise TypeError(f"y must be a Dask array, got {type(y).__name__}")
    if any(np.isnan(c) for cs in y.chunks for c in cs):
        raise ValueError("y has unknown (nan) chunk sizes; call y.compute_chunk_sizes() first")
    taken = sorted({"shape", "dtype", "chunks", "data"} & set(zarr_kwargs))
    if taken:
        raise TypeError(f"to_zarr takes {', '.join(taken)} from y; do not pass {taken[0]}=")
    if zarr_kwargs.get("shards") is not None:
        # several blocks would rewrite one shard file concurrently, and without a lock lose data
        raise ValueError("shards= is not supported: each Dask block is written as one zarr chunk")
    if not is_numpy(y._meta):  # device blocks (CuPy): zarr writes host buffers
        from dask.array.dispatch import to_numpy_dispatch

        y = y.map_blocks(to_numpy_dispatch, dtype=y.dtype, meta=np.empty((0,) * y.ndim, y.dtype))
    irregular = {ax: max(c) for ax, c in enumerate(y.chunks) if not _regular(c)}
    if irregular:
        y = y.rechunk(irregular)
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    _refuse_memory_store_under_distributed(url)  # before creating: overwrite=True would erase
    z = zarr.create_array(
        store=url,
        name=component,
        shape=y.shape,
        dtype=y.dtype,
        chunks=tuple(max(c[0], 1) for c in y.chunks),
        overwrite=overwrite,
        **zarr_kwargs,
    )
    stored = da.store(y, z, lock=False, compute=compute)
    return z if compute else stored


def _refuse_memory_store_under_distributed(store):
    """A zarr ``MemoryStore`` (or a dict, which zarr wraps in one) lives in this process, and
    distributed pickles every task, even for workers in this process: each write would go into
    a copy of the store and be lost (dask's ``to_zarr`` refuses the same:
    https://github.com/dask/dask/pull/10422)."""
    from zarr.storage import MemoryStore

    if isinstance(store, (MemoryStore, dict)) and active_client() is not None:
        raise ValueError(
            "cannot write into an in-memory zarr store with a distributed client (the workers "
            "would write into copies of it and the result would be lost): give a path, or a "
            "store that every worker can reach"
        )


def conv2d_to_zarr(
    src,
    dst,
    w,
    b=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    tile=None,
    component=None,
    dst_component=None,
    overwrite=False,
    **zarr_kwargs,
):
    """Convolve an image in a zarr store into a new zarr store, tile by tile.

    ``to_zarr(conv2d(open_image(src, component, tile), w, b, ...), dst, ...)``: every output
    tile is computed from its input tile plus halo strips of its neighbours and written as one
    chunk of ``dst``, so memory per worker stays at a few tiles for any image size.

    Parameters
    ----------
    src : str, os.PathLike, zarr store or zarr.Array
        The input image, ``(N, C, H, W)`` (or ``(H, W)``, ``(C, H, W)``; see
        :func:`open_image`).
    dst : str, os.PathLike or zarr store
        Where to write the output ``(N, O, oH, oW)``.
    w, b, stride, padding, dilation, groups
        As in :func:`dask_pconv.conv2d`; ``oH = floor((H + 2*ph - dy*(kh-1) - 1) / sy) + 1``.
    tile : int or (int, int), optional
        Input tile size; ``None`` keeps the store's chunks.  The output chunks are the input
        tiles through the stride.
    component, dst_component : str, optional
        Array paths inside zarr groups, for ``src`` and ``dst``.
    overwrite : bool
        Replace an existing output array.
    **zarr_kwargs
        Passed to ``zarr.create_array`` for the output.

    Returns
    -------
    zarr.Array
        The output array.
    """
    _check_not_in_place(src, component, dst, dst_component)
    x = open_image(src, component, tile)
    y = conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return to_zarr(y, dst, dst_component, overwrite=overwrite, **zarr_kwargs)


def features_to_zarr(
    model, src, dst, blocks=5, tile=None, component=None, dst_component=None, overwrite=False, **zarr_kwargs
):
    """Run a model's convolutional feature stack over an image in a zarr store into another.

    ``to_zarr(model.features(open_image(src, component, tile), blocks), dst, ...)``: for
    :class:`~dask_pconv.models.VGG16`, the 3x3 convs, BatchNorm with the running statistics
    (evaluation mode) and ReLU, and the 2x2 max-pools of the first ``blocks`` blocks, each
    layer tile by tile with halos, so the result equals the unsplit network's.  With a
    ``distributed`` client active, the model's NumPy weights are scattered to the workers once
    instead of travelling inside the graph; ``model`` itself is not changed.

    Parameters
    ----------
    model : object with a ``features(x, blocks)`` method
        E.g. :class:`dask_pconv.models.VGG16` (any image size, ``H, W >= 2**blocks``).
    src, dst, component, dst_component, overwrite, **zarr_kwargs
        As in :func:`conv2d_to_zarr`.
    blocks : int
        How many conv blocks (each ending in a pool) to run.
    tile : int or (int, int), optional
        Input tile size; multiples of ``2**blocks`` keep every layer's tiles aligned with the
        pools.  ``None`` keeps the store's chunks.

    Returns
    -------
    zarr.Array
        The features ``(N, C_out, H / 2**blocks, W / 2**blocks)`` (floor at each pool).
    """
    _check_not_in_place(src, component, dst, dst_component)
    x = open_image(src, component, tile)
    model = _weights_on_workers(model)
    return to_zarr(model.features(x, blocks), dst, dst_component, overwrite=overwrite, **zarr_kwargs)


def predict_to_zarr(
    model, src, dst, tile=None, component=None, dst_component=None, overwrite=False, **zarr_kwargs
):
    """Run a fully convolutional model over an image in a zarr store into another, tile by tile.

    ``to_zarr(model.predict(open_image(src, component, tile)), dst, ...)``: every layer in
    evaluation mode (BatchNorm's running statistics, no dropout), each on the tiles of its
    input with the halos its window needs from the neighbouring tiles, so the result equals
    the module run on the whole image, and memory stays bounded by a few tiles per worker
    (the halos grow with the receptive field, layer by layer).  With a ``distributed`` client
    active, the model's NumPy weights are scattered to the workers once instead of travelling
    inside the graph; ``model`` itself is not changed.

    Parameters
    ----------
    model : dask_pconv.models.Model
        E.g. from :func:`dask_pconv.from_torch`: any model whose output is an image
        ``(N, C_out, H_out, W_out)`` (a segmentation network); its ``input_shape``, if set,
        must allow the image's size.
    src, dst, component, dst_component, overwrite, **zarr_kwargs
        As in :func:`conv2d_to_zarr`.
    tile : int or (int, int), optional
        Input tile size; ``None`` keeps the store's chunks.  A network that pools or strides by
        ``f`` overall keeps every layer's tiles aligned with tiles that are multiples of ``f``.

    Returns
    -------
    zarr.Array
        The prediction, chunked like the output's tiles.

    Raises
    ------
    ValueError
        If the model's output is not 4-D (a classifier's logits are not an image: use
        ``dp.to_zarr(model.predict(x), ...)``), or ``dst`` is the input array.
    """
    _check_not_in_place(src, component, dst, dst_component)
    x = open_image(src, component, tile)
    y = _weights_on_workers(model).predict(x)
    if y.ndim != 4:
        raise ValueError(
            f"predict_to_zarr writes an image, but the model's output has shape {y.shape}; "
            "for a classifier's logits use dp.to_zarr(model.predict(x), dst)"
        )
    return to_zarr(y, dst, dst_component, overwrite=overwrite, **zarr_kwargs)


def _weights_on_workers(model):
    """``model``, or with a ``distributed`` client active, a shallow copy of it whose NumPy
    parameters and state are scattered to the workers once (instead of inside the graph)."""
    client = active_client()
    if client is None or not isinstance(getattr(model, "params", None), dict):
        return model
    model = copy.copy(model)
    model.params = scatter_arrays(model.params, client)
    model.state = scatter_arrays(getattr(model, "state", {}), client)
    return model


def _check_not_in_place(src, component, dst, dst_component):
    """Refuse ``dst`` naming the input array: creating the output (``overwrite=True``) would
    erase the input before the graph reads it."""
    if not all(isinstance(u, (str, os.PathLike)) for u in (src, dst)):
        return
    same = os.path.realpath(os.fspath(src)) == os.path.realpath(os.fspath(dst))
    if same and (component or "").strip("/") == (dst_component or "").strip("/"):
        raise ValueError(
            f"dst is the input array ({os.fspath(dst)!r}, component {dst_component!r}): writing it "
            "would erase the input first; write to another store or component"
        )
