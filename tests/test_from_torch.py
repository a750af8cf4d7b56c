"""Converting PyTorch modules (dask_pconv/models/pytorch.py): names and dtypes kept, predictions
equal to ``module.eval()(x)``, the training-mode loss, every gradient and the updated running
statistics equal to PyTorch autograd's, in every split; a Trainer step on a converted model;
what is refused, and how it is reported.  Skipped without PyTorch (except the check that the
package works without it)."""

import copy
import io
import subprocess
import sys

import dask
import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.data import chunk_batch, synthetic
from dask_pconv.optim import MomentumSGD
from dask_pconv.stages.step import unstaged
from dask_pconv.step import training_step
from dask_pconv.train import Trainer

from strategies import assert_close, tolerance
from torch_models import modules as torch_model_classes
from torch_models import torch_name

torch = pytest.importorskip("torch", reason=optional.TORCH)
nn, F = torch.nn, torch.nn.functional


# -- the modules ----------------------------------------------------------------------------------
def sequential_cnn():
    """(a) nn.Sequential: bias, in-place ReLU, 'same' padding, a pool, BatchNorm, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding="same", bias=False),
        nn.BatchNorm2d(5, eps=1e-3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
    )


class Functional(nn.Module):
    """(b) functional calls in forward: F.relu, torch.relu, torch.flatten, x.relu(), a strided
    conv, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1, padding="valid")
        self.fc1 = nn.Linear(4 * 4 * 4, 7, bias=False)
        self.bn = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 6)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc2(self.bn(self.fc1(x)).relu())


class Residual(nn.Module):
    """(c) conv-bn-relu-conv-bn plus the block's input, relu; ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x
        out = self.pool(torch.relu(out))
        return self.fc(out.view(out.size(0), -1))


class VGGLike(nn.Module):
    """(d) a VGG-like chain: ``features`` and ``classifier`` Sequentials, dropout included."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for out in (4, 4, "M", 6, "M"):
            if out == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(6 * 2 * 2, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU()
        )
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(self.classifier(self.features(x)))


class _Forward(nn.Module):
    """A module whose forward is ``forward(self, x)``, holding ``modules``."""

    def __init__(self, forward, **modules):
        super().__init__()
        for k, v in modules.items():
            setattr(self, k, v)
        self.fn = forward

    def forward(self, x):
        return self.fn(self, x)


MODULES = {"sequential": sequential_cnn, "functional": Functional, "residual": Residual, "vgg-like": VGGLike}
INPUT = {"sequential": (3, 8, 8), "functional": (3, 8, 8), "residual": (3, 8, 8), "vgg-like": (3, 8, 8)}


def make(kind, dtype=torch.float64, seed=0):
    """The module with random weights and non-trivial BatchNorm statistics and affine."""
    torch.manual_seed(seed)
    return with_batch_norm_values(MODULES[kind]().to(dtype))


def with_batch_norm_values(m):
    """``m`` with non-trivial BatchNorm statistics and affine parameters."""
    with torch.no_grad():
        for sub in m.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.uniform_(-0.5, 0.5)
                sub.running_var.uniform_(0.5, 2.0)
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.uniform_(-0.5, 0.5)
    return m


def data(kind, n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *INPUT[kind])), rng.integers(0, 6, n)


def torch_train_step(module, x, t):
    """Loss, gradients and running statistics after a training-mode pass, float64 (a copy of
    the module: dropout off, BatchNorm on batch statistics)."""
    m = copy.deepcopy(module).double().train()
    for sub in m.modules():
        if isinstance(sub, nn.Dropout):
            sub.eval()
    loss = F.cross_entropy(m(torch.tensor(x)), torch.tensor(t))
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
    stats = {k: b.numpy() for k, b in m.named_buffers() if not k.endswith("num_batches_tracked")}
    return loss.item(), grads, stats


def torch_predict(module, x):
    with torch.no_grad():
        return copy.deepcopy(module).double().eval()(torch.tensor(x)).numpy()


