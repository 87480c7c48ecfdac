"""Losses of teacher annealing (BAM!, docs/methods.md §2.2) and self-distillation (§1.1).

Pure functions on tensors, so the trainers stay thin and the formulas are tested on their own.
Teacher outputs are always detached: a teacher is a constant target, never trained through the
student's loss. Losses are computed in float32 whatever the model's dtype (bf16 logits lose
too much precision in a log-softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftune.errors import SelftuneError

REDUCTIONS = ("mean", "sum", "none")
LAMBDA_SCHEDULES = ("linear", "fixed")


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise SelftuneError(f"unknown loss reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


def _check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise SelftuneError(f"teacher-annealing λ must be in [0, 1], got {lam}")


def _as_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Regression outputs (B,) or (B, 1) as a float32 vector of shape (B,)."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.dim() != 1:
        raise SelftuneError(f"regression outputs must have shape (B,) or (B, 1), got "
                            f"{tuple(logits.shape)}")
    return logits.float()


def annealed_targets(
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    lam: float,
    is_regression: bool,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-annealing targets: λ·gold + (1 − λ)·teacher.

    Classification: λ·onehot(y) + (1 − λ)·softmax(teacher_logits / T), shape (B, C);
    regression: λ·y + (1 − λ)·teacher_pred, shape (B,). λ rises from 0 (pure distillation) to
    1 (gold labels only) over training, so the student can end up better than its teacher.
    """
    _check_lambda(lam)
    if temperature <= 0:
        raise SelftuneError(f"distillation temperature must be positive, got {temperature}")
    teacher_logits = teacher_logits.detach()
    if is_regression:
        gold = labels.detach().reshape(-1).float()
        return lam * gold + (1.0 - lam) * _as_predictions(teacher_logits)
    teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    onehot = F.one_hot(labels.long(), num_classes=teacher.shape[-1]).float()
    return lam * onehot + (1.0 - lam) * teacher


def soft_cross_entropy(
    student_logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against a distribution: −Σ_c target_c · log_softmax(student)_c per example.

    Equals ``F.cross_entropy`` when the targets are one-hot; unlike KL divergence it keeps the
    targets' entropy, a constant that does not change the gradient.
    """
    per_example = -(targets.float() * F.log_softmax(student_logits.float(), dim=-1)).sum(dim=-1)
    return _reduce(per_example, reduction)


def annealed_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    lam: float,
    is_regression: bool,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> torch.Tensor:
    """BAM!'s loss: soft cross-entropy (classification) or squared error (regression) against
    :func:`annealed_targets`.

    ``reduction="mean"`` is the default (the natural PyTorch choice, independent of batch
    size); ``"sum"`` is what the reference code does (docs/methods.md §2.2); ``"none"`` gives the
    per-example losses, for per-task weights.
    """
    targets = annealed_targets(labels, teacher_logits, lam, is_regression, temperature)
    if is_regression:
        per_example = (_as_predictions(student_logits) - targets) ** 2
        return _reduce(per_example, reduction)
    return soft_cross_entropy(student_logits, targets, reduction)


def teacher_lambda(
    step: int, total_steps: int, schedule: str = "linear", fixed: float | None = None
) -> float:
    """Weight λ of the gold labels at ``step``.

    "linear": step / total_steps clipped to [0, 1], rising over the whole run, warm-up
    included (BAM!'s teacher annealing); "fixed": the constant ``fixed`` (the paper's
    ablations use 0 and 0.5). ``fixed`` is ignored by the linear schedule, so a configuration
    may carry both.
    """
    if schedule == "linear":
        if total_steps <= 0:
            raise SelftuneError(f"teacher annealing needs a positive number of steps, got "
                                f"{total_steps}")
        return min(1.0, max(0.0, step / total_steps))
    if schedule == "fixed":
        if fixed is None:
            raise SelftuneError("a fixed teacher-annealing schedule needs a value of λ")
        _check_lambda(fixed)
        return float(fixed)
    raise SelftuneError(f"unknown teacher-annealing schedule {schedule!r}; choose one of "
                        f"{list(LAMBDA_SCHEDULES)}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    is_regression: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Self-distillation loss (Xu et al. 2020): task loss + λ·MSE(student, teacher).

    Classification: CE(student, y) + λ·MSE(student logits, teacher logits); regression:
    MSE(pred, y) + λ·MSE(pred, teacher_pred). MSE is ``F.mse_loss``'s default, the mean over
    all logit entries (B·C for classification), so its scale does not grow with the number of
    classes. The teacher is detached. Returns the total and the unweighted parts
    ``{"task_loss", "distill_loss"}`` (detached) for logging. ``lam`` is non-negative
    (--sd-lambda, range-checked with the run's options).
    """
    teacher_logits = teacher_logits.detach()
    if is_regression:
        pred = _as_predictions(student_logits)
        task = F.mse_loss(pred, labels.reshape(-1).float())
        distill = F.mse_loss(pred, _as_predictions(teacher_logits))
    else:
        logits = student_logits.float()
        task = F.cross_entropy(logits, labels.long())
        distill = F.mse_loss(logits, teacher_logits.float())
    total = task + lam * distill
    return total, {"task_loss": task.detach(), "distill_loss": distill.detach()}
