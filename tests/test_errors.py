"""Bad input gets a clear error naming the problem, before any graph runs: the operators, the
model's parameters, the data loaders, the cluster connection and the command line.  Inputs that
are legal but unusual (NaN/Inf in the data, chunks that do not match) get a documented result
instead, checked against the unsplit reference."""

import contextlib
import importlib.util
import io
import json
import os
import pickle
import re
import zipfile

import dask
import dask.array as da
import numpy as np
import pytest
from clusters import local_cluster

import dask_pconv as dp
from dask_pconv import cli
from dask_pconv.checkpoint import _checksum, save_checkpoint
from dask_pconv.cluster import connect
from dask_pconv.data import load_cifar10, load_dataset, parse_split, synthetic
from dask_pconv.models import VGG16
from dask_pconv.ops import nn
from dask_pconv.train import Trainer

from reference import conv2d_ref, conv2d_vjp_ref, max_pool2d_ref

X = da.zeros((2, 4, 8, 8), chunks=(1, 2, 4, 4))
W = np.zeros((6, 4, 3, 3))


def _unknown_chunks():
    a = da.zeros((2, 4, 8, 8), chunks=2)
    return a[a[:, 0, 0, 0] >= 0]


CASES = [
    ("x ndim", lambda: dp.conv2d(da.zeros((8, 8)), W), ValueError, r"x must be 3-D \(C, H, W\) or 4-D"),
    ("x 5-D", lambda: dp.conv2d(da.zeros((1, 2, 4, 8, 8)), W), ValueError, r"x must be 3-D .* or 4-D"),
    ("w ndim", lambda: dp.conv2d(X, np.zeros((6, 4, 3))), ValueError, r"w must be 4-D"),
    ("x type", lambda: dp.conv2d([[1.0]], W), TypeError, r"x must be a Dask"),
    ("channel mismatch", lambda: dp.conv2d(X, np.zeros((6, 3, 3, 3))), ValueError, r"channel mismatch"),
    (
        "groups divide C",
        lambda: dp.conv2d(X, np.zeros((6, 1, 3, 3)), groups=3),
        ValueError,
        r"groups=3 does not divide the 4 input",
    ),
    (
        "groups divide O",
        lambda: dp.conv2d(X, np.zeros((5, 2, 3, 3)), groups=2),
        ValueError,
        r"groups=2 does not divide the 5 output",
    ),
    ("groups zero", lambda: dp.conv2d(X, W, groups=0), ValueError, r"groups must be positive"),
    ("groups float", lambda: dp.conv2d(X, W, groups=1.0), TypeError, r"groups must be an int"),
    ("stride zero", lambda: dp.conv2d(X, W, stride=0), ValueError, r"stride must be positive"),
    ("stride negative pair", lambda: dp.conv2d(X, W, stride=(1, -2)), ValueError, r"stride"),
    ("stride float", lambda: dp.conv2d(X, W, stride=1.5), TypeError, r"stride"),
    ("dilation zero", lambda: dp.conv2d(X, W, dilation=0), ValueError, r"dilation must be positive"),
    ("padding negative", lambda: dp.conv2d(X, W, padding=-1), ValueError, r"padding must be >= 0"),
    ("padding string", lambda: dp.conv2d(X, W, padding="full"), ValueError, r"padding must be"),
    ("same strided", lambda: dp.conv2d(X, W, padding="same", stride=2), ValueError, r"padding='same'"),
    (
        "kernel too large",
        lambda: dp.conv2d(X, np.zeros((6, 4, 11, 3))),
        ValueError,
        r"kernel .* larger than the padded input",
    ),
    (
        "dilated kernel too large",
        lambda: dp.conv2d(X, W, dilation=5),
        ValueError,
        r"larger than the padded input",
    ),
    ("unknown chunks", lambda: dp.conv2d(_unknown_chunks(), W), ValueError, r"unknown \(nan\) chunk sizes"),
    (
        "integer x",
        lambda: dp.conv2d(da.zeros((2, 4, 8, 8), dtype=int), W),
        TypeError,
        r"x must have a floating dtype",
    ),
    ("integer w", lambda: dp.conv2d(X, W.astype(int)), TypeError, r"w must have a floating dtype"),
    (
        "empty channels",
        lambda: dp.conv2d(da.zeros((2, 0, 8, 8)), W),
        ValueError,
        r"x must not be empty \(only the batch axis may be 0\)",
    ),
    ("empty image", lambda: dp.conv2d(da.zeros((2, 4, 0, 8)), W), ValueError, r"x must not be empty"),
    ("empty w", lambda: dp.conv2d(X, np.zeros((0, 4, 3, 3))), ValueError, r"w must not be empty"),
    ("bias shape", lambda: dp.conv2d(X, W, b=np.zeros(5)), ValueError, r"b must have shape \(6,\)"),
    (
        "vjp g_y shape",
        lambda: dp.conv2d_vjp(X, W, np.zeros((2, 6, 7, 7))),
        ValueError,
        r"g_y must have the output shape",
    ),
    (
        "vjp integer g_y",
        lambda: dp.conv2d_vjp(X, W, np.zeros((2, 6, 6, 6), dtype=int)),
        TypeError,
        r"g_y must have a floating dtype",
    ),
    ("pool kernel zero", lambda: dp.max_pool2d(X, 0), ValueError, r"kernel_size must be positive"),
    ("pool padding", lambda: dp.max_pool2d(X, 2, padding=2), ValueError, r"at most half of kernel_size"),
    ("pool too large", lambda: dp.max_pool2d(X, 9), ValueError, r"larger than the padded input"),
    ("pool ndim", lambda: dp.max_pool2d(da.zeros((8, 8)), 2), ValueError, r"x must be 3-D .* or 4-D"),
    (
        "pool vjp g_y",
        lambda: dp.max_pool2d_vjp(X, np.zeros((2, 4, 3, 3)), 2),
        ValueError,
        r"g_y must have the output shape",
    ),
    ("split too many", lambda: dp.split(X, spatial=(9, 1)), ValueError, r"spatial=9 is more than"),
    ("split zero", lambda: dp.split(X, batch=0), ValueError, r"batch must be positive"),
    ("split float", lambda: dp.split(X, channel=1.5), TypeError, r"channel must be an int"),
    (
        "split spatial triple",
        lambda: dp.split(X, spatial=(2, 2, 2)),
        TypeError,
        r"spatial must be an int or a pair",
    ),
    ("split 2-D", lambda: dp.split(np.zeros((8, 8)), batch=2), ValueError, r"x must be 4-D"),
    (
        "padding quadruple",
        lambda: dp.conv2d(X, W, padding=(1, 1, 1, 1)),
        TypeError,
        r"padding must be an int or a pair",
    ),
    (
        "w list",
        lambda: dp.conv2d(X, W.tolist()),
        TypeError,
        r"w must be a Dask, NumPy or CuPy array, got list",
    ),
    ("complex x", lambda: dp.conv2d(X.astype(complex), W), TypeError, r"x must have a floating dtype"),
    (
        "vjp channel mismatch",
        lambda: dp.conv2d_vjp(X, W[:, :3], np.zeros((2, 6, 6, 6))),
        ValueError,
        r"channel mismatch",
    ),
    ("pool stride zero", lambda: dp.max_pool2d(X, 2, stride=0), ValueError, r"stride must be positive"),
    ("pool bool x", lambda: dp.max_pool2d(X > 0, 2), TypeError, r"x must have a floating dtype"),
]


