"""conv2d and conv2d_vjp on a real distributed.LocalCluster with 2 worker processes."""

import dask
import dask.array as da
import numpy as np
import pytest
from clusters import local_cluster
from distributed import Client

import dask_pconv as dp

from reference import conv2d_ref, conv2d_vjp_ref
from strategies import assert_close

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client():
    with (
        local_cluster() as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_conv2d_and_vjp_on_local_cluster(client):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 20, 18))
    w = rng.standard_normal((8, 3, 3, 3))
    xd = dp.split(x, batch=2, channel=2, spatial=(2, 3))
    wd = da.from_array(w, chunks=(3, -1, -1, -1))
    y = dp.conv2d(xd, wd, padding=1, stride=(1, 2), groups=2)
    gy = rng.standard_normal(y.shape)
    g_x, g_w, g_b = dp.conv2d_vjp(xd, wd, gy, padding=1, stride=(1, 2), groups=2)
    out, gx, gw, gb = dask.compute(y, g_x, g_w, g_b)  # runs on the client's cluster
    assert len(client.scheduler_info()["workers"]) == 2
    assert_close(out, conv2d_ref(x, w, padding=1, stride=(1, 2), groups=2), np.float64)
    for a, e in zip((gx, gw, gb), conv2d_vjp_ref(x, w, gy, padding=1, stride=(1, 2), groups=2)):
        assert_close(a, e, np.float64)
