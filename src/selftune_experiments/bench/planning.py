"""A grid turned into runs, each one process, and what a run's folder says about it.

The BAM! recipe's layout and checks come from ``selftune.recipes.bam``'s public functions, imported
where a BAM! run is planned or checked: that module loads torch, which building the command
line must not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.config import BamConfig, TrainConfig, check_strategy_options, validate_options
from selftune.data.tasks import get_task
from selftune.errors import SelftuneError
from selftune.outputs import BAM_SUMMARY_FILE, BENCH_RUN_FILE, METRICS_FILE, RUN_CONFIG_FILE
from selftune_experiments.bench.grid import TEACHER_VARIANT, Grid, check_grid


@dataclass
class PlannedRun:
    """One process: a ``selftune train`` run (one task) or a ``selftune bam`` run (all tasks)."""

    run_id: str
    task: str
    variant: str
    seed: int
    config: TrainConfig
    command: str = "train"
    # A shared BAM! teacher's run: the students that read its predictions.
    students: list[PlannedRun] = field(default_factory=list)
    # A self-ensemble built afterwards ("pipeline: ensemble"): the run whose saved snapshots
    # it averages, how many, and whether their output vote is scored too.
    source: PlannedRun | None = None
    k: int = 0
    vote: bool = False

    def hash(self) -> str:
        """What identifies the run's results line: its options' hash (an ensemble: its source
        run's, and its own k and vote)."""
        if self.command != ENSEMBLE:
            return self.config.hash()
        return f"{self.config.hash()}+se{self.k}{'+vote' if self.vote else ''}"

    def record_ids(self) -> list[str]:
        """The run_ids of the results lines that make this run recorded (a BAM! run's teacher
        lines come along when its teachers have metrics, but are not required)."""
        if self.command == "train":
            return [self.run_id]
        return [f"{t}__{self.variant}__seed{self.seed}" for t in self.task.split(",")]


ENSEMBLE = "ensemble"
ENSEMBLE_KEYS = {"pipeline", "from", "k", "vote"}


def plan_runs(grid: Grid, runs_dir: Path) -> list[PlannedRun]:
    """Seed-major order: an interrupted grid has whole seeds for every task and variant."""
    def is_bam(options: dict | None) -> bool:  # "pipeline: bam" in the variant or in common
        return {**grid.common, **(options or {})}.get("pipeline") == "bam"

    check_grid(grid)
    runs = []
    for seed in grid.seeds:
        students = [_plan_bam(grid, variant, options or {}, seed, runs_dir)
                    for variant, options in grid.variants.items() if is_bam(options)]
        runs.extend(_plan_shared_teachers(students))
        runs.extend(students)
        for task in grid.tasks:
            planned: dict[str, PlannedRun] = {}
            for variant, options in grid.variants.items():
                if is_bam(options) or (options or {}).get("pipeline") == ENSEMBLE:
                    continue
                values = {**grid.common, **grid.task_options.get(task, {}), **(options or {}),
                          "task": task, "seed": seed}
                if not values.get("train_file"):
                    get_task(task)  # with the user's own files, the task name is free
                run_id = f"{task}__{variant}__seed{seed}"
                values["output_dir"] = str(runs_dir / run_id)
                try:
                    config = TrainConfig.from_dict(values)
                except TypeError as err:
                    raise SelftuneError(f"grid variant {variant!r}: {err}") from None
                _check_options(config, f"grid variant {variant!r} ({task})")
                planned[variant] = PlannedRun(run_id, task, variant, seed, config)
                runs.append(planned[variant])
            # After the runs they are built from, so one worker usually takes both in turn.
            runs.extend(_plan_ensemble(variant, options, planned, runs_dir)
                        for variant, options in grid.variants.items()
                        if (options or {}).get("pipeline") == ENSEMBLE)
    return runs


def _plan_ensemble(variant: str, options: dict, planned: dict[str, PlannedRun],
                   runs_dir: Path) -> PlannedRun:
    """A self-ensemble of a trained variant's saved snapshots ('selftune ensemble'): an
    evaluation, recorded as a run of its own."""
    where = f"grid variant {variant!r}"
    unknown = sorted(set(options) - ENSEMBLE_KEYS)
    if unknown:
        raise SelftuneError(f"{where}: an ensemble takes only from, k and vote, not {unknown}")
    source = planned.get(str(options.get("from")))
    if source is None:
        raise SelftuneError(f"{where}: 'from' names the trained variant whose snapshots it "
                            f"averages, one of {sorted(planned)}")
    kept = source.config.save_snapshots
    k = options.get("k", kept)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= kept:
        raise SelftuneError(f"{where}: k must be a whole number from 1 to the {kept} snapshots "
                            f"variant {source.variant!r} keeps (save_snapshots)")
    run_id = f"{source.task}__{variant}__seed{source.seed}"
    config = TrainConfig.from_dict({**source.config.to_dict(),
                                    "output_dir": str(runs_dir / run_id)})
    return PlannedRun(run_id, source.task, variant, source.seed, config, command=ENSEMBLE,
                      source=source, k=k, vote=bool(options.get("vote", False)))


def _check_options(config: Any, where: str, bam: bool = False) -> None:
    """The range and strategy checks 'selftune train' makes of a run's options before any
    work (for a BAM! run: of the student's options and of each --teachers auto teacher's),
    made here for every run before the first starts: a bad value fails at once, not hours
    into a grid. No data or model is read."""
    try:
        if bam:
            from selftune.recipes.bam import check_bam_options

            check_bam_options(config)
        else:
            validate_options(config)
            check_strategy_options(config)
        if bam and config.teachers == "auto":
            from selftune.recipes.bam import recipe_teachers

            for task, teacher in recipe_teachers(config).items():
                _check_options(teacher, f"{where}, its {task} teacher")
    except SelftuneError as err:
        if str(err).startswith(where):
            raise
        raise SelftuneError(f"{where}: {err}") from None


def _plan_bam(grid: Grid, variant: str, options: dict, seed: int, runs_dir: Path) -> PlannedRun:
    """A BAM!/multi-task variant: one ``selftune bam`` run per seed covers every task."""
    for task in grid.tasks:
        get_task(task)
    if grid.task_options:
        raise SelftuneError(f"grid variant {variant!r}: a BAM! run trains every task at once, "
                            "so task_options cannot apply to it; give the options in common "
                            "or in the variant")
    values = {**{k: v for k, v in {**grid.common, **options}.items() if k != "pipeline"},
              "tasks": ",".join(grid.tasks), "seed": seed,
              "output_dir": str(runs_dir / f"{variant}__seed{seed}")}
    try:
        config = BamConfig.from_dict(values)
    except TypeError as err:
        raise SelftuneError(f"grid variant {variant!r}: {err}") from None
    if config.finetune_after:
        # Its results lines hold the multi-task student; the fine-tuned models would be trained
        # and never recorded, nor weighed by a deadline.
        raise SelftuneError(f"grid variant {variant!r}: finetune_after is not supported in a "
                            "grid; run 'selftune bam --finetune-after' on its own")
    _check_options(config, f"grid variant {variant!r}", bam=True)
    return PlannedRun(f"{variant}__seed{seed}", ",".join(grid.tasks), variant, seed, config,
                      command="bam")


def has_shared_teachers(run: PlannedRun) -> bool:
    """A BAM! run whose teachers are planned as runs of their own (``teachers: auto`` in a
    ``teachers_root``)."""
    return run.command == "bam" and run.config.teachers == "auto" and \
        bool(run.config.teachers_root)


def _plan_shared_teachers(bam_runs: list[PlannedRun]) -> list[PlannedRun]:
    """The ``teachers: auto`` teachers that BAM! runs keep in a ``teachers_root``, as
    single-task runs of their own (variant ``teacher``, the recipe's teacher options), planned
    before the students: workers then train a seed's teachers side by side, and a deadline
    weighs a teacher run of minutes instead of a teachers-and-student run of hours. A student
    whose teacher another worker is still training waits for it (the recipe's teacher lock)."""
    from selftune.recipes.bam import recipe_teachers

    teachers: dict[Path, PlannedRun] = {}
    for run in bam_runs:
        if not has_shared_teachers(run):
            continue  # teachers inside a student's own folder stay part of its run
        for task, config in recipe_teachers(run.config).items():
            teacher_dir = Path(config.output_dir)
            planned = PlannedRun(f"{task}__{TEACHER_VARIANT}__seed{run.seed}", task,
                                 TEACHER_VARIANT, run.seed, config)
            first = teachers.setdefault(teacher_dir, planned)  # variants share their teachers
            first.students.append(run)
            if first.config.hash() != planned.config.hash():
                # The recipe would refuse the shared teacher hours later, at the student.
                raise SelftuneError(
                    f"grid variant {run.variant!r} shares the teachers in {teacher_dir.parent} "
                    "with another variant but trains them with other teacher options; give "
                    "it its own teachers_root or the same teacher_* options")
    return list(teachers.values())


def students_without_predictions(run: PlannedRun) -> list[TrainConfig]:
    """The options of a shared teacher's students whose cached predictions its folder does
    not hold yet (one per file: students that read the same file count once). Its run makes
    them; a teacher recorded but without them is not done."""
    from selftune.recipes.bam import teacher_predictions_file

    teacher_dir = Path(run.config.output_dir or "")
    missing: dict[Path, TrainConfig] = {}
    for student in run.students:
        cache = teacher_predictions_file(teacher_dir, run.task, student.config)
        if not cache.is_file():
            missing.setdefault(cache, student.config)
    return list(missing.values())


def must_train_teacher_again(run: PlannedRun) -> bool:
    """A finished teacher that lost its model (git keeps no models) before it made the
    predictions some student needs: only training it again (same options and seed, so the
    same teacher) can make them."""
    from selftune.recipes.bam import holds_model

    out = Path(run.config.output_dir or "")
    return (run.variant == TEACHER_VARIANT and finished_metrics(out, run) is not None
            and not holds_model(out) and bool(students_without_predictions(run)))


def teacher_dirs(run: PlannedRun, summary: dict) -> dict[str, Path]:
    """The teacher folder of each task, as the run's bam.json names them (or, for a run that
    predates that field, as --teachers auto places them)."""
    teachers = getattr(run.config, "teachers", "none")
    if teachers == "none":
        return {}
    if "teacher_dirs" in summary:
        return {task: Path(d) for task, d in summary["teacher_dirs"].items()}
    if teachers != "auto":
        return {}
    from selftune.recipes.bam import recipe_teachers

    return {task: Path(config.output_dir) for task, config in recipe_teachers(run.config).items()}


def holds_other_config(out: Path, run: PlannedRun) -> bool:
    # A train run writes its options to run_config.json as it starts; a BAM! run has only the
    # bench_run.json it was started with until its bam.json is written at the end.
    saved = out / (RUN_CONFIG_FILE if run.command == "train" else BENCH_RUN_FILE)
    if not saved.is_file():
        return False
    try:
        saved_config = type(run.config).from_dict(json.loads(saved.read_text()))
        return saved_config.hash() != run.config.hash()
    except (json.JSONDecodeError, SelftuneError, TypeError):
        return True


def finished_metrics(out: Path, run: PlannedRun) -> dict | None:
    """metrics.json of a finished run with this exact configuration, else None (for a bam
    run: its bam.json summary)."""
    path = out / (BAM_SUMMARY_FILE if run.command == "bam" else METRICS_FILE)
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if run.command == ENSEMBLE:
        same = (metrics.get("source_run") == run.source.config.output_dir
                and metrics.get("k") == run.k and ("vote_score" in metrics) == run.vote)
        return metrics if same else None
    return metrics if metrics.get("config_hash") == run.config.hash() else None
