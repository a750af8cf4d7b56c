"""The staged step of programs with branches (dask_pconv/stages/step.py): the fine-grained step
to rounding in every batch split, PyTorch's gradients, the chain's stages bit for bit, and the
shape of its graph."""

import dask
import numpy as np
import optional
import pytest

from dask_pconv.data import chunk_batch
from dask_pconv.graphstats import graph_stats
from dask_pconv.models import (
    INPUT,
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    Model,
    Node,
    Program,
    ReLU,
    ResNet18,
    UNet,
    Upsample,
)
from dask_pconv.optim import MomentumSGD
from dask_pconv.stages.step import unstaged
from dask_pconv.stages.train_plan import step_plan
from dask_pconv.step import training_step

RNG = np.random.default_rng(21)


def residual_net():
    """A stem, a residual block with an identity shortcut, a downsampling block whose
    projection shortcut has a BatchNorm in parallel with the main path's second one, a
    BatchNorm on the program's input and a skip from the input itself."""
    return Program(
        (
            Node("in_bn", BatchNorm(3), (INPUT,)),
            Node("stem", Conv2d(3, 4, 3, padding=1), ("in_bn",)),
            Node("stem_bn", BatchNorm(4, relu=True), ("stem",)),
            Node("a1", Conv2d(4, 4, 3, padding=1), ("stem_bn",)),
            Node("a1_bn", BatchNorm(4), ("a1",)),
            Node("a1_relu", ReLU(), ("a1_bn",)),
            Node("a2", Conv2d(4, 4, 3, padding=1), ("a1_relu",)),
            Node("a2_bn", BatchNorm(4), ("a2",)),
            Node("a_sum", Add(), ("a2_bn", "stem_bn")),
            Node("a_relu", ReLU(), ("a_sum",)),
            Node("drop", Dropout(0.3), ("a_relu",)),
            Node("b1", Conv2d(4, 6, 3, stride=2, padding=1), ("drop",)),
            Node("b1_bn", BatchNorm(6, relu=True), ("b1",)),
            Node("b2", Conv2d(6, 6, 3, padding=1), ("b1_bn",)),
            Node("b2_bn", BatchNorm(6), ("b2",)),
            Node("short", Conv2d(4, 6, 1, stride=2), ("drop",)),
            Node("short_bn", BatchNorm(6), ("short",)),
            Node("b_sum", Add(), ("b2_bn", "short_bn")),
            Node("b_relu", ReLU(), ("b_sum",)),
            Node("pool", MaxPool2d(2), ("b_relu",)),
            Node("flatten", Flatten(), ("pool",)),
            Node("fc", Linear(6 * 2 * 2, 5, channel_split=False), ("flatten",)),
        )
    )


def skip_net():
    """A conv reading the input and an Add reading it again two stages later; a 1-D
    BatchNorm and a second Linear after it."""
    return Program(
        (
            Node("a", Conv2d(3, 3, 3, padding=1, bias=True), (INPUT,)),
            Node("a_bn", BatchNorm(3, relu=True), ("a",)),
            Node("b", Conv2d(3, 3, 3, padding=1), ("a_bn",)),
            Node("b_bn", BatchNorm(3), ("b",)),
            Node("sum", Add(), ("b_bn", INPUT)),
            Node("flatten", Flatten(), ("sum",)),
            Node("fc1", Linear(3 * 7 * 7, 6), ("flatten",)),
            Node("fc1_bn", BatchNorm(6, relu=True), ("fc1",)),
            Node("fc2", Linear(6, 5, channel_split=False), ("fc1_bn",)),
        )
    )