# every split of the batch: images, input channels, spatial tiles, a mix (and split weights)
SPLITS = {
    "batch": (dict(batch=4), 1),
    "channel": (dict(in_channel=3), 2),
    "spatial": (dict(spatial=(2, 3)), 1),
    "mixed": (dict(batch=2, in_channel=2, spatial=(3, 2)), 2),
}


# -- names, dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODULES))
def test_names_values_and_dtype_are_the_modules(kind):
    m = make(kind, torch.float32)
    model = dp.from_torch(m)
    assert model.dtype == np.float32
    assert list(model.params) == [k for k, _ in m.named_parameters()]
    buffers = [k for k, _ in m.named_buffers() if not k.endswith("num_batches_tracked")]
    assert list(model.state) == buffers
    sd = m.state_dict()
    for k, v in {**model.params, **model.state}.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, sd[k].numpy())
    assert dp.from_torch(m.double()).dtype == np.float64
    assert dp.from_torch(m, dtype=np.float32).dtype == np.float32


def test_the_state_dict_goes_back_into_the_module():
    m = make("residual")
    back = dp.models.to_torch_state_dict(dp.from_torch(m))
    fresh = Residual().double()
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    for k, v in m.state_dict().items():
        if k in back:
            assert torch.equal(fresh.state_dict()[k], v)


# -- against PyTorch, in every split --------------------------------------------------------------
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", list(MODULES))
def test_predict_and_training_pass_equal_pytorch(kind, dtype, split):
    """Evaluation: ``module.eval()(x)``; training: the loss, every gradient and the updated
    running statistics (PyTorch's momentum, unbiased variance).  float32 is judged against the
    float64 reference."""
    m = make(kind, torch.float64 if dtype == np.float64 else torch.float32)
    x, t = data(kind)
    pieces, channel_split = SPLITS[split]
    model = dp.from_torch(m, input_shape=INPUT[kind], channel_split=channel_split)
    xd = dp.split(x.astype(dtype), **pieces)
    loss, grads, aux = model.forward_backward_aux(xd, t, dropout=False)
    y, loss, grads, state = dask.compute(model.predict(xd), loss, grads, aux["state"])
    want_loss, want_grads, want_state = torch_train_step(m, x, t)
    assert_close(y, torch_predict(m, x), dtype)
    assert_close(loss, np.array(want_loss), dtype)
    assert grads.keys() == want_grads.keys() and state.keys() == want_state.keys()
    # a bias before a BatchNorm has a gradient of zero up to rounding: judged on the largest
    scale = max(np.abs(g).max() for g in want_grads.values())
    for k in want_grads:
        assert grads[k].dtype == dtype
        err = np.abs(grads[k] - want_grads[k]).max() / max(np.abs(want_grads[k]).max(), 1e-3 * scale)
        assert err <= tolerance(dtype), f"{k}: relative error {err:.3g}"
    for k in want_state:
        assert_close(state[k], want_state[k], dtype)


def test_forward_backward_returns_the_training_loss_and_grads():
    m = make("sequential")
    x, t = data("sequential")
    loss, grads = dp.from_torch(m).forward_backward(dp.split(x, batch=2), t, dropout=False)
    loss, grads = dask.compute(loss, grads)
    want_loss, want_grads, _ = torch_train_step(m, x, t)
    assert_close(loss, np.array(want_loss), np.float64)
    assert list(grads) == list(want_grads)


