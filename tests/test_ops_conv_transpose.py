"""conv_transpose2d and conv_transpose2d_vjp in every split and chunking: against the dense
references of tests/reference.py (a transposed convolution is the adjoint of a convolution, so
no PyTorch is needed) and against PyTorch's conv_transpose2d and its autograd where installed."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dask_pconv as dp

from reference import conv2d_ref, conv2d_vjp_ref
from strategies import assert_blocks_have_dtype, assert_close, partitions


def _out(n, k, s, p, d, op):
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


@st.composite
def transpose_cases(draw, max_hw=7):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cog = groups * draw(st.integers(1, 2)), draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    out_hw = tuple(map(_out, (H, W), kernel, stride, pad, dilation, out_pad))
    assume(min(out_hw) >= 1)
    as_int = pad[0] == pad[1] and draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, cin, H, W)).astype(dtype)
    w = rng.standard_normal((cin, cog) + kernel).astype(dtype)
    b = rng.standard_normal(cog * groups).astype(dtype) if draw(st.booleans()) else None
    gy = rng.standard_normal((N, cog * groups) + out_hw).astype(dtype)
    split = draw(st.sampled_from(["batch", "channel", "weight", "spatial", "mixed"]))
    xc, wc = [(N,), (cin,), (H,), (W,)], (cin,)
    if split in ("batch", "mixed"):
        xc[0] = draw(partitions(N))
    if split in ("channel", "mixed"):
        xc[1] = draw(partitions(cin))
    if split in ("weight", "mixed"):
        wc = draw(partitions(cin))
    if split in ("spatial", "mixed"):
        xc[2], xc[3] = draw(partitions(H, 4)), draw(partitions(W, 4))
    kw = dict(stride=stride, padding=pad[0] if as_int else pad, output_padding=out_pad, groups=groups)
    kw["dilation"] = dilation
    return dict(x=x, w=w, b=b, gy=gy, kw=kw, x_chunks=tuple(xc), w_chunks=wc, dtype=dtype)


def _inputs(case):
    x = da.from_array(case["x"], chunks=case["x_chunks"])
    return x, da.from_array(case["w"], chunks=(case["w_chunks"], -1, -1, -1))


def _conv_kw(kw):
    """The convolution whose adjoint the transposed one is (no output padding)."""
    return {k: kw[k] for k in ("stride", "padding", "dilation", "groups")}


def _as_conv_output(x, kw, out_hw, w):
    """``x`` padded with zeros at the end to the output size of the convolution of an
    ``out_hw`` input (larger than ``x`` where output_padding >= stride, with dilation)."""
    N, C = x.shape[:2]
    shape = conv2d_ref(np.zeros((1, w.shape[1] * kw["groups"]) + out_hw), w, **_conv_kw(kw)).shape[2:]
    full = np.zeros((N, C) + shape)
    full[:, :, : x.shape[2], : x.shape[3]] = x
    return full


def conv_transpose2d_ref(x, w, b, kw, out_hw):
    """The dense reference: conv2d_vjp_ref's g_x for an ``out_hw`` input, ``x`` its g_y."""
    N, groups = x.shape[0], kw["groups"]
    zeros = np.zeros((N, w.shape[1] * groups) + out_hw)
    y = conv2d_vjp_ref(zeros, w, _as_conv_output(x, kw, out_hw, w), **_conv_kw(kw))[0]
    return y if b is None else y + np.asarray(b, np.float64)[None, :, None, None]


def conv_transpose2d_vjp_ref(x, w, gy, kw):
    H, W = x.shape[2:]
    g_x = conv2d_ref(gy, w, **_conv_kw(kw))[:, :, :H, :W]
    g_w = conv2d_vjp_ref(gy, w, _as_conv_output(x, kw, gy.shape[2:], w), **_conv_kw(kw))[1]
    return g_x, g_w, np.asarray(gy, np.float64).sum((0, 2, 3))


def _check(case, expected):
    x, w = _inputs(case)
    y = dp.conv_transpose2d(x, w, case["b"], **case["kw"])
    grads = dp.conv_transpose2d_vjp(x, w, case["gy"], **case["kw"])
    assert y.shape == case["gy"].shape and y.dtype == case["dtype"]
    assert grads[0].chunks == x.chunks and grads[1].chunks == w.chunks
    got = dask.compute(y, *grads)
    for a, e in zip(got, expected):
        assert a.dtype == case["dtype"]
        assert_close(a, e, case["dtype"])


@settings(max_examples=150)
@given(case=transpose_cases())
def test_matches_the_dense_reference(case):
    out_hw = case["gy"].shape[2:]
    ey = conv_transpose2d_ref(case["x"], case["w"], case["b"], case["kw"], out_hw)
    _check(case, (ey,) + conv_transpose2d_vjp_ref(case["x"], case["w"], case["gy"], case["kw"]))


