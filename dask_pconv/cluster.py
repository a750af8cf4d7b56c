"""Start or connect to a dask.distributed cluster.  Only the training entry points use this:
every op returns a lazy Dask array and runs on whatever scheduler is active."""

from __future__ import annotations

__all__ = ["connect"]


def connect(
    address=None,
    *,
    cuda=False,
    n_workers=None,
    threads_per_worker=None,
    memory_limit="auto",
    dashboard_address="127.0.0.1:8787",
    security=None,
):
    """A ``distributed.Client``.

    Parameters
    ----------
    address : str, optional
        Connect to this existing scheduler (``tcp://host:8786``, ``tls://...``).  Otherwise a
        new cluster is started on this machine, listening on 127.0.0.1 only.
    cuda : bool
        Start dask-cuda's ``LocalCUDACluster`` (one worker per GPU) instead of a LocalCluster.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        For a new cluster.  ``dashboard_address=None`` turns the dashboard off.
    security : distributed.Security or bool, optional
        TLS settings; ``True`` makes temporary self-signed credentials for a new cluster.

    Returns
    -------
    distributed.Client
        Closing the client also closes a cluster it started.
    """
    from distributed import Client, LocalCluster

    if address is not None:
        if not isinstance(address, str) or "://" not in address and ":" not in address:
            raise ValueError(f"scheduler address must look like 'tcp://host:port', got {address!r}")
        return Client(address, security=security if security is not True else None)
    kwargs = dict(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        dashboard_address=dashboard_address,
    )
    if security is not None:
        kwargs["security"] = security
        if security is True:
            kwargs["protocol"] = "tls://"
    if cuda:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise ImportError(
                "cuda=True needs dask-cuda and CuPy: pip install 'dask-pconv[gpu]' "
                "(or: pip install dask-cuda cupy-cuda12x)"
            ) from e
        cluster = LocalCUDACluster(
            ip="127.0.0.1", **{k: v for k, v in kwargs.items() if k != "n_workers" or v is not None}
        )
    else:
        cluster = LocalCluster(host="127.0.0.1", processes=True, **kwargs)
    client = Client(cluster)
    client._dask_pconv_cluster = cluster  # closed with the client
    return client
