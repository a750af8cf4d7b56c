"""One block-kernel code path for NumPy and CuPy: the ops on a CuPy stand-in (CPU).

The stand-in refuses implicit conversion to NumPy, so these tests fail if any kernel, halo
assembly, tree sum or scatter touches NumPy, and they check that ``meta`` keeps the blocks'
type through every graph.
"""

import dask
import dask.array as da
import numpy as np
import pytest

import dask_pconv as dp
from dask_pconv import kernels

import standin
from reference import conv2d_ref, conv2d_vjp_ref, max_pool2d_ref, max_pool2d_vjp_ref
from standin import StandInArray, blocks_to_host, to_device
from strategies import assert_close


def _device(a, chunks):
    x = da.from_array(a, chunks=chunks)
    return x.map_blocks(to_device, meta=standin.meta(a.ndim, a.dtype))


def test_standin_refuses_numpy_conversion():
    a = to_device(np.ones(3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError):
        a + np.ones(3)


def test_kernels_on_standin_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 2))
    kw = dict(stride=(2, 1), dilation=(1, 2), groups=2)
    y = kernels.conv2d_forward(to_device(x), to_device(w), **kw)
    assert isinstance(y, StandInArray)
    np.testing.assert_allclose(y.get(), kernels.conv2d_forward(x, w, **kw))
    gy = rng.standard_normal(y.shape)
    gx = kernels.conv2d_grad_x(to_device(gy), to_device(w), **kw)
    np.testing.assert_allclose(gx.get(), kernels.conv2d_grad_x(gy, w, **kw))
    gw = kernels.conv2d_grad_w(to_device(x), to_device(gy), (3, 2), **kw)
    np.testing.assert_allclose(gw.get(), kernels.conv2d_grad_w(x, gy, (3, 2), **kw))
    p = kernels.max_pool2d_forward(to_device(x), (3, 2), (2, 2))
    np.testing.assert_array_equal(p.get(), kernels.max_pool2d_forward(x, (3, 2), (2, 2)))


