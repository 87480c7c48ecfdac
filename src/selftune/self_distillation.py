"""Self-ensemble and self-distillation (Xu et al. 2020, arXiv:2002.10345; methods.md §1).

One objective for four strategies, each a small addition to the baseline loss:

- ``sda``: loss = CE(student, y) + λ·MSE(student logits, logits of the parameter average of the
  last K snapshots);
- ``sdv``: the same loss, the teacher logits being the mean of the K snapshot models' logits;
- ``ema``: the same loss with an EMA teacher, d = min(0.995, (1+t)/(10+t));
- ``se``: no distillation; snapshots are pooled (every ``interval`` steps, or at each epoch's end)
  and the pool's parameter average (or output vote) is the final model.

The teacher of the student θ_t averages the K states before it, θ_{t−1}…θ_{t−K} (methods.md
§1.1; fewer while fewer exist, the initial model alone at the start), so with K = 1 the SDA
teacher is the student of the previous step. A state enters the window when the student leaves
it: just before the optimizer step that would overwrite it (every ``interval``-th state). The
window therefore holds exactly the teacher's K states, and sda/sdv keep K + 1 model copies in
all: the K snapshots and one teacher model whose tensors receive their average. The ``se`` pool
instead takes the state after the step (every ``interval`` steps, or at each epoch's end), so
the final model is part of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from selftune.errors import SelftuneError
from selftune.evaluation import dataset_logits
from selftune.losses import distillation_loss
from selftune.metrics import compute_task_metrics, metrics_and_score
from selftune.teachers import (
    EmaAverage,
    SnapshotWindow,
    State,
    float_state,
    load_float_state,
    make_teacher_shell,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from selftune.config import TrainConfig
    from selftune.data.tasks import TaskSpec
    from selftune.trainer import SelftuneTrainer

STRATEGIES = ("sda", "sdv", "ema", "se")
# Version of the state saved in checkpoints (1: a window of K + 1 states with a running sum).
STATE_FORMAT = 2
# What a distilling strategy's teacher is, as metrics.json names it.
TEACHER_KINDS = {"sda": "parameter average of the last K snapshots",
                 "sdv": "output vote of the last K snapshots",
                 "ema": "exponential moving average"}


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
        self.window = SnapshotWindow(k) if kind != "ema" else None
        # The EMA is kept in the teacher's own tensors: they are the teacher.
        self.ema = EmaAverage(self.teacher) if kind == "ema" else None
        self._started = False

    # ---- events from the Trainer

    def on_train_begin(self, model: nn.Module, global_step: int = 0, max_steps: int = 0) -> None:
        device = next(model.parameters()).device  # the Trainer has placed the student by now
        self.teacher.to(device)
        if self._started:  # resumed: the window came from the checkpoint
            self._refresh_teacher()
            return
        self._started = True
        if self.kind == "se" and self.se_pool == "steps":
            self.window.push(model)
        # Until a first state is pushed, the teacher is the initial model itself.
        load_float_state(self.teacher, float_state(model))

    def before_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """The student still holds θ_t (t = ``global_step``), about to be overwritten."""
        if self.kind in ("sda", "sdv") and global_step % self.interval == 0:
            self.window.push(model)
            self._refresh_teacher()

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        if global_step % self.interval:
            return
        if self.ema is not None:
            self.ema.update(model)
        elif self.kind == "se" and self.se_pool == "steps":
            self.window.push(model)

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        if self.kind == "se" and self.se_pool == "epochs":
            self.window.push(model)

    def _refresh_teacher(self) -> None:
        if self.kind == "sda" and len(self.window):
            self.window.average_into(self.teacher)

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
        if not members:  # nothing pushed yet: the teacher shell holds the initial model
            return self.teacher(**features).logits.float()
        total = None
        for snapshot in members:
            load_float_state(self.teacher, snapshot)
            logits = self.teacher(**features).logits.float()
            total = logits if total is None else total + logits
        return total / len(members)

    # ---- what the run keeps

    def averaged_teacher(self) -> nn.Module:
        """The teacher model loaded with the averaged parameters (window mean or EMA; for se,
        the pool's), for evaluation and saving."""
        if self.window is not None and len(self.window):
            self.window.average_into(self.teacher)
        return self.teacher

    def members(self) -> list[State]:
        """The snapshot models whose outputs a vote averages (the teacher's K states)."""
        return self.window.snapshots() if self.window is not None else []

    def vote_logits(self, predict: Any) -> np.ndarray:
        """Mean of ``predict(model)`` (logits over a dataset) over the teacher's members."""
        logits = []
        for snapshot in self.members():
            load_float_state(self.teacher, snapshot)
            logits.append(predict(self.teacher))
        return np.mean(logits, axis=0)

    def state_dict(self) -> State:
        state = {"format": torch.tensor(STATE_FORMAT), "started": torch.tensor(int(self._started))}
        if self.window is not None:
            state.update(self.window.state_dict())
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def load_state_dict(self, state: State) -> None:
        if int(state.get("format", 1)) != STATE_FORMAT:
            raise SelftuneError("this checkpoint's teacher state was written by an older "
                                "selftune; rerun with --overwrite-output-dir to start over")
        self._started = bool(int(state["started"]))
        if self.window is not None:
            self.window.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(state)
        self._refresh_teacher()


# --------------------------------------------------------------------------------------------
# In a selftune run: the objective of --strategy, the teacher's (or ensemble's) dev metrics,
# and what is saved
# --------------------------------------------------------------------------------------------


def build_objective(cfg: TrainConfig, model: PreTrainedModel,
                    is_regression: bool) -> SelfDistillation | None:
    """The training objective of a strategy; ``None`` is the model's own loss (baseline)."""
    if cfg.strategy == "baseline":
        return None
    return SelfDistillation(model, kind=cfg.strategy, k=cfg.sd_k, lam=cfg.sd_lambda,
                            interval=cfg.snapshot_interval, teacher_dropout=cfg.teacher_dropout,
                            is_regression=is_regression, se_pool=cfg.se_pool)


def evaluate_self_distillation(
    cfg: TrainConfig, objective: SelfDistillation, tokenizer: PreTrainedTokenizerBase,
    eval_set: datasets.Dataset, other_sets: dict[str, datasets.Dataset], task: TaskSpec,
    student: dict[str, float], student_other_splits: dict[str, Any],
) -> dict[str, Any]:
    """Dev metrics of the teacher (sda/sdv/ema) or of the self-ensemble (se); for se, also on
    the task's other dev sets (``other_sets``, tokenized), since the ensemble is the model
    saved."""
    def metrics_of(logits: np.ndarray, dataset=eval_set) -> dict[str, float]:
        return compute_task_metrics(task, logits, np.array(dataset["labels"]))

    def predict(model, dataset=eval_set) -> np.ndarray:
        return dataset_logits(model, tokenizer, dataset, cfg.per_device_eval_batch_size)

    ensemble = objective.averaged_teacher()
    averaged = metrics_of(predict(ensemble))
    if cfg.strategy == "se":
        # The self-ensemble (parameter average, the saved model) is the run's model; the last
        # iterate, and with --se-combine vote the output vote of the pool, are kept beside it.
        extra = {}
        if other_sets:  # before the vote, which loads each pool member into the same model
            extra["other_splits"] = {
                name: metrics_and_score(metrics_of(predict(ensemble, other), other))
                for name, other in other_sets.items()}
            extra["last_iterate_other_splits"] = student_other_splits
        if cfg.se_combine == "vote":
            vote = metrics_of(objective.vote_logits(predict))
            extra.update(metrics_and_score(vote, "vote_"))
        return {**metrics_and_score(averaged),
                "ensemble": f"parameter average of {len(objective.members())} snapshots "
                            f"({cfg.se_pool} pool)",
                **metrics_and_score(student, "last_iterate_"), **extra}
    teacher = metrics_of(objective.vote_logits(predict)) if cfg.strategy == "sdv" else averaged
    return {**metrics_and_score(teacher, "teacher_"),
            "teacher": TEACHER_KINDS[cfg.strategy],
            "teacher_average_metrics": averaged}


def save_self_distillation(
    cfg: TrainConfig, objective: SelfDistillation, trainer: SelftuneTrainer, tokenizer,
    output_dir: Path,
) -> None:
    """se: the saved model is the pool's parameter average. Others: the averaged teacher is
    saved beside the student, in teacher/, as a second standard model directory."""
    if cfg.strategy == "se":
        from selftune.teachers import float_state, load_float_state

        load_float_state(trainer.accelerator.unwrap_model(trainer.model),
                         float_state(objective.averaged_teacher()))
        return
    teacher_dir = output_dir / "teacher"
    from selftune.models.heads import save_portable

    teacher = objective.averaged_teacher()
    teacher.save_pretrained(teacher_dir)
    save_portable(teacher, teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
