"""Images larger than memory: read from a chunked store, compute tile by tile, write back.

    import dask_pconv as dp
    x = dp.open_image("big.zarr", tile=1024)            # lazy (N, C, H, W), 1024x1024 tiles
    dp.to_zarr(dp.conv2d(x, w, padding="same"), "out.zarr")
    # or in one call, each output tile from its own input window:
    dp.conv2d_to_zarr("big.zarr", "out.zarr", w, padding="same", tile=1024)
    dp.predict_to_zarr(model, "big.zarr", "masks.zarr", tile=1024)

The ``*_to_zarr`` calls run every output tile as one task that reads the input window the
tile's receptive field covers, runs the layers on it and writes the tile into its own chunk of
the output (:mod:`dask_pconv.tiled`): no task waits for another, so a worker holds one
window's working set per thread whatever the size of the image, a lost worker's tiles are
recomputed (the model travels in the graph, once), and a tile whose working set would not fit
the workers' memory is refused before anything runs.

Nothing is lost: no call writes over its own input, however source and destination are named
(paths, stores, groups, opened arrays, components); an output is marked incomplete
(``attrs["dask_pconv"]["complete"] = False``) until its last chunk is written, the readers of
this package refuse an incomplete array, and ``resume=True`` finishes an interrupted run
without recomputing the chunks already written.  Needs the ``zarr`` extra
(``pip install 'dask-pconv[zarr]'``, zarr 3).
"""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from . import geometry as geo
from . import tiled
from ._client import active_client
from .backend import is_numpy, to_host

__all__ = ["conv2d_to_zarr", "features_to_zarr", "open_image", "predict_to_zarr", "to_zarr"]

_EXTRA_HINT = "pip install 'dask-pconv[zarr]'"
#: the attribute an output of this package carries: ``{"complete": bool, "job": token}``
MARK = "dask_pconv"


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


def _check_complete(z):
    """Refuse an array that a run of this package left incomplete (interrupted, or a worker
    failed): its unwritten chunks read as the fill value, which looks like data."""
    mark = z.attrs.get(MARK)
    if isinstance(mark, dict) and mark.get("complete") is False:
        raise ValueError(
            f"the zarr array {_describe(z)} is incomplete: the run writing it was interrupted; "
            "finish it with the same call and resume=True, or rerun it with overwrite=True"
        )


