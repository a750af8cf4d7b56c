"""``benchmarks/gpu_check.py``: its dry run on NumPy blocks runs every check and timing, and
without CuPy it stops with a message instead of crashing."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_dry_run_with_numpy_blocks(tmp_path):
    r = _run("--numpy", "--quick", "--steps", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["blocks"] == "numpy"
    checks = {c["check"].split(",")[0] for c in out["checks"]}
    ops = {"conv2d", "conv2d_vjp g_x", "conv2d_vjp g_w", "max_pool2d", "max_pool2d_vjp"}
    vgg = {"VGG16 step 1 loss", "VGG16 step 2 loss", "VGG16 parameters after 2 steps"}
    cluster = {"cluster: VGG16 step loss", "cluster: evaluate", "cluster: checkpoint parameters"}
    unet_checks = {"U-Net predict on tiles (64x64)", "U-Net forward_backward on tiles (32x32)"}
    assert ops | vgg | cluster | unet_checks == checks
    assert all(c["ok"] for c in out["checks"])
    assert {r["op"] for r in out["rows"] if "op" in r} == {"fwd", "fwd+bwd"}
    assert all(r["ours[numpy] s"] > 0 for r in out["rows"] if "op" in r)
    vgg = [r for r in out["rows"] if "floor" in r]
    (unet,) = [r for r in out["rows"] if "predict" in r]
    # per tile: its block, its copy to the device, its stage task; one job for all
    assert unet["ours s"] > 0 and unet["tasks"] <= 3 * 4 + 1 and unet["critical path"] <= 3
    # --quick: the step floor (width 1/16, batch 4) for two splits, each with its graph's shape
    assert [r["case"].split(", ")[-1] for r in vgg if r["floor"]] == ["batch:2", "one block"]
    assert all(r["ours step s"] > 0 and 0 < r["critical path"] < r["tasks"] for r in vgg)
    # splitting the batch adds tasks and shortens no chain of them
    unsplit, batch = (next(r for r in vgg if r["case"].endswith(s)) for s in ("one block", "batch:2"))
    assert batch["tasks"] > unsplit["tasks"] and batch["critical path"] >= unsplit["critical path"]


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None,
    reason="CuPy is installed: this is the dry run for machines without it (run benchmarks/gpu_check.py)",
)
def test_without_cupy_it_says_so(tmp_path):
    r = _run("--out", str(tmp_path))
    assert r.returncode == 2
    assert "CuPy is not installed" in r.stderr and "--numpy" in r.stderr
    assert "Traceback" not in r.stderr
