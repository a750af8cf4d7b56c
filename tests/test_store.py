"""Chunked stores: zarr in, conv2d or the VGG16 feature stack tile by tile, zarr out.

The cluster tests run an image about 4x the workers' total memory limit through a 2-worker
LocalCluster and check each worker's peak resident memory against its limit.
"""

import os

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from clusters import local_cluster

import dask_pconv as dp
from dask_pconv.models import VGG16
from dask_pconv.profiling import peak_memory

from strategies import assert_close

# CI installs the zarr extra: there a missing zarr is a failure, not a skip
zarr = __import__("zarr") if os.environ.get("CI") else pytest.importorskip("zarr", reason=optional.ZARR)

MiB = 2**20


def _pattern(block_info=None):
    """A block of a cheap test image that changes sharply from pixel to pixel, a pure function
    of the global indices (no block needs another, so writing the image holds one block at a
    time)."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"][-2:]
    r, c = np.arange(r0, r1, dtype=np.float64), np.arange(c0, c1, dtype=np.float64)
    out = np.add.outer(np.sin(0.37 * r).astype("f4"), np.cos(0.61 * c).astype("f4"))
    out *= (1 + 0.5 * np.sin(0.13 * r).astype("f4"))[:, None]
    return out[None, None]


def _image(shape, chunks):
    """A lazy (1, 1, H, W) image of :func:`_pattern` blocks."""
    return da.map_blocks(
        _pattern, chunks=da.core.normalize_chunks((1, 1) + chunks, (1, 1) + shape), dtype="f4"
    )


def _conv_ref(z, w, rows, cols):
    """Direct 'same' correlation (zero padding) of the single-channel image in ``z`` over the
    output region ``rows x cols``, from the input region plus its halo read from the store."""
    kh, kw = w.shape[-2:]
    ph, pw = kh // 2, kw // 2
    H, W = z.shape[-2:]
    (r0, r1), (c0, c1) = rows, cols
    a0, a1, b0, b1 = max(r0 - ph, 0), min(r1 + ph, H), max(c0 - pw, 0), min(c1 + pw, W)
    xin = np.zeros((r1 - r0 + 2 * ph, c1 - c0 + 2 * pw))
    xin[a0 - (r0 - ph) : a1 - (r0 - ph), b0 - (c0 - pw) : b1 - (c0 - pw)] = z[0, 0, a0:a1, b0:b1]
    out = np.zeros((w.shape[0], r1 - r0, c1 - c0))
    for o in range(w.shape[0]):
        for i in range(kh):
            for j in range(kw):
                out[o] += w[o, 0, i, j] * xin[i : i + r1 - r0, j : j + c1 - c0]
    return out


def _vgg(in_channels, seed):
    """VGG16 of width 1/8 with running BatchNorm statistics far from (0, 1)."""
    m = VGG16(width=0.125, in_channels=in_channels, seed=seed)
    rng = np.random.default_rng(seed)
    state = {
        k: (rng.random(v.shape) + (0.5 if "var" in k else -0.5)).astype("f4") for k, v in m.state.items()
    }
    m.load_params(m.params, state)
    return m


# -- unit tests (synchronous scheduler) ------------------------------------------------------


def test_open_image_shapes_tiles_and_errors(tmp_path):
    a = np.arange(6 * 10, dtype="f4").reshape(6, 10)
    zarr.create_array(str(tmp_path / "a2.zarr"), data=a, chunks=(3, 5))
    x = dp.open_image(tmp_path / "a2.zarr")
    assert x.shape == (1, 1, 6, 10) and x.chunks == ((1,), (1,), (3, 3), (5, 5))
    np.testing.assert_array_equal(x.compute()[0, 0], a)
    x = dp.open_image(tmp_path / "a2.zarr", tile=(4, 6))
    assert x.chunks[2:] == ((4, 2), (6, 4))
    np.testing.assert_array_equal(x.compute()[0, 0], a)
    b = np.stack([a, -a])
    zarr.create_array(str(tmp_path / "a3.zarr"), data=b, chunks=(1, 6, 10))
    x = dp.open_image(tmp_path / "a3.zarr", tile=5)
    assert x.shape == (1, 2, 6, 10) and x.chunks == ((1,), (1, 1), (5, 1), (5, 5))
    np.testing.assert_array_equal(x.compute()[0], b)

    with pytest.raises(FileNotFoundError, match="no zarr store"):
        dp.open_image(tmp_path / "missing.zarr")
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("img", shape=(4, 4), dtype="f4")
    with pytest.raises(ValueError, match=r"is a zarr group.*\['img'\]"):
        dp.open_image(tmp_path / "g.zarr")
    with pytest.raises(FileNotFoundError, match="no zarr array"):
        dp.open_image(tmp_path / "g.zarr", component="nope")
    assert dp.open_image(tmp_path / "g.zarr", component="img").shape == (1, 1, 4, 4)
    zarr.create_array(str(tmp_path / "a1.zarr"), shape=(5,), dtype="f4")
    with pytest.raises(ValueError, match=r"\(H, W\), \(C, H, W\) or \(N, C, H, W\)"):
        dp.open_image(tmp_path / "a1.zarr")


def test_missing_zarr_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'dask-pconv\[zarr\]'"):
        dp.open_image(tmp_path / "x.zarr")
    with pytest.raises(ImportError, match=r"dask-pconv\[zarr\]"):
        dp.to_zarr(da.zeros((2, 2)), tmp_path / "y.zarr")


def test_to_zarr_writes_blocks_and_regularises_chunks(tmp_path):
    x = da.from_array(np.arange(7 * 9, dtype="f4").reshape(1, 1, 7, 9), chunks=(1, 1, (2, 5), (4, 4, 1)))
    z = dp.to_zarr(x, tmp_path / "o.zarr")
    assert z.chunks == (1, 1, 5, 4)  # rows (2, 5) are not regular: rechunked to 5
    np.testing.assert_array_equal(z[...], x.compute())
    with pytest.raises(Exception, match="exist"):
        dp.to_zarr(x, tmp_path / "o.zarr")
    z = dp.to_zarr(2 * x, tmp_path / "o.zarr", overwrite=True)
    np.testing.assert_array_equal(z[...], 2 * x.compute())
    delayed = dp.to_zarr(x + 1, tmp_path / "d.zarr", compute=False)
    assert not np.any(zarr.open_array(str(tmp_path / "d.zarr"), mode="r")[...])  # nothing written yet
    with pytest.raises(ValueError, match="incomplete"):
        dp.open_image(tmp_path / "d.zarr")
    delayed.compute()
    assert dp.open_image(tmp_path / "d.zarr").shape == x.shape  # marked complete by the last task
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d.zarr"), mode="r")[...], x.compute() + 1)
    with pytest.raises(TypeError, match="Dask array"):
        dp.to_zarr(np.zeros(3), tmp_path / "n.zarr")


def test_conv2d_to_zarr_equals_conv2d(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 23, 17)).astype("f4")
    w = rng.standard_normal((4, 3, 3, 3)).astype("f4")
    b = rng.standard_normal(4).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 3, 8, 8))
    z = dp.conv2d_to_zarr(tmp_path / "x.zarr", tmp_path / "y.zarr", w, b, stride=2, padding=1, tile=(10, 6))
    expected = dp.conv2d(x, w, b, stride=2, padding=1).compute()
    assert z.shape == expected.shape == (2, 4, 12, 9)
    assert z.chunks == (1, 4, 5, 3)  # the tiles (10, 6) through the stride
    np.testing.assert_allclose(z[...], expected, rtol=1e-6, atol=1e-6)


def test_features_to_zarr_equals_features(tmp_path):
    m = _vgg(in_channels=2, seed=3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 64, 96)).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 2, 32, 32))
    z = dp.features_to_zarr(m, tmp_path / "x.zarr", tmp_path / "f.zarr", blocks=3, tile=32)
    expected = m.features(x, blocks=3).compute()
    assert z.shape == expected.shape == (1, 32, 8, 12)  # block 3 of width 1/8: 32 channels
    np.testing.assert_allclose(z[...], expected, rtol=1e-5, atol=1e-5)


def _segmenter(in_channels=1, width=8, seed=0):
    """A small fully convolutional model (per-pixel logits at half resolution), with running
    statistics that are not the initial ones."""
    from dask_pconv.models import BatchNorm, Conv2d, MaxPool2d, Model, sequential

    program = sequential(
        ("c1", Conv2d(in_channels, width, 3, padding=1)),
        ("bn1", BatchNorm(width, relu=True)),
        ("pool", MaxPool2d(2)),
        ("c2", Conv2d(width, width, 3, padding=2, bias=True)),
        ("bn2", BatchNorm(width, relu=True)),
        ("head", Conv2d(width, 3, 1, bias=True)),
    )
    m = Model(program, seed=seed)
    rng = np.random.default_rng(seed)
    m.state = {k: (rng.random(v.shape) + 0.5).astype(v.dtype) for k, v in m.state.items()}
    return m


def test_predict_to_zarr_equals_predict_on_the_whole_image(tmp_path):
    m = _segmenter(in_channels=2, seed=3)
    x = np.random.default_rng(2).standard_normal((2, 2, 40, 56)).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 2, 20, 20))
    z = dp.predict_to_zarr(m, tmp_path / "x.zarr", tmp_path / "y.zarr", tile=(12, 16))
    with dask.config.set(scheduler="synchronous"):
        expected = m.predict(da.from_array(x)).compute()
    assert z.shape == expected.shape == (2, 3, 22, 30)  # (40, 56) / 2 by the pool, + 2 * 2 - 2
    assert z.chunks[:2] == (1, 3)
    assert_close(z[...], expected, np.float32)


def test_predict_to_zarr_runs_a_converted_pytorch_module(tmp_path):
    """A PyTorch U-Net-like module through ``from_torch``, zarr to zarr on tiles, equals the
    module on the whole image."""
    torch = optional.need_torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.down = nn.MaxPool2d(2)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e = self.enc(x)
            return self.head(torch.cat([self.up(self.down(e)), e], dim=1))

    torch.manual_seed(0)
    module = Net().eval()
    with torch.no_grad():
        module.enc[1].running_mean.uniform_(-0.5, 0.5)
        module.enc[1].running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(4).standard_normal((1, 1, 48, 40)).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 1, 16, 16))
    z = dp.predict_to_zarr(dp.from_torch(module), tmp_path / "x.zarr", tmp_path / "y.zarr", tile=(16, 8))
    with torch.no_grad():
        want = module(torch.tensor(x)).numpy()
    assert z.shape == want.shape == (1, 2, 48, 40)
    assert_close(z[...], want, np.float32)


def test_predict_to_zarr_refuses_a_model_whose_output_is_not_an_image(tmp_path):
    dp.to_zarr(da.zeros((1, 3, 32, 32), chunks=(1, 3, 16, 16), dtype="f4"), tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="for a classifier's logits use dp.to_zarr"):
        dp.predict_to_zarr(VGG16(width=0.125), tmp_path / "x.zarr", tmp_path / "y.zarr")
    with pytest.raises(ValueError, match="would erase the input"):
        dp.predict_to_zarr(_segmenter(3), tmp_path / "x.zarr", tmp_path / "x.zarr", overwrite=True)


# -- on a cluster: images several times the workers' memory ---------------------------------

# Dask's memory management would hide a graph that does not stream: spilling moves held blocks
# to disk and pausing throttles the worker.  Both are off, so resident memory is what the graph
# holds.  The nanny still restarts a worker at 95% of its limit (checked below as a lost worker).
# (The thresholds: https://distributed.dask.org/en/latest/worker-memory.html)
NO_SPILL = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}
# A worker process with NumPy, SciPy, Dask and zarr loaded holds about 95 MiB before any task;
# the runs below peak near 135 MiB, and the nanny restarts a worker at 95% of its limit.
LIMIT = 192 * MiB


def _distributed_malloc(monkeypatch):
    """distributed's own malloc settings for the workers: an earlier cluster's nanny (one that
    dask_pconv.connect started keeps 64 MiB of freed memory per worker) copies its settings
    into this process's environment, where they would override distributed's."""
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(monkeypatch):
    """A fresh cluster per test, so that each peak starts from a bare worker."""
    from distributed import Client

    _distributed_malloc(monkeypatch)

    # numpy kernels: PyTorch's import alone would cost each worker ~180 MiB
    with (
        dask.config.set({**NO_SPILL, "pconv.conv-kernel": "numpy"}),
        local_cluster(memory_limit=LIMIT) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _check_memory(mem, n_workers=2):
    assert mem["lost"] == [], f"workers restarted during the run: {mem['lost']}"
    assert len(mem["workers"]) == n_workers
    for addr, m in mem["workers"].items():
        print(
            f"{addr}: peak {m['peak'] / MiB:.0f} MiB (start {m['start'] / MiB:.0f}) of {m['limit'] / MiB:.0f}"
        )
        assert m["limit"] == LIMIT and m["samples"] > 10
        assert m["peak"] < m["limit"], f"{addr} peaked at {m['peak'] / MiB:.0f} MiB > {LIMIT / MiB:.0f} MiB"


@pytest.mark.cluster
def test_conv_zarr_to_zarr_4x_the_workers_memory(client, tmp_path):
    H, W = 24576, 16384  # 1.5 GiB of float32: 4x the 2 x 192 MiB of the workers
    tile = (32, W)  # 2 MiB stripes: a window needs only the strips above and below
    assert H * W * 4 >= 4 * 2 * LIMIT
    with dask.config.set(scheduler="threads"):  # the test image, a block per thread at a time
        dp.to_zarr(_image((H, W), tile), tmp_path / "x.zarr", compressors=None)
    w = np.array([[[[1, -2, 0.5], [3, 0.25, -1], [-0.5, 2, 1.5]]]], dtype="f4")
    with peak_memory(client) as mem:
        z = dp.conv2d_to_zarr(tmp_path / "x.zarr", tmp_path / "y.zarr", w, padding=1, compressors=None)
    _check_memory(mem)
    assert z.shape == (1, 1, H, W) and z.chunks == (1, 1) + tile
    x = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    # image corners (zero padding), stripe borders (halo from the neighbours), the middle
    for rows, cols in [
        ((0, 40), (0, 50)),
        ((30, 35), (1000, 1100)),
        ((H // 2 - 33, H // 2 + 33), (W // 2 - 7, W // 2 + 9)),
        ((H - 40, H), (W - 64, W)),
        ((H - 33, H - 31), (0, W)),
    ]:
        expected = _conv_ref(x, w, rows, cols)
        assert_close(z[0, :, slice(*rows), slice(*cols)], expected, np.float32)


@pytest.mark.cluster
def test_vgg_features_zarr_to_zarr_within_memory(client, tmp_path):
    m = _vgg(in_channels=1, seed=0)
    # 8 MiB in, but every layer's output is an image of its own: the first four are 8 channels
    # x 8 MiB = 64 MiB each, all of them together ~540 MiB, 1.4x the workers' 2 x 192 MiB
    H, W = 2048, 1024
    with dask.config.set(scheduler="synchronous"):
        dp.to_zarr(_image((H, W), (128, W)), tmp_path / "x.zarr")
    with peak_memory(client) as mem:
        z = dp.features_to_zarr(m, tmp_path / "x.zarr", tmp_path / "f.zarr")
    _check_memory(mem)
    assert z.shape == (1, m.params["block5_3.conv.W"].shape[0], H // 32, W // 32)
    # against the unsplit network on a corner and an inner region (their receptive fields
    # reach the image edge and stay inside it); equal values everywhere is
    # test_features_to_zarr_equals_features
    x = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    with dask.config.set(scheduler="synchronous"):
        corner = m.features(x[:, :, :256, :256]).compute()
        inner = m.features(x[:, :, 512:1024, 256:768]).compute()
    assert_close(z[:, :, :4, :4], corner[:, :, :4, :4], np.float32)
    assert_close(z[:, :, 20:28, 12:20], inner[:, :, 4:12, 4:12], np.float32)


def test_to_zarr_refuses_what_would_lose_data(tmp_path):
    """Arguments that would lose data or clash are refused before anything is written: shards
    (blocks sharing a shard file would overwrite each other), y's own shape/chunks, and an
    output that is the input array (creating it would erase the input first)."""
    x = da.ones((1, 1, 8, 8), chunks=(1, 1, 4, 4), dtype="f4")
    with pytest.raises(ValueError, match="shards= is not supported"):
        dp.to_zarr(x, tmp_path / "s.zarr", shards=(1, 1, 8, 8))
    with pytest.raises(TypeError, match="takes chunks from y"):
        dp.to_zarr(x, tmp_path / "c.zarr", chunks=(1, 1, 8, 8))
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "c.zarr").exists()
    dp.to_zarr(x, tmp_path / "x.zarr")
    w = np.ones((1, 1, 3, 3), "f4")
    for dst in (tmp_path / "x.zarr", str(tmp_path / "sub" / ".." / "x.zarr")):
        with pytest.raises(ValueError, match="dst is the input array"):
            dp.conv2d_to_zarr(tmp_path / "x.zarr", dst, w, padding=1, overwrite=True)
        with pytest.raises(ValueError, match="dst is the input array"):
            dp.features_to_zarr(VGG16(width=0.125, in_channels=1), tmp_path / "x.zarr", dst, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "x.zarr"), mode="r")[:], 1)  # intact


def test_to_zarr_copies_device_blocks_to_the_host(tmp_path):
    """Blocks of a CuPy-like array (no implicit conversion to NumPy) are copied to the host
    explicitly, block by block, through dask's to_numpy dispatch."""
    from dask.array.dispatch import to_numpy_dispatch

    import standin

    to_numpy_dispatch.register(standin.StandInArray)(lambda a, **kw: a.get())
    a = np.arange(64, dtype="f4").reshape(1, 1, 8, 8)
    y = da.from_array(a, chunks=(1, 1, 4, 4)).map_blocks(standin.to_device, meta=standin.meta(4, "f4"))
    z = dp.to_zarr(y, tmp_path / "d.zarr")
    np.testing.assert_array_equal(z[:], a)


