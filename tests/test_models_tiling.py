"""Independent tiles (models/tiling.py, tiled.py): every output tile computed from its own
input window equals the network run on the whole image, for strided, dilated, padded, ceil-mode,
transposed and upsampling layers, skip connections, odd image sizes and tiles not aligned with
anything; the planner refuses what cannot run on a window, naming the node."""

import dask
import dask.array as da
import numpy as np
import pytest

from dask_pconv import tiled
from dask_pconv.models import (
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    ConvTranspose2d,
    LeakyReLU,
    MaxPool2d,
    Model,
    Node,
    Program,
    ReLU,
    Upsample,
    sequential,
)
from dask_pconv.models.tiling import plan_tiles
from dask_pconv.models.unet import UNet


def _model(program, seed=0):
    """A float64 model with running statistics far from the initial ones."""
    m = Model(program, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    m.state = {k: rng.random(v.shape) + 0.5 for k, v in m.state.items()}
    m.params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in m.params.items()}
    return m


def _chain():
    return sequential(
        ("c1", Conv2d(2, 4, 3, padding=1, bias=True)),
        ("bn1", BatchNorm(4, relu=True)),
        ("down", Conv2d(4, 4, 3, stride=2, padding=1)),
        ("pool", MaxPool2d(3, 2, padding=1, ceil_mode=True)),
        ("dil", Conv2d(4, 6, 3, padding=2, dilation=2)),
        ("avg", AvgPool2d(3, 1, padding=1, count_include_pad=False)),
        ("up", ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, bias=True)),
        ("act", LeakyReLU(0.1)),
        ("valid", Conv2d(4, 3, (3, 2))),
        ("up2", Upsample(2)),
        ("head", Conv2d(3, 2, 1, bias=True)),
    )


def _branches():
    """Residual additions and a skip concatenation across a pool and an upsampling."""
    nodes = (
        Node("a", Conv2d(2, 4, 3, padding="same"), ("input",)),
        Node("b", Conv2d(4, 4, 5, padding=2), ("a",)),
        Node("res", Add(), ("a", "b")),
        Node("p", MaxPool2d(2), ("res",)),
        Node("c", Conv2d(4, 4, 3, padding=1), ("p",)),
        Node("r", ReLU(), ("c",)),
        Node("u", Upsample(2), ("r",)),
        Node("cat", Concat(1), ("res", "u")),
        Node("head", Conv2d(8, 3, 3, padding=1, bias=True), ("cat",)),
    )
    return Program(nodes)


def _tiles(model, x, tile, until=None):
    """The output assembled from every tile's window run, as the tiled calls write it."""
    plan = tiled.plan(model, x.shape, tile, until)
    job = tiled.TileJob(model, until, 0)
    out = None
    for ro, rw, rc in zip(*plan.rows):
        for co, cw, cc in zip(*plan.cols):
            y = job.run(x[:, :, slice(*rw), slice(*cw)])
            if out is None:
                out = np.full((x.shape[0], y.shape[1]) + plan.out_hw, np.nan)
            out[:, :, slice(*ro), slice(*co)] = y[:, :, slice(*rc), slice(*cc)]
    return out, plan


def _whole(model, x, until=None):
    with dask.config.set(scheduler="synchronous"):
        return Model.features(model, da.from_array(x), until).compute()


SIZES = [((37, 53), (8, 12)), ((64, 48), (16, 16)), ((40, 41), (40, 7)), ((33, 70), (5, 64))]


@pytest.mark.parametrize(
    "make, hw, tile",
    # the branches meet only where the pool's floor loses nothing: even sizes
    [(_chain, hw, t) for hw, t in SIZES] + [(_branches, (h + h % 2, w + w % 2), t) for (h, w), t in SIZES],
)
def test_tiles_equal_the_whole_image(make, hw, tile):
    m = _model(make())
    x = np.random.default_rng(1).standard_normal((2, 2) + hw)
    want = _whole(m, x)
    got, plan = _tiles(m, x, tile)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # every window starts on the network's alignment and lies in the image
    for axis, length, f in zip((plan.rows, plan.cols), hw, plan.align):
        assert all(a % f == 0 and 0 <= a < b <= length for a, b in axis.windows)


def test_unet_tiles_equal_the_whole_image():
    m = UNet(in_channels=1, n_classes=3, width=4, depth=2, seed=2, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((1, 1, 64, 96))
    got, plan = _tiles(m, x, (16, 32))
    assert plan.align == (4, 4) and plan.n_tiles == 4 * 3
    np.testing.assert_allclose(got, _whole(m, x), rtol=1e-12, atol=1e-12)


def test_features_of_a_node():
    m = _model(_chain())
    x = np.random.default_rng(4).standard_normal((1, 2, 45, 30))
    got, _ = _tiles(m, x, (10, 10), until="dil")
    np.testing.assert_allclose(got, _whole(m, x, "dil"), rtol=1e-12, atol=1e-12)


def test_alignment_and_windows_of_a_chain():
    """Two 2x pools: windows start on multiples of 4; a 3x3 conv after them reaches 4 input
    pixels, before them 1: a 16-pixel tile reads at most 16 + 2 * (4 + 4 + 1) rounded to 4."""
    program = sequential(
        ("c", Conv2d(1, 1, 3, padding=1)),
        ("p1", MaxPool2d(2)),
        ("p2", MaxPool2d(2)),
        ("d", Conv2d(1, 1, 3, padding=1)),
    )
    plan = plan_tiles(program, (64, 64), (16, 16))
    assert plan.align == (4, 4) and plan.out_hw == (16, 16)
    assert plan.rows.outputs == ((0, 4), (4, 8), (8, 12), (12, 16))
    assert plan.rows.windows[0] == (0, 24) and plan.rows.windows[-1] == (40, 64)
    assert max(b - a for a, b in plan.rows.windows) <= 36


def test_a_layer_that_reads_its_whole_input_is_refused_by_name():
    program = sequential(("c", Conv2d(1, 2, 3, padding=1)), ("gap", AdaptiveAvgPool2d(1)))
    with pytest.raises(ValueError, match="node 'gap' .AdaptiveAvgPool2d. reads its whole input"):
        plan_tiles(program, (32, 32), (8, 8))


def test_a_layer_without_a_reach_is_an_error_naming_it():
    from dask_pconv.models.layers import Layer

    class Mystery(Layer):
        pass

    with pytest.raises(NotImplementedError, match="Mystery declares no reach"):
        plan_tiles(Program((Node("m", Mystery(), ("input",)),)), (8, 8), (4, 4))


def test_working_set_grows_with_the_tile_and_counts_the_live_outputs():
    m = _model(_branches())
    small = tiled.tile_working_set(m, 2, 1, (16, 16), 4)
    big = tiled.tile_working_set(m, 2, 1, (64, 64), 4)
    # 16x16: the placeholder window's own outputs are a few KiB; the kernels' scratch dominates
    assert 2 * tiled.COL_BYTES <= small < big
    # res (4 channels, full size) stays alive until cat, with the upsampled branch
    assert big - 2 * tiled.COL_BYTES >= 64 * 64 * 8 * (4 + 4 + 8)