def _describe(z):
    return f"{str(z.store)!r}" + (f", component {z.path!r}" if z.path else "")


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
        ``url``/``component`` is a group (the message lists its arrays), the array is not
        2-, 3- or 4-D, or a run of this package left it incomplete (see :func:`to_zarr`).
    """
    z = _open_array(url, component)
    _check_complete(z)
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

    The array is created with ``attrs["dask_pconv"] = {"complete": False, ...}`` and marked
    complete once every block is written; :func:`open_image` refuses an incomplete array (a
    run that was interrupted or lost its workers), so that unwritten chunks never read as data.

    Parameters
    ----------
    y : dask.array.Array
        What to write; its graph runs on the active scheduler (a ``distributed.Client`` if
        there is one).  It must not read from the array being written: a ``y`` that reads
        (through :func:`open_image` or ``dask.array.from_zarr``) from the destination, an
        array inside it or a group holding it is refused before anything is written.
    url : str or os.PathLike or zarr store
        Where to create the array (a directory store for a path).  An in-memory store is
        refused while a ``distributed.Client`` is active: the workers would write into copies
        of it.
    component : str, optional
        Name of the array inside a zarr group at ``url``.
    overwrite : bool
        Replace an existing array; otherwise an existing one is an error (``FileExistsError``).
    compute : bool
        Run now (default) or return a ``dask.delayed`` object whose computation writes every
        block and then marks the array complete.
    **zarr_kwargs
        Passed to ``zarr.create_array`` (``compressors=``, ``fill_value=``, ...); ``shape``,
        ``dtype`` and ``chunks`` come from ``y``, and ``shards`` is refused (blocks sharing a
        shard would overwrite each other's writes).  Device (CuPy) blocks are copied to the
        host block by block.

    Returns
    -------
    zarr.Array or dask.delayed.Delayed
        The written array (opened for reading and writing) when ``compute``; otherwise the
        lazy write.
    """
    if not isinstance(y, da.Array):
        raise TypeError(f"y must be a Dask array, got {type(y).__name__}")
    if any(np.isnan(c) for cs in y.chunks for c in cs):
        raise ValueError("y has unknown (nan) chunk sizes; call y.compute_chunk_sizes() first")
    _check_kwargs(zarr_kwargs)
    for source in _zarr_sources(y):
        _check_not_in_place(source, None, url, component)
    if not is_numpy(y._meta):  # device blocks (CuPy): zarr writes host buffers
        from dask.array.dispatch import to_numpy_dispatch

        y = y.map_blocks(to_numpy_dispatch, dtype=y.dtype, meta=np.empty((0,) * y.ndim, y.dtype))
    irregular = {ax: max(c) for ax, c in enumerate(y.chunks) if not _regular(c)}
    if irregular:
        y = y.rechunk(irregular)
    chunks = tuple(max(c[0], 1) for c in y.chunks)
    z = _create(url, component, y.shape, y.dtype, chunks, overwrite, tokenize(y.name), dict(zarr_kwargs))
    stored = da.store(y, z, lock=False, compute=compute)
    if not compute:
        # one task after every block's write marks the array complete
        return dask.delayed(_finish, pure=False)(z, *stored.to_delayed().ravel())
    _mark_complete(z)
    return z


def _finish(z, *written):
    _mark_complete(z)


def _check_kwargs(zarr_kwargs, caller="to_zarr", source="y"):
    """Refuse ``zarr.create_array`` arguments that the calls here set, or that would lose data."""
    taken = sorted({"shape", "dtype", "chunks", "data"} & set(zarr_kwargs))
    if taken:
        raise TypeError(f"{caller} takes {', '.join(taken)} from {source}; do not pass {taken[0]}=")
    if zarr_kwargs.get("shards") is not None:
        # several blocks would rewrite one shard file concurrently, and without a lock lose data
        raise ValueError("shards= is not supported: each Dask block is written as one zarr chunk")


def _zarr_sources(y):
    """The zarr arrays the graph of ``y`` reads (``dask.array.from_zarr`` keeps each as the one
    value of a layer named ``original-...``)."""
    zarr = _zarr()
    out = []
    for name, layer in y.__dask_graph__().layers.items():
        if str(name).startswith("original-"):
            out += [v for v in layer.values() if isinstance(v, zarr.Array)]
    return out


def _create(url, component, shape, dtype, chunks, overwrite, job, zarr_kwargs, resumable=False):
    """A new zarr array marked incomplete (``job`` names what will write it), every chunk
    written even where it equals the fill value (so that a written chunk is one that exists)."""
    zarr = _zarr()
    from zarr.errors import ContainsArrayError, ContainsGroupError

    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    _refuse_memory_store_under_distributed(url)  # before creating: overwrite=True would erase
    config = {"write_empty_chunks": True, **zarr_kwargs.pop("config", {})}
    attributes = {**zarr_kwargs.pop("attributes", {}), MARK: {"complete": False, "job": job}}
    try:
        return zarr.create_array(
            store=url,
            name=component,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            overwrite=overwrite,
            config=config,
            attributes=attributes,
            **zarr_kwargs,
        )
    except (ContainsArrayError, ContainsGroupError) as e:
        where = f"{url!r}" + (f", component {component!r}" if component else "")
        raise FileExistsError(
            f"{where} already exists (a zarr array or group): pass overwrite=True to replace it"
            + (", or resume=True to finish an interrupted run of the same call" if resumable else "")
        ) from e


def _mark_complete(z):
    z.update_attributes({MARK: {**z.attrs[MARK], "complete": True}})


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


