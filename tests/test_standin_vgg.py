"""A whole VGG16 training step on CuPy-like blocks, on the CPU.

The stand-in array (``standin.py``) refuses implicit conversion to NumPy and NumPy operands,
as CuPy does, and records every copy between host and device.  Two training steps of a small
VGG16 (BatchNorm in training mode, dropout on, momentum SGD) run through the ``Trainer`` with
``to_device`` set, and the tests check that

- no block is ever converted to NumPy implicitly and no NumPy block meets a stand-in one;
- every Dask array built for a step has stand-in ``meta``, except the host-side inputs that
  are copied to the device: the batch, and in the first step the NumPy parameters and
  BatchNorm statistics (once; the second step copies only its batch);
- only the loss and accuracy come back to the host, as two scalars;
- loss, accuracy, parameters, velocities and BatchNorm statistics equal the same steps on
  NumPy blocks bitwise.  Bitwise, not within a tolerance, because both runs execute the same
  im2col kernels (``pconv.conv-kernel = "numpy"``: PyTorch's kernel takes NumPy blocks only)
  and the same Dask graph shapes, and the stand-in computes each operation with NumPy on its
  storage: any difference would mean a different code path, which is what this test is for.
"""

from collections import Counter
from itertools import product

import dask
import numpy as np
import pytest

from dask_pconv.data import Dataset, chunk_batch
from dask_pconv.models import VGG16, ResNet18
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer

import standin
from standin import StandInArray

SPLITS = {"channel": {"channel": 2}, "spatial 2x2": {"spatial": (2, 2)}}
HOST_EVENTS = ("__array__", "mixed", "download", "scalar", "upload")


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 32, 32), dtype=np.float32)
    return Dataset(x, rng.integers(0, 10, 4), 10, "random")


MODELS = {"vgg16": lambda: VGG16(width=0.125, seed=3), "resnet18": lambda: ResNet18(width=1 / 16, seed=3)}


def _trainer(data, split, to_device=None, model="vgg16"):
    tr = Trainer(
        MODELS[model](),
        data,
        data,
        batch_size=4,
        split=split,
        optimizer=MomentumSGD(0.05, 0.9, 5e-4),
        seed=1,
        progress=False,
        to_device=to_device,
    )
    tr.tasks_per_step = 0  # skip counting the tasks (a graph optimisation as slow as the step)
    return tr


def _host_events():
    return [e for e in standin.LOG if e.startswith(HOST_EVENTS)]


def _uploads(*arrays):
    """The upload events of copying these Dask arrays block by block to the device."""
    return [f"upload:{shape}" for a in arrays for shape in product(*a.chunks)]


def _batch_uploads(tr, x, t):
    """The batch's blocks, and the empty metas the Trainer makes with ``to_device``."""
    xd, td = chunk_batch(x, t, tr.split, to_device=tr.to_device)
    return _uploads(xd, td) + [f"upload:{(0,) * xd.ndim}", "upload:(0,)"]


def _built(fn, *args):
    """``fn(*args)`` and the ``meta`` types of every Dask array built while it ran."""
    built = []
    with dask.config.set(array_plugins=[lambda a: built.append(type(a._meta))]):
        out = fn(*args)
    return out, built


def _step_on_standin(tr, x, t):
    """One ``train_step``; returns its result, the meta types of every Dask array built for it
    and the host/device events while it ran."""
    standin.LOG.clear()
    out, built = _built(tr.train_step, x, t)
    return out, built, _host_events()


def _host(arrays):
    (arrays,) = dask.compute(arrays)
    return {k: v.get() if isinstance(v, StandInArray) else v for k, v in arrays.items()}


def _run(split, steps, model="vgg16"):
    """``steps`` training steps on NumPy blocks and on stand-in blocks, checking every step on
    the stand-in; returns both trainers."""
    data = _data()
    x, t = data.x, data.t
    with dask.config.set({"pconv.conv-kernel": "numpy"}):
        ref = _trainer(data, split, model=model)
        expected = [ref.train_step(x, t) for _ in range(steps)]
        tr = _trainer(data, split, to_device=standin.to_device, model=model)
        m = tr.model
        batch = _batch_uploads(tr, x, t)
        split = tr.split.get("out_channel")
        params = _uploads(*m.chunked(m.params, channel_split=split).values())  # every chunk once
        state = _uploads(*m.chunked(m.state, channel_split=split).values())  # every statistic once
        _, host_batch = _built(chunk_batch, x, t, tr.split)  # the NumPy batch, before it is copied
        host_inputs = len(host_batch) + len(m.params) + len(m.state)  # and parameters, statistics
        for step in range(steps):
            out, built, events = _step_on_standin(tr, x, t)
            assert out == expected[step]
            assert events[-2:] == ["scalar:float"] * 2  # only the loss and the accuracy come back
            # and nothing but the inputs went in: the parameters and statistics once
            assert Counter(events[:-2]) == Counter(batch + params + state if step == 0 else batch)
            assert sum(b is not StandInArray for b in built) == host_inputs
            assert len(built) > 100 and StandInArray in built
            host_inputs = len(host_batch)  # from the second step on, only the batch is on the host
    assert [type(v._meta) for v in m.params.values()] == [StandInArray] * len(m.params)
    assert "matmul" in standin.LOG and "arange" in standin.LOG  # kernels ran in the stand-in's namespace
    assert np.isfinite(expected[0][0])
    for got, want in (
        (m.params, ref.model.params),
        (tr.velocities, ref.velocities),
        (m.state, ref.model.state),
    ):
        got, want = _host(got), _host(want)
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    return ref, tr, data