@pytest.mark.cluster
@pytest.mark.cluster
def test_predict_to_zarr_within_memory(client, tmp_path):
    """Every layer's output is 8 channels x 8 MiB (the first) or 16 MiB: all of them together
    ~190 MiB, about half the workers' 2 x 192 MiB (most of which the libraries take); run
    tile by tile, a worker holds a few tiles."""
    m = _segmenter(in_channels=1, seed=4)
    H, W = 2048, 1024
    with dask.config.set(scheduler="synchronous"):
        dp.to_zarr(_image((H, W), (128, W)), tmp_path / "x.zarr")
    with peak_memory(client) as mem:
        z = dp.predict_to_zarr(m, tmp_path / "x.zarr", tmp_path / "y.zarr", tile=(256, 512))
    _check_memory(mem)
    assert z.shape == (1, 3, H // 2 + 2, W // 2 + 2)
    x = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    with dask.config.set(scheduler="synchronous"):
        corner = m.predict(x[:, :, :64, :64]).compute()
        inner = m.predict(x[:, :, 1000:1100, 500:600]).compute()
    # an output pixel reads 8 input pixels each side: the corner's reach the image edge, the
    # inner ones stay inside the crop
    assert_close(z[:, :, :24, :24], corner[:, :, :24, :24], np.float32)
    assert_close(z[:, :, 508:544, 258:294], inner[:, :, 8:44, 8:44], np.float32)


def test_features_to_zarr_sends_the_weights_once_not_per_tile(tmp_path):
    """On a distributed cluster the model's weights travel in the graph once, as one key every
    tile reads (recomputable after a lost worker, unlike scattered data), not once per tile:
    at width 1/2 they are 15 MB, and distributed's large-graph warning (an error here) fires
    only beyond its threshold plus the model's size, which four copies would pass.  The model
    itself is left unchanged and the features are the in-memory ones."""
    from distributed import Client

    m = VGG16(width=0.5, seed=5)
    assert sum(v.nbytes for v in m.params.values()) > 10 * MiB
    x = np.random.default_rng(5).random((1, 3, 64, 64), dtype=np.float32)
    dp.to_zarr(da.from_array(x, chunks=(1, 3, 32, 32)), tmp_path / "x.zarr")
    with local_cluster() as c, Client(c):
        z = dp.features_to_zarr(m, tmp_path / "x.zarr", tmp_path / "f.zarr", blocks=5)
    assert all(isinstance(v, np.ndarray) for v in m.params.values())
    with dask.config.set(scheduler="synchronous"):
        want = m.features(da.from_array(x, chunks=(1, 3, 32, 32)), 5).compute()
    assert_close(z[:], want, np.float32)


@pytest.mark.cluster
@pytest.mark.parametrize("processes", [True, False])
def test_to_zarr_refuses_an_in_memory_store_under_distributed(processes):
    """distributed pickles every task, even for workers in this process
    (``processes=False``): they would write into copies of an in-memory store and the result
    would be lost.  Refused, as dask's to_zarr does; without a client the write goes through."""
    from distributed import Client
    from zarr.storage import MemoryStore

    a = np.arange(64, dtype="f4").reshape(1, 1, 8, 8)
    x = da.from_array(a, chunks=(1, 1, 4, 4))
    with local_cluster(n_workers=1, processes=processes) as cluster, Client(cluster):
        with pytest.raises(ValueError, match="in-memory zarr store with a distributed client"):
            dp.to_zarr(x, MemoryStore())
        with pytest.raises(ValueError, match="in-memory zarr store"):
            dp.to_zarr(x, MemoryStore(), compute=False)  # the write would run there later
        kept = MemoryStore()
        zarr.create_array(kept, shape=(2,), dtype="i4", fill_value=7)
        with pytest.raises(ValueError, match="in-memory zarr store"):
            dp.to_zarr(x, kept, overwrite=True)  # refused before anything is erased
        np.testing.assert_array_equal(zarr.open_array(kept, mode="r")[:], 7)
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(dp.to_zarr(x, MemoryStore())[:], a)


# -- nothing lost: the input, an interrupted or faulted run, the workers' memory ----------------


def _store(path, shape=(1, 1, 16, 16), chunks=(1, 1, 8, 8), component=None):
    """A float32 array of ones at ``path`` (inside a group when ``component`` is given)."""
    if component is None:
        z = zarr.create_array(str(path), shape=shape, dtype="f4", chunks=chunks)
    else:
        z = zarr.open_group(str(path), mode="w").create_array(
            component, shape=shape, dtype="f4", chunks=chunks
        )
    z[...] = 1
    return z


W3 = np.ones((1, 1, 3, 3), "f4")


def test_no_call_writes_over_its_input_however_it_is_named(tmp_path):
    """Issue 18.1: an opened array of the destination's path, a group holding the input, an
    array inside the input's path, a store object, a MemoryStore, and to_zarr of a graph that
    reads the destination: each refused before anything is written, the input intact."""
    from zarr.storage import LocalStore, MemoryStore

    a = tmp_path / "a.zarr"
    _store(a)
    g = tmp_path / "g.zarr"
    _store(g, component="img")
    cases = [
        lambda: dp.conv2d_to_zarr(zarr.open_array(str(a), mode="r"), a, W3, padding=1, overwrite=True),
        lambda: dp.conv2d_to_zarr(a, LocalStore(str(a)), W3, padding=1, overwrite=True),
        lambda: dp.conv2d_to_zarr(a, str(a) + "/", W3, padding=1, overwrite=True),
        lambda: dp.conv2d_to_zarr(a, a, W3, padding=1, dst_component="sub", overwrite=True),
        lambda: dp.conv2d_to_zarr(g, g, W3, padding=1, component="img", overwrite=True),
        lambda: dp.conv2d_to_zarr(zarr.open_group(str(g), mode="r")["img"], g, W3, padding=1, overwrite=True),
        lambda: dp.predict_to_zarr(_segmenter(1), zarr.open_array(str(a), mode="r"), a, overwrite=True),
        lambda: dp.to_zarr(dp.open_image(a) + 1, a, overwrite=True),
        lambda: dp.to_zarr(dp.open_image(g, "img") * 2, g, overwrite=True),
        lambda: dp.features_to_zarr(_vgg(1, 0), a, a, blocks=1, resume=True),
    ]
    for case in cases:
        with pytest.raises(
            ValueError, match="dst (is the input array|holds the input|lies inside the input)"
        ):
            case()
    np.testing.assert_array_equal(zarr.open_array(str(a), mode="r")[...], 1)
    np.testing.assert_array_equal(zarr.open_group(str(g), mode="r")["img"][...], 1)
    # an in-memory store: the same store and component is refused, another component is fine
    mem = MemoryStore()
    zarr.create_array(mem, name="x", shape=(1, 1, 8, 8), dtype="f4", chunks=(1, 1, 4, 4))[...] = 1
    with pytest.raises(ValueError, match="dst is the input array"):
        dp.conv2d_to_zarr(mem, mem, W3, padding=1, component="x", dst_component="x", overwrite=True)
    with dask.config.set(scheduler="synchronous"):
        y = dp.conv2d_to_zarr(mem, mem, W3, padding=1, component="x", dst_component="y")
    assert y[0, 0, 1, 1] == 9 and zarr.open_array(mem, path="x", mode="r")[0, 0, 0, 0] == 1


def test_a_rerun_onto_an_existing_output_says_what_to_pass(tmp_path):
    _store(tmp_path / "a.zarr")
    dp.conv2d_to_zarr(tmp_path / "a.zarr", tmp_path / "b.zarr", W3, padding=1)
    with pytest.raises(FileExistsError, match="overwrite=True .* or resume=True"):
        dp.conv2d_to_zarr(tmp_path / "a.zarr", tmp_path / "b.zarr", W3, padding=1)
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it$"):
        dp.to_zarr(dp.open_image(tmp_path / "a.zarr"), tmp_path / "b.zarr")


@pytest.mark.parametrize(
    "dtype, ok", [("u1", True), ("u2", True), ("i2", True), ("i4", False), ("u8", False), ("?", False)]
)
def test_one_dtype_rule_for_every_tiled_call(tmp_path, dtype, ok):
    """Issue 18.7: integer images are cast only where float32 holds them exactly, for
    conv2d_to_zarr and predict_to_zarr alike; a float64 model takes 32-bit integers."""
    x = np.arange(256).reshape(1, 1, 16, 16).astype(dtype)
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 1, 8, 8))
    calls = [
        lambda out: dp.conv2d_to_zarr(tmp_path / "x.zarr", out, W3, padding=1),
        lambda out: dp.predict_to_zarr(_segmenter(1), tmp_path / "x.zarr", out),
    ]
    for i, call in enumerate(calls):
        out = tmp_path / f"y{i}.zarr"
        if ok:
            z = call(out)
            assert z.dtype == np.float32
        else:
            with pytest.raises(TypeError, match="does not convert exactly|must hold real numbers"):
                call(out)
            assert not out.exists()
    if dtype == "i4":
        z = dp.conv2d_to_zarr(tmp_path / "x.zarr", tmp_path / "y64.zarr", W3.astype("f8"), padding=1)
        assert z.dtype == np.float64 and z[0, 0, 5, 5] == 9 * x[0, 0, 5, 5]


