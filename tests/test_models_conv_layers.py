"""The convolution layers' hyperparameters (models/layers.py): Conv2d's dilation, groups, pairs
and padding strings, and ConvTranspose2d; a program using them trains like PyTorch in every
split (against the unsplit run without PyTorch)."""

import dask
import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.models import (
    BatchNorm,
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Linear,
    MaxPool2d,
    Model,
    ReLU,
    sequential,
)

from strategies import assert_close

RNG = np.random.default_rng(11)
X = RNG.standard_normal((6, 3, 8, 8))
T = RNG.integers(0, 5, 6)


def program():
    return sequential(
        ("c1", Conv2d(3, 6, (3, 2), padding="same", bias=True, dilation=(1, 2))),
        ("relu1", ReLU()),  # before the BatchNorm, so that the bias has a gradient
        ("bn", BatchNorm(6)),
        ("c2", Conv2d(6, 6, 3, stride=2, padding=(1, 0), groups=3)),  # (6, 6, 4, 3)
        ("up", ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True)),
        ("relu", ReLU()),  # (6, 4, 8, 6)
        ("pool", MaxPool2d(2)),
        ("flatten", Flatten()),
        ("fc", Linear(4 * 4 * 3, 5, channel_split=False)),
    )


def test_parameter_shapes_fan_in_and_channel_split():
    specs = program().param_specs()
    assert specs["c1.W"].shape == (6, 3, 3, 2) and specs["c1.W"].fan_in == 3 * 3 * 2
    assert specs["c2.W"].shape == (6, 2, 3, 3) and specs["c2.W"].fan_in == 2 * 9
    assert specs["up.W"].shape == (6, 2, 3, 3) and specs["up.W"].fan_in == 2 * 9  # out/groups * kh * kw
    assert specs["up.W"].channel_split and not specs["up.b"].channel_split
    assert list(ConvTranspose2d(4, 2).params()) == ["W"]
    assert ConvTranspose2d(4, 2).params()["W"].shape == (4, 2, 2, 2)
    # the fields VGG16 reads keep their order and defaults
    assert Conv2d(3, 4, 5, 2, 1, True) == Conv2d(3, 4, kernel_size=5, stride=2, padding=1, bias=True)
    assert Conv2d(3, 4).params()["W"].shape == (4, 3, 3, 3)
    m = Model(program(), channel_split=2, dtype=np.float64)
    chunks = {k: v.chunks for k, v in m.dask_params().items()}
    assert chunks["up.W"][0] == (3, 3) and chunks["up.b"] == ((4,),)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Conv2d(3, 4, groups=2), "groups=2 must divide in_channels=3"),
        (lambda: Conv2d(4, 3, groups=2), "groups=2 must divide"),
        (lambda: Conv2d(4, 4, groups=0), "groups must be a positive int"),
        (lambda: Conv2d(4, 4, kernel_size=0), "kernel_size must be positive"),
        (lambda: Conv2d(4, 4, dilation=(1, 0)), "dilation must be positive"),
        (lambda: Conv2d(4, 4, padding=-1), "padding must be >= 0"),
        (lambda: ConvTranspose2d(4, 3, groups=2), "groups=2 must divide"),
        (lambda: ConvTranspose2d(4, 4, output_padding=-1), "output_padding must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused_when_declared(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _torch_reference(model):
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    h = F.conv2d(torch.tensor(X), p["c1.W"], p["c1.b"], padding="same", dilation=(1, 2))
    h = F.batch_norm(F.relu(h), None, None, p["bn.gamma"], p["bn.beta"], True, eps=2e-5)
    h = F.conv2d(h, p["c2.W"], stride=2, padding=(1, 0), groups=3)
    h = F.conv_transpose2d(h, p["up.W"], p["up.b"], stride=2, padding=1, output_padding=1, groups=2)
    h = F.max_pool2d(F.relu(h), 2).flatten(1) @ p["fc.W"].T
    loss = F.cross_entropy(h, torch.tensor(T))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


SPLITS = {
    "batch": ({"batch": 3}, 1),
    "input channels": ({"channel": 3}, 1),
    "spatial 3x2": ({"spatial": (3, 2)}, 1),
    "output channels": ({}, 2),
    "mixed": ({"batch": 2, "spatial": (2, 2)}, 3),
}


def test_a_program_of_the_new_layers_trains_like_pytorch_in_every_split():
    """Loss and every gradient (float64) equal the unsplit run's in every split, and PyTorch's
    where installed."""
    model = Model(program(), seed=2, dtype=np.float64)
    loss, grads = dask.compute(*model.forward_backward(X, T, dropout=False))
    assert grads.keys() == model.params.keys()
    if optional.HAVE_TORCH:
        lt, gt = _torch_reference(model)
        assert abs(loss - lt) <= 1e-10 * abs(lt)
        for k in grads:
            assert_close(grads[k], gt[k], np.float64)
    for spec, cs in SPLITS.values():
        ls, gs = dask.compute(
            *model.forward_backward(dp.split(X, **spec), T, dropout=False, channel_split=cs)
        )
        assert abs(ls - loss) <= 1e-12 * abs(loss)
        for k in grads:
            assert_close(gs[k], grads[k], np.float64)


def test_a_transposed_convolution_restores_the_size_a_strided_one_halves():
    """The encoder-decoder use: Conv2d(stride 2) then ConvTranspose2d(stride 2) gives back H, W."""
    m = Model(
        sequential(("down", Conv2d(3, 4, 3, stride=2, padding=1)), ("up", ConvTranspose2d(4, 3, 4, 2, 1))),
        dtype=np.float64,
    )
    z, _ = m.forward(dp.split(X, spatial=(2, 2)), train=False)
    assert z.shape == X.shape
