"""Hypothesis strategies: conv/pool problems with random chunkings in every split."""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st


@st.composite
def partitions(draw, length, max_pieces=None):
    """A random chunking of ``length``: chunks of size 1, uneven last chunks, or one chunk."""
    cuts = draw(st.sets(st.integers(1, length - 1), max_size=max_pieces or length)) if length > 1 else set()
    bounds = [0] + sorted(cuts) + [length]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def _out(n, k, s, p, d):
    return (n + p[0] + p[1] - d * (k - 1) - 1) // s + 1


@st.composite
def conv_cases(draw, max_hw=10):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = groups > 1 and draw(st.booleans())
    cg = 1 if depthwise else draw(st.integers(1, 3))
    og = draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 3))
    C, O = groups * cg, groups * og
    N = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if kind == "same":
        stride = (1, 1)
        padding = "same"
        pads = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip((kh, kw), dilation))
    elif kind == "valid":
        padding, pads = "valid", ((0, 0), (0, 0))
    elif kind == "int":
        p = draw(st.integers(0, 2))
        padding, pads = p, ((p, p), (p, p))
    else:
        p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        padding, pads = p, ((p[0], p[0]), (p[1], p[1]))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    assume(_out(H, kh, stride[0], pads[0], dilation[0]) >= 1)
    assume(_out(W, kw, stride[1], pads[1], dilation[1]) >= 1)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((O, cg, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if draw(st.booleans()) else None
    split = draw(st.sampled_from(["batch", "out", "in", "spatial", "mixed"]))
    full = lambda n: (n,)  # noqa: E731
    xc = [full(N), full(C), full(H), full(W)]
    wc = full(O)
    if split in ("batch", "mixed"):
        xc[0] = draw(partitions(N))
    if split in ("out", "mixed"):
        wc = draw(partitions(O))
    if split in ("in", "mixed"):
        xc[1] = draw(partitions(C))
    if split in ("spatial", "mixed"):
        xc[2], xc[3] = draw(partitions(H, 5)), draw(partitions(W, 5))
    return dict(
        x=x,
        w=w,
        b=b,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        x_chunks=tuple(xc),
        w_chunks=wc,
        dtype=dtype,
        seed=seed,
    )


def tolerance(dtype):
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4


def assert_close(actual, expected, dtype):
    """Max error relative to the expected output's max-abs (the issue's criterion)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    err = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert err <= tolerance(dtype), f"relative error {err:.3g} > {tolerance(dtype)}"


def assert_blocks_have_dtype(*arrays):
    """Every block of each lazy array has the dtype the array reports (the concatenated result
    alone would hide a block computed in another dtype: concatenation promotes)."""
    import dask

    for a in arrays:
        blocks = dask.compute(*a.to_delayed().ravel())
        got = {np.asarray(b).dtype for b in blocks}
        assert got == {a.dtype}, f"reported {a.dtype}, computed {sorted(map(str, got))}"


def assert_trains_like_unsplit(model, x, t, pieces, channel_split, reference=None):
    """``model.forward_backward`` on ``x`` split by ``dp.split(x, **pieces)``, its parameters
    split ``channel_split`` ways (float64, dropout off): the loss and every gradient equal
    the unsplit run's, and ``reference(model, x, t)``'s ``(loss, grads)`` (PyTorch's) if given."""
    import dask

    import dask_pconv as dp

    ref_loss, ref_grads = dask.compute(*model.forward_backward(x, t, dropout=False))
    loss, grads = dask.compute(
        *model.forward_backward(dp.split(x, **pieces), t, dropout=False, channel_split=channel_split)
    )
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert grads.keys() == model.params.keys()
    for k in grads:
        assert_close(grads[k], ref_grads[k], np.float64)
    if reference is not None:
        want_loss, want_grads = reference(model, x, t)
        assert abs(loss - want_loss) <= 1e-10 * abs(want_loss)
        for k in grads:
            assert_close(grads[k], want_grads[k], np.float64)
