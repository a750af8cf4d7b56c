"""VGG16: Chainer's architecture, and loss/gradients equal to a dense reference in every split."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest

import dask_pconv as dp
from dask_pconv.models import VGG16, Dropout

from strategies import assert_close

SPLITS = {
    "none": (dict(), 1),
    "batch": (dict(batch=3), 1),
    "channel": (dict(), 3),  # output channels of every conv and fc1 in 3 chunks
    "spatial 2x2": (dict(spatial=(2, 2)), 1),
    "spatial 3x3 (tiles not aligned with the pools)": (dict(spatial=(3, 3)), 1),
    "mixed": (dict(batch=2, channel=2, spatial=(2, 3)), 2),
}


def _batch(dtype, n=6):
    rng = np.random.default_rng(0)
    return rng.random((n, 3, 32, 32)).astype(dtype), rng.integers(0, 10, n)


def test_architecture_matches_chainer_vgg16():
    m = VGG16()
    assert m.n_params == 14_987_200  # about 15.0 M, as Chainer's CIFAR VGG16
    names = list(m.params)
    assert names[:3] == ["block1_1.conv.W", "block1_1.bn.gamma", "block1_1.bn.beta"]
    assert names[-4:] == ["fc1.W", "bn_fc1.gamma", "bn_fc1.beta", "fc2.W"]
    convs = [k for k in names if k.endswith("conv.W")]
    assert [m.params[k].shape[0] for k in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert m.params["block1_1.conv.W"].shape == (64, 3, 3, 3)
    assert m.params["fc1.W"].shape == (512, 512) and m.params["fc2.W"].shape == (10, 512)
    assert set(m.state) == {k.replace("gamma", "avg_mean") for k in names if k.endswith("gamma")} | {
        k.replace("gamma", "avg_var") for k in names if k.endswith("gamma")
    }
    drops = [n.layer.ratio for n in m.program.nodes if isinstance(n.layer, Dropout)]
    assert drops == [0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.5, 0.5]
    quarter = VGG16(width=0.25, n_classes=7)
    assert quarter.params["block5_3.conv.W"].shape == (128, 128, 3, 3)
    assert quarter.params["fc2.W"].shape == (7, 128)


def test_load_params_checks_names_and_shapes():
    m = VGG16(width=0.125)
    p = {k: v.copy() for k, v in m.params.items()}
    p["fc2.W"] = p["fc2.W"] + 1
    m.load_params(p)
    np.testing.assert_array_equal(m.params["fc2.W"], p["fc2.W"])
    bad = dict(p)
    del bad["fc1.W"]
    with pytest.raises(KeyError, match="missing \\['fc1.W'\\]"):
        m.load_params(bad)
    bad = dict(p, extra=np.zeros(1))
    with pytest.raises(KeyError, match="unexpected \\['extra'\\]"):
        m.load_params(bad)
    bad = dict(p, **{"fc1.W": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="fc1.W.*shape"):
        m.load_params(bad)
    with pytest.raises(ValueError, match="width"):
        VGG16(width=0)


@pytest.mark.parametrize("split", list(SPLITS))
def test_gradients_equal_under_every_split(split):
    """No oracle needed: every split gives the unsplit run's loss and gradients (float64)."""
    x, t = _batch(np.float64)
    m = VGG16(width=0.125, dtype=np.float64)
    ref = dask.compute(*m.forward_backward(x, t, dropout=False))
    spec, cs = SPLITS[split]
    m.channel_split = cs
    loss, grads = dask.compute(*m.forward_backward(dp.split(x, **spec), t, dropout=False))
    assert abs(loss - ref[0]) <= 1e-10 * abs(ref[0])
    for k in grads:
        assert_close(grads[k], ref[1][k], np.float64)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-8), (np.float32, 1e-3)])
@pytest.mark.parametrize(
    "split", ["batch", "channel", "spatial 3x3 (tiles not aligned with the pools)", "mixed"]
)
def test_matches_pytorch(split, dtype, tol):
    optional.need_torch()
    from torch_vgg import torch_loss_and_grads

    # float32 needs a batch of 16: with 6 images a ReLU or max-pool input of this seed lies so
    # near its kink that float32 rounding flips it (PyTorch's own float32 run is 8% off then)
    x, t = _batch(dtype, 6 if dtype == np.float64 else 16)
    m = VGG16(width=0.125, dtype=dtype, seed=3)
    lt, gt = torch_loss_and_grads(m, x, t)
    spec, cs = SPLITS[split]
    m.channel_split = cs
    loss, grads = dask.compute(*m.forward_backward(dp.split(x, **spec), t, dropout=False))
    assert abs(loss - lt) <= tol * abs(lt)
    assert set(grads) == set(m.params)
    for k, g in grads.items():
        assert g.shape == m.params[k].shape
        err = np.abs(g - gt[k]).max() / max(np.abs(gt[k]).max(), 1e-30)
        assert err <= tol, (k, err)


