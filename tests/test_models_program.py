"""Models as programs (dask_pconv/models/program.py, layers.py, model.py): the program's checks,
its parameter names and initial values, the interpreter in training and evaluation mode, a
residual (DAG) program, and the channel-split chunking, against PyTorch where installed and
against the unsplit run in every split."""

import functools

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from dask.highlevelgraph import HighLevelGraph

import dask_pconv as dp
from dask_pconv.models import (
    INPUT,
    VGG16,
    Add,
    BatchNorm,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    Model,
    Node,
    Program,
    ReLU,
    RunMode,
    sequential,
)

from strategies import assert_close, assert_trains_like_unsplit

RNG = np.random.default_rng(5)
X = RNG.standard_normal((6, 3, 8, 8))
T = RNG.integers(0, 5, 6)


def small_program(bias=True):
    return sequential(
        ("conv", Conv2d(3, 4, 3, padding=1, bias=bias)),
        ("relu", ReLU()),  # before the BatchNorm, so that the bias has a gradient
        ("bn", BatchNorm(4)),
        ("drop", Dropout(0.25)),
        ("pool", MaxPool2d(2)),
        ("flatten", Flatten()),
        ("fc", Linear(4 * 4 * 4, 5, channel_split=False)),
    )


def residual_program():
    """conv-bn-relu-conv, plus the block's input (a residual connection), then the head."""
    return Program(
        (
            Node("a", Conv2d(3, 3, 3, padding=1), (INPUT,)),
            Node("a_bn", BatchNorm(3, relu=True), ("a",)),
            Node("b", Conv2d(3, 3, 3, padding=1, bias=True), ("a_bn",)),
            Node("sum", Add(), ("b", INPUT)),
            Node("pool", MaxPool2d(2), ("sum",)),
            Node("flatten", Flatten(), ("pool",)),
            Node("fc", Linear(3 * 4 * 4, 5, channel_split=False), ("flatten",)),
        )
    )


def test_program_refuses_bad_graphs():
    conv = Conv2d(3, 4)
    with pytest.raises(ValueError, match="used twice"):
        sequential(("c", conv), ("c", ReLU()))
    with pytest.raises(ValueError, match="reserved 'input'"):
        sequential(("input", conv))
    with pytest.raises(ValueError, match=r"node 'r' reads \['later'\]: not an earlier node"):
        Program((Node("r", ReLU(), ("later",)), Node("later", conv, (INPUT,))))
    with pytest.raises(ValueError, match="reads nothing"):
        Program((Node("r", ReLU(), ()),))
    with pytest.raises(ValueError, match="at least one node"):
        Program(())
    with pytest.raises(TypeError, match="Nodes of Layers"):
        Program((Node("r", "relu", (INPUT,)),))
    with pytest.raises(KeyError, match=r"no node 'x'; the nodes are \['conv'"):
        small_program().node("x")


def test_names_order_and_initial_values():
    prog = small_program()
    assert list(prog.param_specs()) == ["conv.W", "conv.b", "bn.gamma", "bn.beta", "fc.W"]  # program order
    assert list(prog.state_specs()) == ["bn.avg_mean", "bn.avg_var"]
    p1, s1 = prog.init(3, np.float32)
    p2, _ = prog.init(3, np.float32)
    p3, _ = prog.init(4, np.float32)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert not np.array_equal(p1["conv.W"], p3["conv.W"])
    assert p1["conv.W"].dtype == np.float32 and p1["conv.W"].shape == (4, 3, 3, 3)
    # LeCun normal: N(0, 1/fan_in); biases and beta 0, gamma and the running variance 1
    w = VGG16(width=0.5).params["block3_1.conv.W"]
    assert abs(w.std() * np.sqrt(64 * 9) - 1) < 0.02
    assert not p1["conv.b"].any() and (p1["bn.gamma"] == 1).all() and (s1["bn.avg_var"] == 1).all()


def _torch_reference(model, x, t, residual):
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    h0 = torch.tensor(x)
    if residual:
        h = F.relu(
            F.batch_norm(
                F.conv2d(h0, p["a.W"], padding=1), None, None, p["a_bn.gamma"], p["a_bn.beta"], True, eps=2e-5
            )
        )
        h = F.conv2d(h, p["b.W"], p["b.b"], padding=1) + h0
    else:
        h = F.relu(F.conv2d(h0, p["conv.W"], p["conv.b"], padding=1))
        h = F.batch_norm(h, None, None, p["bn.gamma"], p["bn.beta"], True, eps=2e-5)
    h = F.max_pool2d(h, 2).flatten(1) @ p["fc.W"].T
    loss = F.cross_entropy(h, torch.tensor(t))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


