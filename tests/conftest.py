import dask
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if __import__("os").environ.get("CI") else "default")


@pytest.fixture(autouse=True)
def _sync_scheduler(request):
    """Unit tests run on the synchronous scheduler; cluster tests bring their own client."""
    if request.node.get_closest_marker("cluster"):
        yield
        return
    with dask.config.set(scheduler="synchronous"):
        yield
