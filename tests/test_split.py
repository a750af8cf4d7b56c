import dask.array as da
import numpy as np
import pytest

import dask_pconv as dp


def test_split_even_pieces():
    x = da.zeros((10, 6, 7, 9), chunks=(3, 6, 7, 2))
    y = dp.split(x, batch=4, channel=2, spatial=(3, 2))
    assert y.chunks == ((3, 3, 2, 2), (3, 3), (3, 2, 2), (5, 4))
    assert dp.split(x, spatial=3).chunks[2:] == ((3, 2, 2), (3, 3, 3))
    assert dp.split(x).chunks == x.chunks  # None keeps an axis as it is


def test_split_keeps_values():
    x = np.arange(2 * 3 * 5 * 4, dtype="f8").reshape(2, 3, 5, 4)
    np.testing.assert_array_equal(dp.split(x, batch=2, channel=3, spatial=(5, 4)).compute(), x)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(batch=0), ValueError, "batch"),
        (dict(batch=11), ValueError, "batch"),
        (dict(channel=1.5), TypeError, "channel"),
        (dict(spatial=(2, 0)), ValueError, "spatial"),
        (dict(spatial=(1, 2, 3)), TypeError, "spatial"),
    ],
)
def test_split_rejects_bad_counts(kw, err, match):
    with pytest.raises(err, match=match):
        dp.split(da.zeros((10, 6, 7, 9)), **kw)


def test_in_channel_is_the_named_spelling_of_channel():
    x = da.zeros((2, 6, 4, 4))
    assert dp.split(x, in_channel=3).chunks[1] == (2, 2, 2) == dp.split(x, channel=3).chunks[1]
    with pytest.raises(TypeError, match="give in_channel or channel"):
        dp.split(x, channel=2, in_channel=2)
    with pytest.raises(ValueError, match="in_channel=7 is more than the axis length 6"):
        dp.split(x, in_channel=7)