def test_im2col_bands_are_large_for_device_blocks():
    """Device blocks get one GEMM for a whole 4.6 MB column matrix (no cache to fit; small
    bands would leave a GPU idle); NumPy blocks are cut into cache-sized bands."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 16, 66, 514)), rng.standard_normal((8, 16, 3, 3))
    with dask.config.set({"pconv.conv-kernel": "numpy"}):
        standin.LOG.clear()
        y = kernels.conv2d_forward(to_device(x), to_device(w))
        assert standin.LOG.count("matmul") == 1
        want = kernels.conv2d_forward(x, w)
    assert kernels.conv.COL_BYTES < 16 * 9 * 64 * 512 * 8  # so NumPy used several bands
    np.testing.assert_allclose(y.get(), want, rtol=1e-12, atol=1e-12)


def test_ops_keep_standin_blocks_end_to_end():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 11, 10))
    w = rng.standard_normal((6, 2, 3, 3))
    kw = dict(padding=1, stride=(1, 2), groups=2)
    xd = _device(x, (2, 3, (4, 4, 3), (3, 7)))
    wd = _device(w, (4, 2, 3, 3))
    standin.LOG.clear()
    with dask.config.set(scheduler="synchronous"):
        y = dp.conv2d(xd, wd, **kw)
        assert isinstance(y._meta, StandInArray)
        assert_close(blocks_to_host(y), conv2d_ref(x, w, **kw), np.float64)
        gy = rng.standard_normal(y.shape)
        g_x, g_w, g_b = dp.conv2d_vjp(xd, wd, _device(gy, y.chunks), **kw)
        for g in (g_x, g_w):
            assert isinstance(g._meta, StandInArray)
        ex, ew, eb = conv2d_vjp_ref(x, w, gy, **kw)
        assert_close(blocks_to_host(g_x), ex, np.float64)
        assert_close(blocks_to_host(g_w), ew, np.float64)
        assert_close(blocks_to_host(g_b), eb, np.float64)
        p = dp.max_pool2d(xd, 3, 2, 1)
        assert isinstance(p._meta, StandInArray)
        np.testing.assert_array_equal(blocks_to_host(p), max_pool2d_ref(x, 3, 2, 1))
        gp = rng.standard_normal(p.shape)
        gpx = dp.max_pool2d_vjp(xd, _device(gp, p.chunks), 3, 2, 1)
        assert_close(blocks_to_host(gpx), max_pool2d_vjp_ref(x, gp, 3, 2, 1), np.float64)
        pool = dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
        p, idx = dp.max_pool2d(xd, **pool, return_indices=True)
        assert isinstance(p._meta, StandInArray) and isinstance(idx._meta, StandInArray)
        ep, ei = max_pool2d_ref(x, **pool, return_indices=True)
        np.testing.assert_array_equal(blocks_to_host(p), ep)
        np.testing.assert_array_equal(blocks_to_host(idx), ei)
        gp = rng.standard_normal(p.shape)
        gpx = dp.max_pool2d_vjp(xd, _device(gp, p.chunks), **pool)
        assert_close(blocks_to_host(gpx), max_pool2d_vjp_ref(x, gp, **pool), np.float64)
    refused = [e for e in standin.LOG if e == "__array__" or e.startswith("mixed")]
    assert refused == []
    assert "matmul" in standin.LOG  # the kernels ran in the stand-in's namespace


def test_device_operand_with_a_host_input_is_a_clear_error():
    """CuPy weights with a NumPy input would fail inside a task; it is refused up front."""
    rng = np.random.default_rng(3)
    x = da.from_array(rng.standard_normal((2, 4, 8, 8)), chunks=(1, 4, 8, 8))
    wd = _device(rng.standard_normal((6, 4, 3, 3)), (6, 4, 3, 3))
    with pytest.raises(TypeError, match="operand has .*StandInArray blocks but the input has NumPy blocks"):
        dp.conv2d(x, wd)
    gyd = _device(rng.standard_normal((2, 6, 6, 6)), (1, 6, 6, 6))
    with pytest.raises(TypeError, match="but the input has NumPy blocks"):
        dp.conv2d_vjp(x, rng.standard_normal((6, 4, 3, 3)), gyd)


def test_wrapping_device_arrays_does_not_copy_them_to_the_host():
    """Raw device arrays handed to the ops are wrapped without hashing their data (hashing
    pickles them, a copy to the host); NumPy arrays keep content-hashed names."""
    from dask_pconv.backend import wrap

    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((6, 4, 3, 3))
    standin.LOG.clear()
    xd, wd = wrap(to_device(x), x.shape), wrap(to_device(w), w.shape)
    y = dp.conv2d(to_device(x), to_device(w), padding=1)
    assert not [e for e in standin.LOG if e.startswith("download")]
    assert isinstance(xd._meta, StandInArray) and isinstance(wd._meta, StandInArray)
    with dask.config.set(scheduler="synchronous"):
        assert_close(blocks_to_host(y), conv2d_ref(x, w, padding=1), np.float64)
    assert wrap(x, x.shape).name == wrap(x.copy(), x.shape).name


def test_batch_norm_with_raw_device_vectors_does_not_copy_them_to_the_host():
    """Raw device (CuPy) gamma and beta are hashed as Dask arrays, not pickled (a copy to the
    host), in batch_norm and its VJP; the results match the NumPy ones."""
    from dask_pconv.ops.nn import batch_norm, batch_norm_vjp

    rng = np.random.default_rng(6)
    x, g = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    xd, gd = _device(x, (2, 3, 5, 5)), _device(g, (2, 3, 5, 5))
    standin.LOG.clear()
    y = batch_norm(xd, to_device(gamma), to_device(beta))
    grads = batch_norm_vjp(xd, to_device(gamma), gd)
    assert not [e for e in standin.LOG if e.startswith("download")]
    xn = da.from_array(x, chunks=(2, 3, 5, 5))
    want = dask.compute(
        batch_norm(xn, gamma, beta), *batch_norm_vjp(xn, gamma, da.from_array(g, chunks=(2, 3, 5, 5)))
    )
    with dask.config.set(scheduler="synchronous"):
        got = [blocks_to_host(a) for a in (y, *grads)]
    for a, b in zip(got, want):
        assert_close(a, b, np.float64)


@pytest.mark.parametrize("device", [False, True])
def test_onehot_kernel(device):
    t = np.array([3, 0, 2, 2, 1])
    block = to_device(t) if device else t
    out = kernels.onehot(block, 4, np.float32)
    assert isinstance(out, StandInArray if device else np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out.get() if device else out, np.eye(4, dtype=np.float32)[t])