@settings(max_examples=100)
@given(case=transpose_cases())
def test_is_the_adjoint_of_the_convolution(case):
    """<conv_transpose2d(x), u> == <x, conv2d(u)> (the convolution of the dense reference,
    cropped where the output padding makes it longer), and for the weight:
    <conv_transpose2d(x, v), u> == <g_w, v>."""
    if case["dtype"] != np.float64:
        return
    x, w = _inputs(case)
    u = case["gy"]
    y = dp.conv_transpose2d(x, w, **case["kw"])
    H, W = x.shape[2:]
    conv_u = conv2d_ref(u, case["w"], **_conv_kw(case["kw"]))[:, :, :H, :W]
    v = np.random.default_rng(0).standard_normal(w.shape)
    yv = dp.conv_transpose2d(x, v, **case["kw"])
    _, g_w, _ = dp.conv_transpose2d_vjp(x, w, u, **case["kw"])
    y, yv, g_w = dask.compute(y, yv, g_w)
    scale = np.abs(u).sum() * max(np.abs(case["x"]).max(), 1) * max(np.abs(case["w"]).max(), np.abs(v).max())
    assert abs(np.vdot(y, u) - np.vdot(case["x"], conv_u)) <= 1e-11 * scale
    assert abs(np.vdot(yv, u) - np.vdot(g_w, v)) <= 1e-11 * scale


