"""ResNet-18 and the U-Net: loss and gradients equal the unsplit run in every split and
PyTorch's float64 computation (``tests/torch_models.py``), evaluation and the running statistics
as PyTorch's, their parameter names, the U-Net's image-size check, and a few training steps."""

import functools

import dask
import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.data import Dataset, synthetic
from dask_pconv.models import ResNet18, UNet
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer

from strategies import assert_close
from torch_models import load_into, modules, torch_loss_and_grads, torch_name

#: split name -> (dp.split arguments, forward_backward's channel_split)
SPLITS = {
    "none": (dict(), 1),
    "batch": (dict(batch=3), 1),
    "spatial 3x3 (tiles not aligned with the strides and pools)": (dict(spatial=(3, 3)), 1),
    "input channels": (dict(in_channel=2), 1),
    "output channels": (dict(), 2),
    "mixed": (dict(batch=2, in_channel=2, spatial=(2, 3)), 2),
}
MODELS = ("resnet18", "unet")


def _model(name, dtype=np.float64):
    if name == "resnet18":  # 16x16 images: the four stages see 16, 8, 4 and 2 pixels a side
        return ResNet18(n_classes=5, width=1 / 16, seed=1, dtype=dtype)
    return UNet(in_channels=2, n_classes=3, width=4, depth=2, seed=1, dtype=dtype)


def _module(name):
    resnet, unet = modules()
    return resnet(n_classes=5, width=1 / 16) if name == "resnet18" else unet(2, 3, 4, 2)


def _batch(name):
    """Images and labels: one per image for ResNet-18, one per pixel for the U-Net."""
    rng = np.random.default_rng(0)
    if name == "resnet18":
        return rng.random((6, 3, 16, 16)), rng.integers(0, 5, 6)
    return rng.random((5, 2, 12, 12)), rng.integers(0, 3, (5, 12, 12))


def _running_statistics(model, seed=5):
    """Running means in [-0.5, 0.5) and variances in [0.5, 1.5): far from the initial 0 and 1."""
    rng = np.random.default_rng(seed)
    return {k: rng.random(v.shape) + (0.5 if k.endswith("avg_var") else -0.5) for k, v in model.state.items()}


@functools.lru_cache(maxsize=None)
def _loss_and_grads(name, split):
    """float64 loss and gradients of the training step under ``split`` (dropout off)."""
    x, t = _batch(name)
    spec, channel_split = SPLITS[split]
    out = _model(name).forward_backward(dp.split(x, **spec), t, dropout=False, channel_split=channel_split)
    return dask.compute(*out)


@functools.lru_cache(maxsize=None)
def _torch_loss_and_grads(name):
    optional.need_torch()
    x, t = _batch(name)
    return torch_loss_and_grads(load_into(_module(name), _model(name)), x, t)


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "none"])
@pytest.mark.parametrize("name", MODELS)
def test_every_split_gives_the_unsplit_loss_and_gradients(name, split):
    """No oracle needed (runs without PyTorch): each split equals the unsplit run."""
    ref_loss, ref_grads = _loss_and_grads(name, "none")
    loss, grads = _loss_and_grads(name, split)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert set(grads) == set(ref_grads) == set(_model(name).params)
    for k in grads:
        assert_close(grads[k], ref_grads[k], np.float64)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_match_pytorch(name, split):
    lt, gt = _torch_loss_and_grads(name)
    loss, grads = _loss_and_grads(name, split)
    assert abs(loss - lt) <= 1e-10 * abs(lt)
    assert {torch_name(k) for k in grads} == set(gt)
    for k, g in grads.items():
        assert_close(g, gt[torch_name(k)], np.float64)


