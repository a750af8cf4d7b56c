"""One training step as a pure function: no cluster, loop or client, and the model untouched."""

import dask
import dask.array as da
import numpy as np

from dask_pconv.data import chunk_batch, synthetic
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.step import StepOutputs, training_step
from dask_pconv.train import Trainer


def test_training_step_is_the_trainers_step_and_leaves_the_model_alone():
    train, val = synthetic(n=40, n_classes=4, seed=1, val_fraction=0.25)
    x, t = train.x[:10], train.t[:10]
    split = {"batch": 2}
    m = VGG16(n_classes=4, width=0.0625, seed=3)
    params0, state0 = dict(m.params), dict(m.state)
    opt = MomentumSGD(lr=0.01)
    vel = {k: np.full(v.shape, 0.01, v.dtype) for k, v in params0.items()}  # not zeros: used
    xd, td = chunk_batch(x, t, split)
    out = training_step(m, opt, m.dask_params(like=xd), dict(m.state), vel, xd, td, step=0)
    assert isinstance(out, StepOutputs)
    assert all(isinstance(v, da.Array) for g in (out.params, out.velocities, out.state) for v in g.values())
    got = dask.compute(*out)
    # building the graph changed nothing in the model
    assert m.params.keys() == params0.keys() and all(m.params[k] is params0[k] for k in params0)
    assert all(m.state[k] is state0[k] for k in state0)

    # the trainer's step (same model, optimizer, velocities) gives the same bits
    tr = Trainer(m, train, val, batch_size=10, split=split, optimizer=opt, progress=False)
    tr.velocities = dict(vel)
    loss, acc = tr.train_step(x, t)
    want = dask.compute(m.params, tr.velocities, m.state)
    assert (float(got[3]), float(got[4])) == (loss, acc)
    for g, w in zip(got[:3], want):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    # and the step moved the parameters
    assert not np.array_equal(got[0]["fc2.W"], params0["fc2.W"])