@pytest.mark.parametrize(
    "flatten",
    [
        lambda x: x.view(x.size(0), -1),
        lambda x: x.reshape(x.shape[0], -1),
        lambda x: x.view(-1, 4 * 4 * 4),
        lambda x: torch.reshape(x, (x.size(0), 64)),
        lambda x: x.flatten(1),
    ],
    ids=["view size(0)", "reshape shape[0]", "view -1", "torch.reshape", "flatten method"],
)
def test_every_spelling_of_flatten(flatten):
    conv, fc = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Linear(64, 6).double()
    x = data("residual", n=3)[0][:, :, :4, :4]
    module = _Forward(lambda s, x: s.fc(flatten(s.conv(x))), conv=conv, fc=fc)
    y = dp.from_torch(module, input_shape=(3, 4, 4)).predict(dp.split(x, batch=2)).compute()
    assert_close(y, torch_predict(module, x), np.float64)


def test_batch_norm_normalises_and_updates_as_pytorch():
    """One BatchNorm2d alone: the output in training mode (batch statistics, biased variance)
    and evaluation mode, and the running variance's update with the unbiased one."""
    bn = make("sequential")[1]
    x = np.random.default_rng(3).standard_normal((5, 4, 3, 3)) * 2 + 1
    model = dp.from_torch(nn.Sequential(bn, nn.Flatten()), input_shape=(4, 3, 3))
    z, state = model.forward(dp.split(x, batch=2, spatial=(2, 1)), dropout=False)
    z, state = dask.compute(z.value, state)
    evaluated = model.predict(x).compute()
    trained = copy.deepcopy(bn).train()
    want = trained(torch.tensor(x)).flatten(1).detach().numpy()
    assert_close(z, want, np.float64)
    assert_close(state["0.running_var"], trained.running_var.numpy(), np.float64)
    assert_close(state["0.running_mean"], trained.running_mean.numpy(), np.float64)
    assert_close(evaluated, bn.eval()(torch.tensor(x)).flatten(1).detach().numpy(), np.float64)