def test_an_interrupted_run_is_marked_incomplete_and_resumes_without_recomputing(tmp_path, monkeypatch):
    """Issue 18.2/3: a run that stops part way leaves its output marked incomplete; this
    package's readers refuse it, a plain rerun says how to finish it, and ``resume=True``
    computes only the tiles not yet written, giving the bits of an uninterrupted run."""
    from dask_pconv import tiled

    m = _segmenter(in_channels=2, seed=3)
    x = np.random.default_rng(2).standard_normal((2, 2, 40, 56)).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 2, 20, 28))
    src, out = tmp_path / "x.zarr", tmp_path / "y.zarr"
    with dask.config.set(scheduler="synchronous"):
        want = dp.predict_to_zarr(m, src, tmp_path / "want.zarr", tile=(8, 16))[...]
        assert zarr.open_array(str(tmp_path / "want.zarr")).attrs["dask_pconv"]["complete"] is True
        calls, real = [], tiled._tile

        def failing(*args):
            calls.append(args)
            if len(calls) == 7:
                raise KeyboardInterrupt  # as a Ctrl-C would
            return real(*args)

        monkeypatch.setattr(tiled, "_tile", failing)
        with pytest.raises(KeyboardInterrupt, match="marked incomplete; the same call with resume=True"):
            dp.predict_to_zarr(m, src, out, tile=(8, 16))
        assert zarr.open_array(str(out)).attrs["dask_pconv"]["complete"] is False
        with pytest.raises(ValueError, match="incomplete.*resume=True"):
            dp.open_image(out)
        with pytest.raises(FileExistsError, match="resume=True"):
            dp.predict_to_zarr(m, src, out, tile=(8, 16))
        with pytest.raises(ValueError, match="cannot resume"):
            dp.predict_to_zarr(_segmenter(in_channels=2, seed=4), src, out, tile=(8, 16), resume=True)
        with pytest.raises(ValueError, match="cannot resume"):
            dp.predict_to_zarr(m, src, out, tile=(16, 16), resume=True)
        calls.clear()
        monkeypatch.setattr(tiled, "_tile", lambda *a: (calls.append(a), real(*a))[1])
        z = dp.predict_to_zarr(m, src, out, tile=(8, 16), resume=True)
        n_tiles = 2 * 6 * 4  # 2 images x 22/4 rows x 30/8 columns of the output (half size)
        assert len(calls) == n_tiles - 6  # the six written before the interruption are kept
        np.testing.assert_array_equal(z[...], want)
        assert z.attrs["dask_pconv"]["complete"] is True
        calls.clear()
        dp.predict_to_zarr(m, src, out, tile=(8, 16), resume=True)  # finished: nothing to do
        assert calls == []
        np.testing.assert_array_equal(dp.open_image(out).compute(), want)


