"""The stage planner, block interpreter and lowering (dask_pconv.stages) for the forward modes:
every layer kind declares its needs; the plan cuts only where blocks must exchange something
and says why; predict and features on batch chunks, tiles and both equal the fine-grained
reference in float64, with a bounded number of tasks per block and a short critical path."""

import dask
import dask.array as da
import numpy as np
import pytest
from test_models_tiling import _branches, _chain, _model

import dask_pconv as dp
from dask_pconv.graphstats import graph_stats
from dask_pconv.models import (
    VGG16,
    AdaptiveAvgPool2d,
    Concat,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    Model,
    Node,
    Program,
    ResNet18,
    sequential,
)
from dask_pconv.models import layers as layers_module
from dask_pconv.models.layers import SPLIT_AXES, Need
from dask_pconv.models.unet import UNet
from dask_pconv.optim import MomentumSGD
from dask_pconv.stages.plan import Layout, plan
from dask_pconv.step import training_step


def _layout(shape, chunks, out_channel=1):
    return Layout.of(da.zeros(shape, chunks=chunks), out_channel)


# -- the declarations and the planner (nothing computed) ------------------------------------------
def _every_layer_kind():
    return [
        cls
        for name in layers_module.__all__
        if isinstance(cls := getattr(layers_module, name), type)
        and issubclass(cls, Layer)
        and cls is not Layer
    ]


def test_every_layer_kind_declares_its_needs_on_every_axis_in_both_modes():
    examples = {
        "Conv2d": ("2, 3, 3",),
        "ConvTranspose2d": ("2, 3, 3",),
        "BatchNorm": ("3",),
        "MaxPool2d": ("2",),
        "Linear": ("4, 5",),
        "Dropout": ("0.5",),
    }
    kinds = _every_layer_kind()
    assert len(kinds) >= 14
    for cls in kinds:
        layer = eval(f"cls({examples.get(cls.__name__, ('',))[0]})")
        for axis in SPLIT_AXES:
            for train in (True, False):
                assert isinstance(layer.needs(axis, train), Need), (cls.__name__, axis, train)
    assert Conv2d(2, 3, 3).needs("spatial", False) is Need.HALO
    assert Conv2d(2, 3, 3).needs("out_channel", False) is Need.GATHER
    assert Conv2d(2, 3, 3).needs("in_channel", True) is Need.PARTIAL_SUM
    bn = layers_module.BatchNorm(3)
    assert bn.needs("batch", True) is Need.STATISTIC and bn.needs("batch", False) is Need.LOCAL
    assert AdaptiveAvgPool2d().needs("spatial", False) is Need.STATISTIC
    with pytest.raises(ValueError, match="unknown split axis"):
        Conv2d(2, 3, 3).needs("depth", False)


def test_a_layer_kind_that_declares_no_needs_is_an_error_naming_it():
    class Mystery(Layer):
        def reach(self):
            return layers_module.LOCAL

    program = Program((Node("m", Mystery(), ("input",)),))
    with pytest.raises(NotImplementedError, match="Mystery declares no needs"):
        plan(program, _layout((2, 1, 8, 8), (1, 1, 8, 8)))


def test_evaluation_on_batch_chunks_is_one_stage():
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), (4, 3, 32, 32)))
    assert len(p.stages) == 1 and not p.stages[0].tiled and p.refused is None
    assert "every layer is local to a batch chunk" in p.explain()
    assert p.explain().startswith("predict on 2 batch chunks: 1 stage")


def test_tiles_are_cut_before_the_first_layer_that_needs_every_tile():
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 64, 64), (4, 3, 16, 16)))
    assert [s.tiled for s in p.stages] == [True, False]
    assert p.stages[0].output == "pool5" and p.stages[1].nodes[0][1].name == "flatten"
    text = p.explain()
    assert "2 batch chunks x 4x4 tiles: 2 stages" in text
    assert "cut before node 'flatten' (Flatten): it needs a gather across tiles" in text
    assert "more input pixels than the image has" in text

    r = plan(ResNet18(width=1 / 8).program, _layout((2, 3, 32, 32), (2, 3, 16, 16)))
    assert [s.tiled for s in r.stages] == [True, False]
    assert "needs a statistic across tiles" in r.explain()


