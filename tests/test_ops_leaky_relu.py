"""leaky_relu and its VJP against a dense reference and PyTorch, NaN, zeros and infinities
included, in every chunking."""

import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_pconv as dp

from reference import leaky_relu_ref, leaky_relu_vjp_ref
from strategies import assert_blocks_have_dtype, assert_close, partitions

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason=optional.TORCH)


@st.composite
def cases(draw):
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 7)),
        draw(st.integers(1, 7)),
    )
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.1] = 0.0
    x[rng.random(shape) < 0.05] = np.nan
    slope = draw(st.sampled_from([0.01, 0.2, 0.1, 1.5, 0.0, -0.3]))
    x[rng.random(shape) < 0.05] = np.inf
    if slope:  # -inf times a zero slope is NaN (in PyTorch too), with NumPy's warning
        x[rng.random(shape) < 0.05] = -np.inf
    chunks = tuple(draw(partitions(n, 3)) for n in shape)
    return x.astype(dtype), chunks, slope, dtype, rng


@settings(max_examples=60)
@given(cases())
def test_leaky_relu_and_vjp_match_reference(case):
    x, chunks, slope, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    y = dp.leaky_relu(xd, slope)
    assert y.dtype == dtype and y.chunks == xd.chunks
    got, ref = y.compute(), leaky_relu_ref(x, slope)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[~finite], ref[~finite])  # NaN and the infinities
    if finite.any():
        assert_close(got[finite], ref[finite], dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    g = dp.leaky_relu_vjp(xd, da.from_array(gy, chunks=chunks), slope)
    assert g.dtype == dtype
    assert_close(g.compute(), leaky_relu_vjp_ref(x, gy, slope), dtype)


@needs_torch
@settings(max_examples=60)
@given(cases())
def test_leaky_relu_and_vjp_match_torch_bit_for_bit(case):
    x, chunks, slope, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.leaky_relu(xt, slope)
    gy = rng.standard_normal(x.shape).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    np.testing.assert_array_equal(dp.leaky_relu(xd, slope).compute(), yt.detach().numpy())
    np.testing.assert_array_equal(dp.leaky_relu_vjp(xd, gy, slope).compute(), xt.grad.numpy())


def test_leaky_relu_errors_and_dtypes():
    x = da.ones((2, 3), chunks=1, dtype=np.float32)
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        dp.leaky_relu(x, "0.1")
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        dp.leaky_relu_vjp(x, x, None)
    with pytest.raises(TypeError, match="masked array"):
        dp.leaky_relu(np.ma.masked_array(np.ones(3)))
    assert_blocks_have_dtype(dp.leaky_relu(x - 2, 0.3), dp.leaky_relu_vjp(x - 2, x, 0.3))