@pytest.mark.cluster
def test_predict_to_zarr_survives_a_lost_worker_bitwise(tmp_path):
    """Issue 18.2: a worker SIGKILLed in the middle of predict_to_zarr: the call completes and
    the output is bitwise the unfaulted run's (the model is in the graph, so the lost worker's
    tiles are recomputed)."""
    import signal
    import threading
    import time

    from distributed import Client

    m = _segmenter(in_channels=1, seed=6)
    with dask.config.set(scheduler="threads"):
        dp.to_zarr(_image((1024, 1024), (128, 1024)), tmp_path / "x.zarr")
    with local_cluster() as cluster, Client(cluster) as client:
        want = dp.predict_to_zarr(m, tmp_path / "x.zarr", tmp_path / "want.zarr", tile=(64, 64))[...]
        out = tmp_path / "y.zarr"
        result = {}
        run = threading.Thread(
            target=lambda: result.update(z=dp.predict_to_zarr(m, tmp_path / "x.zarr", out, tile=(64, 64)))
        )
        run.start()
        deadline = time.monotonic() + 60
        while not (out / "c").exists() or sum(len(f) for _, _, f in os.walk(out / "c")) < 20:
            assert time.monotonic() < deadline and run.is_alive(), "the run ended before the kill"
            time.sleep(0.005)
        pids = client.run(os.getpid)
        os.kill(pids[sorted(pids)[0]], signal.SIGKILL)
        run.join(120)
        written = sum(len(f) for _, _, f in os.walk(out / "c"))
    assert "z" in result, "predict_to_zarr did not complete"
    assert written == result["z"].nchunks == 17 * 17  # (1024 / 2 + 2) / 32, rounded up
    np.testing.assert_array_equal(result["z"][...], want)
    assert result["z"].attrs["dask_pconv"]["complete"] is True