def conv_chain():
    """A chain of the convolutions the chain's stages do not run: dilated, grouped, 'same'
    with an even kernel, pair kernels and strides that leave a row unread."""
    return Program(
        (
            Node("a", Conv2d(3, 6, 3, padding=2, dilation=2), (INPUT,)),
            Node("a_bn", BatchNorm(6, relu=True), ("a",)),
            Node("b", Conv2d(6, 6, 3, padding=1, groups=3, bias=True), ("a_bn",)),
            Node("b_bn", BatchNorm(6, relu=True), ("b",)),
            Node("c", Conv2d(6, 4, (2, 3), padding="same"), ("b_bn",)),
            Node("c_bn", BatchNorm(4), ("c",)),
            Node("d", Conv2d(4, 4, (3, 1), stride=(2, 3), padding=(0, 1)), ("c_bn",)),
            Node("d_bn", BatchNorm(4, relu=True), ("d",)),
            Node("flatten", Flatten(), ("d_bn",)),
            Node("fc", Linear(4 * 4 * 4, 5, channel_split=False), ("flatten",)),
        )
    )


def encoder_decoder():
    """Average pooling (padding counted and not), a transposed convolution with output
    padding and bias, nearest upsampling, concatenations of two and three nodes, leaky ReLU,
    an identity, a global average pool and a Linear with bias."""
    return Program(
        (
            Node("a", Conv2d(3, 4, 3, padding=1), (INPUT,)),
            Node("a_bn", BatchNorm(4), ("a",)),
            Node("a_act", LeakyReLU(0.1), ("a_bn",)),
            Node("down", AvgPool2d(3, 2, padding=1, count_include_pad=False), ("a_act",)),
            Node("b", Conv2d(4, 4, 3, padding=1), ("down",)),
            Node("b_bn", BatchNorm(4, relu=True), ("b",)),
            Node("up", ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, bias=True), ("b_bn",)),
            Node("up2", Upsample(2), ("b_bn",)),
            Node("cat", Concat(), ("up", "a_act", "up2")),
            Node("c", Conv2d(11, 4, 1), ("cat",)),
            Node("c_bn", BatchNorm(4, relu=True), ("c",)),
            Node("same", Identity(), ("c_bn",)),
            Node("pool", AvgPool2d(2), ("same",)),
            Node("gap", AdaptiveAvgPool2d(1), ("pool",)),
            Node("flatten", Flatten(), ("gap",)),
            Node("fc", Linear(4, 5, bias=True, channel_split=False), ("flatten",)),
        )
    )


NETS = {
    "encoder-decoder": (encoder_decoder, (6, 3, 8, 8)),
    "residual": (residual_net, (8, 3, 8, 8)),
    "skip": (skip_net, (7, 3, 7, 7)),
    "convolutions": (conv_chain, (5, 3, 10, 8)),  # d reads 9 of the 10 rows
}


def _split(x, t, chunks):
    """The batch in ``chunks`` pieces (an int) or as ``(batch chunks, row chunks, column
    chunks)``."""
    if isinstance(chunks, int):
        return chunk_batch(x, t, {"batch": chunks} if chunks > 1 else {})
    batch, rows, cols = chunks
    xd, td = chunk_batch(x, t, {"batch": batch} if batch > 1 else {})
    return xd.rechunk((xd.chunks[0], x.shape[1], rows, cols)), td


def _step(model, x, t, chunks, staged, dropout):
    opt = MomentumSGD(0.05, 0.9, 5e-4)
    xd, td = _split(x, t, chunks)
    params = model.dask_params(like=xd)
    vel = {k: np.full(v.shape, 0.01, v.dtype) for k, v in model.params.items()}
    with dask.config.set({"pconv.staged": staged}):
        assert (unstaged(model, opt, params, xd) is None) == staged
        out = training_step(model, opt, params, dict(model.state), vel, xd, td, step=3, dropout=dropout)
    return dask.compute(out)[0]


#: tiles per net: not aligned with the strides, uneven, a halo wider than a tile, and batch
#: chunks of tiles
TILES = {
    "encoder-decoder": [(1, (4, 4), (4, 4)), (2, (3, 5), (5, 3))],
    "residual": [(1, (4, 4), (4, 4)), (2, (2, 3, 3), (5, 3))],
    "skip": [(1, (3, 4), (4, 3)), (3, (2, 5), (7,))],
    "convolutions": [(1, (5, 5), (3, 5)), (2, (1, 9), (4, 4))],
}
SPLITS = [(n, c) for n in NETS for c in (1, 2, 3)] + [(n, t) for n, ts in TILES.items() for t in ts]


