"""Every VJP rule against finite differences (float64), plus the tape's own behaviour."""

import dask
import dask.array as da
import numpy as np
import pytest

from dask_pconv import autodiff as ad
from dask_pconv.ops import nn

from strategies import assert_close

RNG = np.random.default_rng(0)
X4 = RNG.standard_normal((4, 3, 7, 6))
W = RNG.standard_normal((5, 3, 3, 3))
GAMMA, BETA = RNG.random(3) + 0.5, RNG.standard_normal(3)
MEAN, VAR = RNG.standard_normal(3), RNG.random(3) + 0.5
X2 = RNG.standard_normal((6, 5))
LIN = RNG.standard_normal((4, 5))
T = np.array([0, 3, 1, 3, 2, 0])
CH4 = (2, (1, 2), (4, 3), (2, 4))


def d(a, chunks=None):
    return da.from_array(a, chunks=chunks or a.shape)


CASES = {
    "conv2d": (lambda x, w: ad.conv2d(x, w, padding=1, stride=(2, 1)), [d(X4, CH4), d(W, (3, 3, 3, 3))]),
    "conv2d grouped dilated": (
        lambda x, w: ad.conv2d(x, w, padding=2, dilation=2, groups=3),
        [d(X4, CH4), d(RNG.standard_normal((6, 1, 3, 2)))],
    ),
    "conv_transpose2d": (
        lambda x, w, b: ad.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
        [d(X4, CH4), d(RNG.standard_normal((3, 2, 3, 4)), (2, 2, 3, 4)), d(RNG.standard_normal(2))],
    ),
    "conv_transpose2d grouped dilated": (
        lambda x, w: ad.conv_transpose2d(x, w, stride=(1, 2), padding=(2, 0), groups=3, dilation=(2, 1)),
        [d(X4, CH4), d(RNG.standard_normal((3, 2, 3, 2)))],
    ),
    "max_pool2d": (lambda x: ad.max_pool2d(x, 3, 2, 1), [d(X4, CH4)]),
    "max_pool2d dilated ceil_mode": (
        lambda x: ad.max_pool2d(x, (2, 3), stride=2, padding=1, dilation=(2, 1), ceil_mode=True),
        [d(X4, CH4)],
    ),
    "relu": (ad.relu, [d(X4, CH4)]),
    "batch_norm train": (lambda x, g, b: ad.batch_norm(x, g, b), [d(X4, CH4), d(GAMMA), d(BETA)]),
    "batch_norm train relu": (
        lambda x, g, b: ad.batch_norm(x, g, b, relu=True),
        [d(X4, CH4), d(GAMMA, 2), d(BETA, 1)],
    ),
    "batch_norm eval": (
        lambda x, g, b: ad.batch_norm(x, g, b, d(MEAN), d(VAR), relu=True),
        [d(X4, CH4), d(GAMMA), d(BETA)],
    ),
    "batch_norm 2-D": (lambda x, g, b: ad.batch_norm(x, g, b), [d(X2, (4, 2)), d(X2[0] + 2), d(X2[1])]),
    "dropout": (lambda x: ad.dropout(x, 0.3, 0, 1, 2), [d(X4, CH4)]),
    "linear": (ad.linear, [d(X2, (4, 2)), d(LIN, (3, 5))]),
    "flatten": (ad.flatten, [d(X4, CH4)]),
    "reshape": (lambda x: ad.reshape(x, (4, 3, 42)), [d(X4, CH4)]),
    "rechunk": (lambda x: ad.rechunk(x, (1, 3, 7, (5, 1))), [d(X4, CH4)]),
    "batch_norm train, given statistics": (
        lambda x, g, b: ad.batch_norm(x, g, b, relu=True, stats=nn.batch_norm_stats(x.value)),
        [d(X4, CH4), d(GAMMA, 2), d(BETA, 1)],
    ),
    "add broadcast": (ad.add, [d(X4, CH4), d(GAMMA.reshape(1, 3, 1, 1))]),
    "mul broadcast": (ad.mul, [d(X4, CH4), d(X4[:1, :, :, :1])]),
    "sum": (lambda x: ad.sum_(x, axis=(0, 2)), [d(X4, CH4)]),
    "mean": (lambda x: ad.mean(x, axis=1), [d(X4, CH4)]),
    "softmax_cross_entropy": (lambda z: ad.softmax_cross_entropy(z, d(T, 4)), [d(X2, (4, 2))]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_vjp_matches_finite_differences(name):
    """<u, (f(x + e v) - f(x - e v)) / 2e> equals <J^T u, v> summed over all inputs."""
    f, inputs = CASES[name]
    rng = np.random.default_rng(1)
    tensors = [ad.Tensor(a) for a in inputs]
    out = f(*tensors)
    u = rng.standard_normal(out.shape)
    u_d = da.from_array(u, chunks=out.value.chunks) if out.value.ndim else da.from_array(u)
    grads = ad.grad(out, tensors, g=u_d)
    vs = [rng.standard_normal(a.shape) for a in inputs]
    eps = 1e-6
    plus = f(*[ad.Tensor(a + eps * v) for a, v in zip(inputs, vs)]).value
    minus = f(*[ad.Tensor(a - eps * v) for a, v in zip(inputs, vs)]).value
    grads, plus, minus = dask.compute(grads, plus, minus)
    jvp = np.vdot(u, (plus - minus) / (2 * eps))
    vjp = sum(np.vdot(g, v) for g, v in zip(grads, vs))
    assert np.isclose(jvp, vjp, rtol=1e-6, atol=1e-8), (jvp, vjp)
    for g, a in zip(grads, inputs):
        assert g.shape == a.shape


def test_gradients_do_not_depend_on_the_chunking():
    def net(x, w, g, b, lin):
        h = ad.conv2d(x, w, padding=1)
        h = ad.batch_norm(h, g, b, relu=True)
        h = ad.max_pool2d(h, 2)
        h = ad.dropout(h, 0.4, 7, 3, 1)
        return ad.softmax_cross_entropy(ad.linear(ad.flatten(h), lin), d(T[:4], 2))

    lin = RNG.standard_normal((4, 5 * 3 * 3))
    g5, b5 = RNG.random(5) + 0.5, RNG.standard_normal(5)
    results = []
    for xc, wc in [(X4.shape, 5), (CH4, 2), ((1, 1, 2, 1), 1)]:
        ts = [ad.Tensor(a) for a in (d(X4, xc), d(W, (wc, 3, 3, 3)), d(g5), d(b5), d(lin))]
        loss = net(*ts)
        results.append(dask.compute(loss.value, ad.grad(loss, ts)))
    for loss, grads in results[1:]:
        assert_close(loss, results[0][0], np.float64)
        for g, g0 in zip(grads, results[0][1]):
            assert_close(g, g0, np.float64)


def test_missing_rule_names_the_primitive():
    @ad.primitive
    def cube(x):
        return x**3

    x = ad.Tensor(d(X2))
    with pytest.raises(NotImplementedError, match="'cube'"):
        ad.grad(ad.sum_(cube(x)), [x])


def _primitive_named_double(factor):
    @ad.primitive
    def double(x):
        return factor * x

    ad.defvjp(double, lambda ans, x: lambda g: factor * g)
    return double


def test_primitives_of_the_same_name_keep_their_own_rules():
    """The registry is keyed by the primitive, not by its name: a second primitive called
    ``double`` does not replace the first one's rule."""
    two, three = _primitive_named_double(2.0), _primitive_named_double(3.0)
    assert two.__name__ == three.__name__ == "double"
    x = ad.Tensor(d(X2))
    (g2,) = ad.grad(ad.sum_(two(x)), [x])
    (g3,) = ad.grad(ad.sum_(three(x)), [x])
    np.testing.assert_allclose(g2.compute(), np.full_like(X2, 2.0))
    np.testing.assert_allclose(g3.compute(), np.full_like(X2, 3.0))


def test_a_rule_for_a_plain_function_is_refused():
    with pytest.raises(TypeError, match="defvjp: prim must be a function made by @primitive"):
        ad.defvjp(np.negative, lambda ans, x: lambda g: -g)
    with pytest.raises(TypeError, match="defvjp_all: prim must be a function made by @primitive"):
        ad.defvjp_all(lambda x: x, lambda ans, x: lambda g: (g,))


def test_tensor_operators_record_add_and_mul():
    """``+`` and ``*`` on tensors, from either side, are the ``add`` and ``mul`` primitives."""
    x = ad.Tensor(d(X2))
    for out, want in [(x + 1.0, "add"), (1.0 + x, "add"), (x * 2.0, "mul"), (2.0 * x, "mul")]:
        assert out.node.prim is getattr(ad, want)
    (gx,) = ad.grad(ad.sum_(2.0 * x * x + 1.0 + x), [x])
    np.testing.assert_allclose(gx.compute(), 4 * X2 + 1)


def test_no_rule_for_labels_argument():
    z = ad.Tensor(d(X2))
    t = ad.Tensor(d(T))
    with pytest.raises(NotImplementedError, match="argument 1 of primitive 'softmax_cross_entropy'"):
        ad.grad(ad.softmax_cross_entropy(z, t), [z])


def test_unused_input_gets_none_and_reuse_accumulates():
    x, y = ad.Tensor(d(X2)), ad.Tensor(d(X2))
    out = ad.sum_(x * x + x)
    gx, gy = ad.grad(out, [x, y])
    assert gy is None
    np.testing.assert_allclose(gx.compute(), 2 * X2 + 1)


def test_registered_rules():
    names = set(ad.rule_names())
    expected = {
        "conv2d",
        "conv_transpose2d",
        "max_pool2d",
        "relu",
        "batch_norm",
        "dropout",
        "linear",
        "reshape",
        "rechunk",
        "add",
        "mul",
        "sum",
        "mean",
        "softmax_cross_entropy",
    }
    assert expected <= names