X32 = X.astype(np.float32)
W32 = W.astype(np.float32)
_MASKED = np.ma.masked_array(
    np.zeros((2, 4, 8, 8)), mask=np.zeros((2, 4, 8, 8), bool) | np.eye(8, dtype=bool)
)
_DA_MASKED = da.ma.masked_greater(X, 0.5)  # a dask.array.ma array: its blocks are masked arrays
_V = np.ones(4)
CASES += [
    ("masked x", lambda: dp.conv2d(_MASKED, W), TypeError, r"x is a masked array: .* ignore its mask"),
    ("dask masked x", lambda: dp.conv2d(_DA_MASKED, W), TypeError, r"x is a masked array"),
    ("masked w", lambda: dp.conv2d(X, np.ma.masked_array(W)), TypeError, r"w is a masked array"),
    ("masked b", lambda: dp.conv2d(X, W, np.ma.masked_array(np.zeros(6))), TypeError, r"b is a masked array"),
    (
        "masked g_y",
        lambda: dp.conv2d_vjp(X, W, np.ma.masked_array(np.zeros((2, 6, 6, 6)))),
        TypeError,
        r"g_y is a masked array",
    ),
    ("pool masked x", lambda: dp.max_pool2d(_DA_MASKED, 2), TypeError, r"x is a masked array"),
    (
        "pool vjp masked g_y",
        lambda: dp.max_pool2d_vjp(X, np.ma.masked_array(np.zeros((2, 4, 4, 4))), 2),
        TypeError,
        r"g_y is a masked array",
    ),
    ("split masked", lambda: dp.split(_MASKED, batch=2), TypeError, r"x is a masked array"),
    ("relu masked", lambda: nn.relu(_DA_MASKED), TypeError, r"x is a masked array"),
    ("batch_norm masked x", lambda: nn.batch_norm(_DA_MASKED, _V, _V), TypeError, r"x is a masked array"),
    (
        "batch_norm masked gamma",
        lambda: nn.batch_norm(X, np.ma.masked_array(_V, [1, 0, 0, 0]), _V),
        TypeError,
        r"gamma is a masked array",
    ),
    (
        "linear masked W",
        lambda: nn.linear(X[:, :, 0, 0], np.ma.ones((3, 4))),
        TypeError,
        r"W is a masked array",
    ),
    ("dropout masked", lambda: nn.dropout(_DA_MASKED, 0.5, 0, 0, 0), TypeError, r"x is a masked array"),
    (
        "cross-entropy masked",
        lambda: nn.softmax_cross_entropy(da.ma.masked_array(X[:, :, 0, 0]), np.zeros(2, int)),
        TypeError,
        r"z is a masked array",
    ),
    (
        "float64 w with float32 x",
        lambda: dp.conv2d(X32, W),
        TypeError,
        r"w has dtype float64 but x has dtype float32; .*not promoted",
    ),
    (
        "float32 w with float64 x",
        lambda: dp.conv2d(X, W32),
        TypeError,
        r"w has dtype float32 but x has dtype float64",
    ),
    (
        "float64 b",
        lambda: dp.conv2d(X32, W32, np.zeros(6)),
        TypeError,
        r"b has dtype float64 but x has dtype float32",
    ),
    (
        "float64 g_y",
        lambda: dp.conv2d_vjp(X32, W32, np.zeros((2, 6, 6, 6))),
        TypeError,
        r"g_y has dtype float64 but x has dtype float32",
    ),
    (
        "vjp float64 w",
        lambda: dp.conv2d_vjp(X32, W, np.zeros((2, 6, 6, 6), np.float32)),
        TypeError,
        r"w has dtype float64 but x has dtype float32",
    ),
    (
        "pool vjp float64 g_y",
        lambda: dp.max_pool2d_vjp(X32, np.zeros((2, 4, 4, 4)), 2),
        TypeError,
        r"g_y has dtype float64 but x has dtype float32",
    ),
    (
        "unbatched vjp with batched g_y",
        lambda: dp.conv2d_vjp(X[0], W, np.zeros((1, 6, 6, 6))),
        ValueError,
        r"g_y must be 3-D",
    ),
    (
        "unbatched vjp g_y shape",
        lambda: dp.conv2d_vjp(X[0], W, np.zeros((6, 6, 5))),
        ValueError,
        r"g_y must have the output shape \(6, 6, 6\)",
    ),
    ("pool dilation zero", lambda: dp.max_pool2d(X, 2, dilation=0), ValueError, r"dilation must be positive"),
    (
        "pool ceil_mode",
        lambda: dp.max_pool2d(X, 2, ceil_mode="yes"),
        TypeError,
        r"ceil_mode must be True or False",
    ),
    (
        "pool dilated too large",
        lambda: dp.max_pool2d(X, 3, dilation=4),
        ValueError,
        r"effective size \(9, 9\) .* larger than the padded input",
    ),
    (
        "stride triple",
        lambda: dp.conv2d(X, W, stride=(1, 1, 1)),
        TypeError,
        r"stride must be an int or a pair",
    ),
    ("stride empty", lambda: dp.conv2d(X, W, stride=()), TypeError, r"stride must be an int or a pair"),
]


