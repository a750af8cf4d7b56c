"""The VJP rules of average pooling, nearest upsampling, leaky ReLU and concatenation against
finite differences (float64), and concatenation's gradients chunked like its inputs."""

import dask
import dask.array as da
import numpy as np
import pytest

from dask_pconv import autodiff as ad

RNG = np.random.default_rng(0)
X4 = RNG.standard_normal((4, 3, 7, 6))
Y4 = RNG.standard_normal((4, 2, 7, 6))
CH4 = (2, (1, 2), (4, 3), (2, 4))


def d(a, chunks=None):
    return da.from_array(a, chunks=chunks or a.shape)


CASES = {
    "avg_pool2d": (lambda x: ad.avg_pool2d(x, 3, 2, 1), [d(X4, CH4)]),
    "avg_pool2d ceil_mode, no padding counted": (
        lambda x: ad.avg_pool2d(x, (2, 3), stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        [d(X4, CH4)],
    ),
    "avg_pool2d divisor_override": (lambda x: ad.avg_pool2d(x, 2, divisor_override=3), [d(X4, CH4)]),
    "adaptive_avg_pool2d": (lambda x: ad.adaptive_avg_pool2d(x, 1), [d(X4, CH4)]),
    "upsample_nearest": (lambda x: ad.upsample_nearest(x, (2, 3)), [d(X4, CH4)]),
    "leaky_relu": (lambda x: ad.leaky_relu(x, 0.2), [d(X4, CH4)]),
    "concatenate": (lambda a, b: ad.concatenate([a, b], axis=1), [d(X4, CH4), d(Y4, (1, 1, 7, 3))]),
    "concatenate, negative axis": (
        lambda a, b: ad.concatenate((a, b), axis=-1),
        [d(X4, CH4), d(X4[..., :2])],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_vjp_matches_finite_differences(name):
    """<u, (f(x + e v) - f(x - e v)) / 2e> equals <J^T u, v> summed over all inputs."""
    f, inputs = CASES[name]
    rng = np.random.default_rng(1)
    tensors = [ad.Tensor(a) for a in inputs]
    out = f(*tensors)
    u = rng.standard_normal(out.shape)
    grads = ad.grad(out, tensors, g=da.from_array(u, chunks=out.value.chunks))
    vs = [rng.standard_normal(a.shape) for a in inputs]
    eps = 1e-6
    plus = f(*[ad.Tensor(a + eps * v) for a, v in zip(inputs, vs)]).value
    minus = f(*[ad.Tensor(a - eps * v) for a, v in zip(inputs, vs)]).value
    for g, a in zip(grads, inputs):
        assert g.shape == a.shape and g.chunks == a.chunks
    grads, plus, minus = dask.compute(grads, plus, minus)
    jvp = np.vdot(u, (plus - minus) / (2 * eps))
    vjp = sum(np.vdot(g, v) for g, v in zip(grads, vs))
    assert np.isclose(jvp, vjp, rtol=1e-6, atol=1e-8), (jvp, vjp)


def test_concatenate_gradients_are_the_slices_chunked_like_the_inputs():
    a, b = ad.Tensor(d(X4, CH4)), ad.Tensor(d(Y4, (4, 2, 7, 6)))
    out = ad.concatenate([a, b])
    g = RNG.standard_normal(out.shape)
    ga, gb = ad.grad(out, [a, b], g=d(g, (1, 5, 2, 6)))  # a gradient chunked like neither
    assert ga.chunks == a.value.chunks and gb.chunks == b.value.chunks
    np.testing.assert_array_equal(ga.compute(), g[:, :3])
    np.testing.assert_array_equal(gb.compute(), g[:, 3:])
    # plain arrays: no tape, just the concatenation
    np.testing.assert_array_equal(ad.concatenate([d(X4), d(Y4)]).compute(), np.concatenate([X4, Y4], 1))


def test_concatenate_refuses_mixed_dtypes_and_nothing():
    with pytest.raises(TypeError, match="one dtype"):
        ad.concatenate([d(X4), d(X4.astype(np.float32))])
    with pytest.raises(ValueError, match="at least one array"):
        ad.concatenate([])


def test_registered_rules():
    names = set(ad.rule_names())
    assert {"avg_pool2d", "adaptive_avg_pool2d", "upsample_nearest", "leaky_relu", "concatenate"} <= names