def test_a_network_without_whole_image_layers_is_one_tiled_stage():
    p = plan(UNet(in_channels=1, n_classes=2, width=4, depth=2).program, _layout((1, 1, 1024, 1024), 128))
    (stage,) = p.stages
    assert stage.tiled and stage.tiles.n_tiles == 64 and stage.tiles.align == (4, 4)


def _two_pools():
    """Two global pools, of ``a`` and of ``b``: the rest reads ``a`` and ``b``, so only ``a``
    (the last value the rest reads alone) ends the tiled stage."""
    return Program(
        (
            Node("a", Conv2d(2, 3, 3, padding=1), ("input",)),
            Node("b", Conv2d(3, 3, 3, padding=1), ("a",)),
            Node("gb", AdaptiveAvgPool2d(), ("b",)),
            Node("ga", AdaptiveAvgPool2d(), ("a",)),
            Node("cat", Concat(1), ("gb", "ga")),
            Node("flat", Flatten(), ("cat",)),
            Node("fc", Linear(6, 2, bias=True), ("flat",)),
        )
    )


def test_the_tiled_stage_ends_where_the_rest_reads_one_value():
    p = plan(_two_pools(), _layout((2, 2, 16, 16), (1, 2, 8, 8)))
    assert [n.name for _, n in p.stages[0].nodes] == ["a"]
    assert "node 'a' is the last value before it that the rest reads alone" in p.explain()
    # the input itself read after the cut: nothing can be tiled
    nodes, ga = _two_pools().nodes, Node("ga", AdaptiveAvgPool2d(), ("input",))
    program = Program((*nodes[:3], ga, *nodes[4:6], Node("fc", Linear(5, 2, bias=True), ("flat",))))
    q = plan(program, _layout((2, 2, 16, 16), (1, 2, 8, 8)))
    assert [s.tiled for s in q.stages] == [False]
    assert "the tiles are put together first" in q.explain()
    model = _model(program)
    x = da.from_array(np.random.default_rng(5).standard_normal((2, 2, 16, 16)), chunks=(1, 2, 8, 5))
    np.testing.assert_allclose(model.predict(x).compute(), _reference(model, x), rtol=1e-11, atol=1e-12)


def test_training_on_batch_chunks_is_cut_before_each_batch_norm():
    """The training step's stages (the branching programs' step graph takes its stage numbers
    from the planner): one per BatchNorm, parallel branches sharing their synchronisation."""
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), (4, 3, 32, 32)), mode="train")
    assert len(p.stages) == 15  # 14 BatchNorms
    assert all(s.nodes[0][1].name.endswith("bn") for s in p.stages[1:-1])
    assert "cut before 'block1_1.bn' (BatchNorm: a statistic over the whole batch)" in p.explain()
    r = plan(ResNet18(width=1 / 8).program, _layout((8, 3, 32, 32), (4, 3, 32, 32)), mode="train")
    text = r.explain()
    assert (
        "'layer2.0.bn1' (BatchNorm: a statistic over the whole batch), 'layer2.0.shortcut.1' (BatchNorm"
        in text
    )
    starts_with_bn = Program(
        (Node("bn", layers_module.BatchNorm(2), ("input",)), Node("c", Conv2d(2, 2, 1), ("bn",)))
    )
    q = plan(starts_with_bn, _layout((4, 2, 4, 4), (2, 2, 4, 4)), mode="train")
    assert [[n.name for _, n in st.nodes] for st in q.stages] == [["bn", "c"]]


def test_training_on_tiles_runs_tiled_stages_up_to_the_first_layer_that_needs_every_tile():
    """On tiles every stage before the one holding the global pooling is tiled (with the
    halos' redundant work reported); that stage and the rest run on whole images."""
    r = plan(ResNet18(width=1 / 8).program, _layout((8, 3, 64, 64), (8, 3, 32, 32)), mode="train")
    assert r.refused is None and len(r.stages) == 18
    assert all(s.tiled for s in r.stages[:-1]) and not r.stages[-1].tiled
    assert [n.name for _, n in r.stages[-1].nodes][-2:] == ["flatten", "linear"]
    text = r.explain()
    assert (
        "'avgpool' (AdaptiveAvgPool2d: a statistic over the whole image, so whole images from here on)"
        in text
    )
    assert "2x2 tiles aligned to 8x8, holding" in text and "the halos' redundant work" in text
    u = plan(
        UNet(in_channels=1, n_classes=2, width=2, depth=2).program,
        _layout((2, 1, 32, 32), (2, 1, 16, 16)),
        "train",
    )
    assert all(s.tiled for s in u.stages) and len(u.stages) == 11


