"""The staged training step (dask_pconv/stages/step.py) of chains: the same step as the
fine-grained graph to rounding, gradients equal to PyTorch's, which steps it takes, and its
graph's shape."""

import dask
import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.data import chunk_batch
from dask_pconv.graphstats import graph_stats
from dask_pconv.models import (
    VGG16,
    BatchNorm,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    Model,
    ReLU,
    sequential,
)
from dask_pconv.optim import MomentumSGD
from dask_pconv.stages.step import unstaged
from dask_pconv.step import training_step

from strategies import assert_close

RNG = np.random.default_rng(11)


def _odd_program():
    """Bias, a ReLU of its own, a pool that floors (7 -> 3), a 2-D BatchNorm."""
    return sequential(
        ("conv", Conv2d(3, 5, 3, padding=1, bias=True)),
        ("relu", ReLU()),
        ("bn", BatchNorm(5)),
        ("drop", Dropout(0.3)),
        ("pool", MaxPool2d(2)),
        ("conv2", Conv2d(5, 4, 3, padding=0)),
        ("bn2", BatchNorm(4, relu=True)),
        ("flatten", Flatten()),
        ("fc1", Linear(4, 6)),
        ("bn3", BatchNorm(6, relu=True)),
        ("fc2", Linear(6, 3, channel_split=False)),
    )


def _tiled_program():
    """For tiles: two convolutions in one stage (a halo of two convolutions), bias, a ReLU of
    its own, dropout before and after pooling, a pool in the stage that puts the tiles
    together, a 2-D BatchNorm."""
    return sequential(
        ("conv", Conv2d(3, 5, 3, padding=1, bias=True)),
        ("relu", ReLU()),
        ("bn", BatchNorm(5)),
        ("drop", Dropout(0.3)),
        ("pool", MaxPool2d(2)),
        ("conv2", Conv2d(5, 4, 3, padding=1)),
        ("relu2", ReLU()),
        ("conv3", Conv2d(4, 4, 3, padding=1, bias=True)),
        ("bn2", BatchNorm(4, relu=True)),
        ("drop2", Dropout(0.2)),
        ("pool2", MaxPool2d(2)),
        ("flatten", Flatten()),
        ("fc1", Linear(4 * 6 * 2, 6)),
        ("bn3", BatchNorm(6, relu=True)),
        ("fc2", Linear(6, 3, channel_split=False)),
    )


def _split(x, t, chunks):
    """The batch in ``chunks`` pieces (an int) or as ``(batch, row chunks, column chunks)``."""
    if isinstance(chunks, int):
        return chunk_batch(x, t, {"batch": chunks} if chunks > 1 else {})
    batch, rows, cols = chunks
    xd, td = chunk_batch(x, t, {"batch": batch} if batch > 1 else {})
    return xd.rechunk((xd.chunks[0], x.shape[1], rows, cols)), td


def _step(model, x, t, chunks, staged, dropout, opt=None):
    opt = opt or MomentumSGD(0.05, 0.9, 5e-4)
    xd, td = _split(x, t, chunks)
    params = model.dask_params(like=xd)
    vel = {k: np.full(v.shape, 0.01, v.dtype) for k, v in model.params.items()}  # not zeros: used
    with dask.config.set({"pconv.staged": staged}):
        assert (unstaged(model, opt, params, xd) is None) == staged
        out = training_step(model, opt, params, dict(model.state), vel, xd, td, step=3, dropout=dropout)
    return dask.compute(out)[0]


CASES = {
    "vgg16": (lambda: VGG16(n_classes=4, width=1 / 16, seed=2, dtype=np.float64), (9, 3, 32, 32), 4),
    "bias, floor pooling, 2-D BatchNorm": (
        lambda: Model(_odd_program(), seed=1, dtype=np.float64),
        (9, 3, 7, 7),
        3,
    ),
}


