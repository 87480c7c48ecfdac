"""Teacher-annealing targets and losses, and the self-distillation loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selftune.errors import SelftuneError
from selftune.losses import (
    annealed_loss,
    annealed_targets,
    distillation_loss,
    soft_cross_entropy,
    teacher_lambda,
)

B, C = 6, 3


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, generator=g, requires_grad=True)
    teacher = torch.randn(B, C, generator=g, requires_grad=True)
    labels = torch.randint(0, C, (B,), generator=g)
    return student, teacher, labels


@pytest.fixture()
def regression() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 1, generator=g, requires_grad=True),
            torch.randn(B, 1, generator=g, requires_grad=True), torch.rand(B, generator=g))


def test_annealed_targets(batch) -> None:
    _, teacher, labels = batch
    targets = annealed_targets(labels, teacher, 0.25, False)
    expected = 0.25 * F.one_hot(labels, C) + 0.75 * torch.softmax(teacher, -1)
    assert torch.allclose(targets, expected)
    assert torch.allclose(targets.sum(-1), torch.ones(B))
    hot = annealed_targets(labels, teacher, 0.0, False, temperature=2.0)
    assert torch.allclose(hot, torch.softmax(teacher / 2.0, -1))
    assert not targets.requires_grad


def test_annealed_targets_regression(regression) -> None:
    _, teacher, y = regression
    for shape in [(B,), (B, 1)]:
        targets = annealed_targets(y, teacher.reshape(shape), 0.4, True)
        assert targets.shape == (B,)
        assert torch.allclose(targets, 0.4 * y + 0.6 * teacher.detach().reshape(-1))


def test_lambda_one_is_plain_loss(batch, regression) -> None:
    student, teacher, labels = batch
    assert torch.allclose(annealed_loss(student, labels, teacher, 1.0, False),
                          F.cross_entropy(student, labels))
    pred, t_pred, y = regression
    assert torch.allclose(annealed_loss(pred, y, t_pred, 1.0, True),
                          F.mse_loss(pred.reshape(-1), y))


def test_lambda_zero_is_pure_distillation(batch, regression) -> None:
    student, teacher, labels = batch
    expected = -(torch.softmax(teacher, -1) * torch.log_softmax(student, -1)).sum(-1).mean()
    assert torch.allclose(annealed_loss(student, labels, teacher, 0.0, False), expected)
    pred, t_pred, y = regression
    assert torch.allclose(annealed_loss(pred, y, t_pred, 0.0, True),
                          F.mse_loss(pred, t_pred))


def test_reductions(batch, regression) -> None:
    for student, teacher, labels, reg in [(*batch, False), (*regression, True)]:
        mean = annealed_loss(student, labels, teacher, 0.3, reg)
        total = annealed_loss(student, labels, teacher, 0.3, reg, reduction="sum")
        each = annealed_loss(student, labels, teacher, 0.3, reg, reduction="none")
        assert torch.allclose(total, mean * B)
        assert each.shape == (B,) and torch.allclose(each.sum(), total)
    with pytest.raises(SelftuneError):
        soft_cross_entropy(batch[0], torch.softmax(batch[1], -1), reduction="max")


def test_soft_cross_entropy_with_one_hot_is_cross_entropy(batch) -> None:
    student, _, labels = batch
    assert torch.allclose(soft_cross_entropy(student, F.one_hot(labels, C).float()),
                          F.cross_entropy(student, labels))


def test_teacher_gets_no_gradient(batch, regression) -> None:
    for student, teacher, labels, reg in [(*batch, False), (*regression, True)]:
        annealed_loss(student, labels, teacher, 0.5, reg).backward()
        distillation_loss(student, teacher, labels, 1.0, reg)[0].backward()
        assert teacher.grad is None
        assert student.grad is not None


def test_distillation_loss(batch, regression) -> None:
    student, teacher, labels = batch
    total, parts = distillation_loss(student, teacher, labels, 0.0, False)
    assert torch.allclose(total, F.cross_entropy(student, labels))
    total, parts = distillation_loss(student, teacher, labels, 2.0, False)
    mse = ((student - teacher) ** 2).mean()  # mean over all B·C entries
    assert torch.allclose(parts["distill_loss"], mse)
    assert torch.allclose(parts["task_loss"], F.cross_entropy(student, labels))
    assert torch.allclose(total, parts["task_loss"] + 2.0 * mse)
    pred, t_pred, y = regression
    total, parts = distillation_loss(pred, t_pred, y, 0.5, True)
    expected = F.mse_loss(pred.reshape(-1), y) + 0.5 * F.mse_loss(pred, t_pred)
    assert torch.allclose(total, expected)


def test_teacher_lambda() -> None:
    assert teacher_lambda(0, 100) == 0.0
    assert teacher_lambda(25, 100) == 0.25
    assert teacher_lambda(100, 100) == 1.0
    assert teacher_lambda(150, 100) == 1.0
    assert teacher_lambda(40, 100, "fixed", 0.5) == 0.5
    assert teacher_lambda(40, 100, "fixed", 0.0) == 0.0
    assert math.isclose(teacher_lambda(1, 3, fixed=0.5), 1 / 3)  # fixed ignored when linear


@pytest.mark.parametrize(("args", "kwargs"), [
    ((1, 0), {}), ((1, 10, "fixed"), {}), ((1, 10, "fixed", 1.5), {}), ((1, 10, "cosine"), {}),
])
def test_teacher_lambda_errors(args, kwargs) -> None:
    with pytest.raises(SelftuneError):
        teacher_lambda(*args, **kwargs)


def test_bad_lambda_for_targets(batch) -> None:
    _, teacher, labels = batch
    with pytest.raises(SelftuneError):
        annealed_targets(labels, teacher, 1.2, False)