@settings(max_examples=150)
@given(case=transpose_cases())
def test_matches_torch(case):
    torch = optional.need_torch()
    F = torch.nn.functional
    xt = torch.from_numpy(case["x"].astype(np.float64)).requires_grad_()
    wt = torch.from_numpy(case["w"].astype(np.float64)).requires_grad_()
    bt = None if case["b"] is None else torch.from_numpy(case["b"].astype(np.float64)).requires_grad_()
    yt = F.conv_transpose2d(xt, wt, bt, **case["kw"])
    assert tuple(yt.shape) == case["gy"].shape
    yt.backward(torch.from_numpy(case["gy"].astype(np.float64)))
    gb = case["gy"].astype(np.float64).sum((0, 2, 3)) if bt is None else bt.grad.numpy()
    _check(case, (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), gb))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_split_gives_the_same_result(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 9, 7)).astype(dtype)
    w = rng.standard_normal((6, 2, 4, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    kw = dict(stride=2, padding=1, groups=2)
    ref = conv_transpose2d_ref(x, w, b, dict(kw, dilation=1), (18, 14))
    splits = [
        dict(),
        dict(batch=4),
        dict(channel=3),
        dict(spatial=(3, 2)),
        dict(spatial=(9, 7)),  # tiles of one pixel: smaller than the kernel's reach
        dict(batch=2, channel=2, spatial=(3, 2)),
    ]
    for w_chunks in [6, 4, 1]:
        wd = da.from_array(w, chunks=(w_chunks, -1, -1, -1))
        for s in splits:
            y = dp.conv_transpose2d(dp.split(x, **s), wd, b, **kw)
            assert_close(y.compute(), ref, dtype)
            assert_blocks_have_dtype(y)


def test_output_chunks_are_the_input_tiles_times_the_stride():
    x = da.zeros((4, 6, 8, 6), chunks=(2, 3, (2, 2, 4), 3))
    w = da.zeros((6, 5, 4, 4), chunks=(3, 5, 4, 4))
    y = dp.conv_transpose2d(x, w, stride=2, padding=1)  # the usual 2x upsampling
    assert y.chunks == ((2, 2), (5,), (4, 4, 8), (6, 6))
    # the convolution's chunk rule maps these tiles back to x's: x is not rechunked
    assert not [name for name in y.dask.layers if name.startswith("rechunk")]
    assert dp.conv_transpose2d(x, w[:, :, :2, :2], stride=2).chunks[2:] == ((4, 4, 8), (6, 6))
    assert dp.conv_transpose2d(x, w[:, :, :3, :3], padding=1).chunks[2:] == x.chunks[2:]
    # the boundary b*s - p + floor(d(k-1)/2): kernel 3, stride 2, no padding -> 2b + 1
    y3 = dp.conv_transpose2d(x, w[:, :, :3, :3], stride=2, output_padding=1)
    assert y3.chunks[2:] == ((5, 4, 9), (7, 7))
    # input channel chunks: x's; w's where x's channels are whole (and g_w keeps w's chunks)
    w2 = w.rechunk({0: 2})
    for xc in (x, x.rechunk({1: -1})):
        g_x, g_w, _ = dp.conv_transpose2d_vjp(xc, w2, y, stride=2, padding=1)
        assert g_x.chunks == xc.chunks and g_w.chunks == w2.chunks


def test_tiles_that_would_be_empty_are_dropped():
    """Large padding crops the output: boundaries clipped to it give empty tiles, dropped; the
    input is then rechunked and g_x still comes back chunked like x."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 6, 5))
    w = rng.standard_normal((2, 1, 3, 3))
    kw = dict(padding=2, dilation=1, groups=1, stride=1, output_padding=0)
    xd = da.from_array(x, chunks=(1, 1, (1, 1, 2, 1, 1), (1, 3, 1)))
    y = dp.conv_transpose2d(xd, w, padding=2)
    assert y.shape == (1, 1, 4, 3) and all(c > 0 for cs in y.chunks for c in cs)
    assert_close(y.compute(), conv_transpose2d_ref(x, w, None, kw, (4, 3)), np.float64)
    gy = rng.standard_normal(y.shape)
    got = dask.compute(*dp.conv_transpose2d_vjp(xd, w, gy, padding=2))
    assert got[0].shape == x.shape
    assert dp.conv_transpose2d_vjp(xd, w, gy, padding=2)[0].chunks == xd.chunks
    for a, e in zip(got, conv_transpose2d_vjp_ref(x, w, gy, kw)):
        assert_close(a, e, np.float64)


def test_empty_batch_unbatched_input_and_numpy_operands():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 4))
    w = rng.standard_normal((3, 2, 3, 2))
    b = rng.standard_normal(2)
    kw = dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=1, dilation=1)
    ey = conv_transpose2d_ref(x[None], w, b, kw, (10, 5))[0]
    y = dp.conv_transpose2d(x, w, b, **kw)
    assert isinstance(y, da.Array) and y.shape == ey.shape
    assert_close(y.compute(), ey, np.float64)
    gy = rng.standard_normal(ey.shape)
    got = dask.compute(*dp.conv_transpose2d_vjp(da.from_array(x, chunks=(1, 2, 3)), w, gy, **kw))
    ex, ew, eb = conv_transpose2d_vjp_ref(x[None], w, gy[None], kw)
    for a, e in zip(got, (ex[0], ew, eb)):
        assert_close(a, e, np.float64)
    empty = dp.conv_transpose2d(np.zeros((0, 3, 5, 4)), w, b, **kw)
    assert empty.shape == (0, 2, 10, 5) and empty.compute().shape == (0, 2, 10, 5)
    g_x, g_w, g_b = dask.compute(
        *dp.conv_transpose2d_vjp(np.zeros((0, 3, 5, 4)), w, np.zeros((0, 2, 10, 5)), **kw)
    )
    assert g_x.shape == (0, 3, 5, 4) and not g_w.any() and not g_b.any()


def test_output_padding_only_at_the_dilation():
    """output_padding may reach the dilation when the stride is smaller (as in PyTorch): the
    convolution then has more outputs than x has pixels."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 3, 3, 2))
    kw = dict(stride=1, padding=0, output_padding=(2, 1), groups=1, dilation=(3, 2))
    y = dp.conv_transpose2d(dp.split(x, spatial=(2, 2)), w, **kw)
    out_hw = (5 - 1 + 6 + 2 + 1, 4 - 1 + 2 + 1 + 1)
    assert y.shape[2:] == out_hw
    assert_close(y.compute(), conv_transpose2d_ref(x, w, None, kw, out_hw), np.float64)
    gy = rng.standard_normal(y.shape)
    got = dask.compute(*dp.conv_transpose2d_vjp(dp.split(x, spatial=(2, 2)), w, gy, **kw))
    for a, e in zip(got, conv_transpose2d_vjp_ref(x, w, gy, kw)):
        assert_close(a, e, np.float64)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(output_padding=2, stride=2), ValueError, "output_padding .* smaller than the stride"),
        (dict(output_padding=1), ValueError, "output_padding .* smaller than the stride"),
        (dict(padding="same"), TypeError, "padding must be an int or a pair"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(stride=0), ValueError, "stride must be positive"),
        (dict(groups=0), ValueError, "groups must be positive"),
        (dict(groups=4), ValueError, "groups=4 does not divide the 6 input channels"),
        (dict(padding=5), ValueError, "the output would have size"),
    ],
)
def test_errors(kwargs, error, match):
    x, w = np.ones((1, 6, 3, 3)), np.ones((6, 1, 3, 3))
    with pytest.raises(error, match=match):
        dp.conv_transpose2d(x, w, **kwargs)
    with pytest.raises(error, match=match):
        dp.conv_transpose2d_vjp(x, w, np.ones((1, 1, 5, 5)), **kwargs)


def test_operand_errors():
    x, w = np.ones((1, 6, 3, 3)), np.ones((6, 1, 3, 3))
    with pytest.raises(ValueError, match="x has 4 channels but w has 6 input channels"):
        dp.conv_transpose2d(np.ones((1, 4, 3, 3)), w)
    with pytest.raises(TypeError, match="dtypes are not promoted"):
        dp.conv_transpose2d(x.astype(np.float32), w)
    with pytest.raises(ValueError, match=r"b must have shape \(1,\)"):
        dp.conv_transpose2d(x, w, np.ones(6))
    with pytest.raises(ValueError, match=r"g_y must have the output shape \(1, 1, 5, 5\)"):
        dp.conv_transpose2d_vjp(x, w, np.ones((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="w must be 4-D"):
        dp.conv_transpose2d(x, np.ones((6, 3, 3)))