@pytest.mark.parametrize("split", ["none", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_float32_matches_pytorchs_float64_to_float32_rounding(name, split):
    lt, gt = _torch_loss_and_grads(name)
    m = _model(name, np.float32)
    m.load_params(_model(name).params)  # the float64 model's values, rounded once
    x, t = _batch(name)
    spec, channel_split = SPLITS[split]
    out = m.forward_backward(
        dp.split(x.astype(np.float32), **spec), t, dropout=False, channel_split=channel_split
    )
    loss, grads = dask.compute(*out)
    assert loss.dtype == np.float32 and abs(loss - lt) <= 1e-5 * abs(lt)
    for k, g in grads.items():
        assert g.dtype == np.float32
        assert_close(g, gt[torch_name(k)], np.float32)


@pytest.mark.parametrize("name", MODELS)
def test_predict_uses_the_running_statistics_like_pytorchs_eval_mode(name):
    torch = optional.need_torch()
    m = _model(name)
    m.load_params(m.params, _running_statistics(m))
    module = load_into(_module(name), m).eval()
    x, _ = _batch(name)
    with torch.no_grad():
        want = module(torch.tensor(x)).numpy()
    got = m.predict(dp.split(x, batch=2, spatial=(2, 2)), channel_split=2).compute()
    assert_close(got, want, np.float64)
    # and not the batch statistics: training mode gives other logits
    assert not np.allclose(m.forward(x)[0].value.compute(), want, rtol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_running_statistics_update_like_pytorchs_train_mode(name):
    """decay 0.9 is PyTorch's momentum 0.1; both keep the unbiased batch variance."""
    optional.need_torch()
    m = _model(name)
    m.load_params(m.params, _running_statistics(m))
    module = load_into(_module(name), m)
    x, t = _batch(name)
    torch_loss_and_grads(module, x, t)  # a train-mode forward updates the running buffers
    buffers = dict(module.named_buffers())
    _, _, aux = m.forward_backward_aux(dp.split(x, batch=2, spatial=(3, 2)), t, dropout=False)
    state = dask.compute(aux["state"])[0]
    assert set(state) == set(m.state)
    for k, v in state.items():
        assert_close(v, buffers[torch_name(k)].numpy(), np.float64)
        assert not np.allclose(v, m.state[k])  # the step moved every statistic


@pytest.mark.parametrize("name", MODELS)
def test_parameter_and_state_names_are_the_pytorch_modules(name):
    optional.need_torch()
    m, module = _model(name), _module(name)
    assert [(torch_name(k), v.shape) for k, v in m.params.items()] == [
        (k, tuple(p.shape)) for k, p in module.named_parameters()
    ]
    buffers = {k: tuple(b.shape) for k, b in module.named_buffers() if not k.endswith("num_batches_tracked")}
    assert {torch_name(k): v.shape for k, v in m.state.items()} == buffers


def test_resnet18_is_the_cifar_resnet18():
    m = ResNet18()
    assert m.n_params == 11_173_962  # the CIFAR ResNet-18 (3x3 stem, no stem pooling), 10 classes
    names = list(m.params)
    assert names[:3] == ["conv1.W", "bn1.gamma", "bn1.beta"]
    assert names[-2:] == ["linear.W", "linear.b"]
    assert m.params["conv1.W"].shape == (64, 3, 3, 3)
    assert m.params["layer2.0.shortcut.0.W"].shape == (128, 64, 1, 1)
    assert "layer1.0.shortcut.0.W" not in m.params  # same shape: the identity shortcut
    assert m.params["layer4.1.conv2.W"].shape == (512, 512, 3, 3)
    assert set(m.state) == {
        f"{k[: -len('.gamma')]}.{s}" for k in names if k.endswith(".gamma") for s in ("avg_mean", "avg_var")
    }
    small = _model("resnet18")
    assert small.params["layer4.0.conv1.W"].shape == (32, 16, 3, 3) and small.params["linear.W"].shape == (
        5,
        32,
    )


def test_resnet18_takes_any_image_size():
    m = _model("resnet18")
    rng = np.random.default_rng(1)
    for hw in ((16, 16), (9, 13)):
        assert m.predict(rng.random((2, 3, *hw))).shape == (2, 5)


@pytest.mark.parametrize("depth, shape", [(2, (10, 12)), (2, (12, 6)), (3, (12, 12)), (1, (7, 8))])
def test_unet_refuses_an_image_whose_size_is_not_a_multiple_of_2_to_the_depth(depth, shape):
    m = UNet(width=2, depth=depth)
    x = np.zeros((2, 1, *shape), np.float32)
    size = 2**depth
    match = rf"H and W multiples of 2\*\*depth = {size} .* got shape \(2, 1, {shape[0]}, {shape[1]}\)"
    with pytest.raises(ValueError, match=match):
        m.predict(x)
    with pytest.raises(ValueError, match=match):
        m.forward_backward(x, np.zeros((2, *shape), np.int64))
    ok = np.zeros((2, 1, size * 3, size), np.float32)
    assert m.predict(ok).shape == (2, 2, size * 3, size)


def test_unet_refuses_other_input_channels():
    with pytest.raises(ValueError, match=r"x must be \(N, 2, H, W\)"):
        _model("unet").predict(np.zeros((1, 3, 8, 8)))


def test_resnet18_training_steps_lower_the_loss():
    train, val = synthetic(n=60, n_classes=4, seed=1, val_fraction=0.25)
    tr = Trainer(
        ResNet18(n_classes=4, width=1 / 16, seed=0),
        train,
        val,
        batch_size=15,
        split="batch:2",
        progress=False,
        optimizer=MomentumSGD(lr=0.05),
    )
    x, t = train.x[:15], train.t[:15]
    losses = [tr.train_step(x, t)[0] for _ in range(4)]
    assert losses[-1] < 0.7 * losses[0], losses
    loss, acc = tr.evaluate(val)
    assert np.isfinite(loss) and 0 <= acc <= 1


def _segmentation_set(n, seed):
    """1-channel 12x12 images of random 3x3 blocks of 4x4 pixels plus noise; a pixel's label is
    whether its block is bright, so it needs the neighbourhood, not the pixel alone."""
    rng = np.random.default_rng(seed)
    blocks = rng.random((n, 3, 3)) > 0.5
    t = blocks.repeat(4, axis=1).repeat(4, axis=2).astype(np.int64)  # (n, 12, 12)
    x = 0.6 * t[:, None] + 0.8 * rng.random((n, 1, 12, 12))  # noise wider than the gap
    return x.astype(np.float32), t


def test_unet_training_steps_lower_the_per_pixel_loss():
    x, t = _segmentation_set(20, seed=2)
    train, val = Dataset(x[:16], t[:16], 2, "blocks/train"), Dataset(x[16:], t[16:], 2, "blocks/val")
    tr = Trainer(
        UNet(width=4, depth=2, seed=0),
        train,
        val,
        batch_size=8,
        split="spatial:2x2",  # the labels are cut into the images' tiles
        progress=False,
        optimizer=MomentumSGD(lr=0.1),
    )
    losses = [tr.train_step(train.x[:8], train.t[:8])[0] for _ in range(5)]
    assert losses[-1] < 0.7 * losses[0], losses
    loss, acc = tr.evaluate(val)
    assert np.isfinite(loss) and 0 <= acc <= 1
