"""The self-ensemble (Xu et al. 2020): training is the baseline's; the final model is the
parameter average (or the output vote) of a pool of the run's own snapshots.

The pool takes the state after an update: at the end of each of the last K epochs
(``pool="epochs"``), or every ``interval`` updates (``pool="steps"``, the last K). The same
pool, kept by a baseline run (``--save-snapshots K``) and written to ``snapshots.safetensors``,
lets ``selftune ensemble`` build the self-ensemble afterwards, for the cost of an evaluation.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selftune.errors import SelftuneError
from selftune.teachers import SnapshotWindow, State, make_teacher_shell

SE_POOLS = ("epochs", "steps")
SNAPSHOTS_FILE = "snapshots.safetensors"
STATE_FORMAT = 2  # as self-distillation's: the checkpoint files share their layout


class SelfEnsemble:
    """An objective for ``SelftuneTrainer`` that trains as the baseline and keeps a pool."""

    def __init__(self, student: nn.Module, k: int = 3, pool: str = "epochs",
                 interval: int = 1, skip_initial: bool = False) -> None:
        if pool not in SE_POOLS:
            raise ValueError(f"unknown self-ensemble pool {pool!r}")
        self.k, self.pool, self.interval = k, pool, interval
        self.skip_initial = skip_initial  # the initial model (random head) is not pooled
        self.window = SnapshotWindow(k)
        self.steps: deque[int] = deque(maxlen=k)  # the update after which each was taken
        self._student = student
        self._shell: nn.Module | None = None  # made when the average is asked for
        self._started = False

    # ---- events from the Trainer

    def on_train_begin(self, model: nn.Module, global_step: int = 0, max_steps: int = 0) -> None:
        self._student = model
        if self._started:  # resumed: the pool came from the checkpoint
            return
        self._started = True
        if self.pool == "steps" and not self.skip_initial:
            self._take(model, 0)

    def before_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        if self.pool == "steps" and global_step % self.interval == 0:
            self._take(model, global_step)

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        if self.pool == "epochs":
            self._take(model, -1)

    def _take(self, model: nn.Module, step: int) -> None:
        self.window.push(model)
        self.steps.append(step)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any]):
        outputs = model(**inputs)  # the model's own loss: training is the baseline's
        return outputs.loss, outputs, {}

    # ---- the ensemble

    def members(self) -> list[State]:
        return self.window.snapshots()

    def averaged_model(self) -> nn.Module:
        """A model copy holding the pool's parameter average (the student, while the pool is
        empty)."""
        if self._shell is None:
            self._shell = make_teacher_shell(self._student)
        if len(self.window):
            self.window.average_into(self._shell)
        return self._shell

    averaged_teacher = averaged_model  # the name the run's evaluation uses for every method

    def save_snapshots(self, path: Path) -> None:
        """The pool, for ``selftune ensemble``: one safetensors file, oldest first."""
        metadata = {"steps": json.dumps(list(self.steps)), "interval": str(self.interval),
                    "pool": self.pool}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.window.state_dict().items()}, str(tmp),
                  metadata=metadata)
        tmp.replace(path)

    # ---- checkpoints

    def state_dict(self) -> State:
        return {"format": torch.tensor(STATE_FORMAT), "started": torch.tensor(int(self._started)),
                "snapshot_steps": torch.tensor(list(self.steps), dtype=torch.long),
                **self.window.state_dict()}

    def load_state_dict(self, state: State) -> None:
        if int(state.get("format", 1)) != STATE_FORMAT:
            raise SelftuneError("this checkpoint's snapshot pool was written by an older "
                                "selftune; rerun with --overwrite-output-dir to start over")
        self._started = bool(int(state["started"]))
        self.window.load_state_dict(state)
        steps = state.get("snapshot_steps")
        self.steps = deque((int(s) for s in steps) if steps is not None else (), maxlen=self.k)


def load_snapshots(path: Path) -> tuple[list[State], list[int], int]:
    """The pool a run saved: (states oldest first, the step of each, the interval)."""
    from safetensors import safe_open

    if not path.is_file():
        raise SelftuneError(f"{path.parent} keeps no snapshots ({path.name}); train it with "
                            "--save-snapshots K to build its self-ensemble afterwards")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    window = SnapshotWindow(max(1, len(json.loads(metadata.get("steps", "[]")))))
    window.load_state_dict(load_file(str(path)))
    return window.snapshots(), json.loads(metadata.get("steps", "[]")), int(
        metadata.get("interval", "0"))
