"""The Dask-level layers of ``dask_pconv.ops.nn`` against direct NumPy computations of the
same formulas, for chunkings of every axis (their VJPs are checked against finite differences
in tests/test_autodiff.py)."""

import dask.array as da
import numpy as np
import optional
import pytest

from dask_pconv import autodiff as ad
from dask_pconv.ops import nn

from strategies import assert_blocks_have_dtype, assert_close

RNG = np.random.default_rng(0)
X4 = RNG.standard_normal((4, 3, 7, 6))
GAMMA, BETA = RNG.random(3) + 0.5, RNG.standard_normal(3)
X4_CHUNKS = [(4, 3, 7, 6), (1, 3, 7, 6), (2, (1, 2), (4, 3), (2, 4)), (3, 1, 2, 5)]
CH4 = X4_CHUNKS[2]
EPS = 2e-5


def d(a, chunks=None):
    return da.from_array(a, chunks=chunks or a.shape)


def _bn_ref(x, gamma, beta, mean=None, var=None, relu=False):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS) * gamma.reshape(shape)
    y = y + beta.reshape(shape)
    return np.maximum(y, 0) if relu else y


@pytest.mark.parametrize("chunks", X4_CHUNKS, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_matches_numpy(chunks, relu):
    """Training mode: statistics over (N, H, W) across every chunk; evaluation mode: the given
    running statistics."""
    mean, var = RNG.standard_normal(3), RNG.random(3) + 0.5
    x = d(X4, chunks)
    got = nn.batch_norm(x, GAMMA, BETA, relu=relu).compute()
    assert_close(got, _bn_ref(X4, GAMMA, BETA, relu=relu), np.float64)
    got = nn.batch_norm(x, GAMMA, BETA, mean, var, relu=relu).compute()
    assert_close(got, _bn_ref(X4, GAMMA, BETA, mean, var, relu=relu), np.float64)


def test_batch_norm_on_features_matches_numpy():
    x = RNG.standard_normal((10, 4))
    g, b = RNG.random(4) + 0.5, RNG.standard_normal(4)
    for chunks in [(10, 4), (3, 2), (5, (1, 3))]:
        assert_close(nn.batch_norm(d(x, chunks), g, b).compute(), _bn_ref(x, g, b), np.float64)


@pytest.mark.parametrize("chunks", X4_CHUNKS, ids=str)
def test_batch_norm_stats_and_running_update_match_numpy(chunks):
    """``(count, mean, M2)`` per channel, and Chainer's running update with the unbiased
    variance ``M2 / (m - 1)``."""
    stats = nn.batch_norm_stats(d(X4, chunks)).compute()
    m = X4.size // 3
    np.testing.assert_array_equal(stats[0], [m] * 3)
    assert_close(stats[1], X4.mean(axis=(0, 2, 3)), np.float64)
    assert_close(stats[2], X4.var(axis=(0, 2, 3)) * m, np.float64)
    old_m, old_v = RNG.standard_normal(3), RNG.random(3)
    new_m, new_v = nn.batch_norm_running_update(nn.batch_norm_stats(d(X4, chunks)), old_m, old_v, 0.9)
    assert_close(new_m.compute(), 0.9 * old_m + 0.1 * X4.mean(axis=(0, 2, 3)), np.float64)
    assert_close(new_v.compute(), 0.9 * old_v + 0.1 * X4.var(axis=(0, 2, 3), ddof=1), np.float64)


@pytest.mark.parametrize(
    "x_chunks, w_chunks", [((6, 5), (4, 5)), ((2, 5), (1, 5)), ((3, 2), (2, 3)), ((1, 1), (4, 1))]
)
def test_linear_and_its_vjp_match_numpy(x_chunks, w_chunks):
    """``x @ W.T`` and its gradients, with the batch, the input features and the outputs
    chunked any way; results chunked like ``x`` and ``W``."""
    x, W, g = RNG.standard_normal((6, 5)), RNG.standard_normal((4, 5)), RNG.standard_normal((6, 4))
    xd, Wd = d(x, x_chunks), d(W, w_chunks)
    y = nn.linear(xd, Wd)
    assert_close(y.compute(), x @ W.T, np.float64)
    g_x, g_W = nn.linear_vjp(xd, Wd, d(g, (xd.chunks[0], Wd.chunks[0])))
    assert g_x.chunks == xd.chunks and g_W.chunks == Wd.chunks
    assert_close(g_x.compute(), g @ W, np.float64)
    assert_close(g_W.compute(), g.T @ x, np.float64)


def test_linear_does_not_depend_on_the_input_feature_chunking():
    """Each task contracts over whole rows, so the result is bitwise the same for any chunking
    of the contracted axis (chunks of the batch or the outputs change the shape of each
    product, and so its rounding)."""
    x, W = RNG.standard_normal((6, 50)).astype("f4"), RNG.standard_normal((4, 50)).astype("f4")
    ref = nn.linear(d(x), d(W)).compute()
    for xc, wc in [((6, 7), (4, 50)), ((6, 25), (4, 10)), ((6, 1), (4, 3))]:
        np.testing.assert_array_equal(nn.linear(d(x, xc), d(W, wc)).compute(), ref)


@pytest.mark.parametrize("chunks", [(6, 5), (2, 5), (3, (2, 3)), (1, 1)], ids=str)
def test_softmax_cross_entropy_and_its_vjp_match_numpy(chunks):
    z = RNG.standard_normal((6, 5)) * 5
    t = np.array([0, 3, 1, 4, 2, 0])
    logp = z - z.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    want = -logp[np.arange(6), t].mean()
    zd, td = d(z, chunks), d(t, chunks[0])
    assert_close(nn.softmax_cross_entropy(zd, td).compute(), want, np.float64)
    onehot = np.eye(5)[t]
    got = nn.softmax_cross_entropy_vjp(zd, td, da.asarray(2.0)).compute()
    assert_close(got, (np.exp(logp) - onehot) * 2.0 / 6, np.float64)


PIXEL_CHUNKS = [(3, 4, 5, 6), (1, 4, 5, 6), (3, (1, 3), (2, 3), (4, 2)), (2, 2, 1, 5)]


@pytest.mark.parametrize("chunks", PIXEL_CHUNKS, ids=str)
def test_per_pixel_softmax_cross_entropy_its_vjp_and_accuracy_match_numpy(chunks):
    """(N, K, H, W) logits of a segmentation network with (N, H, W) labels: the mean over
    every pixel, in any chunking of the batch, class and spatial axes."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 4, 5, 6)) * 4
    t = rng.integers(0, 4, (3, 5, 6))
    logp = z - z.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    onehot = np.moveaxis(np.eye(4)[t], -1, 1)
    zd, td = d(z, chunks), d(t, (chunks[0],) + chunks[2:])
    assert_close(nn.softmax_cross_entropy(zd, td).compute(), -(logp * onehot).sum() / t.size, np.float64)
    got = nn.softmax_cross_entropy_vjp(zd, td, da.asarray(3.0)).compute()
    assert_close(got, (np.exp(logp) - onehot) * 3.0 / t.size, np.float64)
    assert nn.accuracy(zd, d(t)).compute() == np.mean(z.argmax(axis=1) == t)


def test_per_pixel_loss_reproduces_its_bits_for_a_split():
    """The same chunking gives the same bits on every run (the partial sums add in one order)."""
    rng = np.random.default_rng(6)
    z, t = rng.standard_normal((4, 3, 8, 8)).astype("f4"), rng.integers(0, 3, (4, 8, 8))
    runs = {
        nn.softmax_cross_entropy(d(z, (2, 3, 4, 4)), d(t, (2, 4, 4))).compute().tobytes() for _ in range(5)
    }
    assert len(runs) == 1


def test_cross_entropy_rejects_labels_that_do_not_fit_the_logits():
    z = d(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4, 4\)"):
        nn.softmax_cross_entropy(z, d(np.zeros(2, int)))
    with pytest.raises(TypeError, match="labels must be integers"):
        nn.softmax_cross_entropy(z, d(np.zeros((2, 4, 4))))
    with pytest.raises(ValueError, match=r"logits must be \(N, K\) or per-pixel"):
        nn.softmax_cross_entropy(d(np.zeros((2, 3, 4))), d(np.zeros((2, 4), int)))


def test_per_pixel_loss_and_gradient_match_torch():
    torch = optional.need_torch()

    rng = np.random.default_rng(7)
    z, t = rng.standard_normal((2, 5, 6, 7)), rng.integers(0, 5, (2, 6, 7))
    zt = torch.tensor(z, requires_grad=True)
    want = torch.nn.functional.cross_entropy(zt, torch.tensor(t))
    want.backward()
    zd, td = d(z, (1, 5, 3, (3, 4))), d(t, (1, 3, (3, 4)))
    assert_close(nn.softmax_cross_entropy(zd, td).compute(), want.item(), np.float64)
    g = nn.softmax_cross_entropy_vjp(zd, td, da.asarray(1.0)).compute()
    assert_close(g, zt.grad.numpy(), np.float64)


def test_relu_and_its_vjp_match_numpy():
    x, g = d(X4, CH4), d(X4[::-1], CH4)
    np.testing.assert_array_equal(nn.relu(x).compute(), np.maximum(X4, 0))
    np.testing.assert_array_equal(nn.relu_vjp(x, g).compute(), np.where(X4 > 0, X4[::-1], 0))


def test_dropout_mask_is_a_pure_function_of_seed_step_layer_and_index():
    x = np.ones((4, 3, 8, 8))
    a = ad.dropout.raw(d(x, (1, 1, 3, 5)), 0.5, 0, 1, 2).compute()
    b = ad.dropout.raw(d(x, (4, 3, 8, 8)), 0.5, 0, 1, 2).compute()
    c = ad.dropout.raw(d(x), 0.5, 0, 2, 2).compute()
    np.testing.assert_array_equal(a, b)  # chunking does not matter
    assert not np.array_equal(a, c)  # the step does
    assert set(np.unique(a)) == {0.0, 2.0}
    assert 0.4 < (a == 0).mean() < 0.6


def test_batch_norm_vjp_with_relu_needs_the_forward_output():
    from dask_pconv.ops.nn import batch_norm_vjp

    with pytest.raises(ValueError, match="needs y"):
        batch_norm_vjp(d(X4, CH4), d(GAMMA), d(X4, CH4), relu=True)


@pytest.mark.parametrize("chunks", [(4, 5), (3, 2), (2, (1, 3, 1))])
def test_accuracy_matches_numpy_for_any_chunking(chunks):
    """The fraction of rows whose arg-max is the label, row and class axes chunked any way;
    ties go to the first maximum, as in NumPy."""
    from dask_pconv.ops.nn import accuracy

    rng = np.random.default_rng(8)
    z = rng.integers(0, 3, (10, 5)).astype("f4")  # many ties
    t = rng.integers(0, 5, 10)
    want = np.mean(z.argmax(axis=1) == t)
    assert 0 < want < 1
    got = accuracy(da.from_array(z, chunks=chunks), da.from_array(t, chunks=chunks[0])).compute()
    assert got == want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nn_ops_compute_the_dtype_they_report(dtype):
    """Every block of every layer's output (and gradient) has the reported dtype, whatever
    the chunking (the conv and pooling ops are checked in their own test files)."""
    from dask_pconv.ops import nn

    x = RNG.standard_normal((4, 6, 5, 5)).astype(dtype)
    v = np.ones(6, dtype)
    W = RNG.standard_normal((7, 150)).astype(dtype)
    t = np.array([0, 1, 2, 3])
    for chunks in [(4, 6, 5, 5), (1, 2, 2, 3), (2, 6, 5, 1)]:
        xd = d(x, chunks)
        g = xd * dtype(2)
        z = xd.reshape(4, 150).rechunk((chunks[0], 50))
        logits = nn.linear(z, W)
        outs = [nn.relu(xd), nn.relu_vjp(xd, g), nn.batch_norm(xd, v, v), *nn.batch_norm_vjp(xd, v, g)]
        outs += [nn.batch_norm(xd, v, v, v, v, relu=True), nn.dropout(xd, 0.5, 0, 1, 2)]
        outs += [logits, *nn.linear_vjp(z, W, logits), nn.softmax_cross_entropy(logits, t)]
        outs += [nn.softmax_cross_entropy_vjp(logits, t, da.ones((), dtype=dtype))]
        outs += list(nn.batch_norm_running_update(nn.batch_norm_stats(xd), v, v))
        assert all(o.dtype == dtype for o in outs)
        assert_blocks_have_dtype(*outs)