# -- residual and encoder-decoder networks ------------------------------------------------------------
class EncoderDecoder(nn.Module):
    """Per-pixel logits of 10x10 images: a (3, 5) kernel, BatchNorm, LeakyReLU, an average pool
    whose windows cross the border (count_include_pad=False), a dilated grouped 'same' conv, a
    transposed conv with output_padding back to 10x10, F.interpolate, torch.cat of three and an
    even-kernel 'same' conv (PyTorch pads its extra row and column at the end)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, (3, 5), padding=(1, 2))
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)  # 10 -> 5
        self.mid = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)  # 5 -> 10
        self.same = nn.Identity()
        self.fuse = nn.Conv2d(12, 5, 2, padding="same")
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        skip = self.act(self.bn(self.enc(x)))
        h = self.mid(self.pool(skip))
        h = torch.cat([self.up(h), F.interpolate(h, scale_factor=2, mode="nearest"), self.same(skip)], dim=1)
        return self.head(F.leaky_relu(self.fuse(h), negative_slope=0.2, inplace=True))


TorchResNet18, TorchUNet = torch_model_classes()
NETS = {  # the module, its input (C, H, W), the labels' shape after N, the classes
    "resnet18": (lambda: TorchResNet18(n_classes=5, width=1 / 16), (3, 8, 8), (), 5),
    "unet": (lambda: TorchUNet(in_channels=2, n_classes=3, width=2, depth=2), (2, 8, 8), (8, 8), 3),
    "encoder-decoder": (EncoderDecoder, (3, 10, 10), (10, 10), 3),
}


def make_net(kind):
    torch.manual_seed(0)
    return with_batch_norm_values(NETS[kind][0]().double())


# PyTorch pads a copy of the input for an even kernel's 'same' padding, and says so
EVEN_SAME = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

NET_SPLITS = {
    "batch": (dict(batch=3), 1),
    "spatial": (dict(spatial=(2, 3)), 1),
    "mixed": (dict(batch=2, in_channel=2, spatial=(3, 2)), 2),
}


@EVEN_SAME
@pytest.mark.parametrize("split", list(NET_SPLITS))
@pytest.mark.parametrize("kind", list(NETS))
def test_residual_and_encoder_decoder_networks_equal_pytorch(kind, split):
    """The ResNet-18 and U-Net of tests/torch_models.py and an encoder-decoder, float64:
    ``module.eval()(x)``, and the training pass's loss (per pixel for (N, K, H, W) logits and
    (N, H, W) labels), every gradient and the running statistics."""
    _, shape, label_shape, k = NETS[kind]
    m = make_net(kind)
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((5, *shape)), rng.integers(0, k, (5, *label_shape))
    pieces, channel_split = NET_SPLITS[split]
    model = dp.from_torch(m, input_shape=shape, channel_split=channel_split)
    assert list(model.params) == [n for n, _ in m.named_parameters()]
    xd = dp.split(x, **pieces)
    loss, grads, aux = model.forward_backward_aux(xd, t)
    y, loss, grads, state = dask.compute(model.predict(xd), loss, grads, aux["state"])
    want_loss, want_grads, want_state = torch_train_step(m, x, t)
    assert_close(y, torch_predict(m, x), np.float64)
    assert_close(loss, np.array(want_loss), np.float64)
    assert grads.keys() == want_grads.keys() and state.keys() == want_state.keys()
    scale = max(np.abs(g).max() for g in want_grads.values())  # biases before a BatchNorm: ~0
    for name in want_grads:
        err = np.abs(grads[name] - want_grads[name]).max() / max(np.abs(want_grads[name]).max(), 1e-3 * scale)
        assert err <= tolerance(np.float64), f"{name}: relative error {err:.3g}"
    for name in want_state:
        assert_close(state[name], want_state[name], np.float64)


def test_converted_resnet18_steps_as_the_native_one():
    """The same weights loaded into the converted module and into ``dp.models.ResNet18`` (its
    names are ours: ``W``, ``gamma``, ``avg_var``): one momentum-SGD step gives the same loss,
    parameters, velocities and running statistics."""
    module = make_net("resnet18")
    converted = dp.from_torch(module, input_shape=(3, 8, 8))
    native = dp.models.ResNet18(n_classes=5, width=1 / 16, dtype=np.float64)
    assert [torch_name(k) for k in native.params] == list(converted.params)
    assert [torch_name(k) for k in native.state] == list(converted.state)
    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    native.load_params(
        {k: sd[torch_name(k)] for k in native.params}, {k: sd[torch_name(k)] for k in native.state}
    )
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 5, 6)
    xd, td = chunk_batch(x, t, {"batch": 2})
    opt = MomentumSGD(0.05, 0.9, 5e-4)
    outs = []
    for model in (native, converted):
        vel = {k: np.full(v.shape, 0.01) for k, v in model.params.items()}
        assert unstaged(model, opt, model.dask_params(like=xd), xd) is None  # both run the staged step
        step = training_step(model, opt, model.dask_params(like=xd), dict(model.state), vel, xd, td, 1)
        outs.append(dask.compute(step)[0])
    want, got = outs
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss) and got.accuracy == want.accuracy
    for g, w in zip(got[:3], want[:3]):  # parameters, velocities, state
        assert list(g) == [torch_name(k) for k in w]
        for k in w:
            np.testing.assert_allclose(g[torch_name(k)], w[k], rtol=1e-10, atol=1e-13, err_msg=k)


class Spellings(nn.Module):
    """The functional and method forms: F.leaky_relu in place, F.max_pool2d, nn.Upsample,
    F.avg_pool2d, torch.concat, x.mean((2, 3)) (flattened), torch.mean(keepdim=True),
    nn.AdaptiveAvgPool2d((1, 1)), F.adaptive_avg_pool2d, F.dropout(training=self.training)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.leaky_relu(self.conv(x), 0.3, inplace=True)
        a = self.up(F.max_pool2d(h, 2))
        b = F.avg_pool2d(h, 3, stride=1, padding=1)
        c = torch.concat((a, b), 1)
        m1 = c.mean((2, 3))  # (N, 8)
        m2 = torch.flatten(torch.mean(h, dim=(-1, -2), keepdim=True), 1)
        m3 = self.gap(h).flatten(1) + F.adaptive_avg_pool2d(b, 1).flatten(1)
        h = torch.cat([m1, m2, m3], dim=-1)
        return self.fc(F.dropout(h, 0.25, self.training))


