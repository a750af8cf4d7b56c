"""Bad input gets a clear ValueError/TypeError naming the argument, before any graph runs."""

import dask.array as da
import numpy as np
import pytest

import dask_pconv as dp

X = da.zeros((2, 4, 8, 8), chunks=(1, 2, 4, 4))
W = np.zeros((6, 4, 3, 3))


def _unknown_chunks():
    a = da.zeros((2, 4, 8, 8), chunks=2)
    return a[a[:, 0, 0, 0] >= 0]


CASES = [
    ("x ndim", lambda: dp.conv2d(da.zeros((4, 8, 8)), W), ValueError, r"x must be 4-D"),
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
    ("empty x", lambda: dp.conv2d(da.zeros((0, 4, 8, 8)), W), ValueError, r"x must not be empty"),
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
    ("pool ndim", lambda: dp.max_pool2d(da.zeros((8, 8)), 2), ValueError, r"x must be 4-D"),
    (
        "pool vjp g_y",
        lambda: dp.max_pool2d_vjp(X, np.zeros((2, 4, 3, 3)), 2),
        ValueError,
        r"g_y must have the output shape",
    ),
    ("split too many", lambda: dp.split(X, spatial=(9, 1)), ValueError, r"spatial=9 is more than"),
]


@pytest.mark.parametrize("call, err, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
