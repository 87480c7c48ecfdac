"""Two CPU processes through torchrun (gloo): data-parallel, one writer, a teacher per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("strategy", ["baseline", "sda"])
def test_two_process_run(strategy, tiny_model, sentiment_files, tmp_path):
    train, dev = map(str, sentiment_files)
    out = tmp_path / strategy
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 1000 + (strategy == "sda")),
         "-m", "selftune", "train", "--train-file", train, "--validation-file", dev,
         "--model", str(tiny_model), "--output-dir", str(out), "--strategy", strategy,
         "--per-device-train-batch-size", "8", "--num-train-epochs", "2",
         "--learning-rate", "1e-2"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 48 examples, 2 processes x 8 per step: 3 optimizer steps per epoch, not 6.
    assert metrics["global_steps"] == 6
    assert (out / "model.safetensors").is_file()
    assert ("teacher_metrics" in metrics) == (strategy == "sda")
    assert not list(out.glob("checkpoints"))