@pytest.mark.cluster
def test_unet_over_an_image_larger_than_all_workers_memory(tmp_path, monkeypatch):
    """Issue 18.3: a U-Net over a 1 GiB image, twice the two workers' 256 MiB together: no
    worker restarted, each below the threshold where distributed would pause it, and each
    worker's growth within the documented bound: one tile's working set per thread plus
    ``tiled.WORKER_OVERHEAD`` (docs/tiled.rst)."""
    from distributed import Client

    from dask_pconv import tiled
    from dask_pconv.models.unet import UNet

    _distributed_malloc(monkeypatch)
    limit = 256 * MiB
    H = W = 16384
    assert H * W * 4 >= 2 * 2 * limit
    with dask.config.set(scheduler="threads"):
        dp.to_zarr(_image((H, W), (512, 512)), tmp_path / "x.zarr", compressors=None)
    m = UNet(in_channels=1, n_classes=2, width=1, depth=1, seed=1)
    tile = (1024, 1024)
    with (
        dask.config.set({**NO_SPILL, "pconv.conv-kernel": "numpy"}),
        local_cluster(memory_limit=limit) as cluster,
        Client(cluster) as client,
        peak_memory(client) as mem,
    ):
        z = dp.predict_to_zarr(m, tmp_path / "x.zarr", tmp_path / "y.zarr", tile=tile, compressors=None)
    assert mem["lost"] == [], f"workers restarted during the run: {mem['lost']}"
    plan = tiled.plan(m, (1, 1, H, W), tile)
    bound = tiled.WORKER_OVERHEAD + tiled.tile_working_set(
        m, 1, 1, plan.largest_window(), 4, store_chunks=((512, 32), (512, 32))
    )
    pause = dask.config.get("distributed.worker.memory.pause", 0.8) or 0.8
    for addr, w in mem["workers"].items():
        grew = (w["peak"] - w["start"]) / MiB
        print(f"{addr}: peak {w['peak'] / MiB:.0f} MiB, grew {grew:.0f} MiB, bound {bound / MiB:.0f} MiB")
        assert w["samples"] > 10 and w["peak"] - w["start"] <= bound
        assert w["peak"] < pause * limit
    assert z.shape == (1, 2, H, W) and z.attrs["dask_pconv"]["complete"] is True
    x = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    with dask.config.set(scheduler="synchronous"):
        corner = m.predict(x[:, :, :64, :64]).compute()
        inner = m.predict(x[:, :, 8192 - 64 : 8192 + 64, 4096 - 64 : 4096 + 64]).compute()
    assert_close(z[:, :, :32, :32], corner[:, :, :32, :32], np.float32)
    assert_close(z[:, :, 8192 - 32 : 8192 + 32, 4096 - 32 : 4096 + 32], inner[:, :, 32:96, 32:96], np.float32)