@pytest.mark.parametrize("dropout", [False, True], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("net, chunks", SPLITS)
def test_staged_step_of_a_program_with_branches_is_the_fine_grained_step(net, chunks, dropout):
    """Batch chunks, and tiles: each tile's stages read the windows of the values before them
    from their own and their neighbours' regions, forward and backward, whatever the tiles'
    sizes."""
    make, shape = NETS[net]
    x, t = RNG.standard_normal(shape), RNG.integers(0, 5, shape[0])
    want = _step(Model(make(), seed=4, dtype=np.float64), x, t, chunks, False, dropout)
    got = _step(Model(make(), seed=4, dtype=np.float64), x, t, chunks, True, dropout)
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss) and got.accuracy == want.accuracy
    for g, w in zip(got[:3], want[:3]):
        assert g.keys() == w.keys()
        for name in g:
            assert g[name].dtype == w[name].dtype and g[name].shape == w[name].shape
            np.testing.assert_allclose(g[name], w[name], rtol=1e-11, atol=1e-13, err_msg=name)


def test_staged_branch_gradients_match_pytorch():
    torch = optional.need_torch()
    F = torch.nn.functional
    model = Model(skip_net(), seed=3, dtype=np.float64)
    x, t = RNG.standard_normal((6, 3, 7, 7)), RNG.integers(0, 5, 6)
    xd, td = chunk_batch(x, t, {"batch": 2})
    opt = MomentumSGD(lr=1.0, momentum=0.0, weight_decay=0.0)  # new velocity = -gradient
    zeros = {k: np.zeros_like(v) for k, v in model.params.items()}
    out = training_step(model, opt, model.dask_params(like=xd), dict(model.state), zeros, xd, td, 0, False)
    loss, v = dask.compute(out.loss, out.velocities)
    p = {k: torch.tensor(a, requires_grad=True) for k, a in model.params.items()}

    def bn(h, name, relu=False):
        h = F.batch_norm(h, None, None, p[f"{name}.gamma"], p[f"{name}.beta"], True, eps=2e-5)
        return F.relu(h) if relu else h

    h0 = torch.tensor(x)
    h = bn(F.conv2d(h0, p["a.W"], p["a.b"], padding=1), "a_bn", True)
    h = bn(F.conv2d(h, p["b.W"], padding=1), "b_bn") + h0
    h = bn(h.flatten(1) @ p["fc1.W"].T, "fc1_bn", True) @ p["fc2.W"].T
    want = F.cross_entropy(h, torch.tensor(t))
    want.backward()
    assert abs(loss - want.item()) <= 1e-12 * abs(want.item())
    for k in p:
        np.testing.assert_allclose(-v[k], p[k].grad.numpy(), rtol=1e-10, atol=1e-13, err_msg=k)


def test_parallel_branches_share_a_synchronisation_and_the_graph_stays_small():
    """The residual net has 7 BatchNorms but 6 synchronisations (the projection's BatchNorm
    syncs with the main path's first): per chunk a task per stage forward and backward plus
    their small picks, and a critical path of a few tasks per stage."""
    plan = step_plan(residual_net().nodes)
    assert plan.last == 6 and plan.stage["short_bn"] == plan.stage["b1_bn"] == 5
    m = Model(residual_net(), seed=0)
    x, t = RNG.random((4, 3, 8, 8), dtype=np.float32), RNG.integers(0, 5, 4)
    xd, td = chunk_batch(x, t, {"batch": 2})
    vel = {k: np.zeros_like(v) for k, v in m.params.items()}
    out = training_step(m, MomentumSGD(), m.dask_params(like=xd), dict(m.state), vel, xd, td, 0, True)
    stats = graph_stats(dask.delayed(tuple)([out.loss, *out.params.values()]))
    n_params, n_bn = len(m.params), sum(isinstance(n.layer, BatchNorm) for n in m.program.nodes)
    # per chunk: 6 forward stages, the last, 6 backward and at most a stats / sums / grad pick
    # each, the loss pick; per parameter a velocity and an update, two running statistics per
    # BatchNorm, loss and accuracy, and the batch's and the labels' blocks
    assert stats.tasks <= 2 * (6 + 1 + 6 + 3 * 7 + 1) + 2 * n_params + 2 * n_bn + 2 + 12
    # two tasks per synchronisation forward and backward, and the update
    assert stats.critical_path <= 4 * plan.last + 3