def test_every_spelling_of_the_new_layers():
    torch.manual_seed(0)
    module = Spellings().double()
    x, t = data("residual", n=4)
    t = t % 5
    model = dp.from_torch(module, input_shape=(3, 8, 8))
    kinds = [type(n.layer).__name__ for n in model.program.nodes]
    assert kinds.count("AdaptiveAvgPool2d") == 4 and kinds.count("Dropout") == 1
    assert dp.from_torch(module.eval()).program.nodes[-2].layer == dp.models.Identity()  # training=False
    xd = dp.split(x, batch=2, spatial=(2, 2))
    loss, grads = model.forward_backward(xd, t, dropout=False)
    y, loss, grads = dask.compute(model.predict(xd), loss, grads)
    # no BatchNorm: the training pass without dropout is evaluation mode's
    want = F.cross_entropy(module.eval()(torch.tensor(x)), torch.tensor(t))
    want.backward()
    assert_close(y, torch_predict(module, x), np.float64)
    assert_close(loss, np.array(want.item()), np.float64)
    for name, p in module.named_parameters():
        assert_close(grads[name], p.grad.numpy(), np.float64)


@EVEN_SAME
@pytest.mark.parametrize(
    "conv, options",
    [
        (nn.Conv2d(4, 6, 3, dilation=2, groups=2), dict(kernel_size=3, padding=0, dilation=2, groups=2)),
        (nn.Conv2d(4, 4, (3, 5), stride=(2, 1), padding=(1, 2)), dict(kernel_size=(3, 5), stride=(2, 1))),
        (nn.Conv2d(4, 4, 3, padding="same", dilation=(1, 2)), dict(padding=(1, 2), dilation=(1, 2))),
        (nn.Conv2d(4, 4, (2, 3), padding="same"), dict(padding="same")),
        (nn.Conv2d(4, 2, 3, padding="valid", groups=2, bias=False), dict(padding=0, groups=2)),
        (nn.Conv2d(4, 4, 3, groups=4, padding=1), dict(groups=4)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), {}),
        (nn.ConvTranspose2d(4, 4, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False), {}),
    ],
    ids=[
        "dilated grouped",
        "pairs",
        "same dilated",
        "same even",
        "valid",
        "depthwise",
        "transposed",
        "tr pairs",
    ],
)
def test_convolution_attributes_convert_exactly(conv, options):
    """Per-pixel logits straight from one convolution, split into batch chunks, channel
    chunks and tiles: predictions and gradients equal PyTorch's.  An equal pair becomes an
    int and 'same' a symmetric padding where there is one."""
    torch.manual_seed(0)
    module = nn.Sequential(conv).double()
    layer = dp.from_torch(module).program.nodes[0].layer
    assert all(getattr(layer, k) == v for k, v in options.items()), layer
    x = data("residual", n=4)[0][:, :, :7, :7].copy()
    x = np.concatenate([x, x[:, :1]], axis=1)  # 4 channels
    out = torch_predict(module, x)
    t = np.random.default_rng(5).integers(0, out.shape[1], (4, *out.shape[2:]))
    model = dp.from_torch(module, input_shape=(4, 7, 7), channel_split=2)
    xd = dp.split(x, batch=2, in_channel=2, spatial=(2, 3))
    y, (loss, grads) = dask.compute(model.predict(xd), model.forward_backward(xd, t))
    want_loss, want_grads, _ = torch_train_step(module, x, t)
    assert_close(y, out, np.float64)
    assert_close(loss, np.array(want_loss), np.float64)
    for name in want_grads:
        assert_close(grads[name], want_grads[name], np.float64)


