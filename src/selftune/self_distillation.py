"""Self-distillation (Xu et al. 2020, arXiv:2002.10345): the student learns from the labels and
from a teacher made of its own past (:mod:`selftune.teachers`):

    loss = task loss + λ·MSE(student logits, teacher logits)

- ``sda``: the teacher is the parameter average of the last K snapshots;
- ``sdv``: the mean of the K snapshot models' logits;
- ``ema``: an exponential moving average of the student, d = min(0.995, (1+t)/(10+t)).

The self-ensemble (``se``), which distils nothing, is :mod:`selftune.self_ensemble`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from selftune.errors import SelftuneError
from selftune.losses import distillation_loss
from selftune.teachers import PastTeacher, State, load_float_state, make_teacher

STRATEGIES = ("sda", "sdv", "ema")
# Version of the state saved in checkpoints (1: a window of K + 1 states with a running sum).
STATE_FORMAT = 2
# When distillation starts: from the first step, with the initial model as the first teacher
# state (the paper's formula, fewer states while fewer exist), or once the teacher holds a
# state past the initial model, whose classifier head is still random.
DISTILL_STARTS = ("initial", "first-snapshot")


class SelfDistillation:
    """loss = task loss + λ·MSE(student logits, teacher logits), for ``SelftuneTrainer`` (or a
    plain ``Trainer`` through :mod:`selftune.plain_trainer`).

    ``teacher`` is one of :mod:`selftune.teachers` (``make_teacher("sda", model, k=3)``). Until
    the teacher is ready (``skip_initial``), the loss is the task loss alone and the teacher
    runs no forward pass.
    """

    def __init__(self, teacher: PastTeacher, lam: float = 1.0,
                 is_regression: bool = False) -> None:
        # Checked once here for Python callers; the command line refuses it earlier, in words.
        if not lam >= 0:
            raise ValueError(f"lam must be a non-negative number, not {lam!r}")
        self.teacher = teacher
        self.lam = lam  # weight λ of the distillation term
        self.is_regression = is_regression

    @classmethod
    def for_strategy(cls, student: nn.Module, kind: str = "sda", k: int = 3, lam: float = 1.0,
                     interval: int = 1, teacher_dropout: bool = False,
                     is_regression: bool = False,
                     distill_start: str = "initial") -> SelfDistillation:
        """The objective of ``--strategy sda|sdv|ema`` with its options."""
        if distill_start not in DISTILL_STARTS:
            raise ValueError(f"unknown distillation start {distill_start!r}")
        teacher = make_teacher(kind, student, k=k, interval=interval, dropout=teacher_dropout,
                               skip_initial=distill_start == "first-snapshot")
        return cls(teacher, lam=lam, is_regression=is_regression)

    # ---- events from the Trainer

    def on_train_begin(self, model: nn.Module, global_step: int = 0, max_steps: int = 0) -> None:
        self.teacher.start(model)

    def before_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """The student still holds θ_t (t = ``global_step``), about to be overwritten."""
        self.teacher.before_update(model, global_step)

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        self.teacher.after_update(model, global_step)

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        pass

    # ---- the loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        loss, parts = self.loss_from_outputs(outputs, labels, features)
        return loss, outputs, parts

    def loss_from_outputs(self, outputs: Any, labels: torch.Tensor, features: dict[str, Any]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch whose student outputs are known; ``features`` (the student's
        inputs without the labels) feed the teacher."""
        logits = outputs.logits
        if self.teacher.ready:
            teacher_logits = self.teacher_logits(features).to(logits.dtype)
        else:  # its own detached outputs: a distillation term of 0 with no gradient
            teacher_logits = logits.detach()
        return distillation_loss(logits, teacher_logits, labels, self.lam, self.is_regression)

    def teacher_logits(self, features: dict[str, Any]) -> torch.Tensor:
        return self.teacher.logits(features)

    # ---- what the run keeps

    def averaged_teacher(self) -> nn.Module:
        """The teacher model loaded with the averaged parameters (window mean or EMA), for
        evaluation and saving."""
        return self.teacher.averaged_model()

    def members(self) -> list[State]:
        """The snapshot states whose outputs a vote averages (the teacher's K states)."""
        return self.teacher.members()

    def vote_logits(self, predict: Any) -> np.ndarray:
        """Mean of ``predict(model)`` (logits over a dataset) over the teacher's members."""
        return vote_logits(self.teacher.model, self.members(), predict)

    def state_dict(self) -> State:
        return {"format": torch.tensor(STATE_FORMAT),
                "started": torch.tensor(int(self.teacher._started)),
                **self.teacher.state_dict()}

    def load_state_dict(self, state: State) -> None:
        check_state_format(state)
        self.teacher._started = bool(int(state["started"]))
        self.teacher.load_state_dict(state)
        self.teacher._refresh()


def check_state_format(state: State) -> None:
    if int(state.get("format", 1)) != STATE_FORMAT:
        raise SelftuneError("this checkpoint's teacher state was written by an older "
                            "selftune; rerun with --overwrite-output-dir to start over")


def vote_logits(shell: nn.Module, members: list[State], predict: Any) -> np.ndarray:
    """Mean of ``predict(shell)`` with each member's state loaded into ``shell`` in turn."""
    logits = []
    for snapshot in members:
        load_float_state(shell, snapshot)
        logits.append(predict(shell))
    return np.mean(logits, axis=0)
