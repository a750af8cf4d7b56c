"""conv2d and conv2d_vjp against independent references, in every split and chunking."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dask_pconv as dp

from reference import conv2d_ref, conv2d_vjp_ref
from strategies import assert_blocks_have_dtype, assert_close, conv_cases, tolerance


def _inputs(case):
    x = da.from_array(case["x"], chunks=case["x_chunks"])
    w = da.from_array(case["w"], chunks=(case["w_chunks"], -1, -1, -1))
    return x, w


def _kw(case):
    return {k: case[k] for k in ("stride", "padding", "dilation", "groups")}


KERNELS = [
    "numpy",
    "auto",
    pytest.param("torch", marks=pytest.mark.skipif(not optional.HAVE_TORCH, reason=optional.TORCH)),
]


@pytest.mark.parametrize("kernel", KERNELS)
@given(case=conv_cases())
def test_conv2d_matches_reference(kernel, case):
    with dask.config.set({"pconv.conv-kernel": kernel}):
        _check_conv2d(case)


def _check_conv2d(case):
    x, w = _inputs(case)
    y = dp.conv2d(x, w, case["b"], **_kw(case))
    expected = conv2d_ref(case["x"], case["w"], case["b"], **_kw(case))
    assert y.shape == expected.shape
    assert y.dtype == case["dtype"]
    out = y.compute()
    assert out.dtype == case["dtype"]
    assert_close(out, expected, case["dtype"])


@pytest.mark.parametrize("kernel", KERNELS)
@given(case=conv_cases())
def test_conv2d_vjp_matches_reference(kernel, case):
    with dask.config.set({"pconv.conv-kernel": kernel}):
        _check_conv2d_vjp(case)


def _check_conv2d_vjp(case):
    x, w = _inputs(case)
    rng = np.random.default_rng(case["seed"] + 1)
    y_shape = conv2d_ref(case["x"][:1, :, :, :], case["w"], **_kw(case)).shape
    gy = rng.standard_normal((case["x"].shape[0],) + y_shape[1:]).astype(case["dtype"])
    g_x, g_w, g_b = dp.conv2d_vjp(x, w, gy, **_kw(case))
    assert g_x.chunks == x.chunks
    assert g_w.chunks[0] == w.chunks[0]
    ex, ew, eb = conv2d_vjp_ref(case["x"], case["w"], gy, **_kw(case))
    gx, gw, gb = dask.compute(g_x, g_w, g_b)
    assert_close(gx, ex, case["dtype"])
    assert_close(gw, ew, case["dtype"])
    # g_b sums gy over (N, H, W): where that sum cancels, rounding is relative to the terms, not
    # to the result (a float32 case of hypothesis: 2e-4 of a near-zero max); scale by the norm of
    # each channel's terms, which is the typical size of such a sum
    scale = max(np.abs(eb).max(), np.sqrt((gy.astype(np.float64) ** 2).sum(axis=(0, 2, 3))).max())
    assert np.abs(gb.astype(np.float64) - eb).max() <= tolerance(case["dtype"]) * scale


@given(conv_cases(max_hw=8), st.integers(0, 2**16))
def test_conv2d_vjp_dot_product(case, seed):
    """<u, J v> == <J^T u, v> for x and w (conv is bilinear), with no reference involved."""
    if case["dtype"] != np.float64:
        return
    x, w = _inputs(case)
    rng = np.random.default_rng(seed)
    vx = rng.standard_normal(case["x"].shape)
    vw = rng.standard_normal(case["w"].shape)
    y = dp.conv2d(x, w, **_kw(case))
    u = rng.standard_normal(y.shape)
    jvx = dp.conv2d(da.from_array(vx, chunks=case["x_chunks"]), w, **_kw(case))
    jvw = dp.conv2d(x, vw, **_kw(case))
    g_x, g_w, _ = dp.conv2d_vjp(x, w, u, **_kw(case))
    jvx, jvw, g_x, g_w = dask.compute(jvx, jvw, g_x, g_w)
    lhs_x, rhs_x = np.vdot(u, jvx), np.vdot(g_x, vx)
    lhs_w, rhs_w = np.vdot(u, jvw), np.vdot(g_w, vw)
    assert np.isclose(lhs_x, rhs_x, rtol=1e-10, atol=1e-10 * np.abs(u).sum())
    assert np.isclose(lhs_w, rhs_w, rtol=1e-10, atol=1e-10 * np.abs(u).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_split_gives_the_same_result(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 13, 11)).astype(dtype)
    w = rng.standard_normal((8, 6, 3, 3)).astype(dtype)
    ref = conv2d_ref(x, w, padding=1)
    splits = [
        dict(),
        dict(batch=4),
        dict(channel=3),
        dict(spatial=(4, 3)),
        dict(spatial=(13, 11)),  # chunks of size 1: smaller than the halo on one side
        dict(batch=2, channel=2, spatial=(3, 2)),
    ]
    for w_chunks in [8, 3, 1]:
        wd = da.from_array(w, chunks=(w_chunks, -1, -1, -1))
        for s in splits:
            y = dp.conv2d(dp.split(x, **s), wd, padding=1).compute()
            assert_close(y, ref, dtype)


def test_halo_wider_than_neighbour_chunks():
    """Dilation 3 and a 5x5 kernel need a halo of 6: read from several size-1/2 neighbours."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 17, 15))
    w = rng.standard_normal((3, 2, 5, 5))
    xd = da.from_array(x, chunks=(1, 1, (1, 2, 1, 1, 3, 1, 2, 2, 1, 1, 2), (2, 1, 1, 5, 1, 1, 2, 2)))
    for stride in (1, 2, 3):
        y = dp.conv2d(xd, w, stride=stride, padding=2, dilation=3).compute()
        assert_close(y, conv2d_ref(x, w, stride=stride, padding=2, dilation=3), np.float64)
        gy = rng.standard_normal(y.shape)
        got = dask.compute(*dp.conv2d_vjp(xd, w, gy, stride=stride, padding=2, dilation=3))
        for a, e in zip(got, conv2d_vjp_ref(x, w, gy, stride=stride, padding=2, dilation=3)):
            assert_close(a, e, np.float64)


