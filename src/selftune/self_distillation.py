"""Self-ensemble and self-distillation (Xu et al. 2020, arXiv:2002.10345; methods.md §1).

One objective for four strategies, each a small addition to the baseline loss:

- ``sda``: loss = CE(student, y) + λ·MSE(student logits, logits of the parameter average of the
  last K snapshots);
- ``sdv``: the same loss, the teacher logits being the mean of the K snapshot models' logits;
- ``ema``: the same loss with an EMA teacher, d = min(0.995, (1+t)/(10+t));
- ``se``: no distillation; snapshots are pooled (every ``interval`` steps, or at each epoch's end)
  and the pool's parameter average (or output vote) is the final model.

A snapshot is pushed after every ``interval``-th optimizer step (the initial model is the first
snapshot). The teacher of the student θ_t averages the K states before it, θ_{t−1}…θ_{t−K}
(methods.md §1.1; fewer while fewer exist), so with K = 1 the SDA teacher is the student of the
previous step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from selftune.losses import distillation_loss
from selftune.teachers import (
    EmaAverage,
    SnapshotWindow,
    State,
    load_float_state,
    make_teacher_shell,
)

STRATEGIES = ("sda", "sdv", "ema", "se")


class SelfDistillation:
    """The self-distillation / self-ensemble objective for ``SelftuneTrainer``."""

    def __init__(
        self,
        student: nn.Module,
        kind: str = "sda",
        k: int = 3,  # snapshots in the window (SDA/SDV/SE)
        lam: float = 1.0,  # weight λ of the distillation term
        interval: int = 1,  # push a snapshot every N optimizer steps
        teacher_dropout: bool = False,  # run the teacher in train mode (dropout on)
        is_regression: bool = False,
        se_pool: str = "epochs",  # SE only: pool of "steps" snapshots or end-of-"epochs" states
    ) -> None:
        if kind not in STRATEGIES:
            raise ValueError(f"unknown self-distillation strategy {kind!r}")
        self.kind, self.k, self.lam, self.interval = kind, k, lam, interval
        self.is_regression, self.se_pool = is_regression, se_pool
        self.teacher = make_teacher_shell(student, dropout=teacher_dropout)
        # A distilling window keeps K + 1 states: the K before the student's current state,
        # plus that current state (pushed after the optimizer step, a teacher one step later).
        capacity = k if kind == "se" else k + 1
        self.window = SnapshotWindow(capacity) if kind != "ema" else None
        self.ema = EmaAverage(student) if kind == "ema" else None
        self._started = False
        self._step = 0  # optimizer updates so far
        self._pushed_at = -1  # the step whose state is the window's newest snapshot

    # ---- events from the Trainer

    def on_train_begin(self, model: nn.Module, global_step: int = 0, max_steps: int = 0) -> None:
        device = next(model.parameters()).device  # the Trainer has placed the student by now
        self.teacher.to(device)
        if self.ema is not None:
            self.ema.average = {n: t.to(device) for n, t in self.ema.average.items()}
        if self._started:  # resumed: the window came from the checkpoint
            self._refresh_teacher()
            return
        self._started = True
        self._step = global_step
        if self.window is not None and not self._epoch_pool:
            self._push(model)
        if self.ema is not None:
            load_float_state(self.teacher, self.ema.average)

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        self._step = global_step
        if global_step % self.interval == 0:
            if self.ema is not None:
                self.ema.update(model)
                load_float_state(self.teacher, self.ema.average)
            elif not self._epoch_pool:
                self._push(model)
                return
        if global_step == self._pushed_at + 1:
            self._refresh_teacher()  # the newest snapshot is now a past state

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        if self._epoch_pool:
            self._push(model)

    @property
    def _epoch_pool(self) -> bool:
        return self.kind == "se" and self.se_pool == "epochs"

    def _push(self, model: nn.Module) -> None:
        assert self.window is not None
        self.window.push(model)
        self._pushed_at = self._step
        self._refresh_teacher()

    def _skip(self) -> str | None:
        """Which end of the window the teacher leaves out: θ̃_t averages θ_{t−1}…θ_{t−K}, so
        the student's own current state (just pushed) is not part of its teacher."""
        assert self.window is not None
        if self.kind == "se":
            return None
        if len(self.window) >= 2 and self._pushed_at == self._step:
            return "newest"
        return "oldest" if len(self.window) == self.k + 1 else None

    def _refresh_teacher(self) -> None:
        if self.kind == "sda":
            load_float_state(self.teacher, self.window.mean(self._skip()))

    # ---- the loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        if self.kind == "se":  # training is the baseline's: the model's own loss
            outputs = model(**inputs)
            return outputs.loss, outputs, {}
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        logits = outputs.logits
        teacher_logits = self.teacher_logits(features).to(logits.dtype)
        loss, parts = distillation_loss(logits, teacher_logits, labels, self.lam,
                                        self.is_regression)
        return loss, outputs, parts

    @torch.no_grad()
    def teacher_logits(self, features: dict[str, Any]) -> torch.Tensor:
        if self.kind == "sdv":
            return self._vote(features)
        return self.teacher(**features).logits

    def _vote(self, features: dict[str, Any]) -> torch.Tensor:
        # One model shell, K parameter loads: K forward passes without K model copies.
        members = self.members()
        total = None
        for snapshot in members:
            load_float_state(self.teacher, snapshot)
            logits = self.teacher(**features).logits.float()
            total = logits if total is None else total + logits
        return total / len(members)

    # ---- what the run keeps

    def averaged_state(self) -> State:
        """Parameters of the averaged teacher (window mean or EMA); for se, of the pool."""
        if self.ema is not None:
            return self.ema.average
        assert self.window is not None
        return self.window.mean(self._skip())

    def averaged_teacher(self) -> nn.Module:
        """The teacher shell loaded with the averaged parameters (for evaluation and saving)."""
        load_float_state(self.teacher, self.averaged_state())
        return self.teacher

    def members(self) -> list[State]:
        """The snapshot models whose outputs a vote averages (the teacher's K states)."""
        if self.window is None:
            return []
        snapshots = self.window.snapshots()
        skip = self._skip()
        if skip == "newest":
            return snapshots[:-1]
        return snapshots[1:] if skip == "oldest" else snapshots

    def vote_logits(self, predict: Any) -> np.ndarray:
        """Mean of ``predict(model)`` (logits over a dataset) over the teacher's members."""
        logits = []
        for snapshot in self.members():
            load_float_state(self.teacher, snapshot)
            logits.append(predict(self.teacher))
        return np.mean(logits, axis=0)

    def state_dict(self) -> State:
        state = {"started": torch.tensor(int(self._started)), "step": torch.tensor(self._step),
                 "pushed_at": torch.tensor(self._pushed_at)}
        if self.window is not None:
            state.update(self.window.state_dict())
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def load_state_dict(self, state: State) -> None:
        self._started = bool(int(state["started"]))
        self._step, self._pushed_at = int(state["step"]), int(state["pushed_at"])
        if self.window is not None:
            self.window.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(state)
            load_float_state(self.teacher, self.ema.average)
