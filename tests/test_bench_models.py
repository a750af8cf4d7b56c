"""``benchmarks/bench_models.py``: its quick run times staged ResNet-18 and tiled U-Net steps
and a tiled U-Net prediction on a real cluster, and reports every column; without PyTorch it
runs the same cases and leaves the PyTorch baselines out."""

import json
import os
import pathlib
import subprocess
import sys

import optional

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_models.py"


def _run(tmp_path, env=None):
    out = tmp_path / "models.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--steps", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text()), r


def _check_rows(rows):
    steps = [r for r in rows if "dask_pconv step s" in r]
    unet = [r for r in rows if "tiled s" in r]
    assert [r["case"][:6] for r in steps] == ["ResNet", "U-Net "] and len(unet) == 1 and len(rows) == 3
    step = steps[0]
    assert steps[1]["step graph"] == "stages" and steps[1]["dask_pconv step s"] > 0
    assert step["step graph"] == "stages"
    assert step["dask_pconv step s"] > 0
    # the Trainer's count is the optimised graph's keys: tasks, aliases and persisted inputs
    g = step["graph"]
    assert step["tasks per step"] == g["tasks"] + g["aliases"] + g["inputs"]
    assert 0 < step["critical path"] < step["graph"]["tasks"]
    (pred,) = unet
    assert pred["tiled s"] > 0 and pred["ours one chunk s"] > 0
    # 2x2 tiles: at least a task per tile and layer where the one chunk has one per layer
    assert pred["tasks"] > 2 * pred["one-chunk tasks"]
    assert 0 < pred["critical path"] < pred["tasks"]
    return step, pred


def test_quick_run(tmp_path):
    out, _ = _run(tmp_path)
    assert out["benchmark"] == "models" and out["quick"] is True
    step, pred = _check_rows(out["rows"])
    assert out["torch"] is optional.HAVE_TORCH
    if optional.HAVE_TORCH:
        assert step["torch step s"] > 0
        assert step["ratio"] == step["dask_pconv step s"] / step["torch step s"]
        assert pred["torch whole s"] > 0 and pred["tiled / torch"] > 0
        # the tiled logits are PyTorch's for the whole image, to float32 rounding
        assert pred["max abs diff"] < 1e-4


def test_quick_run_without_torch(tmp_path):
    # a `torch` module that cannot be imported, first on the path of the script and its workers
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    out, r = _run(tmp_path, env)
    assert out["torch"] is False
    assert "PyTorch is not installed" in r.stdout
    step, pred = _check_rows(out["rows"])
    for key in ("torch step s", "ratio"):
        assert key not in step
    for key in ("torch whole s", "tiled / torch", "max abs diff"):
        assert key not in pred
