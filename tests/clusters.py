"""LocalClusters for the tests: 127.0.0.1 only, no dashboard, and nothing on fixed ports (the
scheduler's HTTP endpoints take a free port instead of trying 8787), so the tests also pass
while another Dask cluster runs on the machine."""

from distributed import LocalCluster


def local_cluster(n_workers=2, threads_per_worker=1, **kwargs):
    kwargs.setdefault("memory_limit", "2GiB")
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        **kwargs,
    )