SPLITS = {
    "unsplit": ({}, 1),
    "batch": ({"batch": 3}, 1),
    "input channels": ({"channel": 3}, 1),
    "spatial 3x2": ({"spatial": (3, 2)}, 1),
    "output channels": ({}, 2),
    "mixed": ({"batch": 2, "spatial": (2, 2)}, 3),
}


@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "residual"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_a_program_trains_like_pytorch_in_every_split(split, residual):
    """Loss and every gradient (float64, dropout off) equal the unsplit run's in every split,
    and PyTorch's where installed."""
    model = Model(residual_program() if residual else small_program(), seed=1, dtype=np.float64)
    reference = functools.partial(_torch_reference, residual=residual) if optional.HAVE_TORCH else None
    assert_trains_like_unsplit(model, X, T, *SPLITS[split], reference)


def segmentation_program():
    """A fully convolutional network: per-pixel logits (N, 5, H, W)."""
    return sequential(
        ("conv", Conv2d(3, 4, 3, padding=1)),
        ("bn", BatchNorm(4, relu=True)),
        ("head", Conv2d(4, 5, 1, bias=True)),
    )


@pytest.mark.parametrize("split", list(SPLITS))
def test_per_pixel_logits_train_with_per_pixel_labels_in_every_split(split):
    """(N, H, W) labels for (N, K, H, W) logits: the loss is the mean over every pixel, as in
    ``F.cross_entropy``, and the gradients equal the unsplit run's (and PyTorch's)."""
    t = np.random.default_rng(9).integers(0, 5, (6, 8, 8))
    model = Model(segmentation_program(), seed=1, dtype=np.float64)
    assert_trains_like_unsplit(
        model, X, t, *SPLITS[split], _torch_segmentation if optional.HAVE_TORCH else None
    )


def _torch_segmentation(model, x, t):
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    h = F.conv2d(torch.tensor(x), p["conv.W"], padding=1)
    h = F.relu(F.batch_norm(h, None, None, p["bn.gamma"], p["bn.beta"], True, eps=2e-5))
    loss = F.cross_entropy(F.conv2d(h, p["head.W"], p["head.b"]), torch.tensor(t))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


def test_training_mode_updates_every_running_statistic_and_evaluation_none():
    model = Model(residual_program(), dtype=np.float64)
    z, state = model.forward(X)
    assert set(state) == set(model.state) == {"a_bn.avg_mean", "a_bn.avg_var"}
    mean = dask.compute(state["a_bn.avg_mean"])[0]
    assert not np.allclose(mean, 0)  # 0.1 of the batch mean
    z, state = model.forward(X, train=False)
    assert state == {} and z.shape == (6, 5)


def test_each_batch_norm_computes_its_statistics_once_in_a_step():
    """The running update and the normalisation read one statistics array (passed to
    batch_norm explicitly, not matched by graph keys)."""
    m = VGG16(width=0.0625)
    loss, grads, aux = m.forward_backward_aux(dp.split(RNG.random((4, 3, 32, 32)), batch=2), T[:4])
    arrays = [loss, *grads.values(), *aux["state"].values()]
    graph = HighLevelGraph.merge(*(a.__dask_graph__() for a in arrays)).to_dict()
    names = {k[0] if isinstance(k, tuple) else k for k in graph}
    stats = {n for n in names if str(n).startswith("batch_norm-stats-") and not str(n).endswith("-part")}
    assert len(stats) == 14  # 13 convolutions and fc1


def test_add_refuses_mismatched_inputs():
    prog = Program(
        (
            Node("a", Conv2d(3, 2, 3, padding=1), (INPUT,)),
            Node("sum", Add(), ("a", INPUT)),
        )
    )
    with pytest.raises(ValueError, match="inputs of one shape"):
        Model(prog).forward(X)


def test_dropout_masks_differ_between_layers_and_steps_and_repeat():
    prog = sequential(("d1", Dropout(0.5)), ("d2", Dropout(0.5)))
    x = da.ones((4, 2, 8, 8), chunks=(2, 1, 8, 4))
    one = Program((prog.nodes[0],))
    a = prog.nodes[0].layer.apply((x,), {}, {}, RunMode(seed=1, step=2), 0)[0]
    b = prog.nodes[1].layer.apply((x,), {}, {}, RunMode(seed=1, step=2), 1)[0]
    c = prog.nodes[0].layer.apply((x,), {}, {}, RunMode(seed=1, step=3), 0)[0]
    again, _ = one.run(x, {}, {}, RunMode(seed=1, step=2))
    a, b, c, again = dask.compute(a, b, c, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, again)
    off, _ = one.run(x, {}, {}, RunMode(train=False, seed=1, step=2))
    assert np.array_equal(dask.compute(off)[0], np.ones((4, 2, 8, 8)))


