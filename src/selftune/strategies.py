"""The objective of ``--strategy`` in a selftune run: how it is built from the options, what
its teacher (or ensemble) scores on the dev set, and what it saves beside the student."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from selftune.config import StrategyOptions
from selftune.metrics import metrics_and_score
from selftune.self_distillation import SelfDistillation
from selftune.self_ensemble import SNAPSHOTS_FILE, SelfEnsemble
from selftune.teachers import float_state, load_float_state

Objective = SelfDistillation | SelfEnsemble
# Scores logits of a dev set: metrics_of(logits, dataset).
MetricsOf = Callable[..., dict[str, float]]
# Logits of a model over a dev set: predict(model, dataset).
Predict = Callable[..., np.ndarray]


def build_objective(options: StrategyOptions, model: nn.Module,
                    is_regression: bool) -> Objective | None:
    """The training objective of a strategy; ``None`` is the model's own loss (baseline)."""
    if options.strategy == "baseline":
        if not options.save_snapshots:
            return None
        return SelfEnsemble(model, k=options.save_snapshots, pool="steps",
                            interval=options.interval, skip_initial=options.skip_initial)
    if options.strategy == "se":
        return SelfEnsemble(model, k=options.k, pool=options.se_pool, interval=options.interval,
                            skip_initial=options.skip_initial)
    return SelfDistillation.for_strategy(
        model, kind=options.strategy, k=options.k, lam=options.lam, interval=options.interval,
        teacher_dropout=options.teacher_dropout, is_regression=is_regression,
        distill_start="first-snapshot" if options.skip_initial else "initial")


def objective_metrics(
    options: StrategyOptions, objective: Objective, metrics_of: MetricsOf, predict: Predict,
    other_sets: dict[str, Any], student: dict[str, float],
    student_other_splits: dict[str, Any],
) -> dict[str, Any]:
    """Dev metrics of the teacher (sda/sdv/ema) or of the self-ensemble (se); for se, also on
    the task's other dev sets, since the ensemble is the model saved. A baseline keeping
    snapshots reports nothing more: 'selftune ensemble' scores them."""
    if options.strategy == "baseline":
        return {}
    ensemble = objective.averaged_teacher()
    averaged = metrics_of(predict(ensemble))
    if options.strategy == "se":
        return _ensemble_metrics(options, objective, ensemble, averaged, metrics_of, predict,
                                 other_sets, student, student_other_splits)
    teacher = (metrics_of(objective.vote_logits(predict)) if options.strategy == "sdv"
               else averaged)
    return {**metrics_and_score(teacher, "teacher_"), "teacher": objective.teacher.name,
            "teacher_average_metrics": averaged}


def _ensemble_metrics(options, objective, ensemble, averaged, metrics_of, predict, other_sets,
                      student, student_other_splits) -> dict[str, Any]:
    # The self-ensemble (parameter average, the saved model) is the run's model; the last
    # iterate, and with --se-combine vote the output vote of the pool, are kept beside it.
    extra: dict[str, Any] = {}
    if other_sets:  # before the vote, which loads each pool member into the same model
        extra["other_splits"] = {
            name: metrics_and_score(metrics_of(predict(ensemble, other), other))
            for name, other in other_sets.items()}
        extra["last_iterate_other_splits"] = student_other_splits
    if options.se_combine == "vote":
        from selftune.self_distillation import vote_logits

        vote = metrics_of(vote_logits(ensemble, objective.members(), predict))
        extra.update(metrics_and_score(vote, "vote_"))
    return {**metrics_and_score(averaged),
            "ensemble": f"parameter average of {len(objective.members())} snapshots "
                        f"({options.se_pool} pool)",
            **metrics_and_score(student, "last_iterate_"), **extra}


def save_objective(options: StrategyOptions, objective: Objective, student: nn.Module,
                   tokenizer: Any, output_dir: Path) -> None:
    """se: the student's tensors receive the pool's parameter average (the model saved).
    sda/sdv/ema: the averaged teacher is saved beside the student, in teacher/, as a second
    standard model directory. A baseline keeping snapshots writes them to
    snapshots.safetensors."""
    if options.strategy == "baseline":
        objective.save_snapshots(output_dir / SNAPSHOTS_FILE)
    elif options.strategy == "se":
        load_float_state(student, float_state(objective.averaged_teacher()))
    else:
        from selftune.models.heads import save_portable

        teacher_dir = output_dir / "teacher"
        teacher = objective.averaged_teacher()
        teacher.save_pretrained(teacher_dir)
        save_portable(teacher, teacher_dir)  # a [CLS] normalizer folded in, or refused
        tokenizer.save_pretrained(teacher_dir)
