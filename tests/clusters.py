"""LocalClusters for the tests: 127.0.0.1 only, no dashboard, and nothing on fixed ports (the
scheduler's HTTP endpoints, served without a dashboard too, take a free port instead of trying
8787: https://github.com/dask/distributed/issues/7207), so the tests also pass
while another Dask cluster runs on the machine."""

import sys
import threading
import traceback

from distributed import LocalCluster


def _thread_stacks():
    frames = sys._current_frames()
    return "\n".join(
        f"--- thread {t.name} ---\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threading.enumerate()
        if t.ident in frames
    )


def local_cluster(n_workers=2, threads_per_worker=1, processes=True, **kwargs):
    """Worker processes by default; ``processes=False`` keeps the workers in this process (over
    TCP: the in-process transport takes no host)."""
    kwargs.setdefault("memory_limit", "2GiB")
    if not processes:
        kwargs.setdefault("protocol", "tcp://")
    try:
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            **kwargs,
        )
    except AssertionError as e:
        # distributed's event-loop thread did not start within 10 s (seen once in CI, never
        # reproduced): say what every thread of this process was doing
        raise AssertionError(f"LocalCluster did not start; threads now:\n{_thread_stacks()}") from e