def test_chunked_follows_the_layers_and_checks_names():
    model = Model(small_program(), channel_split=2)
    p = model.dask_params()
    assert p["conv.W"].chunks[0] == (2, 2) and p["conv.b"].chunks == ((2, 2),)
    assert p["fc.W"].chunks[0] == (5,)  # the logits' layer stays whole
    assert model.chunked(model.state, channel_split=3)["bn.avg_var"].chunks == ((2, 1, 1),)
    assert model.dask_params(channel_split=1)["conv.W"].chunks[0] == (4,)
    with pytest.raises(KeyError, match="'nope' is not a parameter or state array"):
        model.chunked({"nope": np.zeros(3)})
    with pytest.raises(ValueError, match="channel_split must be a positive int"):
        model.dask_params(channel_split=0)
    with pytest.raises(TypeError, match="program must be a Program"):
        Model([Conv2d(3, 4)])


def test_features_stop_at_a_node_in_evaluation_mode():
    model = Model(small_program(), dtype=np.float64, input_shape=(3, 8, 8))
    h = model.features(dp.split(RNG.standard_normal((2, 3, 12, 16)), spatial=(2, 2)), until="pool")
    assert h.shape == (2, 4, 6, 8)
    with pytest.raises(KeyError, match="no node 'fc1'"):
        model.features(X, until="fc1")
    with pytest.raises(ValueError, match=r"x must be \(N, 3, 8, 8\)"):
        model.forward(RNG.standard_normal((2, 3, 12, 16)))


def test_nodes_may_name_their_arrays():
    """``Node.names`` renames a layer's arrays everywhere: specs, init, the run, the new state,
    and the checks of ``load_params`` (a running variance by its spec, not by its name)."""
    prog = Program(
        (
            Node("c", Conv2d(3, 4, 3, padding=1), (INPUT,), {"W": "conv.weight"}),
            Node("n", BatchNorm(4), ("c",), {"avg_var": "bn.var", "gamma": "bn.g"}),
            Node("f", Flatten(), ("n",)),
            Node("l", Linear(4 * 8 * 8, 5, bias=True), ("f",)),
        )
    )
    assert list(prog.param_specs()) == ["conv.weight", "bn.g", "n.beta", "l.W", "l.b"]
    assert list(prog.state_specs()) == ["n.avg_mean", "bn.var"]
    assert prog.nodes[1].names == (("avg_var", "bn.var"), ("gamma", "bn.g"))  # hashable pairs
    hash(prog)
    model = Model(prog, dtype=np.float64)
    _, new_state = prog.run(da.from_array(X[:, :, :8, :8]), model.dask_params(), model.state)
    assert set(new_state) == {"n.avg_mean", "bn.var"}
    bad = {**model.state, "bn.var": -np.ones(4)}
    with pytest.raises(ValueError, match=r"state\['bn.var'\] \(a BatchNorm running variance\)"):
        model.load_params(model.params, bad)
    with pytest.raises(ValueError, match="node 'b' names \\['V'\\]; its layer has \\['W'"):
        Program((Node("b", Conv2d(3, 4), (INPUT,), {"V": "x"}),))
    with pytest.raises(ValueError, match="nodes 'a' and 'b' both name an array 'a.W'"):
        Program((Node("a", Conv2d(3, 3), (INPUT,)), Node("b", Conv2d(3, 3), ("a",), {"W": "a.W"})))


def test_linear_bias_trains_like_pytorch():
    torch = optional.need_torch()
    import torch.nn.functional as F

    model = Model(sequential(("f", Flatten()), ("l", Linear(3 * 8 * 8, 5, bias=True))), dtype=np.float64)
    x = X[:, :, :8, :8]
    loss, grads = dask.compute(*model.forward_backward(dp.split(x, batch=2), T, channel_split=2))
    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    want = F.cross_entropy(F.linear(torch.tensor(x).flatten(1), p["l.W"], p["l.b"]), torch.tensor(T))
    want.backward()
    assert_close(loss, want.item(), np.float64)
    for k in p:
        assert_close(grads[k], p[k].grad.numpy(), np.float64)
    with pytest.raises(ValueError, match=r"Linear\(192, 5\) needs input \(N, 192\), got shape \(6, 48\)"):
        model.predict(X[:, :, :4, :4])


def test_a_programs_dask_token_follows_its_nodes_and_is_computed_once():
    from dask.base import tokenize

    a = sequential(("c", Conv2d(1, 2, 3)), ("r", ReLU()))
    b = sequential(("c", Conv2d(1, 2, 3)), ("r", ReLU()))
    c = sequential(("c", Conv2d(1, 3, 3)), ("r", ReLU()))
    assert tokenize(a) == tokenize(b) != tokenize(c)
    assert a.__dict__["_token"] == a.__dask_tokenize__()  # cached on the program
    assert a == b and hash(a) == hash(b)  # the cache is not a field