# -- where an array lives, to refuse writing over the input ----------------------------------
def _location(url, component):
    """``(store, path)``: the store as a string and the path of the array inside it, as a
    tuple of names.  A directory (a path, a ``file://`` URL or a ``LocalStore``) is
    ``("file://", <the names of its real path> + <component>)``, so that an array and the
    directory store holding it compare by path; any other store is zarr's own ``str()``
    (``memory://<id>``, ``s3://bucket/...``) with the component's names."""
    zarr = _zarr()
    from zarr.storage import LocalStore

    parts = tuple(p for p in (component or "").split("/") if p)
    if isinstance(url, (zarr.Array, zarr.Group)):
        return _location(url.store, url.path + "/" + "/".join(parts))
    if isinstance(url, LocalStore):
        url = url.root
    if isinstance(url, (str, os.PathLike)):
        url = os.fspath(url)
        if "://" not in url or url.startswith("file://"):
            return "file://", tuple(
                p for p in os.path.realpath(url.removeprefix("file://")).split(os.sep) if p
            ) + parts
        return url.rstrip("/"), parts
    return str(url), parts


def _check_not_in_place(src, component, dst, dst_component):
    """Refuse a destination that is the input array, an array inside it or a group that holds
    it: creating the output (``overwrite=True``) would erase the input before it is read, and
    writing into it would change the input."""
    (s_store, s_path), (d_store, d_path) = _location(src, component), _location(dst, dst_component)
    n = min(len(s_path), len(d_path))
    if s_store == d_store and s_path[:n] == d_path[:n]:
        what = (
            "is the input array"
            if s_path == d_path
            else ("holds the input" if n == len(d_path) else "lies inside the input")
        )
        where = "/" + "/".join(d_path) if d_store == "file://" else f"{d_store}, path {'/'.join(d_path)!r}"
        raise ValueError(
            f"dst {what} ({where}): writing it would erase the input (or change it); write to "
            "another store or component"
        )


# -- the tiled calls --------------------------------------------------------------------------
def _check_dtype(src_dtype, dtype):
    """The one rule for images: a float image is cast to the computation's float dtype (as
    PyTorch's ``.float()``), an integer one only where the cast is exact (uint8/uint16/int8/
    int16 into float32, up to 32-bit integers into float64); anything else is refused."""
    src_dtype = np.dtype(src_dtype)
    if np.issubdtype(src_dtype, np.floating):
        return
    if np.issubdtype(src_dtype, np.integer) and np.can_cast(src_dtype, dtype, "safe"):
        return
    if np.issubdtype(src_dtype, np.integer):
        raise TypeError(
            f"the image's dtype {src_dtype} does not convert exactly to the computation's {np.dtype(dtype)}; "
            "convert the image (or compute in float64)"
        )
    raise TypeError(f"the image must hold real numbers (float or integer), got dtype {src_dtype}")