def _compare(make, shape, k, chunks, dropout):
    x, t = RNG.standard_normal(shape), RNG.integers(0, k, shape[0])
    want = _step(make(), x, t, chunks, staged=False, dropout=dropout)
    got = _step(make(), x, t, chunks, staged=True, dropout=dropout)
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss) and got.accuracy == want.accuracy
    for g, w in zip(got[:3], want[:3]):
        assert g.keys() == w.keys()
        for name in g:
            assert g[name].dtype == w[name].dtype and g[name].shape == w[name].shape
            np.testing.assert_allclose(g[name], w[name], rtol=1e-11, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("dropout", [False, True], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_staged_step_is_the_fine_grained_step(case, chunks, dropout):
    """Loss, accuracy, parameters, velocities and running statistics after a step, float64,
    with uneven chunks (9 images in 2), dropout masks included."""
    _compare(*CASES[case], chunks, dropout)


TILED = {
    "vgg16, 2x2 tiles": (CASES["vgg16"][0], (3, 3, 32, 32), 4, (1, (16, 16), (16, 16))),
    "vgg16, 2 chunks of 2x2 tiles": (CASES["vgg16"][0], (5, 3, 32, 32), 4, (2, (16, 16), (16, 16))),
    "small, 2x2 tiles": (
        lambda: Model(_tiled_program(), seed=4, dtype=np.float64),
        (5, 3, 24, 8),
        3,
        (1, (12, 12), (4, 4)),
    ),
    # uneven tiles, aligned with the pool; a halo of 2 pooled rows takes all of the middle tile
    "small, 3x1 uneven tiles": (
        lambda: Model(_tiled_program(), seed=4, dtype=np.float64),
        (5, 3, 24, 8),
        3,
        (1, (8, 4, 12), (8,)),
    ),
    # tiles not aligned with the pools: rounded to the stages' alignment (16)
    "vgg16, unaligned tiles": (CASES["vgg16"][0], (3, 3, 32, 32), 4, (1, (10, 22), (20, 12))),
    "small, 3 chunks of 2x2 tiles": (
        lambda: Model(_tiled_program(), seed=4, dtype=np.float64),
        (7, 3, 24, 8),
        3,
        (3, (12, 12), (4, 4)),
    ),
}


@pytest.mark.parametrize("dropout", [False, True], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("case", list(TILED))
def test_staged_step_on_tiles_is_the_fine_grained_step(case, dropout):
    """The same on spatial tiles (and batch chunks of tiles): halos exchanged between tiles'
    stages forward and backward, dropout masks of each tile's window at its global place."""
    make, shape, k, split = TILED[case]
    _compare(make, shape, k, split, dropout)


def test_staged_gradients_match_pytorch():
    """With lr 1, no momentum and no decay, a step's velocities are minus the gradients."""
    optional.need_torch()
    from torch_vgg import torch_loss_and_grads

    m = VGG16(n_classes=4, width=1 / 8, seed=3, dtype=np.float64)
    x, t = RNG.standard_normal((6, 3, 32, 32)), RNG.integers(0, 4, 6)
    lt, gt = torch_loss_and_grads(m, x, t)
    xd, td = chunk_batch(x, t, {"batch": 3})
    params, opt = m.dask_params(like=xd), MomentumSGD(1.0, 0.0, 0.0)
    assert unstaged(m, opt, params, xd) is None
    out = training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, step=0, dropout=False)
    loss, vel = dask.compute(out.loss, out.velocities)
    assert abs(loss - lt) <= 1e-10 * abs(lt)
    for name, g in gt.items():
        assert_close(-vel[name], g, np.float64)


def test_which_steps_are_staged():
    m, opt = VGG16(n_classes=4, width=1 / 16), MomentumSGD()
    x = RNG.random((4, 3, 32, 32))
    batch = dp.split(x, batch=2)
    assert unstaged(m, opt, m.dask_params(), batch) is None
    assert unstaged(m, opt, m.dask_params(), dp.split(x, spatial=(2, 2))) is None
    assert unstaged(m, opt, m.dask_params(), dp.split(x, batch=2, spatial=(2, 1))) is None
    # tiles of 10 and 22 rows: rounded to the stages' alignment (16: pool4), 16 and 16
    assert unstaged(m, opt, m.dask_params(), dp.split(x).rechunk((4, 3, (10, 22), 32))) is None
    assert "split along its channels" in unstaged(m, opt, m.dask_params(), dp.split(x, channel=3))
    assert "smaller than the network's alignment 16" in unstaged(
        m, opt, m.dask_params(), dp.split(x).rechunk((4, 3, (4, 28), 32))
    )
    odd = Model(_odd_program())  # 7x7 -> pool 3x3 -> conv2 1x1: a tile would hold no pixel
    assert "holds no pixel of node 'conv2'" in unstaged(
        odd, opt, odd.dask_params(), dp.split(RNG.random((4, 3, 7, 7))).rechunk((4, 3, (3, 4), 7))
    )
    assert "parameters are split" in unstaged(m, opt, m.dask_params(channel_split=2), batch)
    assert "not MomentumSGD" in unstaged(m, object(), m.dask_params(), batch)
    with dask.config.set({"pconv.staged": False}):
        assert unstaged(m, opt, m.dask_params(), batch) == "pconv.staged is off"
    no_bn = Model(sequential(("c", Conv2d(3, 2, 3, padding=1)), ("f", Flatten()), ("l", Linear(2048, 2))))
    assert "no BatchNorm" in unstaged(no_bn, opt, no_bn.dask_params(), batch)
    # strided, dilated, grouped, "same" and unpadded convolutions, on batch chunks and tiles
    tiles = dp.split(x, spatial=(2, 2))
    for conv in (
        Conv2d(3, 2, 3, stride=2),
        Conv2d(3, 3, 3, padding=2, dilation=2),
        Conv2d(3, 3, 3, padding=1, groups=3),
        Conv2d(3, 2, 3, padding="same"),
        Conv2d(3, 2, (3, 3), padding=1),
    ):
        m2 = Model(
            sequential(
                ("c", conv), ("bn", BatchNorm(conv.out_channels)), ("f", Flatten()), ("l", Linear(1, 2))
            )
        )
        assert unstaged(m2, opt, m2.dask_params(), batch) is None
        assert unstaged(m2, opt, m2.dask_params(), tiles) is None


def test_a_staged_step_graph_is_a_few_tasks_per_chunk_and_batch_norm():
    """Per BatchNorm on batch chunks: a stage forward and one backward (the stage results are
    small enough to be read whole: ``pconv.read-whole-below``), so the critical path is about
    two tasks per BatchNorm; with a pick of the statistics and sums (tiles, or larger results)
    four.  It does not grow with the chunks."""
    m = VGG16(n_classes=4, width=1 / 16)
    x, t = RNG.random((6, 3, 32, 32)), RNG.integers(0, 4, 6)
    paths = []
    for chunks in (2, 3):
        xd, td = chunk_batch(x, t, {"batch": chunks})
        opt = MomentumSGD()
        params = m.dask_params(like=xd)
        stats = graph_stats(training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, 0))
        paths.append(stats.critical_path)
    n_bn = 14
    assert paths[0] == paths[1] <= 2 * n_bn + 6
    with dask.config.set({"pconv.read-whole-below": 0}):
        xd, td = chunk_batch(x, t, {"batch": 2})
        params = m.dask_params(like=xd)
        stats = graph_stats(training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, 0))
        picked = stats.critical_path
    assert paths[0] < picked <= 4 * n_bn + 6
    # tiles: the halo strips travel beside the statistics, so no longer than picked chunks
    for split in ({"spatial": (2, 2)}, {"batch": 2, "spatial": (2, 2)}):
        xd, td = chunk_batch(x, t, split)
        params = m.dask_params(like=xd)
        stats = graph_stats(training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, 0))
        assert stats.critical_path <= picked


def test_a_tiled_step_is_the_same_bits_whatever_the_order_of_its_tasks():
    """Every sum over tiles and chunks runs in a fixed order inside one task, so the threaded
    scheduler (tasks in any order) gives the synchronous one's bits."""
    m = Model(_tiled_program(), seed=4, dtype=np.float64)
    x, t = RNG.standard_normal((5, 3, 24, 8)), RNG.integers(0, 3, 5)
    xd, td = _split(x, t, (2, (8, 4, 12), (4, 4)))
    opt = MomentumSGD(0.05, 0.9, 5e-4)
    params = m.dask_params(like=xd)
    assert unstaged(m, opt, params, xd) is None
    out = training_step(m, opt, params, dict(m.state), opt.init_state(params), xd, td, step=1)
    a = dask.compute(out, scheduler="sync")[0]
    b = dask.compute(out, scheduler="threads")[0]
    assert a.loss == b.loss
    for ga, gb in zip(a[:3], b[:3]):
        for name in ga:
            np.testing.assert_array_equal(ga[name], gb[name], err_msg=name)