def test_max_pooling_with_padding_dilation_and_ceil_mode_converts_exactly():
    """-inf padding, dilated windows and a last window started in ceil mode, in every split of
    the batch and tiles (the block interpreter has no rule for these pools: they run through
    the fine-grained reference inside their stage)."""
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.MaxPool2d(3, 2, padding=1, dilation=2, ceil_mode=True),
    ).double()
    layer = dp.from_torch(module).program.nodes[-1].layer
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode) == (
        3,
        2,
        1,
        2,
        True,
    )
    x = np.random.default_rng(3).standard_normal((4, 3, 10, 9))
    out = torch_predict(module, x)
    t = np.random.default_rng(4).integers(0, 4, (4, *out.shape[2:]))
    want_loss, want_grads, _ = torch_train_step(module, x, t)
    model = dp.from_torch(module)
    for pieces in (dict(batch=2), dict(spatial=(2, 3)), dict(batch=2, spatial=(3, 2))):
        xd = dp.split(x, **pieces)
        y, (loss, grads) = dask.compute(model.predict(xd), model.forward_backward(xd, t, dropout=False))
        assert_close(y, out, np.float64)
        assert_close(loss, np.array(want_loss), np.float64)
        for name in want_grads:
            assert_close(grads[name], want_grads[name], np.float64)
    # the step runs as coarse stages on batch chunks and tiles alike
    for pieces in (dict(batch=2), dict(spatial=(2, 1))):
        xd = model.check_input(dp.split(x, **pieces))
        assert unstaged(model, MomentumSGD(), model.dask_params(), xd) is None


def test_cat_dims_and_a_lone_tensor():
    """torch.cat along a spatial axis (negative dims resolved with input_shape), of one tensor
    (an identity)."""
    torch.manual_seed(0)
    convs = dict(c=nn.Conv2d(3, 2, 3, padding=1).double(), d=nn.Conv2d(3, 2, 1).double())
    x = data("residual", n=2)[0]
    for fn, kind in [
        (lambda s, x: torch.cat([s.c(x), s.d(x)], dim=3), "Concat"),
        (lambda s, x: torch.cat((s.c(x), s.d(x)), -2), "Concat"),
        (lambda s, x: torch.cat([s.c(x)], 1), "Identity"),
    ]:
        module = _Forward(fn, **convs)
        model = dp.from_torch(module, input_shape=(3, 8, 8))
        assert type(model.program.nodes[-1].layer).__name__ == kind
        y = model.predict(dp.split(x, spatial=(2, 2))).compute()
        assert_close(y, torch_predict(module, x), np.float64)


# -- training ----------------------------------------------------------------------------------------
def test_the_staged_step_of_a_converted_model_is_the_fine_grained_one():
    """A converted chain (Linear biases, PyTorch names) takes the staged path, with the same
    parameters, velocities and running statistics after a step as the fine-grained graph."""
    model = dp.from_torch(make("sequential"), input_shape=(3, 8, 8))
    x, t = data("sequential", n=7)
    xd, td = chunk_batch(x, t, {"batch": 2})
    opt = MomentumSGD(0.05, 0.9, 5e-4)
    vel = {k: np.full(v.shape, 0.01, v.dtype) for k, v in model.params.items()}
    outs = []
    for staged in (False, True):
        params = model.dask_params(like=xd)
        with dask.config.set({"pconv.staged": staged}):
            assert (unstaged(model, opt, params, xd) is None) == staged
            outs.append(dask.compute(training_step(model, opt, params, dict(model.state), vel, xd, td, 1))[0])
    want, got = outs
    assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss)
    for g, w in zip(got[:3], want[:3]):
        assert list(g) == list(w)
        for k in g:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-11, atol=1e-13, err_msg=k)


