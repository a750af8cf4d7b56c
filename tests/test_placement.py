"""Where a step's inputs live (dask_pconv/placement.py) and the snapshot a run restarts from
(dask_pconv/checkpoint.py's Snapshot), without a cluster."""

import dask
import numpy as np
import pytest

from dask_pconv.checkpoint import Snapshot
from dask_pconv.data import chunk_batch
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.placement import StepInputs

RNG = np.random.default_rng(2)


def _batch(n=4):
    return chunk_batch(RNG.random((n, 3, 32, 32), dtype=np.float32), RNG.integers(0, 4, n), {"batch": 2})


def test_inputs_are_chunked_for_the_split_and_placed_once():
    m = VGG16(n_classes=4, width=0.0625)
    host = dict(m.params)
    inputs = StepInputs(m, channel_split=2)
    xd, _ = _batch()
    params, vel, state = inputs.get(xd, MomentumSGD().init_state)
    assert inputs.placed and params.keys() == host.keys() and vel.keys() == host.keys()
    assert params["block1_1.conv.W"].chunks[0] == (2, 2) and params["fc2.W"].chunks[0] == (4,)
    assert state["block1_1.bn.avg_mean"].chunks == ((2, 2),)
    # the model now holds the placed (persisted) arrays, with the host values
    assert m.params["block1_1.conv.W"] is params["block1_1.conv.W"]
    np.testing.assert_array_equal(dask.compute(m.params["fc1.W"])[0], host["fc1.W"])
    assert not any(dask.compute(vel["fc1.W"])[0].ravel())  # zero velocities
    # a second step's inputs are the same arrays: nothing placed again
    again = inputs.get(xd, MomentumSGD().init_state)
    assert all(again[0][k] is params[k] for k in params)
    inputs.reset(None)
    assert not inputs.placed and inputs.velocities is None
    assert m.channel_split == 1  # the model's own split is not changed


def test_update_takes_a_steps_results():
    m = VGG16(n_classes=4, width=0.0625)
    inputs = StepInputs(m)
    new = {k: v + 1 for k, v in m.params.items()}
    vel = {k: np.ones_like(v) for k, v in m.params.items()}
    state = {"bn_fc1.avg_mean": np.full(32, 3.0, np.float32)}
    inputs.update(new, vel, state)
    assert m.params == new and inputs.velocities == vel
    assert (m.state["bn_fc1.avg_mean"] == 3).all() and (m.state["bn_fc1.avg_var"] == 1).all()
    inputs.restart_memory_manager()  # nothing was stopped: a no-op without a cluster


def test_snapshot_round_trips_through_a_checkpoint(tmp_path):
    m = VGG16(n_classes=4, width=0.0625)
    vel = {k: np.full(v.shape, 0.5, v.dtype) for k, v in m.params.items()}
    log = [{"epoch": 1, "iteration": 3}]
    snap = Snapshot.take(m.dask_params(channel_split=2), m.state, vel, 1, 3, log, 2.5)
    assert all(isinstance(v, np.ndarray) for v in snap.params.values())
    log.append("later")  # the snapshot holds its own copy of the log
    assert snap.log == [{"epoch": 1, "iteration": 3}]
    snap.save(tmp_path / "c.npz", seed=7)
    back = Snapshot.load(tmp_path / "c.npz", m.params)
    assert (back.epoch, back.step, back.log, back.elapsed) == (1, 3, snap.log, 2.5)
    for a, b in ((back.params, m.params), (back.state, m.state), (back.velocities, vel)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = VGG16(n_classes=5, width=0.0625)
    with pytest.raises(ValueError, match=r"velocity\['fc2.W'\] has shape \(4, 32\), expected \(5, 32\)"):
        Snapshot.load(tmp_path / "c.npz", other.params)
