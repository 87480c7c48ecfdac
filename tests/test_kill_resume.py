"""SIGKILL at chosen points of a real training process, then the same run again: it resumes
from the last complete checkpoint and ends exactly where an uninterrupted run ends.

The killed run is a separate process that kills itself with SIGKILL (no cleanup, no exception
handler runs), at: a step before the first checkpoint, a step after one, the middle of writing
a checkpoint (weights and optimizer written, trainer_state.json not), and the final write
(model saved, metrics.json not), for every strategy and for the BAM student.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selftune import outputs
from selftune.recipes.bam import BamConfig, run_bam
from selftune.training import train

from .test_training import dev_logits, tiny_config

TEXTS = ["the movie was good", "it was really dull", "a great plot", "not very bad"]

# Runs in the child process: argv = kind ("train" or "bam"), options as JSON, where, step.
KILLED_RUN = """
import json, os, signal, sys
from transformers import TrainerState
from selftune import outputs
from selftune.trainer import SelftuneTrainer

kind, options, where, step = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

training_step = SelftuneTrainer.training_step
def training_step_or_die(self, *args, **kwargs):
    # global_step steps are complete; die before the next one (in the student, for BAM).
    if where == "step" and self.state.global_step == step and (
            kind == "train" or type(self).__name__ == "MultiTaskTrainer"):
        die()
    return training_step(self, *args, **kwargs)
SelftuneTrainer.training_step = training_step_or_die

save_to_json = TrainerState.save_to_json
def save_to_json_or_die(self, path):
    if where == "checkpoint" and self.global_step == step:
        die()  # the checkpoint's weights, optimizer and RNG are written; its state file is not
    save_to_json(self, path)
TrainerState.save_to_json = save_to_json_or_die

write_json_atomic = outputs.write_json_atomic
def write_or_die(path, data):
    if where == "final" and path.name == outputs.METRICS_FILE:
        die()  # the final model is saved; the file that marks the run finished is not
    write_json_atomic(path, data)
outputs.write_json_atomic = write_or_die

if kind == "train":
    from selftune.config import TrainConfig
    from selftune.training import train
    train(TrainConfig(**options))
else:
    from selftune.recipes.bam import BamConfig, run_bam
    run_bam(BamConfig(**options))
"""


def run_killed(kind: str, options: dict, where: str, step: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, kind, json.dumps(options), where,
                           str(step)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def options(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


@pytest.mark.parametrize(("strategy", "where", "step", "resumes_from"), [
    ("baseline", "step", 2, None),             # before the first checkpoint: starts over
    ("sda", "step", 4, "checkpoint-3"),        # mid-epoch, after a checkpoint
    ("sdv", "checkpoint", 6, "checkpoint-3"),  # mid-write: the half-written one is ignored
    ("ema", "final", 0, "checkpoint-18"),      # after the last step, before metrics.json
    ("se", "step", 7, "checkpoint-6"),         # the epoch pool holds the first epoch's state
])
def test_sigkill_then_rerun_ends_as_if_never_killed(strategy, where, step, resumes_from,
                                                    tiny_model, sentiment_files, tmp_path):
    def config(out):
        return tiny_config(tiny_model, sentiment_files, out, strategy=strategy, save_steps=3)

    reference = train(config(tmp_path / "ref"))
    out = tmp_path / "killed"
    run_killed("train", options(config(out)), where, step)
    assert not outputs.is_finished(out)
    assert not (out / outputs.METRICS_FILE).exists()

    resumed = train(config(out))
    if resumes_from is None:
        assert resumed["resumed_from"] is None
    else:
        assert Path(resumed["resumed_from"]).name == resumes_from
    assert resumed["metrics"] == pytest.approx(reference["metrics"], abs=1e-9)
    assert resumed.get("teacher_metrics") == reference.get("teacher_metrics")
    models = [""] + (["teacher"] if (tmp_path / "ref" / "teacher").is_dir() else [])
    for sub in models:
        np.testing.assert_allclose(dev_logits(out / sub, TEXTS),
                                   dev_logits(tmp_path / "ref" / sub, TEXTS), atol=1e-6)


def test_sigkill_in_the_bam_student_resumes_it(tiny_model, glue_dir, tmp_path):
    def config(out):
        return BamConfig(tasks="rte,stsb", model=str(tiny_model), data_dir=str(glue_dir),
                         output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=4,
                         learning_rate=1e-3, teacher_epochs=1, teacher_batch_size=4,
                         save_steps=2)

    reference = run_bam(config(tmp_path / "ref"))
    out = tmp_path / "killed"
    run_killed("bam", options(config(out)), "step", 3)  # teachers done, student at step 3
    assert outputs.is_finished(out / "teachers" / "rte")
    assert not outputs.is_finished(out / "student")

    resumed = run_bam(config(out))
    student = json.loads((out / "student" / outputs.METRICS_FILE).read_text())
    assert Path(student["resumed_from"]).name == "checkpoint-2"
    assert resumed["student"] == pytest.approx(reference["student"], abs=1e-9)
    for task in ("rte", "stsb"):
        np.testing.assert_allclose(
            dev_logits(out / "student" / "tasks" / task, TEXTS),
            dev_logits(tmp_path / "ref" / "student" / "tasks" / task, TEXTS), atol=1e-6)