@pytest.mark.parametrize("call, err, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def _params(**replace):
    return {**VGG16(n_classes=4, width=0.0625).params, **replace}


_FC2 = (4, 32)  # fc2.W of VGG16(n_classes=4, width=0.0625)


def _negative_state(m):
    return {**m.state, "bn_fc1.avg_var": np.full(m.state["bn_fc1.avg_var"].shape, -1.0)}


MODEL_CASES = [
    ("params not a mapping", lambda m: m.load_params([1, 2]), TypeError, r"params must be a mapping"),
    ("params missing", lambda m: m.load_params({"fc2.W": np.zeros(_FC2)}), KeyError, r"missing \['block1_1"),
    (
        "params unexpected",
        lambda m: m.load_params(_params(extra=np.zeros(1))),
        KeyError,
        r"unexpected \['extra'\]",
    ),
    (
        "params shape",
        lambda m: m.load_params(_params(**{"fc2.W": np.zeros((4, 31))})),
        ValueError,
        r"\(4, 31\), expected \(4, 32\)",
    ),
    (
        "params strings",
        lambda m: m.load_params(_params(**{"fc2.W": np.full(_FC2, "a")})),
        TypeError,
        r"real numbers",
    ),
    (
        "params NaN",
        lambda m: m.load_params(_params(**{"fc2.W": np.full(_FC2, np.nan)})),
        ValueError,
        r"NaN or Inf",
    ),
    (
        "params Inf",
        lambda m: m.load_params(_params(**{"fc2.W": np.full(_FC2, np.inf)})),
        ValueError,
        r"NaN or Inf",
    ),
    (
        "state negative variance",
        lambda m: m.load_params(_params(), _negative_state(m)),
        ValueError,
        r"state\['bn_fc1.avg_var'\] \(a BatchNorm running variance\) has negative values",
    ),
    (
        "state wrong names",
        lambda m: m.load_params(_params(), {"x": np.zeros(1)}),
        KeyError,
        r"state names do not match",
    ),
    ("model int dtype", lambda m: VGG16(dtype="int32"), TypeError, r"dtype must be a floating dtype"),
    ("model image size", lambda m: VGG16(image_size=48), ValueError, r"multiple of 32"),
    (
        "model channel_split",
        lambda m: VGG16(channel_split=0),
        ValueError,
        r"channel_split must be a positive int",
    ),
    (
        "forward wrong image",
        lambda m: m.predict(da.zeros((2, 3, 16, 16))),
        ValueError,
        r"x must be \(N, 3, 32, 32\)",
    ),
]


@pytest.mark.parametrize("call, err, match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_input(call, err, match):
    m = VGG16(n_classes=4, width=0.0625)
    before = dict(m.params)
    with pytest.raises(err, match=match):
        call(m)
    assert all(m.params[k] is before[k] for k in before)  # nothing was replaced


def _cifar_dir(tmp_path, content):
    ok = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(ok))
    (tmp_path / "test_batch").write_bytes(content)
    return tmp_path


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


DATA_CASES = [
    ("cifar missing dir", lambda d: load_cifar10(d / "nope"), FileNotFoundError, r"does not exist"),
    ("cifar empty dir", lambda d: load_cifar10(d), FileNotFoundError, r"cifar-10-batches-py"),
    (
        "cifar truncated",
        lambda d: load_cifar10(_cifar_dir(d, b"\x80\x02}q")),
        ValueError,
        r"test_batch.*unpickling failed",
    ),
    (
        "cifar code in pickle",
        lambda d: load_cifar10(_cifar_dir(d, pickle.dumps({b"data": _Exploit()}))),
        ValueError,
        r"refusing to load (posix|os|nt)\.system",
    ),
    ("cifar no data_dir", lambda d: load_dataset("cifar10"), ValueError, r"needs data_dir"),
    ("unknown dataset", lambda d: load_dataset("mnist"), ValueError, r"unknown dataset 'mnist'"),
    (
        "synthetic n too small",
        lambda d: synthetic(n=3, n_classes=10),
        ValueError,
        r"leaves an empty validation set out of 3",
    ),
    ("split spec axis", lambda d: parse_split("diagonal:2"), ValueError, r"diagonal"),
    ("split spec count", lambda d: parse_split("batch:0"), ValueError, r"positive integer"),
    ("split spec shape", lambda d: parse_split("spatial:2x2x2"), ValueError, r"spatial:HxW"),
    ("address not an address", lambda d: connect("localhost"), ValueError, r"tcp://host:port"),
    (
        "address is the dashboard",
        lambda d: connect("http://127.0.0.1:8787"),
        ValueError,
        r"dashboard \(HTTP\) address",
    ),
]


@pytest.mark.parametrize("call, err, match", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_and_cluster_input(call, err, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(err, match=match):
        call(tmp_path)
    assert not (tmp_path / "pwned").exists()


def _run_cli(*argv):
    """``dask-pconv`` in this process: (exit status, standard error)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def _corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint_epoch_1.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return str(tmp_path)


CLI_CASES = [
    ("cli split spec", lambda d: ("--split", "batch:two"), r"bad count 'two'"),
    ("cli epochs", lambda d: ("--epochs", "-3"), r"--epochs: expected a positive integer"),
    ("cli unknown option", lambda d: ("--learning-rate", "0.1"), r"unrecognized arguments"),
    (
        "cli cifar without dir",
        lambda d: ("--dataset", "cifar10"),
        r"loading dataset 'cifar10': .*needs data_dir",
    ),
    (
        "cli cifar missing dir",
        lambda d: ("--dataset", "cifar10", "--data-dir", str(d / "none")),
        r"loading dataset 'cifar10': .*does not exist",
    ),
    (
        "cli batch too big",
        lambda d: ("--batch-size", "100000"),
        r"--batch-size 100000 is more than the \d+ training",
    ),
    (
        "cli bad address",
        lambda d: ("--scheduler", "nowhere"),
        r"connecting to the scheduler: .*tcp://host:port",
    ),
    (
        "cli unreachable scheduler",
        lambda d: ("--scheduler", "tcp://127.0.0.1:1"),
        r"connecting to the scheduler: could not connect to the scheduler at 'tcp://127.0.0.1:1'",
    ),
    pytest.param(
        "cli cuda without cupy",
        lambda d: ("--cuda",),
        r"--cuda needs CuPy and dask-cuda: pip install 'dask-pconv\[gpu\]'",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("cupy") is not None,
            reason="CuPy is installed: the error without CuPy cannot be shown",
        ),
    ),
    (
        "cli corrupt checkpoint",
        lambda d: ("--resume", "--out", _corrupt_checkpoint(d), "--workers", "1", "--dashboard", ""),
        r"resuming from .*: checkpoint .* unreadable or malformed",
    ),
]


def _params_of(cases):
    """``pytest.param``s without the name (the name becomes the id), keeping any marks."""
    out = []
    for c in cases:
        values, marks = (c.values, c.marks) if hasattr(c, "values") else (c, ())
        out.append(pytest.param(*values[1:], id=values[0], marks=marks))
    return out


@pytest.mark.parametrize("argv, match", _params_of(CLI_CASES))
def test_bad_command_line(argv, match, tmp_path):
    """Exit status 2 and one line on standard error naming the problem; no traceback."""
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        rc, err = _run_cli("train", "--dataset", "synthetic", "--no-progress", *argv(tmp_path))
    assert rc == 2, err
    assert re.search(match, err), err
    assert "Traceback" not in err


def _torch_cases():
    torch = pytest.importorskip("torch", reason="the PyTorch oracle: pip install torch==2.13.0")
    t = torch.zeros
    return [
        lambda: dp.conv2d(t(2, 4, 8, 8, dtype=torch.float64), W),
        lambda: dp.conv2d(X, t(6, 4, 3, 3, dtype=torch.float64)),
        lambda: dp.conv2d(X, W, t(6, dtype=torch.float64)),
        lambda: dp.conv2d_vjp(X, W, t(2, 6, 6, 6, dtype=torch.float64)),
        lambda: dp.max_pool2d(t(2, 4, 8, 8), 2),
        lambda: dp.max_pool2d_vjp(X, t(2, 4, 4, 4, dtype=torch.float64), 2),
        lambda: dp.split(t(2, 4, 8, 8), batch=2),
        lambda: nn.linear(X[:, :, 0, 0], t(3, 4, dtype=torch.float64)),
    ], ["x", "w", "b", "g_y", "x", "g_y", "x", "W"]


def test_torch_tensors_are_refused_naming_the_argument():
    """A torch.Tensor failed inside Dask ("Cannot interpret 'torch.float64' as a data type");
    now a TypeError on the client names the argument and says how to pass it."""
    calls, names = _torch_cases()
    for call, name in zip(calls, names):
        with pytest.raises(
            TypeError, match=rf"^{name} is a torch.Tensor; .*{name}.detach\(\).cpu\(\).numpy\(\)"
        ):
            call()


def test_the_checks_do_not_import_torch():
    """Recognising a tensor never imports PyTorch (its import costs a worker ~180 MiB)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, dask_pconv as dp\n"
        "x = np.zeros((1, 1, 4, 4), np.float32)\n"
        "dp.max_pool2d(dp.conv2d(x, np.ones((1, 1, 3, 3), np.float32)), 2).compute()\n"
        "try:\n"
        "    dp.conv2d(np.ma.masked_array(x), x)\n"
        "except TypeError:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- documented results for legal but unusual input --------------------------------------------
def _with_nonfinite(shape, chunks):
    x = np.random.default_rng(0).standard_normal(shape)
    x[0, 0, 1, 1], x[-1, -1, -2, 3], x[0, 1, 5, 0] = np.nan, np.inf, -np.inf
    return x, da.from_array(x, chunks=chunks)


@pytest.mark.parametrize("kernel", ["numpy", "auto"])
def test_nan_and_inf_propagate_like_the_unsplit_computation(kernel):
    """NaN and Inf in the data are not errors: they propagate exactly as in the unsplit
    computation (the same outputs are NaN/Inf; the others are finite and equal), whatever the
    split.  A training loss that becomes non-finite stops the trainer (test_reliability)."""
    x, xd = _with_nonfinite((2, 4, 9, 8), (1, 2, 4, 3))
    w = np.random.default_rng(1).standard_normal((3, 4, 3, 3))
    with dask.config.set({"pconv.conv-kernel": kernel}), np.errstate(invalid="ignore"):
        y = dp.conv2d(xd, w, padding=1).compute()
        ref = conv2d_ref(x, w, padding=1)
        gy = np.ones_like(ref)
        gx, gw, _ = (a.compute() for a in dp.conv2d_vjp(xd, w, gy, padding=1))
        gx_ref, gw_ref, _ = conv2d_vjp_ref(x, w, gy, padding=1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    assert np.isnan(y).any() and np.isfinite(y).any()
    fin = np.isfinite(ref)
    np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.isfinite(gx), np.isfinite(gx_ref))
    np.testing.assert_array_equal(np.isfinite(gw), np.isfinite(gw_ref))
    p = dp.max_pool2d(xd, 2).compute()
    p_ref = max_pool2d_ref(x, 2)
    np.testing.assert_array_equal(p, p_ref)  # NaN compares equal in assert_array_equal


def test_mismatched_chunks_are_rechunked():
    """A g_y whose chunks do not match the output's, or a w chunked along its kernel axes, is
    rechunked: the result is the reference one."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8, 8))
    w = rng.standard_normal((6, 4, 3, 3))
    gy = rng.standard_normal((2, 6, 6, 6))
    xd = da.from_array(x, chunks=(1, 2, 4, 4))
    g_x, g_w, g_b = dask.compute(
        *dp.conv2d_vjp(xd, da.from_array(w, chunks=(3, 2, 2, 2)), da.from_array(gy, chunks=(2, 1, 5, 1)))
    )
    for a, e in zip((g_x, g_w, g_b), conv2d_vjp_ref(x, w, gy)):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)


# -- crafted checkpoints -----------------------------------------------------------------------
def _cli_model():
    """The model ``dask-pconv train --dataset synthetic --width 0.0625`` builds."""
    train, _ = load_dataset("synthetic", seed=0)
    return VGG16(n_classes=train.n_classes, in_channels=train.x.shape[1], width=0.0625, seed=0)


def _good_parts():
    m = _cli_model()
    params, state = dict(m.params), {k: v.copy() for k, v in m.state.items()}
    vel = {k: np.zeros_like(v) for k, v in params.items()}
    meta = {"epoch": 1, "step": 3, "seed": 0, "log": [{"epoch": 1}], "elapsed": 1.5}
    return params, state, vel, meta


def _crafted(change):
    """A checkpoint with a valid checksum, changed by ``change(params, state, vel, meta)``: the
    field checks are what refuses it, not the checksum."""

    def write(path):
        params, state, vel, meta = _good_parts()
        change(params, state, vel, meta)
        save_checkpoint(path, params, state, vel, meta)

    return write


def _members(meta_text=None):
    """The members of a good checkpoint, name -> array (meta replaced by ``meta_text``)."""
    params, state, vel, meta = _good_parts()
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"state/{k}": v for k, v in state.items()})
    arrays.update({f"velocity/{k}": v for k, v in vel.items()})
    text = meta_text if meta_text is not None else json.dumps(dict(meta, sha256=_checksum(arrays)))
    return {**arrays, "meta": np.array(text)}


def _raw_meta(text):
    def write(path):
        np.savez(path, **_members(text))

    return write


def _compressed(path):
    np.savez_compressed(path, **_members())


def _huge_header(path):
    """fc2.W's header declares a 4 TiB float32 array; the member holds 16 bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, a in _members().items():
            buf = io.BytesIO()
            if key == "param/fc2.W":
                header = {"descr": "<f4", "fortran_order": False, "shape": (2**40,)}
                np.lib.format.write_array_header_1_0(buf, header)
                buf.write(bytes(16))
            else:
                np.lib.format.write_array(buf, a, allow_pickle=False)
            zf.writestr(f"{key}.npy", buf.getvalue())


def _set(group, key, value):
    return lambda p, s, v, m: {"param": p, "state": s, "velocity": v, "meta": m}[group].update({key: value})


def _negative_var(p, s, v, m):
    s["block1_1.bn.avg_var"] = s["block1_1.bn.avg_var"].copy()
    s["block1_1.bn.avg_var"][0] = -0.5


_FC2_CLI = _cli_model().params["fc2.W"].shape
CHECKPOINT_CASES = [
    (
        "header declares 4 TiB",
        _huge_header,
        r"'param/fc2.W.npy' declares .*\(4398046511104 bytes\) but holds 16",
    ),
    ("compressed member", _compressed, r"is compressed"),
    ("meta a list", _raw_meta("[1, 2]"), r"meta must be a JSON object, got list"),
    ("meta not JSON", _raw_meta("{epoch: 1"), r"meta is not JSON"),
    ("meta without step", _crafted(lambda p, s, v, m: m.pop("step")), r"meta has no 'step' field"),
    (
        "meta epoch fractional",
        _crafted(_set("meta", "epoch", 1.5)),
        r"meta 'epoch' must be an integer >= 0, got 1.5",
    ),
    (
        "meta epoch negative",
        _crafted(_set("meta", "epoch", -1)),
        r"meta 'epoch' must be an integer >= 0, got -1",
    ),
    ("meta epoch bool", _crafted(_set("meta", "epoch", True)), r"meta 'epoch' must be an integer"),
    (
        "meta step a string",
        _crafted(_set("meta", "step", "3")),
        r"meta 'step' must be an integer >= 0, got '3'",
    ),
    ("meta seed a float", _crafted(_set("meta", "seed", 0.5)), r"meta 'seed' must be an integer"),
    ("meta log not a list", _crafted(_set("meta", "log", {"epoch": 1})), r"meta 'log' must be a list"),
    ("meta elapsed NaN", _crafted(_set("meta", "elapsed", float("nan"))), r"meta 'elapsed' must be a finite"),
    (
        "velocity wrong shape",
        _crafted(_set("velocity", "fc2.W", np.zeros((2, 3), np.float32))),
        r"velocity\['fc2.W'\] has shape \(2, 3\), expected",
    ),
    (
        "velocity strings",
        _crafted(_set("velocity", "fc2.W", np.full(_FC2_CLI, "a"))),
        r"velocity/fc2.W must hold floating-point numbers, got dtype <U1",
    ),
    (
        "velocity NaN",
        _crafted(_set("velocity", "fc2.W", np.full(_FC2_CLI, np.nan, np.float32))),
        r"velocity/fc2.W holds NaN or Inf",
    ),
    (
        "velocity missing",
        _crafted(lambda p, s, v, m: v.pop("fc2.W")),
        r"velocities do not match the parameters: missing \['fc2.W'\]",
    ),
    (
        "param wrong shape",
        _crafted(_set("param", "fc2.W", np.zeros((2, 3), np.float32))),
        r"params\['fc2.W'\] has shape \(2, 3\)",
    ),
    (
        "param integers",
        _crafted(_set("param", "fc2.W", np.zeros(_FC2_CLI, np.int64))),
        r"param/fc2.W must hold floating-point numbers, got dtype int64",
    ),
    ("state missing", _crafted(lambda p, s, v, m: s.pop("bn_fc1.avg_mean")), r"state names do not match"),
    ("negative running variance", _crafted(_negative_var), r"state\['block1_1.bn.avg_var'\].*negative"),
    (
        "unexpected member",
        _crafted(lambda p, s, v, m: p.update({"../x": np.zeros(1, np.float32)})),
        r"params names do not match: .*unexpected \['../x'\]",
    ),
]


@pytest.mark.parametrize(
    "write, match", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_crafted_checkpoint_is_refused_and_nothing_is_replaced(write, match, tmp_path):
    """A one-line ``ValueError`` naming the file and the field; the model and the trainer keep
    everything they had."""
    path = tmp_path / "checkpoint_epoch_1.npz"
    write(path)
    m = _cli_model()
    data = synthetic(n=40, n_classes=m.n_classes, seed=0)[0]
    tr = Trainer(m, data, data, batch_size=8, out=tmp_path, progress=False)
    params, state = dict(m.params), dict(m.state)
    with pytest.raises(ValueError, match=match) as e:
        tr.resume()
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert all(m.params[k] is params[k] for k in params) and all(m.state[k] is state[k] for k in state)
    assert (tr.epoch, tr.step, tr.velocities, tr.log) == (0, 0, None, [])


@pytest.fixture(scope="module")
def scheduler_address():
    with local_cluster(n_workers=1, processes=False) as c:
        yield c.scheduler_address


@pytest.mark.cluster
@pytest.mark.parametrize(
    "write, match", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_cli_refuses_a_crafted_checkpoint(write, match, tmp_path, scheduler_address):
    """``--resume`` from a crafted checkpoint: exit status 2 and one line on standard error."""
    write(tmp_path / "checkpoint_epoch_1.npz")
    argv = ("--width", "0.0625", "--resume", "--out", str(tmp_path), "--scheduler", scheduler_address)
    rc, err = _run_cli("train", "--dataset", "synthetic", "--no-progress", *argv)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"^dask-pconv train: error: resuming from .*: checkpoint .*" + match, err), err