@pytest.mark.cluster
def test_a_tile_too_big_for_the_workers_is_refused_before_the_run(client, tmp_path):
    """Issue 18.4: a 2 GiB image in stripes of 1024 x 32768 on workers of 192 MiB: refused at
    once, naming the tile, its estimate and the room, with a tile that fits (which then runs);
    a store whose own chunks are too big to decode says to rechunk.  Nothing is written."""
    import re

    shape = (1, 1, 16384, 32768)
    zarr.create_array(str(tmp_path / "x.zarr"), shape=shape, dtype="f4", chunks=(1, 1, 512, 4096))
    with pytest.raises(
        MemoryError,
        match=r"tile=\(1024, 32768\) needs about \d+ MiB .* \d+ MiB a worker has free per thread; "
        r"tile=\((\d+), (\d+)\) fits",
    ) as e:
        dp.conv2d_to_zarr(tmp_path / "x.zarr", tmp_path / "y.zarr", W3, padding=1, tile=(1024, 32768))
    assert not (tmp_path / "y.zarr").exists()
    fits = tuple(int(v) for v in re.search(r"tile=\((\d+), (\d+)\) fits", str(e.value)).groups())
    assert fits[0] * fits[1] < 1024 * 32768
    # the suggestion runs (on a smaller image with the same chunks, to keep the test short)
    zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(1, 1, 1024, 8192), dtype="f4", chunks=(1, 1, 512, 4096)
    )
    dp.conv2d_to_zarr(tmp_path / "s.zarr", tmp_path / "t.zarr", W3, padding=1, tile=fits)
    # stripes of 128 MiB in the store: no tile helps, the message says to rechunk
    zarr.create_array(str(tmp_path / "r.zarr"), shape=shape, dtype="f4", chunks=(1, 1, 1024, 32768))
    with pytest.raises(
        MemoryError,
        match=r"no tile fits: the store's chunks \(1024, 32768\) take too much to decode \(rechunk",
    ):
        dp.conv2d_to_zarr(tmp_path / "r.zarr", tmp_path / "y.zarr", W3, padding=1)
    assert not (tmp_path / "y.zarr").exists()