def test_what_is_not_staged_is_refused_with_the_reason():
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), (4, 3, 32, 32)), mode="backward")
    assert p.refused and "mode 'backward' is not planned" in p.explain()
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), (4, 3, 28, 32)), mode="train")
    assert "smaller than the network's alignment 16" in p.refused
    p = plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), (4, 3, 32, 32), out_channel=2))
    assert "not staged: a split of the out channels is not staged yet" in p.explain()
    p = plan(VGG16(width=1 / 16).program, _layout((8, 4, 32, 32), (4, 2, 32, 32)))
    assert "in channels" in p.refused
    with pytest.raises(KeyError, match="no node 'nope'"):
        plan(VGG16(width=1 / 16).program, _layout((8, 3, 32, 32), -1), until="nope")


# -- the lowering: exact, few tasks ---------------------------------------------------------------
def _reference(model, x, until=None):
    with dask.config.set({"pconv.staged": False}):
        out = model.predict(x) if until is None else Model.features(model, x, until)
    return out.compute()


NETWORKS = {
    "vgg16": lambda: VGG16(width=1 / 16, dtype=np.float64, seed=3),
    "resnet18": lambda: ResNet18(width=1 / 8, dtype=np.float64, seed=3),
    "unet": lambda: UNet(in_channels=2, n_classes=3, width=4, depth=2, dtype=np.float64, seed=3),
    "chain": lambda: _model(_chain(), seed=3),  # strided, ceil-mode, dilated, transposed...
    "branches": lambda: _model(_branches(), seed=3),
    "two pools": lambda: _model(_two_pools(), seed=3),
}
CHUNKINGS = {
    "batch": lambda n, c, h, w: (n // 2, c, h, w),
    "tiles": lambda n, c, h, w: (n, c, h // 2, w // 2),
    "mixed, tiles not aligned with anything": lambda n, c, h, w: (n // 2 + 1, c, 11, 13),
}


def _randomised(model):
    rng = np.random.default_rng(7)
    model.state = {k: rng.random(v.shape) + 0.5 for k, v in model.state.items()}
    return model


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("network", NETWORKS)
def test_staged_predict_is_the_fine_grained_predict(network, chunking):
    model = _randomised(NETWORKS[network]())
    c = 3 if network in ("vgg16", "resnet18") else 2
    shape = (4, c, 32, 32) if network != "chain" else (4, c, 37, 41)
    x = da.from_array(np.random.default_rng(1).standard_normal(shape), chunks=CHUNKINGS[chunking](*shape))
    y = model.predict(x)
    assert "stage" in model.explain(x) and "not staged" not in model.explain(x)
    np.testing.assert_allclose(y.compute(), _reference(model, x), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("until", ["pool3", "block4_2.bn"])
def test_staged_features_are_the_fine_grained_features(until):
    model = _randomised(VGG16(width=1 / 16, dtype=np.float64))
    x = da.from_array(np.random.default_rng(2).standard_normal((2, 3, 48, 40)), chunks=(1, 3, 13, 17))
    y = Model.features(model, x, until)  # VGG16.features takes a number of blocks
    assert y.chunks[2:] != ((y.shape[2],), (y.shape[3],))  # tiles, not whole images
    np.testing.assert_allclose(y.compute(), _reference(model, x, until), rtol=1e-11, atol=1e-12)


def test_a_layer_without_a_block_rule_runs_through_the_reference_in_its_block():
    """A max pool with padding has no block rule: its node runs the fine-grained op on the
    block, inside the stage's task (still one task per block)."""
    program = sequential(
        ("c", Conv2d(2, 3, 3, padding=1)),
        ("pool", MaxPool2d(3, 2, padding=1, ceil_mode=True)),
        ("d", Conv2d(3, 2, 3, padding=1)),
    )
    model = _model(program)
    x = da.from_array(np.random.default_rng(3).standard_normal((3, 2, 21, 19)), chunks=(2, 2, 8, 7))
    y = model.predict(x)
    np.testing.assert_allclose(y.compute(), _reference(model, x), rtol=1e-11, atol=1e-12)
    n_tiles = len(y.chunks[2]) * len(y.chunks[3]) * len(y.chunks[0])
    assert graph_stats(y).tasks <= x.npartitions + n_tiles + 1


def test_predict_on_batch_chunks_is_one_task_per_chunk():
    """The issue's target: <= 3 tasks per chunk, critical path <= 4 (VGG16, batch:2)."""
    model = VGG16(width=1 / 16)
    x = da.random.default_rng(0).standard_normal((8, 3, 32, 32), chunks=(4, 3, 32, 32)).astype(np.float32)
    stats = graph_stats(model.predict(x))
    # per chunk: its random block, its cast, its stage task; and one job key for all
    assert stats.tasks <= 3 * 2 + 1 and stats.critical_path <= 4, stats


def test_predict_of_a_unet_on_tiles_is_one_task_per_tile_for_any_number_of_tiles():
    """The issue's target: a U-Net on a 1024 x 1024 image in 8 x 8 tiles, <= 12 tasks per
    tile (input blocks included) and a critical path <= 6 (the fine-grained graph: 125 and
    51)."""
    model = UNet(in_channels=1, n_classes=2, width=4, depth=2)
    for grid in (8, 16):
        x = da.zeros((1, 1, 1024, 1024), chunks=(1, 1, 1024 // grid, 1024 // grid), dtype=np.float32)
        y = model.predict(x)
        stats = graph_stats(y)
        assert y.numblocks == (1, 1, grid, grid)
        assert stats.tasks <= 2 * grid * grid + 1 and stats.critical_path <= 3, stats


def test_the_staged_predict_reads_the_parameters_once_per_stage():
    """The model's arrays are one key per stage that every block task reads (not a copy per
    block, nor one key per array)."""
    model = VGG16(width=1 / 16)
    x = da.zeros((8, 3, 32, 32), chunks=(2, 3, 16, 16), dtype=np.float32)
    graph = dict(model.predict(x).__dask_graph__())
    jobs = [k for k in graph if isinstance(k, str) and k.startswith("stage-job-")]
    assert len(jobs) == 2


def test_trained_parameters_held_as_dask_arrays_are_read_by_the_job():
    model = _randomised(VGG16(width=1 / 16, dtype=np.float64))
    x = da.from_array(np.random.default_rng(4).standard_normal((4, 3, 32, 32)), chunks=(2, 3, 16, 16))
    expected = _reference(model, x)
    model.params = {k: da.from_array(v, chunks=v.shape) for k, v in model.params.items()}
    np.testing.assert_allclose(model.predict(x).compute(), expected, rtol=1e-11, atol=1e-12)


def test_the_config_key_turns_the_stages_off():
    model = VGG16(width=1 / 16)
    x = da.zeros((8, 3, 32, 32), chunks=(4, 3, 32, 32), dtype=np.float32)
    with dask.config.set({"pconv.staged": False}):
        assert graph_stats(model.predict(x)).tasks > 40
    assert graph_stats(model.predict(x)).tasks <= 5


# -- the training modes' graphs: ceilings, so that a regression fails --------------------------------
def _vgg_batch():
    model = VGG16(width=1 / 16)
    rng = np.random.default_rng(0)
    x = dp.split(rng.standard_normal((8, 3, 32, 32)).astype(np.float32), batch=2)
    return model, x, rng.integers(0, 10, 8)


def test_forward_backward_on_batch_chunks_is_the_steps_graph_without_the_update():
    """The issue's targets: VGG16 (width 1/16, batch 8 in two chunks) ``forward_backward`` and
    Trainer step, critical path <= 45 (the fine-grained graph: 149; the step's stages with a
    pick per synchronisation: 61)."""
    model, x, t = _vgg_batch()
    loss, grads = model.forward_backward(x, t)
    fb = graph_stats([loss, grads])
    opt = MomentumSGD()
    params = model.dask_params(like=x)
    step = graph_stats(
        training_step(model, opt, params, dict(model.state), opt.init_state(params), x, da.from_array(t), 0)
    )
    assert fb.critical_path <= 45 and step.critical_path <= 45, (fb, step)
    assert fb.tasks < step.tasks


TRAIN_ON_TILES = {
    # the rows (fine-grained critical path before: 129 and 223)
    "U-Net spatial 2x2": (
        lambda: UNet(in_channels=3, n_classes=3, width=4, depth=2),
        (4, 3, 64, 64),
        (4, 64, 64),
    ),
    "ResNet-18 spatial 2x2": (lambda: ResNet18(n_classes=10, width=1 / 8), (8, 3, 32, 32), (8,)),
    "VGG16 spatial 2x2": (lambda: VGG16(n_classes=10, width=1 / 16), (8, 3, 32, 32), (8,)),
}


@pytest.mark.parametrize("case", list(TRAIN_ON_TILES))
def test_a_training_step_on_tiles_is_two_hops_per_synchronisation(case):
    """The issue's target for training on tiles: a critical path <= 2 per synchronisation + 6
    (a stage task and, where its result is large, the pick of what the neighbours read,
    forward and backward), and a few tasks per tile and stage; ``forward_backward`` is the
    step's graph without the update."""
    make, shape, t_shape = TRAIN_ON_TILES[case]
    model, rng = make(), np.random.default_rng(0)
    x = dp.split(rng.standard_normal(shape).astype(np.float32), spatial=(2, 2))
    t = rng.integers(0, 3, t_shape)
    opt = MomentumSGD()
    params = model.dask_params(like=x)
    out = training_step(model, opt, params, dict(model.state), opt.init_state(params), x, da.from_array(t), 0)
    assert out.loss.name.startswith("step-")
    stats = graph_stats(out)
    p = plan(model.program, Layout.of(x), "train")
    syncs = len(p.stages) - 1
    assert stats.critical_path <= 2 * syncs + 6, (stats, syncs)
    # per stage and tile: a task forward and backward, and the picks of what others read
    assert stats.tasks <= 6 * 4 * len(p.stages) + 3 * len(model.params) + 40, stats
    loss, grads = model.forward_backward(x, t)
    assert graph_stats([loss, grads]).critical_path <= stats.critical_path


def test_staged_forward_backward_is_the_fine_grained_one():
    model = VGG16(width=1 / 16, dtype=np.float64, seed=5)
    rng = np.random.default_rng(1)
    x, t = dp.split(rng.standard_normal((6, 3, 32, 32)), batch=3), rng.integers(0, 10, 6)
    staged = dask.compute(model.forward_backward(x, t, step=3))[0]
    with dask.config.set({"pconv.staged": False}):
        reference = dask.compute(model.forward_backward(x, t, step=3))[0]
    np.testing.assert_allclose(staged[0], reference[0], rtol=1e-12)
    for name, g in reference[1].items():
        np.testing.assert_allclose(staged[1][name], g, rtol=1e-9, atol=1e-12, err_msg=name)
        assert staged[1][name].dtype == g.dtype


def test_staged_predict_on_device_blocks_stays_on_the_device():
    """CuPy-like blocks (the stand-in): the stage's arrays are copied to the device once per
    stage, every tile's window and output stay there, and the result is the NumPy one."""
    import standin

    model = _randomised(UNet(in_channels=2, n_classes=3, width=4, depth=2, dtype=np.float64))
    host = np.random.default_rng(6).standard_normal((2, 2, 32, 32))
    x = da.from_array(host, chunks=(1, 2, 12, 20))
    on_device = x.map_blocks(standin.to_device, meta=standin.meta(4, np.float64))
    with dask.config.set({"pconv.conv-kernel": "numpy"}):  # PyTorch's kernel takes NumPy only
        want = model.predict(x).compute()
        standin.LOG.clear()
        got = standin.blocks_to_host(model.predict(on_device))
    np.testing.assert_array_equal(got, want)
    events = [e for e in standin.LOG if e.startswith(("__array__", "mixed", "upload", "download"))]
    n_out = int(np.prod(model.predict(on_device).numblocks))
    uploads = [f"upload:{b.shape}" for b in _blocks(host, x)] + _uploads(model)
    assert sorted(events) == sorted(uploads + ["download"] * n_out)


def _blocks(host, x):
    return [host[tuple(slice(*s) for s in idx)] for idx in _slices(x.chunks)]


def _slices(chunks):
    import itertools

    starts = [np.cumsum((0,) + c) for c in chunks]
    for idx in itertools.product(*[range(len(c)) for c in chunks]):
        yield [(starts[a][i], starts[a][i + 1]) for a, i in enumerate(idx)]


def _uploads(model):
    arrays = [*model.params.values(), *model.state.values()]
    return [f"upload:{a.shape}" for a in arrays]
