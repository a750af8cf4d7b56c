"""The layers of general CNNs (AvgPool2d, AdaptiveAvgPool2d, Upsample, LeakyReLU, Concat, Identity)
in programs: a chain and an encoder-decoder DAG with a concatenation, trained through
``Model.forward_backward`` against the unsplit run in every split and against PyTorch."""

import functools

import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.models import (
    INPUT,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    Model,
    Node,
    Program,
    Upsample,
    sequential,
)

from strategies import assert_trains_like_unsplit

RNG = np.random.default_rng(7)
X = RNG.standard_normal((6, 3, 8, 8))
T = RNG.integers(0, 5, 6)


def chain_program():
    return sequential(
        ("conv1", Conv2d(3, 4, 3, padding=1, bias=True)),
        ("act1", LeakyReLU(0.1)),
        ("pool", AvgPool2d(3, 2, 1, count_include_pad=False)),  # 8x8 -> 4x4, windows cross tiles
        ("up", Upsample(2)),  # -> 8x8
        ("same", Identity()),
        ("conv2", Conv2d(4, 4, 3, padding=1)),
        ("gap", AdaptiveAvgPool2d(1)),
        ("flatten", Flatten()),
        ("fc", Linear(4, 5, channel_split=False)),
    )


def unet_program():
    """An encoder-decoder: a skip from the full-resolution features (and the input itself)
    concatenated with the upsampled coarse features along the channels."""
    return Program(
        (
            Node("enc", Conv2d(3, 4, 3, padding=1), (INPUT,)),
            Node("enc_bn", BatchNorm(4), ("enc",)),
            Node("enc_act", LeakyReLU(0.2), ("enc_bn",)),
            Node("down", AvgPool2d(2), ("enc_act",)),
            Node("mid", Conv2d(4, 4, 3, padding=1, bias=True), ("down",)),
            Node("up", Upsample((2, 2)), ("mid",)),
            Node("cat", Concat(), ("up", "enc_act", INPUT)),  # 4 + 4 + 3 channels
            Node("dec", Conv2d(11, 4, 1), ("cat",)),
            Node("gap", AdaptiveAvgPool2d((1, 1)), ("dec",)),
            Node("flatten", Flatten(), ("gap",)),
            Node("fc", Linear(4, 5, channel_split=False), ("flatten",)),
        )
    )


def _torch_reference(model, x, t, unet):
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    h0 = torch.tensor(x)
    if unet:
        e = F.conv2d(h0, p["enc.W"], padding=1)
        e = F.batch_norm(e, None, None, p["enc_bn.gamma"], p["enc_bn.beta"], True, eps=2e-5)
        e = F.leaky_relu(e, 0.2)
        m = F.conv2d(F.avg_pool2d(e, 2), p["mid.W"], p["mid.b"], padding=1)
        h = torch.cat([F.interpolate(m, scale_factor=2, mode="nearest"), e, h0], dim=1)
        h = F.adaptive_avg_pool2d(F.conv2d(h, p["dec.W"]), (1, 1))
    else:
        h = F.leaky_relu(F.conv2d(h0, p["conv1.W"], p["conv1.b"], padding=1), 0.1)
        h = F.interpolate(F.avg_pool2d(h, 3, 2, 1, count_include_pad=False), scale_factor=2, mode="nearest")
        h = F.adaptive_avg_pool2d(F.conv2d(h, p["conv2.W"], padding=1), 1)
    loss = F.cross_entropy(h.flatten(1) @ p["fc.W"].T, torch.tensor(t))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


SPLITS = {
    "unsplit": ({}, 1),
    "batch": ({"batch": 3}, 1),
    "input channels": ({"channel": 3}, 1),
    "spatial 3x2": ({"spatial": (3, 2)}, 1),
    "output channels": ({}, 2),
    "mixed": ({"batch": 2, "spatial": (2, 3)}, 3),
}


@pytest.mark.parametrize("unet", [False, True], ids=["chain", "unet"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_a_cnn_program_trains_like_pytorch_in_every_split(split, unet):
    """Loss and every gradient (float64) equal the unsplit run's in every split, and
    PyTorch's where installed."""
    model = Model(unet_program() if unet else chain_program(), seed=2, dtype=np.float64)
    reference = functools.partial(_torch_reference, unet=unet) if optional.HAVE_TORCH else None
    assert_trains_like_unsplit(model, X, T, *SPLITS[split], reference)


def test_predict_and_features_run_the_new_layers_without_the_tape():
    model = Model(unet_program(), dtype=np.float64)
    z = model.predict(dp.split(X, spatial=(2, 2)))
    assert z.shape == (6, 5) and np.isfinite(z.compute()).all()
    h = model.features(dp.split(RNG.standard_normal((2, 3, 12, 16)), spatial=(3, 2)), until="cat")
    assert h.shape == (2, 11, 12, 16)
    # the concatenation keeps the first input's chunks on the axes it does not join
    assert (
        h.chunks[2:]
        == model.features(dp.split(RNG.standard_normal((2, 3, 12, 16)), spatial=(3, 2)), "up").chunks[2:]
    )


def test_layer_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="mode 'nearest' only"):
        Upsample(2, mode="bilinear")
    with pytest.raises(ValueError, match="integer scale factors only"):
        Upsample(1.5)
    with pytest.raises(ValueError, match="output_size 1"):
        AdaptiveAvgPool2d(2)
    with pytest.raises(ValueError, match="output_size 1"):
        AdaptiveAvgPool2d((1,))
    assert AdaptiveAvgPool2d([1, 1]).output_size == [1, 1] and Upsample(2.0).scale_factor == 2.0


def test_concat_refuses_mismatched_inputs():
    one = Program((Node("a", Conv2d(3, 2, 3, padding=1), (INPUT,)), Node("cat", Concat(), ("a",))))
    with pytest.raises(ValueError, match="two or more inputs"):
        Model(one).forward(X)
    shapes = Program(
        (
            Node("a", Conv2d(3, 2, 3), (INPUT,)),  # 6x6: spatial sizes differ
            Node("cat", Concat(), ("a", INPUT)),
        )
    )
    with pytest.raises(ValueError, match="agree on every axis but 1"):
        Model(shapes).forward(X)
    flat = Program((Node("f", Flatten(), (INPUT,)), Node("cat", Concat(), ("f", INPUT))))
    with pytest.raises(ValueError, match="one number of axes"):
        Model(flat).forward(X)
    with pytest.raises(ValueError, match="axis 4 is out of range"):
        Model(Program((Node("cat", Concat(axis=4), (INPUT, INPUT)),))).forward(X)