def test_trainer_runs_steps_on_a_converted_model(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 4),
    )
    train, val = synthetic(n=40, n_classes=4, seed=1, val_fraction=0.25)
    model = dp.from_torch(module, input_shape=(3, 32, 32))
    before = dict(model.params)
    kw = dict(batch_size=10, split={"batch": 2}, progress=False, stream=io.StringIO(), out=tmp_path)
    tr = Trainer(model, train, val, **kw)
    losses = [float(tr.train_step(train.x[:10], train.t[:10])[0]) for _ in range(2)]
    assert tr.step_graph == "stages"
    assert all(np.isfinite(losses)) and list(model.params) == list(before)
    after = dask.compute(model.params)[0]
    assert not np.array_equal(after["0.weight"], before["0.weight"])
    tr.save()  # the checkpoint keeps PyTorch's names, and comes back under them
    again = Trainer(dp.from_torch(module, input_shape=(3, 32, 32)), train, val, **kw)
    assert again.resume()
    want, got = dask.compute(
        {**tr.model.params, **tr.model.state}, {**again.model.params, **again.model.state}
    )
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# -- what is refused --------------------------------------------------------------------------------
class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.gelu(self.conv(x))  # the line the error names


@pytest.mark.parametrize(
    "module, match",
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid()),
            r"node '_1' \(torch.nn.modules.activation.Sigmoid '1'",
        ),
        (Gelu(), r"node 'gelu' \(function torch._C._nn.gelu at .*test_from_torch.py:\d+ \(\"return F.gelu"),
        (nn.Sequential(nn.MaxPool2d(3, dilation=(2, 1))), r"'_0' .*dilation=\(2, 1\) is not supported"),
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), "return_indices=True"),
        (nn.Sequential(nn.MaxPool2d((3, 1))), r"kernel_size=\(3, 1\) is not supported"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="reflect")),
            "padding_mode='reflect' is not supported",
        ),
        (nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear")), "mode='bilinear' is not supported"),
        (nn.Sequential(nn.Upsample(size=8)), "size=8 is not supported"),
        (nn.Sequential(nn.Upsample(scale_factor=1.5)), "scale_factor=1.5 is not supported"),
        (nn.Sequential(nn.ReLU6()), r"node '_0' \(torch.nn.modules.activation.ReLU6 .*module type ReLU6"),
        (nn.Sequential(nn.AdaptiveAvgPool2d(2)), "output_size=2 is not supported"),
        (nn.Sequential(nn.AdaptiveAvgPool2d((1, None))), r"output_size=\(1, None\) is not supported"),
        (nn.Sequential(nn.AvgPool2d(2, divisor_override=0)), "divisor_override=0"),
        (nn.Sequential(nn.BatchNorm2d(3, momentum=None)), "momentum=None"),
        (nn.Sequential(nn.BatchNorm2d(3, affine=False)), "affine=False"),
        (nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), "track_running_stats=False"),
        (nn.Sequential(nn.Flatten(2)), "start_dim=2"),
    ],
)
def test_unsupported_calls_are_refused_naming_the_node(module, match):
    with pytest.raises(NotImplementedError, match=match):
        dp.from_torch(module)


