"""Two CPU processes through torchrun (gloo): data-parallel, one writer, a teacher per rank, and
the same result as one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_ports = iter(range(29500 + os.getpid() % 500, 65000))


def selftune(args: list[str], processes: int, timeout: int = 300) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "selftune"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-port", str(next(_ports)), "-m", "selftune"]
    # In a session of its own: on a timeout the launcher and every rank it started are killed,
    # not only the launcher (orphaned ranks would hold on to memory and locks).
    proc = subprocess.Popen(launcher + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]


def final_logits(model_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    from selftune.models.loading import load_finetuned

    model = load_finetuned(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["the movie was good", "it was really dull", "the plot is not great"]
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


@pytest.mark.parametrize("strategy,options", [
    ("baseline", []), ("sda", []), ("baseline", ["--group-by-length"]),
    ("baseline", ["--no-packing"])])
def test_two_processes_match_one_with_the_same_global_batch(
        strategy, options, tiny_model_without_dropout, varied_length_files, tmp_path):
    train, dev = map(str, varied_length_files)
    common = ["train", "--train-file", train, "--validation-file", dev,
              "--model", str(tiny_model_without_dropout), "--strategy", strategy,
              "--num-train-epochs", "2", "--learning-rate", "1e-2", *options]
    one, two = tmp_path / "one", tmp_path / "two"
    selftune(common + ["--output-dir", str(one), "--per-device-train-batch-size", "16"], 1)
    selftune(common + ["--output-dir", str(two), "--per-device-train-batch-size", "8"], 2)

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    # 48 examples, a global batch of 16 either way: 3 optimizer steps per epoch.
    assert m1["global_steps"] == m2["global_steps"] == 6
    assert m2["metrics"] == pytest.approx(m1["metrics"], abs=1e-6)
    np.testing.assert_allclose(final_logits(two), final_logits(one), atol=1e-4)
    assert ("teacher_metrics" in m2) == (strategy == "sda")
    if strategy == "sda":  # each rank built the same teacher from the same student states
        np.testing.assert_allclose(final_logits(two / "teacher"), final_logits(one / "teacher"),
                                   atol=1e-4)
    assert (two / "model.safetensors").is_file()
    assert not list(two.glob("checkpoints"))


def test_two_process_bam_student(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "bam"
    selftune(["bam", "--tasks", "rte,stsb", "--model", str(tiny_model), "--data-dir",
              str(glue_dir), "--output-dir", str(out), "--num-train-epochs", "2",
              "--per-device-train-batch-size", "4", "--learning-rate", "1e-3",
              "--teacher-epochs", "1", "--teacher-batch-size", "4"], 2)
    summary = json.loads((out / "bam.json").read_text())
    assert set(summary["student"]) == {"rte", "stsb"}
    student = json.loads((out / "student" / "metrics.json").read_text())
    assert student["with_teachers"]
    # 16 RTE + 4 STS-B (both orders) examples, 5 batches of 4, shared by two ranks: 3 steps.
    assert student["global_steps"] == 2 * 3
    for task in ("rte", "stsb"):
        assert (out / "student" / "tasks" / task / "model.safetensors").is_file()
        assert (out / "teachers" / task / "model.safetensors").is_file()
    assert not list(out.rglob(".*.tmp"))


def test_two_process_bam_student_matches_one_with_the_same_global_batch(
        tiny_model_without_dropout, glue_dir, tmp_path):
    model = str(tiny_model_without_dropout)
    teachers = []
    for task in ("rte", "stsb"):  # trained once, by one process, for both students
        selftune(["train", "--task", task, "--data-dir", str(glue_dir), "--model", model,
                  "--output-dir", str(tmp_path / task), "--num-train-epochs", "1",
                  "--per-device-train-batch-size", "4"], 1)
        teachers.append(f"{task}={tmp_path / task}")
    common = ["bam", "--tasks", "rte,stsb", "--model", model, "--data-dir", str(glue_dir),
              "--teachers", ",".join(teachers), "--num-train-epochs", "2",
              "--learning-rate", "1e-3", "--strategy", "sda"]
    one, two = tmp_path / "one", tmp_path / "two"
    selftune(common + ["--output-dir", str(one), "--per-device-train-batch-size", "8"], 1)
    selftune(common + ["--output-dir", str(two), "--per-device-train-batch-size", "4"], 2)
    m1, m2 = (json.loads((d / "student" / "metrics.json").read_text()) for d in (one, two))
    # 16 RTE + 4 STS-B (both orders) examples in global batches of 8: 3 steps per epoch.
    assert m1["global_steps"] == m2["global_steps"] == 6
    for task in ("rte", "stsb"):
        assert m2["tasks"][task]["metrics"] == pytest.approx(m1["tasks"][task]["metrics"],
                                                             abs=1e-6)
        np.testing.assert_allclose(final_logits(two / "student" / "tasks" / task),
                                   final_logits(one / "student" / "tasks" / task), atol=1e-4)
        # The self-distillation teacher of every rank saw the same student states.
        np.testing.assert_allclose(
            final_logits(two / "student" / "teacher" / "tasks" / task),
            final_logits(one / "student" / "teacher" / "tasks" / task), atol=1e-4)
