"""selftune from Python: ``selftune.train(**options)`` and ``selftune.bam(**options)``.

The keyword arguments are the command line's options, spelled as in ``run_config.json``
(``learning_rate=2e-5``, ``tasks_file="tasks.yaml"``): the same option dataclasses
(``TrainConfig``, ``BamConfig``) read through their ``from_dict``, so names, types and choices
are checked as on the command line, and every mistake raises ``SelftuneError`` with the
one-line message the command would print.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError


@dataclass
class RunResult:
    """What a run measured and where it wrote it.

    ``metrics``: the content of ``metrics.json`` (``selftune.train``) or of ``bam.json``
    (``selftune.bam``: every stage's dev scores). ``model_dir``: the trained model
    (``selftune.bam``: the student's folder, each task a model in ``task_dirs``).
    ``teacher_dir``: the averaged teacher of self-distillation (``strategy`` sda, sdv or ema),
    saved beside the model. For ``selftune.bam``: ``teacher_dirs`` the single-task teachers,
    ``finetuned_dirs`` the models of ``finetune_after``.
    """

    metrics: dict[str, Any]
    output_dir: Path
    model_dir: Path | None = None
    teacher_dir: Path | None = None
    task_dirs: dict[str, Path] = field(default_factory=dict)
    teacher_dirs: dict[str, Path] = field(default_factory=dict)
    finetuned_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The run's dev score (a BAM! recipe: its last stage's average over the tasks)."""
        for key in ("finetuned_average", "student_average", "score"):
            if key in self.metrics:
                return self.metrics[key]
        return None


def _model_folder(path: Path) -> Path | None:
    return path if (path / "config.json").is_file() else None


def train(**options: Any) -> RunResult:
    """Fine-tune one model, as ``selftune train`` with these options; see ``selftune train
    --help`` for each (``task="rte"`` or ``train_file=..., validation_file=...``,
    ``strategy="sda"``, ``max_train_samples=200``, ...). An interrupted run resumes when called
    again with the same options."""
    from selftune.config import TrainConfig
    from selftune.training import train as run_training

    cfg = TrainConfig.from_dict(options)
    metrics = run_training(cfg)  # fills in the default output_dir
    output_dir = Path(cfg.output_dir)
    return RunResult(metrics, output_dir, output_dir, _model_folder(output_dir / "teacher"))


def bam(**options: Any) -> RunResult:
    """The BAM! recipe, as ``selftune bam`` with these options; see ``selftune bam --help``
    (``tasks="rte,mrpc"`` or ``tasks_file="tasks.yaml"``, ``teachers="none"`` for plain Multi,
    ``finetune_after=True``, ...). Finished stages are reused when called again."""
    from selftune.config import NOT_FOR_MULTITASK, BamConfig
    from selftune.recipes.bam import run_bam

    # As on the command line, which has no single-task options (BamConfig keeps their fields).
    known = {f.name for f in dataclasses.fields(BamConfig)} - set(NOT_FOR_MULTITASK)
    unknown = sorted(set(options) - known)
    if unknown:
        raise SelftuneError(f"unknown option(s) {unknown} for a BAM! recipe (your own files go "
                            "in a tasks_file); see 'selftune bam --help'")
    cfg = BamConfig.from_dict(options)
    if cfg.output_dir is None:  # the recipe's own default, made visible to the caller
        cfg.output_dir = str(Path("runs") / "bam" / f"seed{cfg.seed}")
    summary = run_bam(cfg)
    root = Path(cfg.output_dir)
    student = root / "student"
    result = RunResult(summary, root, teacher_dirs={
        task: Path(path) for task, path in summary.get("teacher_dirs", {}).items()})
    if "student" in summary:
        result.model_dir = student
        result.teacher_dir = student / "teacher" if (student / "teacher").is_dir() else None
        result.task_dirs = {task: student / "tasks" / task for task in summary["tasks"]}
    if "finetuned" in summary:
        result.finetuned_dirs = {task: root / "finetuned" / task for task in summary["tasks"]}
    return result