def _run_tiles(model, until, src, component, dst, dst_component, tile, overwrite, resume, zarr_kwargs):
    """Write ``model``'s output (node ``until``'s) over the image at ``src`` into ``dst``, each
    output tile by a task of its own (:mod:`dask_pconv.tiled`)."""
    _check_kwargs(zarr_kwargs, "a tiled run", "the model and the image")
    _check_not_in_place(src, component, dst, dst_component)
    z_in = _open_array(src, component)
    _check_complete(z_in)
    if z_in.ndim not in (2, 3, 4):
        raise ValueError(f"an image array must be (H, W), (C, H, W) or (N, C, H, W), got shape {z_in.shape}")
    lead = 4 - z_in.ndim
    shape = (1,) * lead + tuple(z_in.shape)
    store_chunks = (1,) * lead + tuple(z_in.chunks)
    _check_dtype(z_in.dtype, model.dtype)
    # the shapes and every layer's checks, on a placeholder of the image's shape (one chunk,
    # nothing computed): errors now, not in a worker
    y = tiled.output_of(model, shape, until)
    if y.ndim != 4:
        raise ValueError(
            f"a tiled run writes an image, but the model's output has shape {y.shape}; "
            "for a classifier's logits use dp.to_zarr(model.predict(x), dst)"
        )
    tile = geo.normalize_pair(tile, "tile") if tile is not None else tuple(store_chunks[2:])
    plan = tiled.plan(model, shape, tile, until)
    n_chunks = da.core.normalize_chunks(store_chunks[0], (shape[0],))[0]
    _check_fits(model, until, shape, store_chunks[0], store_chunks[2:], plan, tile, z_in.dtype.itemsize)
    out_chunks = (store_chunks[0], y.shape[1]) + tuple(
        axis.outputs[0][1] - axis.outputs[0][0] for axis in plan[:2]
    )
    job = tokenize(
        model.program,
        model.params,
        model.state,
        model.dtype,
        until,
        _location(src, component),
        shape,
        z_in.dtype,
        store_chunks[0],
        tile,
    )
    z, skip = _output(dst, dst_component, y.shape, y.dtype, out_chunks, overwrite, resume, job, zarr_kwargs)
    if z is None:  # resume=True of a run that had finished
        return _open_array(dst, dst_component)
    graph = tiled.tile_graph(tiled.TileJob(model, until, lead), z_in, z, plan, n_chunks, job, skip)
    try:
        tiled.compute(graph, model)
    except KeyboardInterrupt:
        # what the user needs is where the output stands, not the scheduler's wait loop
        raise KeyboardInterrupt(
            f"interrupted: {_describe(z)} is marked incomplete; the same call with resume=True "
            "finishes it without recomputing the chunks written"
        ) from None
    _mark_complete(z)
    return z


def _output(dst, dst_component, shape, dtype, chunks, overwrite, resume, job, zarr_kwargs):
    """``(array, skip)``: the output array to write and the tiles already written (with
    ``resume``), or ``(None, ())`` when a resumed run had already finished."""
    zarr = _zarr()
    if resume and not overwrite:
        try:
            z = zarr.open_array(
                store=os.fspath(dst) if isinstance(dst, os.PathLike) else dst,
                path=dst_component or "",
                mode="r+",
            )
        except FileNotFoundError:
            z = None
        if z is not None:
            mark = z.attrs.get(MARK)
            if not isinstance(mark, dict) or mark.get("job") != job or z.shape != shape or z.chunks != chunks:
                raise ValueError(
                    f"cannot resume: {_describe(z)} was not written by this call with these "
                    "arguments (another model, input, tile or chunking); pass overwrite=True to replace it"
                )
            if mark.get("complete"):
                return None, ()
            return z, tiled.written_tiles(z)
    return _create(
        dst, dst_component, shape, dtype, chunks, overwrite, job, dict(zarr_kwargs), True
    ), frozenset()