@pytest.mark.parametrize("chunks", [2, (2, (8, 8), (8, 8))])
def test_staged_resnet18_step_is_the_fine_grained_step(chunks):
    make = lambda: ResNet18(n_classes=5, width=1 / 16, seed=1, dtype=np.float64)  # noqa: E731
    x, t = RNG.standard_normal((4, 3, 16, 16)), RNG.integers(0, 5, 4)
    want = _step(make(), x, t, chunks, False, True)
    got = _step(make(), x, t, chunks, True, True)
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss) and got.accuracy == want.accuracy
    for g, w in zip(got[:3], want[:3]):
        for name in g:
            np.testing.assert_allclose(g[name], w[name], rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("chunks", [1, 2, (1, (8, 8), (6, 6)), (2, (5, 11), (7, 5))])
def test_staged_unet_step_with_per_pixel_labels_is_the_fine_grained_step(chunks):
    """Per-pixel logits and labels: the loss is the mean over every pixel of the batch, its
    gradient spread over the chunks' pixels (on tiles: each tile's own pixels; tiles of 5 and
    7 rows are not aligned with the network's 4)."""
    make = lambda: UNet(in_channels=2, n_classes=3, width=2, depth=2, seed=1, dtype=np.float64)  # noqa: E731
    x, t = RNG.standard_normal((4, 2, 16, 12)), RNG.integers(0, 3, (4, 16, 12))
    want = _step(make(), x, t, chunks, False, False)
    got = _step(make(), x, t, chunks, True, False)
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss) and got.accuracy == want.accuracy
    for g, w in zip(got[:3], want[:3]):
        for name in g:
            np.testing.assert_allclose(g[name], w[name], rtol=1e-11, atol=1e-13, err_msg=name)


def test_a_staged_unet_step_checks_the_image_size_first():
    m = UNet(in_channels=1, n_classes=2, width=2, depth=2)
    xd, td = chunk_batch(RNG.random((2, 1, 10, 8)), RNG.integers(0, 2, (2, 10, 8)), {"batch": 2})
    vel = {k: np.zeros_like(v) for k, v in m.params.items()}
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth = 4"):
        training_step(m, MomentumSGD(), m.dask_params(like=xd), dict(m.state), vel, xd, td, 0, True)


def test_steps_the_branch_stages_cannot_run_say_why():
    opt, x = MomentumSGD(), RNG.random((4, 3, 8, 8))
    batch = chunk_batch(x, np.zeros(4, int), {"batch": 2})[0]

    def program(*extra):
        return Model(
            Program(
                (
                    Node("a", Conv2d(3, 3, 3, padding=1), (INPUT,)),
                    Node("bn", BatchNorm(3), ("a",)),
                    *extra,
                    Node("f", Flatten(), (extra[-1].name if extra else "bn",)),
                    Node("fc", Linear(192, 2), ("f",)),
                )
            )
        )

    m = program(Node("cat", Concat(axis=0), ("bn", INPUT)))
    assert "concatenates along axis 0" in unstaged(m, opt, m.dask_params(), batch)
    # a layer with no block rule runs through the fine-grained reference inside its stage
    m = program(Node("p", AvgPool2d(3, 1, padding=1, ceil_mode=True), ("bn",)))
    assert unstaged(m, opt, m.dask_params(), batch) is None
    dead = Model(
        Program(
            (
                Node("a", Conv2d(3, 3, 3, padding=1), (INPUT,)),
                Node("unused", BatchNorm(3), ("a",)),
                Node("bn", BatchNorm(3), ("a",)),
                Node("f", Flatten(), ("bn",)),
                Node("fc", Linear(192, 2), ("f",)),
            )
        )
    )
    assert "do not lead to the program's output" in unstaged(dead, opt, dead.dask_params(), batch)