def test_eval_mode_matches_pytorch_with_running_statistics():
    optional.need_torch()
    from torch_vgg import torch_loss_and_grads

    x, t = _batch(np.float64)
    m = VGG16(width=0.125, dtype=np.float64)
    rng = np.random.default_rng(5)
    m.load_params(m.params, {k: rng.random(v.shape) + 0.5 for k, v in m.state.items()})
    lt, gt = torch_loss_and_grads(m, x, t, train=False)
    loss, grads = dask.compute(*m.forward_backward(dp.split(x, batch=2, spatial=(2, 2)), t, train=False))
    assert abs(loss - lt) <= 1e-8 * abs(lt)
    for k in grads:
        assert_close(grads[k], gt[k], np.float64)


def test_training_mode_updates_running_statistics_like_chainer():
    x, t = _batch(np.float64)
    m = VGG16(width=0.125, dtype=np.float64)
    _, _, aux = m.forward_backward_aux(x, t, dropout=False)
    state = dask.compute(aux["state"])[0]
    h = x  # first BN sees conv(x): check block1_1 against a direct computation
    w = m.params["block1_1.conv.W"]
    from reference import conv2d_ref

    y = conv2d_ref(h, w, padding=1)
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
    n = y.size // y.shape[1]
    np.testing.assert_allclose(state["block1_1.bn.avg_mean"], 0.1 * mean, rtol=1e-10)
    np.testing.assert_allclose(state["block1_1.bn.avg_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-10)


def test_features_is_predict_before_fc1_for_any_image_size():
    m = VGG16(width=0.125, seed=1)
    rng = np.random.default_rng(4)
    state = {
        k: (rng.random(v.shape) + (0.5 if "var" in k else -0.5)).astype("f4") for k, v in m.state.items()
    }
    m.load_params(m.params, state)
    x = rng.random((3, 3, 32, 32)).astype(np.float32)
    f = m.features(dp.split(x, spatial=(2, 2))).compute()
    assert f.shape == (3, 64, 1, 1)
    # the rest of predict, in NumPy: fc1, BatchNorm (running statistics), ReLU, fc2
    h = f.reshape(3, -1).astype(np.float64) @ m.params["fc1.W"].T
    h = (h - state["bn_fc1.avg_mean"]) / np.sqrt(state["bn_fc1.avg_var"] + 2e-5)
    h = np.maximum(h * m.params["bn_fc1.gamma"] + m.params["bn_fc1.beta"], 0)
    assert_close(m.predict(x).compute(), h @ m.params["fc2.W"].T, np.float32)
    # any size: 3 blocks of a 70x45 image, tiles not aligned with the pools
    x = rng.random((1, 3, 70, 45)).astype(np.float32)
    whole = m.features(x, blocks=3).compute()
    assert whole.shape == (1, 32, 8, 5)
    assert_close(m.features(dp.split(x, spatial=(3, 2)), blocks=3).compute(), whole, np.float32)
    with pytest.raises(ValueError, match="blocks must be"):
        m.features(x, blocks=6)
    with pytest.raises(ValueError, match="H, W >= 32"):
        m.features(x[:, :, :31])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.features(x[:, :2])


def test_load_params_casts_every_value_to_the_model_dtype():
    """NumPy, integer and Dask float64 values all become the model's float32 (a float64 Dask
    parameter would otherwise switch the whole forward to float64)."""
    m = VGG16(n_classes=4, width=0.0625, seed=0)
    new = {k: v.astype("f8") for k, v in m.params.items()}
    new["fc2.W"] = da.from_array(new["fc2.W"], chunks=-1)
    new["block1_1.bn.gamma"] = np.ones(new["block1_1.bn.gamma"].shape, dtype=int)
    m.load_params(new)
    assert {v.dtype for v in m.params.values()} == {np.dtype("f4")}
    assert isinstance(m.params["fc2.W"], da.Array)
    np.testing.assert_array_equal(m.params["fc2.W"].compute(), new["fc2.W"].compute().astype("f4"))
    z = m.predict(da.zeros((2, 3, 32, 32), dtype="f4", chunks=1))
    assert z.dtype == np.float32