def test_vgg16_training_steps_stay_on_the_device(tmp_path):
    """Two steps, a batch split; then evaluation and a checkpoint."""
    ref, tr, data = _run({"batch": 2}, steps=2)
    with dask.config.set({"pconv.conv-kernel": "numpy"}):
        want = ref.evaluate(data)
        standin.LOG.clear()
        got = tr.evaluate(data)
    assert all(type(v) is float for v in got)
    # only the two scalars come back
    assert Counter(_host_events()) == Counter(_batch_uploads(tr, data.x, data.t) + ["scalar:float"] * 2)
    assert got == want
    tr.out = tmp_path
    standin.LOG.clear()
    tr.save()  # an explicit copy back of every array
    assert _host_events() == ["download"] * (2 * len(tr.model.params) + len(tr.model.state))
    assert (tmp_path / "checkpoint_epoch_0.npz").exists()


@pytest.mark.parametrize("split", ["channel", "spatial 2x2"])
def test_vgg16_training_step_on_the_device_in_other_splits(split):
    _run(SPLITS[split], steps=1)


@pytest.mark.parametrize("split", [{"batch": 2}, {"spatial": (2, 2)}], ids=str)
def test_resnet18_training_steps_stay_on_the_device(split):
    """The staged step of a program with branches (dask_pconv.stages.step) on device blocks,
    on batch chunks and on tiles (windows put together and contributions summed there)."""
    _, tr, _ = _run(split, steps=2, model="resnet18")
    assert tr.step_graph == "stages"


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_pytorch_kernels_never_take_lookalike_blocks(choice):
    """The cuDNN path (PyTorch through DLPack) is for ``cupy.ndarray`` blocks only: a stand-in
    block stays on the namespace kernels even when PyTorch is forced."""
    from dask_pconv import backend
    from dask_pconv.kernels import _torch

    x = standin.to_device(np.ones((1, 64, 4, 4), np.float32))
    w = standin.to_device(np.ones((8, 64, 3, 3), np.float32))
    with dask.config.set({_torch.CONFIG_KEY: choice}):
        assert not _torch.use_torch(x, w, k=64 * 9)
        host = (np.ones(1, np.float32), np.ones(1, np.float32))
        if choice == "torch" and _torch._torch() is None:  # forced but absent: said, not ignored
            with pytest.raises(ImportError, match="PyTorch is not installed"):
                _torch.use_torch(*host, k=64 * 9)
        else:
            assert _torch.use_torch(*host, k=64 * 9) == (_torch._torch() is not None)
    assert not backend.is_cupy(x)


def test_standin_is_strict_like_cupy():
    """What the stand-in takes (its own arrays, scalars, explicit copies) and what it refuses."""
    a = standin.to_device(np.arange(4, dtype=np.uint64))
    standin.LOG.clear()
    assert isinstance(np.exp(a.astype(np.float64)), StandInArray)  # ufuncs dispatch to it
    h = ((a ^ (a >> np.uint64(1))) * np.uint64(3)).get()  # uint64 shifts, xor, wrapping products
    np.testing.assert_array_equal(h, (np.arange(4, dtype=np.uint64) ^ np.arange(4, dtype=np.uint64) >> 1) * 3)
    for refused in (
        lambda: np.asarray(a),
        lambda: np.add(a, np.ones(4)),
        lambda: np.ones(4) * a,
        lambda: np.negative(a, out=np.empty(4)),
        lambda: standin.namespace.where(a > 1, a, np.zeros(4)),
    ):
        with pytest.raises(TypeError):
            refused()
    assert standin.LOG.count("__array__") + sum(e.startswith("mixed") for e in standin.LOG) == 5
    standin.LOG.clear()
    standin.namespace.asarray(np.ones(3))  # an explicit copy from the host, as cupy.asarray
    float(a[1])
    assert _host_events() == ["upload:(3,)", "scalar:float"]