def _check_fits(model, until, shape, n_chunk, store_hw, plan, tile, src_itemsize):
    """Refuse, before anything runs, a tile whose working set does not fit the memory a worker
    of the active client has free for each of its threads (below the pause threshold)."""
    client = active_client()
    if client is None:
        return
    room = tiled.worker_room(client)
    if room is None:
        return
    batch = max(da.core.normalize_chunks(n_chunk, (shape[0],))[0])
    grid = tuple((c, -(-n // c)) for c, n in zip(store_hw, shape[2:]))
    need = tiled.tile_working_set(model, shape[1], batch, plan.largest_window(), src_itemsize, until, grid)
    if need <= room:
        return
    fits = tiled.fitting_tile(model, until, shape, batch, tile, src_itemsize, room, grid)
    MiB = 2**20
    if fits:
        hint = f"tile={fits} fits"
    else:
        hint = (
            f"no tile fits: the store's chunks {tuple(store_hw)} take too much to decode (rechunk "
            "the input), or give the workers more memory or fewer threads"
        )
    raise MemoryError(
        f"tile={tuple(tile)} needs about {need / MiB:.0f} MiB per task (its input window "
        f"{plan.largest_window()}, the store chunks it decodes and every layer's output on it), "
        f"more than the {room / MiB:.0f} MiB a worker has free per thread; {hint}"
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
    resume=False,
    **zarr_kwargs,
):
    """Convolve an image in a zarr store into a new zarr store, tile by tile.

    The result is ``conv2d(open_image(src, component), w, b, ...)`` written to ``dst``; each
    output tile is computed by one task from its input window (the tile plus the kernel's
    reach, zero padding only at the image's edge) and written as one chunk of ``dst``, so a
    worker holds one window per thread for any image size.

    Parameters
    ----------
    src : str, os.PathLike, zarr store or zarr.Array
        The input image, ``(N, C, H, W)`` (or ``(H, W)``, ``(C, H, W)``; see
        :func:`open_image`).  Float images are cast to the computation's dtype (``w``'s, or
        float64 for a float64 image); integer images only where that is exact (uint8, uint16
        into float32), otherwise ``TypeError``.
    dst : str, os.PathLike or zarr store
        Where to write the output ``(N, O, oH, oW)``.
    w, b, stride, padding, dilation, groups
        As in :func:`dask_pconv.conv2d`; ``oH = floor((H + 2*ph - dy*(kh-1) - 1) / sy) + 1``.
    tile : int or (int, int), optional
        Input tile size; ``None`` keeps the store's chunks.  The output chunks are the tiles
        through the stride.
    component, dst_component : str, optional
        Array paths inside zarr groups, for ``src`` and ``dst``.
    overwrite : bool
        Replace an existing output array.
    resume : bool
        Finish an output that the same call (same arguments) left incomplete, computing only
        the tiles not yet written; an output written by another call is refused.
    **zarr_kwargs
        Passed to ``zarr.create_array`` for the output.

    Returns
    -------
    zarr.Array
        The output array.

    Raises
    ------
    ValueError
        ``dst`` is the input, inside it or a group holding it (before anything is written).
    FileExistsError
        ``dst`` exists and neither ``overwrite`` nor ``resume`` is given.
    MemoryError
        With a ``distributed`` client, a tile's working set does not fit a worker's free
        memory per thread; the message suggests a tile that fits.
    """
    model = _conv_model(_open_array(src, component), w, b, stride, padding, dilation, groups)
    return _run_tiles(model, None, src, component, dst, dst_component, tile, overwrite, resume, zarr_kwargs)


def _conv_model(z_in, w, b, stride, padding, dilation, groups):
    """A one-layer model of the convolution :func:`conv2d_to_zarr` writes, computing in
    ``w``'s dtype (float64 for a float64 image)."""
    from .models import Conv2d, Model, sequential

    w, b = (
        None if a is None else np.asarray(to_host(a.compute() if isinstance(a, da.Array) else a))
        for a in (w, b)
    )
    if w.ndim != 4 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(
            f"w must be a 4-D float array (O, C/groups, kh, kw), got shape {w.shape} dtype {w.dtype}"
        )
    dtype = np.result_type(w.dtype, z_in.dtype) if np.issubdtype(z_in.dtype, np.floating) else w.dtype
    channels = z_in.shape[-3] if z_in.ndim >= 3 else 1
    layer = Conv2d(channels, w.shape[0], w.shape[2:], stride, padding, b is not None, dilation, groups)
    model = Model(sequential(("conv", layer)), dtype=dtype)
    model.load_params({"conv.W": w} if b is None else {"conv.W": w, "conv.b": b})
    return model


def features_to_zarr(
    model,
    src,
    dst,
    blocks=5,
    tile=None,
    component=None,
    dst_component=None,
    overwrite=False,
    resume=False,
    **zarr_kwargs,
):
    """Run a model's convolutional feature stack over an image in a zarr store into another.

    The result is ``model.features(open_image(src, component), blocks)`` written to ``dst``:
    for :class:`~dask_pconv.models.VGG16`, the 3x3 convs, BatchNorm with the running
    statistics (evaluation mode) and ReLU, and the 2x2 max-pools of the first ``blocks``
    blocks, each output tile by one task from its input window (:func:`predict_to_zarr`), so
    the result equals the unsplit network's.  ``model`` is not changed.

    Parameters
    ----------
    model : dask_pconv.models.VGG16
        Or any model with a ``feature_node(blocks)`` method naming the node to write.
    src, dst, component, dst_component, overwrite, resume, **zarr_kwargs
        As in :func:`conv2d_to_zarr`.
    blocks : int
        How many conv blocks (each ending in a pool) to run.
    tile : int or (int, int), optional
        Input tile size; ``None`` keeps the store's chunks.

    Returns
    -------
    zarr.Array
        The features ``(N, C_out, H / 2**blocks, W / 2**blocks)`` (floor at each pool).
    """
    if not hasattr(model, "feature_node"):
        raise TypeError(
            f"features_to_zarr needs a model with feature blocks (VGG16), got {type(model).__name__}"
        )
    until = model.feature_node(blocks)
    return _run_tiles(model, until, src, component, dst, dst_component, tile, overwrite, resume, zarr_kwargs)


def predict_to_zarr(
    model,
    src,
    dst,
    tile=None,
    component=None,
    dst_component=None,
    overwrite=False,
    resume=False,
    **zarr_kwargs,
):
    """Run a fully convolutional model over an image in a zarr store into another, tile by tile.

    The result is ``model.predict(open_image(src, component))`` (evaluation mode: BatchNorm's
    running statistics, no dropout) written to ``dst``.  Each output tile is computed by one
    task that reads the input window the tile's receptive field covers (aligned to the
    network's overall stride), runs every layer on it and writes the tile into its own chunk
    of ``dst``.  Zero padding is added only at the image's true edges, so the result equals
    the module run on the whole image, to rounding.

    Memory: a worker holds, per thread, one tile's working set: the input window (the tile
    plus the network's reach on each side) and the layer outputs alive at once while the
    network runs on it, about ``itemsize * N_chunk * (T_h + 2 r)(T_w + 2 r) * sum of the live
    channels per pixel`` (``r`` the reach, layer outputs at lower resolution counting
    proportionally less), whatever the size of the image; see docs/tiled.rst.  With a
    ``distributed`` client, a tile that would not fit below a worker's pause threshold is
    refused before the run with a tile that fits.

    The model travels in the graph once (not once per tile), so a lost worker's tiles are
    recomputed and the output is the one an unfaulted run writes.

    Parameters
    ----------
    model : dask_pconv.models.Model
        E.g. from :func:`dask_pconv.from_torch`: any model whose output is an image
        ``(N, C_out, H_out, W_out)`` (a segmentation network) and whose layers read bounded
        windows (no global pooling, Flatten or Linear); its ``input_shape``, if set, must
        allow the image's size.
    src, dst, component, dst_component, overwrite, resume, **zarr_kwargs
        As in :func:`conv2d_to_zarr`; the image is cast to the model's dtype by the rule
        stated there.
    tile : int or (int, int), optional
        Input tile size; ``None`` keeps the store's chunks.  The output tiles (and chunks)
        are ``tile`` times the network's output scale.

    Returns
    -------
    zarr.Array
        The prediction, chunked like the output's tiles.

    Raises
    ------
    ValueError
        If the model's output is not 4-D (a classifier's logits are not an image: use
        ``dp.to_zarr(model.predict(x), ...)``), a layer reads its whole input, or ``dst`` is
        the input (or inside it, or holds it).
    FileExistsError, MemoryError
        As in :func:`conv2d_to_zarr`.
    """
    return _run_tiles(model, None, src, component, dst, dst_component, tile, overwrite, resume, zarr_kwargs)
