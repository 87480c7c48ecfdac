"""Teacher annealing (BAM!, docs/methods.md §2.2) as an objective of ``SelftuneTrainer``.

target = λ·y + (1 − λ)·teacher, λ = global_step / total_steps rising from 0 to 1 over the whole
run (warm-up included), or fixed. Classification uses the teacher's softmax (T = 1) and a soft
cross-entropy; regression the squared error to the mixed score. Without teachers λ = 1: plain
multi-task training. Each example's loss is computed by its own task's head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from selftune.data.tasks import TaskSpec
from selftune.losses import annealed_loss, teacher_lambda

if TYPE_CHECKING:
    from selftune.self_distillation import SelfDistillation


class TeacherAnnealing:
    def __init__(
        self,
        tasks: list[TaskSpec],
        with_teachers: bool,
        schedule: str = "linear",  # λ rises linearly from 0 to 1, or stays fixed
        distill_weight: float = 0.5,  # fixed schedule: teacher share 1 − λ of the target
        reduction: str = "mean",  # batch loss: mean (default) or sum (the reference code)
        batch_parts: int = 1,  # micro-batches per optimizer step: accumulation × processes
    ) -> None:
        self.tasks = tasks
        self.with_teachers = with_teachers
        self.schedule, self.distill_weight, self.reduction = schedule, distill_weight, reduction
        # The Trainer divides each micro-batch's loss by the accumulation steps and DDP averages
        # the processes' gradients: right for a mean, but a sum over the global batch must undo
        # both, or it would shrink with the number of parts.
        self.batch_parts = batch_parts
        self.step, self.max_steps = 0, 1

    def on_train_begin(self, model: nn.Module, global_step: int, max_steps: int) -> None:
        self.step, self.max_steps = global_step, max(1, max_steps)

    def before_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        self.step = global_step

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        pass

    def current_lambda(self) -> float:
        if not self.with_teachers:
            return 1.0
        return teacher_lambda(self.step, self.max_steps, self.schedule,
                              fixed=1.0 - self.distill_weight)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any]):
        labels = inputs["labels"]
        task_ids = inputs["task_ids"]
        teacher = inputs.get("teacher_logits")
        features = {k: v for k, v in inputs.items()
                    if k not in ("labels", "task_ids", "teacher_logits")}
        outputs = model(task_ids=task_ids, **features)
        lam = self.current_lambda()
        total = outputs.logits.new_zeros(())
        for index, task in enumerate(self.tasks):
            rows = (task_ids == index).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            width = task.num_labels
            logits = outputs.logits[rows, :width]
            gold = labels[rows] if task.is_regression else labels[rows].long()
            if task.is_regression:
                logits = logits.reshape(-1)
            target_teacher = (teacher[rows, :width] if teacher is not None
                              else logits.detach())
            if task.is_regression and teacher is not None:
                target_teacher = target_teacher.reshape(-1)
            total = total + annealed_loss(logits, gold, target_teacher, lam, task.is_regression,
                                          reduction="sum")
        loss = total / labels.shape[0] if self.reduction == "mean" else total * self.batch_parts
        return loss, outputs, {"lambda": torch.tensor(lam)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # the step comes back with the Trainer's own state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class SelfDistilledAnnealing:
    """A multi-task student that also self-distills (sda/sdv/ema, Xu et al. 2020).

    loss = the teacher-annealing loss above + λ · MSE(student logits, logits of the student's
    own averaged past), the MSE taken per example over its task's outputs only (the other
    columns of a multi-task batch are padding), then reduced over the batch as the annealing
    loss is. The snapshot window, the EMA and the teacher model are the single-task ones: the
    teacher is a frozen copy of the whole multi-task model (shared encoder and every head).
    """

    def __init__(self, annealing: TeacherAnnealing, self_distillation: SelfDistillation) -> None:
        if not hasattr(self_distillation, "teacher_logits"):
            raise ValueError("se has no distillation loss to add to a multi-task run")
        self.annealing, self.self_distillation = annealing, self_distillation
        self._widths = torch.tensor([t.num_labels for t in annealing.tasks])

    def on_train_begin(self, model: nn.Module, global_step: int, max_steps: int) -> None:
        self.annealing.on_train_begin(model, global_step, max_steps)
        self.self_distillation.on_train_begin(model, global_step, max_steps)

    def before_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        self.self_distillation.before_optimizer_step(model, global_step)

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        self.annealing.on_step_end(model, global_step)
        self.self_distillation.on_step_end(model, global_step)

    def on_epoch_end(self, model: nn.Module, epoch: float) -> None:
        self.self_distillation.on_epoch_end(model, epoch)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any]):
        loss, outputs, parts = self.annealing.compute_loss(model, inputs)
        features = {k: v for k, v in inputs.items() if k not in ("labels", "teacher_logits")}
        if self.self_distillation.teacher.ready:
            teacher = self.self_distillation.teacher_logits(features).to(outputs.logits.dtype)
        else:  # no state past the initial model yet: a distillation term of 0
            teacher = outputs.logits.detach()
        widths = self._widths.to(inputs["task_ids"].device)[inputs["task_ids"]]
        columns = torch.arange(outputs.logits.shape[1], device=widths.device)
        valid = (columns.unsqueeze(0) < widths.unsqueeze(1)).to(outputs.logits.dtype)
        squared = (outputs.logits.float() - teacher.detach().float()).pow(2) * valid
        per_example = squared.sum(dim=1) / widths.to(squared.dtype)
        distill = (per_example.mean() if self.annealing.reduction == "mean"
                   else per_example.sum() * self.annealing.batch_parts)  # as the annealing loss
        lam = self.self_distillation.lam
        return loss + lam * distill, outputs, {**parts, "distill_loss": distill.detach()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.self_distillation.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.self_distillation.load_state_dict(state)
