"""conv2d and conv2d_vjp on a real distributed.LocalCluster with 2 worker processes; what a
cluster that :func:`dask_pconv.cluster.connect` starts listens on, and how it closes."""

import logging
import os
import urllib.error
import urllib.parse
import urllib.request

import dask
import dask.array as da
import numpy as np
import psutil
import pytest
from clusters import local_cluster
from distributed import Client

import dask_pconv as dp
from dask_pconv import cluster as dp_cluster

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


def _listening(pid):
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def _host(address):
    return urllib.parse.urlsplit(address).hostname


def _http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # the default's port, if taken
@pytest.mark.parametrize("dashboard", ["", "   ", "default"])
def test_every_listener_of_a_new_cluster_is_on_loopback(dashboard):
    """``dashboard_address=""`` (or spaces) means no dashboard, as ``--dashboard ''`` does (it
    served one on 0.0.0.0:8787); with it and with the defaults, the scheduler, the nannies, the
    workers, their HTTP servers and the scheduler's (the dashboard or /health) listen on
    127.0.0.1 only: the addresses they report and every socket the processes listen on."""
    kwargs = {} if dashboard == "default" else {"dashboard_address": dashboard}
    before = _listening(os.getpid())
    with dp_cluster.connect(n_workers=2, threads_per_worker=1, **kwargs) as client:
        scheduler = client.cluster.scheduler
        workers = client.scheduler_info()["workers"]
        addresses = [scheduler.address, *workers, *(w["nanny"] for w in workers.values())]
        assert {_host(a) for a in addresses} == {"127.0.0.1"}, addresses
        http = {s.getsockname() for s in scheduler.http_server._sockets.values()}
        assert {ip for ip, _ in http} == {"127.0.0.1"}, http
        port = http.pop()[1]
        assert _http_status(f"http://127.0.0.1:{port}/health") == 200
        if dashboard == "default":
            assert _host(client.dashboard_link) == "127.0.0.1"
        else:
            assert _http_status(f"http://127.0.0.1:{port}/status") == 404  # no dashboard
        pids = client.run(os.getpid)
        sockets = {"scheduler and nannies": _listening(os.getpid()) - before}
        sockets.update({f"worker {p}": _listening(p) for p in pids.values()})
    assert all(sockets.values()), sockets
    for who, socks in sockets.items():
        assert {ip for ip, _ in socks} == {"127.0.0.1"}, (who, socks)


def test_a_quiet_close_leaves_this_process_logging_as_before():
    """``_close_quietly`` turns the distributed loggers off only while the cluster closes, and
    leaves logging on in a worker that shares this process (the CLI's workers do not)."""
    names = ("distributed", "distributed.worker", "distributed.core", "tornado")
    disabled = {n: logging.getLogger(n).disabled for n in names}
    with local_cluster(n_workers=1, processes=False) as cluster:
        client = Client(cluster)
        dp_cluster._close_quietly(client)
        assert client.status == "closed"
    assert {n: logging.getLogger(n).disabled for n in names} == disabled
    assert logging.root.manager.disable == logging.NOTSET
