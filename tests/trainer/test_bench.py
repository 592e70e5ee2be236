"""The bench scripts are what a GPU session runs first, with minutes to spare: it must work before it gets
there. On CPU it runs the same code with the tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_training_bench_runs_and_both_paths_agree_on_the_loss(tmp_path):
    # bf16 as on a GPU: the naive baseline runs PEFT's float32 adapter math, trainer_core its mixed precision
    out = tmp_path / "bench.json"
    argv = [sys.executable, "bench/train_gpu.py", "--steps", "1", "--warmup", "1", "--sweep", "8192",
            "--dtype", "bfloat16", "--json", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"].split(":")[0]: r for r in report["results"]}
    assert not [r for r in report["results"] if "error" in r], report["results"]
    naive, shipped = rows["(a) naive"], rows["(b) trainer_core"]
    assert abs(naive["first_step_loss"] - shipped["first_step_loss"]) < 1e-4
    assert report["env"]["loss_difference"] < 1e-4 and "trainer_core / naive" in proc.stdout


def test_trainer_command_smoke_bench_runs(tmp_path):
    """bench/train_cli_smoke.py: the real `python -m trainer_core.train` on a model it builds, the guide's
    quick-start flags; on CPU the tiny shape."""
    out = tmp_path / "smoke.json"
    argv = [sys.executable, "bench/train_cli_smoke.py", "--steps", "3", "--json", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["done"] and summary["steps"] == 3 and summary["tokens_per_s_median"] > 0


def test_cross_entropy_bench_runs_and_methods_agree(tmp_path):
    """bench/cross_entropy.py at a small head: every method gives the full-logits loss and gradient."""
    out = tmp_path / "ce.json"
    argv = [sys.executable, "bench/cross_entropy.py", "--tokens", "300", "--hidden", "32", "--vocab", "1000",
            "--reps", "1", "--json", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["method"] for r in rows} >= {"full logits", "checkpointed", "grad in forward (shipped)"}
    for r in rows:
        assert "error" not in r and r["loss_rel_diff"] < 1e-5 and r["grad_rel_err"] < 1e-4, r