def test_a_run_interrupted_in_one_process_resumes_in_another(tmp_path, monkeypatch):
    """The mark that names the job is the same in a new process (a rerun of the script), so
    ``resume=True`` there finishes the output instead of refusing it."""
    import subprocess
    import sys
    import textwrap

    from dask_pconv import tiled

    script = textwrap.dedent(
        f"""
        import dask, numpy as np
        import dask_pconv as dp
        from dask_pconv.models import BatchNorm, Conv2d, MaxPool2d, Model, sequential
        m = Model(sequential(("c", Conv2d(1, 2, 3, padding=1)), ("bn", BatchNorm(2, relu=True)),
                             ("p", MaxPool2d(2)), ("h", Conv2d(2, 2, 1, bias=True))), seed=7)
        with dask.config.set(scheduler="synchronous"):
            z = dp.predict_to_zarr(m, {str(tmp_path / "x.zarr")!r}, {str(tmp_path / "y.zarr")!r},
                                   tile=(8, 8), resume=True)
        print(z.attrs["dask_pconv"]["complete"], float(np.abs(z[...]).sum()))
        """
    )
    x = np.random.default_rng(7).standard_normal((1, 1, 32, 32)).astype("f4")
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(1, 1, 16, 16))
    calls, real = [], tiled._tile

    def failing(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    m = {}
    exec(script.split("with dask")[0], m)  # the same model, built here
    monkeypatch.setattr(tiled, "_tile", failing)
    with pytest.raises(KeyboardInterrupt):
        with dask.config.set(scheduler="synchronous"):
            dp.predict_to_zarr(m["m"], tmp_path / "x.zarr", tmp_path / "y.zarr", tile=(8, 8))
    assert zarr.open_array(str(tmp_path / "y.zarr")).attrs["dask_pconv"]["complete"] is False
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with dask.config.set(scheduler="synchronous"):
        want = dp.predict_to_zarr(m["m"], tmp_path / "x.zarr", tmp_path / "w.zarr", tile=(8, 8))[...]
    complete, total = done.stdout.split()
    assert complete == "True" and np.isclose(float(total), np.abs(want).sum(), rtol=1e-6)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "y.zarr"))[...], want)