@pytest.mark.parametrize(
    "forward, modules, match",
    [
        (lambda s, x: s.c(s.c(x)), {"c": nn.Conv2d(3, 3, 1)}, "second call of a module with weights"),
        (lambda s, x: x.relu_() + x, {}, "works in place on 'x', which 'add' reads afterwards"),
        (lambda s, x: torch.flatten(x), {}, r"flatten\(0, -1\) is not supported"),
        (lambda s, x: x + 1, {}, "adding 1 is not supported"),
        (lambda s, x: x.view(-1, 3), {}, r"reshape to \(-1, 3\)"),
        (lambda s, x: x[:, :2], {}, "function operator.getitem"),
        (lambda s, x: (s.c(x), x), {"c": nn.Conv2d(3, 3, 1)}, "returning tuple"),
        (lambda s, x: x * s.w, {"w": nn.Parameter(torch.ones(1))}, "get_attr"),
        (lambda s, x: F.interpolate(x, size=(8, 8)), {}, r"size=\(8, 8\) is not supported"),
        (
            lambda s, x: F.interpolate(x, scale_factor=2, mode="bicubic"),
            {},
            "mode='bicubic' is not supported",
        ),
        (
            lambda s, x: s.up(x, output_size=(8, 8)),
            {"up": nn.ConvTranspose2d(3, 3, 2, stride=2)},
            r"calling it with output_size=\(8, 8\) is not supported",
        ),
        (lambda s, x: torch.cat([x, x]), {}, r"dim=0 \(the batch axis\) is not supported"),
        (lambda s, x: x.mean(1, keepdim=True), {}, "a mean over dim=1 is not supported"),
        (lambda s, x: x.mean((2, 3), dtype=torch.float64), {}, "dtype=torch.float64 is not supported"),
        (lambda s, x: F.relu6(x), {}, "function torch.nn.functional.relu6"),
        (lambda s, x: F.avg_pool2d(x, (2, 2, 2)), {}, r"kernel_size=\(2, 2, 2\) is not supported"),
    ],
    ids=[
        "shared",
        "in place",
        "flatten(0)",
        "constant",
        "view",
        "getitem",
        "tuple",
        "get_attr",
        "interpolate size",
        "interpolate bicubic",
        "output_size",
        "cat batch",
        "mean channels",
        "mean dtype",
        "relu6",
        "avg_pool2d kernel",
    ],
)
def test_unsupported_forwards_are_refused(forward, modules, match):
    with pytest.raises(NotImplementedError, match=match):
        dp.from_torch(_Forward(forward, **modules), input_shape=(3, 4, 4))


def test_untraceable_forward_and_bad_arguments():
    def branch(s, x):
        return x if x.sum() > 0 else -x

    with pytest.raises(NotImplementedError, match="torch.fx cannot trace _Forward.forward"):
        dp.from_torch(_Forward(branch))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dp.from_torch(lambda x: x)
    half = nn.Sequential(nn.Conv2d(3, 3, 1)).half()
    with pytest.raises(ValueError, match="pass dtype="):
        dp.from_torch(half)
    np.testing.assert_array_equal(
        dp.from_torch(half, dtype=np.float32).params["0.weight"], half[0].weight.detach().float().numpy()
    )
    with pytest.raises(ValueError, match="input_shape must be"):
        dp.from_torch(nn.Sequential(nn.ReLU()), input_shape=(8, 8))
    with pytest.raises(ValueError, match="returns its input"):
        dp.from_torch(_Forward(lambda s, x: x))


def test_shape_mismatches_are_clear_errors():
    m = make("sequential")
    with pytest.raises(
        ValueError, match=r"node '_8' \(torch.nn.modules.linear.Linear '8'.*\(N, 125\).*Linear\(80"
    ):
        dp.from_torch(m, input_shape=(3, 10, 10))  # 5x5 after the pool, not 4x4
    with pytest.raises(ValueError, match=r"node '_0' .*channel mismatch"):
        dp.from_torch(m, input_shape=(2, 8, 8))
    model = dp.from_torch(m, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be \(N, 3, 8, 8\), got shape \(2, 3, 9, 9\)"):
        model.predict(np.zeros((2, 3, 9, 9)))
    with pytest.raises(ValueError, match=r"Linear\(80, 6\) needs input \(N, 80\), got shape \(2, 125\)"):
        dp.from_torch(m).predict(np.zeros((2, 3, 10, 10)))  # no input_shape: found when run


def test_the_package_imports_and_runs_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        "import numpy as np, dask_pconv as dp\n"
        "from dask_pconv.models import VGG16\n"
        "m = VGG16(n_classes=2, width=1 / 32)\n"
        "m.predict(np.zeros((1, 3, 32, 32), np.float32)).compute(scheduler='sync')\n"
        "try:\n    dp.from_torch(object())\nexcept ImportError:\n    print('needs torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "needs torch"
