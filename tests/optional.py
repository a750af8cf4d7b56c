"""Optional packages some tests need, and the skip reason that says how to install each."""

import importlib.util

import pytest

TORCH = "needs PyTorch, the test oracle: pip install torch==2.13.0"
ZARR = "needs zarr: pip install -e '.[zarr]'"
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def need_torch():
    """``torch``, or skip the test saying how to install it."""
    return pytest.importorskip("torch", reason=TORCH)
