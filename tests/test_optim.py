import dask.array as da
import numpy as np
import pytest

from dask_pconv.optim import MomentumSGD


def test_momentum_sgd_matches_chainer_rule():
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((6, 4)).astype(np.float32), "b": rng.standard_normal(6)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for _ in range(3)]
    opt = MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
    params = {"w": da.from_array(p["w"], chunks=(2, 4)), "b": da.from_array(p["b"], chunks=3)}
    vel = opt.init_state(params)
    ref_p = {k: v.copy() for k, v in p.items()}
    ref_v = {k: np.zeros_like(v) for k, v in p.items()}
    for g in grads:
        params, vel = opt.update(params, {k: da.from_array(v, chunks=2) for k, v in g.items()}, vel)
        for k in ref_p:  # Chainer: WeightDecay hook, then MomentumSGD
            ref_v[k] = (0.9 * ref_v[k] - 0.05 * (g[k] + 5e-4 * ref_p[k])).astype(ref_p[k].dtype)
            ref_p[k] = ref_p[k] + ref_v[k]
    assert params["w"].chunks == ((2, 2, 2), (4,)) and params["b"].chunks == ((3, 3),)
    for k in ref_p:
        out = params[k].compute()
        assert out.dtype == ref_p[k].dtype
        np.testing.assert_allclose(out, ref_p[k], rtol=1e-6)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        MomentumSGD(lr=-1)
    with pytest.raises(ValueError, match="no gradient for parameter 'w'"):
        MomentumSGD().update({"w": da.ones(3)}, {"w": None}, {"w": da.zeros(3)})