def test_depthwise_with_misaligned_channel_chunks():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 9, 9))
    w = rng.standard_normal((12, 1, 3, 3))  # depthwise, multiplier 2
    xd = da.from_array(x, chunks=(1, (1, 4, 1), 4, 5))
    wd = da.from_array(w, chunks=((5, 3, 4), 1, 3, 3))
    y = dp.conv2d(xd, wd, padding=1, groups=6).compute()
    assert_close(y, conv2d_ref(x, w, padding=1, groups=6), np.float64)
    gy = rng.standard_normal(y.shape)
    got = dask.compute(*dp.conv2d_vjp(xd, wd, gy, padding=1, groups=6))
    for a, e in zip(got, conv2d_vjp_ref(x, w, gy, padding=1, groups=6)):
        assert_close(a, e, np.float64)


def test_output_chunking_rule():
    x = da.zeros((4, 3, 16, 12), chunks=(2, 3, (4, 4, 8), 6))
    w = da.zeros((10, 3, 3, 3), chunks=(4, 3, 3, 3))
    y = dp.conv2d(x, w, padding=1)  # 'same' size, stride 1: tiles are kept
    assert y.chunks == ((2, 2), (4, 4, 2), (4, 4, 8), (6, 6))
    y2 = dp.conv2d(x, w, padding=1, stride=2)  # tiles divided by the stride
    assert y2.chunks == ((2, 2), (4, 4, 2), (2, 2, 4), (3, 3))
    assert dp.conv2d(x, w).chunks[2:] == ((3, 4, 7), (5, 5))  # 'valid': windows centred


def test_numpy_inputs_are_wrapped_and_result_is_lazy():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), np.arange(4.0)
    y = dp.conv2d(x, w, b, padding="same")
    assert isinstance(y, da.Array)
    assert_close(y.compute(), conv2d_ref(x, w, b, padding="same"), np.float64)


def test_torch_oracle():
    torch = optional.need_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 15, 12)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    kw = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    yt = F.conv2d(xt, wt, torch.from_numpy(b), **kw)
    gy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.from_numpy(gy))
    xd = dp.split(x, batch=2, channel=2, spatial=(3, 2))
    wd = da.from_array(w, chunks=(4, 2, 3, 4))
    assert_close(dp.conv2d(xd, wd, b, **kw).compute(), yt.detach().numpy(), np.float32)
    g_x, g_w, g_b = dask.compute(*dp.conv2d_vjp(xd, wd, gy, **kw))
    assert_close(g_x, xt.grad.numpy(), np.float32)
    assert_close(g_w, wt.grad.numpy(), np.float32)
    assert_close(g_b, gy.sum((0, 2, 3)), np.float32)


def test_unknown_kernel_config_is_an_error():
    with dask.config.set({"pconv.conv-kernel": "fortran"}):
        with pytest.raises(ValueError, match="pconv.conv-kernel"):
            dp.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3))).compute()


@given(case=conv_cases())
def test_im2col_in_small_bands_matches_reference(case):
    """Column bands of one output row (or less) must give the same result as one big matrix."""
    from unittest import mock

    from dask_pconv.kernels import conv as conv_kernels

    with (
        mock.patch.object(conv_kernels, "COL_BYTES", 1),
        mock.patch.object(conv_kernels, "DEVICE_COL_BYTES", 1),
        dask.config.set({"pconv.conv-kernel": "numpy"}),
    ):
        _check_conv2d(case)
        _check_conv2d_vjp(case)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reported_dtype_is_computed_in_every_block(dtype, kernel):
    """conv2d and conv2d_vjp compute, block by block, the dtype they report, in every split
    (batch, input and output channels, tiles, mixed)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 9, 8)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    gy = rng.standard_normal((3, 6, 9, 8)).astype(dtype)
    splits = [  # (split of x, chunks of w on axis 0: the output-channel split)
        (dict(), 6),
        (dict(batch=3), 4),
        (dict(channel=2), 1),
        (dict(spatial=(3, 2)), 6),
        (dict(batch=2, channel=4, spatial=(9, 2)), 4),
    ]
    with dask.config.set({"pconv.conv-kernel": kernel}):
        for s, w_chunks in splits:
            xd, wd = dp.split(x, **s), da.from_array(w, chunks=(w_chunks, -1, -1, -1))
            outs = (dp.conv2d(xd, wd, padding=1, groups=2), dp.conv2d(xd, wd, b, padding=1, groups=2))
            outs += dp.conv2d_vjp(xd, wd, gy, padding=1, groups=2)
            assert all(o.dtype == dtype for o in outs)
            assert_blocks_have_dtype(*outs)


# -- what torch.nn.functional.conv2d accepts: an empty batch, unbatched input, 1-tuples ---------
def _like_torch_cases():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((6, 2, 3, 2))
    b = rng.standard_normal(6)
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    one = dict(stride=(2,), padding=[1], dilation=(2,))  # one element: the same on both axes
    as_ints = dict(stride=2, padding=1, dilation=2)
    x4 = rng.standard_normal((2, 4, 9, 8))
    return (
        [
            # (name, x, split of x, w chunks on axis 0, kwargs, the same kwargs for the reference)
            ("empty batch", np.zeros((0, 4, 9, 8)), dict(), 6, kw, kw),
            ("empty batch, split", np.zeros((0, 4, 9, 8)), dict(channel=2, spatial=(3, 2)), 4, kw, kw),
            ("unbatched", x4[0], None, 6, kw, kw),
            ("unbatched, split", x4[0], (2, 4, 3), 1, kw, kw),
            (
                "one-element tuples",
                x4,
                dict(batch=2, spatial=(2, 3)),
                4,
                dict(one, groups=2),
                dict(as_ints, groups=2),
            ),
        ],
        w,
        b,
    )


def _run_like_torch(x, split, w_chunks, w, b, kw, gy):
    if split is None:
        xd = x
    elif isinstance(split, dict):
        xd = dp.split(x, **split)
    else:
        xd = da.from_array(x, chunks=split)
    wd = da.from_array(w, chunks=(w_chunks, -1, -1, -1))
    y = dp.conv2d(xd, wd, b, **kw)
    grads = dp.conv2d_vjp(xd, wd, gy, **kw)
    assert y.shape == gy.shape and grads[0].shape == x.shape
    return dask.compute(y, *grads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_batch_unbatched_input_and_one_element_tuples(kernel):
    """Results of the reference: a batch of one for unbatched input (dropped again), an empty
    result (and zero g_w, g_b) for an empty batch."""
    cases, w, b = _like_torch_cases()
    rng = np.random.default_rng(7)
    for name, x, split, w_chunks, kw, ref_kw in cases:
        x4 = x[None] if x.ndim == 3 else x
        ey = conv2d_ref(x4, w, b, **ref_kw)
        gy = rng.standard_normal(ey.shape[1:] if x.ndim == 3 else ey.shape)
        ex, ew, eb = conv2d_vjp_ref(x4, w, gy[None] if x.ndim == 3 else gy, **ref_kw)
        if x.ndim == 3:
            ey, ex = ey[0], ex[0]
        with dask.config.set({"pconv.conv-kernel": kernel}):
            got = _run_like_torch(x, split, w_chunks, w, b, kw, gy)
        for a, e in zip(got, (ey, ex, ew, eb)):
            assert a.shape == e.shape, name
            if e.size:
                assert_close(a, e, np.float64)
        if x.shape[0] == 0:
            assert not got[2].any() and not got[3].any(), name


def test_empty_batch_unbatched_input_and_one_element_tuples_match_torch():
    torch = optional.need_torch()
    F = torch.nn.functional
    cases, w, b = _like_torch_cases()
    rng = np.random.default_rng(8)
    for name, x, split, w_chunks, kw, _ in cases:
        xt, wt = torch.from_numpy(x.copy()).requires_grad_(), torch.from_numpy(w.copy()).requires_grad_()
        bt = torch.from_numpy(b.copy()).requires_grad_()
        yt = F.conv2d(xt, wt, bt, **kw)
        gy = rng.standard_normal(tuple(yt.shape))
        yt.backward(torch.from_numpy(gy))
        got = _run_like_torch(x, split, w_chunks, w, b, kw, gy)
        for a, e in zip(got, (yt.detach(), xt.grad, wt.grad, bt.grad)):
            e = e.numpy()
            assert a.shape == e.shape, name
            if e.size:
                assert_close(a, e, np.float64)
