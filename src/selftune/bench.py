"""Experiment grids: tasks × variants × seeds, run one by one, resumable and append-only.

A grid is a YAML/TOML/JSON file (or command-line flags)::

    name: baseline
    tasks: [rte, mrpc, stsb, cola]
    seeds: [0, 1, 2, 3, 4]
    common: {data_dir: ../shared/data}        # options of every run (``selftune train`` names)
    task_options: {sst2: {max_train_samples: 10000}}
    variants:                                 # name -> options; the report compares variants
      baseline: {}
      lr1e-4: {learning_rate: 1.0e-4}

Paths in a grid (``results``, ``runs_dir``, ``timings_from``, and the options ``data_dir`` and
``teachers_root``) are relative to the grid file.

Every run is an ordinary ``selftune train`` (a variant with ``pipeline: bam``: ``selftune
bam``, one run per seed for every task) in its own process and output directory. BAM! variants
that keep their teachers in a ``teachers_root`` share them: each teacher is planned as a
single-task run of its own (variant ``teacher``) before the students of its seed. When a run
finishes, one JSON line is appended to the results file. A restart skips the runs already
recorded with the same configuration, and resumes an interrupted run from its checkpoint: a kill
loses at most the work since that run's last checkpoint.

Several ``selftune bench`` processes may work on one grid at the same time (on a machine where
two 1-thread processes outrun one 2-thread process): each run is claimed with an advisory lock
next to its output directory, held by the worker and by the training process it starts, and a
claimed run is left to its owner. A killed worker's training goes on to its end (a later worker
records it); a run whose worker and training both died is free again and resumes from its
checkpoint.

With a deadline (``--deadline``, e.g. the end of a Slurm allocation or of a working session), a
run is started only if it is expected to finish in time: its expected length is the median wall
time of the recorded runs most like it (see ``expected_duration``; the grid key
``timings_from: [other.results.jsonl]`` adds other grids' runs to choose from), times
``DEADLINE_MARGIN``.
A run that does not fit is left for the next invocation, and shorter runs later in the grid
are still started, so the time before the deadline is not spent on runs that would be cut off.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from selftune.config import TrainConfig
from selftune.errors import SelftuneError
from selftune.outputs import (
    BAM_STUDENT_DIR,
    BAM_SUMMARY_FILE,
    BENCH_RUN_FILE,
    LOG_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    directory_lock,
    is_finished,
    last_checkpoint,
    write_json_atomic,
)

RESULTS_SCHEMA = 1


@dataclass
class Grid:
    name: str
    tasks: list[str]
    seeds: list[int]
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"baseline": {}})
    common: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: Path | None = None
    runs_dir: Path | None = None
    # Results files of other grids whose wall times also count when a --deadline estimates a
    # run's length (e.g. an ablation grid whose runs are as long as the main grid's).
    timings_from: list[Path] = field(default_factory=list)


@dataclass
class PlannedRun:
    """One process: a ``selftune train`` run (one task) or a ``selftune bam`` run (all tasks)."""

    run_id: str
    task: str
    variant: str
    seed: int
    config: TrainConfig
    command: str = "train"

    def record_ids(self) -> list[str]:
        """The run_ids of the results lines that make this run recorded (a BAM! run's teacher
        lines come along when its teachers have metrics, but are not required)."""
        if self.command == "train":
            return [self.run_id]
        return [f"{t}__{self.variant}__seed{self.seed}" for t in self.task.split(",")]


def parse_seeds(value: str | list | int) -> list[int]:
    """``"0-4"``, ``"0,1,2"``, ``3`` or a list of ints (or of such strings)."""
    parts = value if isinstance(value, list) else [value]
    seeds: list[int] = []
    try:
        for part in parts:
            if isinstance(part, (bool, float)):  # int() would quietly take 1.5 for 1
                raise ValueError
            if isinstance(part, int):
                seeds.append(part)
                continue
            for piece in str(part).split(","):
                piece = piece.strip()
                if "-" in piece[1:]:
                    lo, hi = (int(x) for x in piece.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    seeds.extend(range(lo, hi + 1))
                elif piece:
                    seeds.append(int(piece))
    except ValueError:
        raise SelftuneError(f"seeds: cannot read {value!r}; use e.g. 0-4, 0,1,2 or [0, 1, 2] "
                            "(whole numbers, ranges from low to high)") from None
    if not seeds:
        raise SelftuneError(f"seeds: {value!r} names no seed")
    return seeds


def parse_tasks(value: Any) -> list[str]:
    """``[rte, mrpc]`` or ``"rte,mrpc"``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise SelftuneError(f"tasks: a list of task names or a comma-separated string, not "
                            f"{value!r}")
    tasks = [t.strip() for t in items if t.strip()]
    if not tasks:
        raise SelftuneError("tasks: the grid names no task")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise SelftuneError(f"tasks: {twice} given twice; name each task once")
    return tasks


# A grid's, a variant's and a task's names become folder and file names (runs/bench/<grid>/
# <task>__<variant>__seed<k>, <grid>.results.jsonl): no path separators, no '..'.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: Any, what: str) -> None:
    # Run ids join task, variant and seed with '__': a name holding it could make two ids one.
    if (isinstance(name, str) and SAFE_NAME.fullmatch(name) and name not in (".", "..")
            and "__" not in name):
        return
    problem = "is empty" if name == "" else f"{name!r} is not a string (quote it)" \
        if not isinstance(name, str) else f"{name!r} cannot name a folder"
    raise SelftuneError(f"{what} {problem}: it names the runs' folders and results, so use "
                        "letters, digits, '-', '_' and '.' only (not '.', '..' or '__'), "
                        "e.g. lr1e-4")


# Options that 'selftune bench' sets on every run itself: a grid's value would be overridden,
# or would undo what bench does (skip finished runs, resume interrupted ones).
BENCH_CONTROLLED = {
    "output_dir": "each run goes to <runs dir>/<run id>; use --runs-dir (or runs_dir in the "
                  "grid) to put the runs elsewhere",
    "overwrite_output_dir": "it starts a run over when its options changed and never redoes a "
                            "finished one; delete a run's folder to redo it",
    "resume": "it resumes an interrupted run from its checkpoint; delete a run's folder to "
              "start it over",
    "task": "list the tasks in the grid's tasks (or --tasks)",
    "tasks": "list the tasks in the grid's tasks (or --tasks)",
    "seed": "list the seeds in the grid's seeds (or --seeds)",
}


def check_bench_options(options: dict, where: str) -> None:
    """Refuse the options that 'selftune bench' sets on each run (BENCH_CONTROLLED)."""
    for key in options:
        if key in BENCH_CONTROLLED:
            raise SelftuneError(f"{where}: {key} is set by 'selftune bench' for each run; "
                                f"{BENCH_CONTROLLED[key]}")


def check_grid(grid: Grid) -> None:
    """The grid's names (safe folder names) and options (none that bench sets itself)."""
    check_name(grid.name, "grid name (the grid's name, or --name)")
    for task in grid.tasks:
        check_name(task, "task")
    for variant in grid.variants:
        check_name(variant, "variant name")
        if variant == TEACHER_VARIANT:
            raise SelftuneError(f"variant name {variant!r} is taken by the BAM! teachers' own "
                                "runs; choose another name")
    check_bench_options(grid.common, "the grid's common options (or --set)")
    for task, options in grid.task_options.items():
        check_bench_options(options, f"task_options of {task}")
    for variant, options in grid.variants.items():
        check_bench_options(options or {}, f"grid variant {variant!r}")


PATHS_RELATIVE_TO_GRID = ("data_dir", "teachers_root")


def load_grid(path: Path) -> Grid:
    if not path.is_file():
        raise SelftuneError(f"grid file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = _yaml_load_unique_keys(text)
        elif path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)  # refuses a key given twice by itself
        else:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise SelftuneError(f"{path}: {err}; the second would silently replace the first") \
            from None
    except Exception as err:
        raise SelftuneError(f"{path}: cannot parse the grid ({err})") from None
    if not isinstance(raw, dict):
        raise SelftuneError(f"{path}: a grid is a mapping with tasks, seeds and variants")
    known = {"name", "tasks", "seeds", "variants", "common", "task_options", "results",
             "runs_dir", "timings_from"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SelftuneError(f"{path}: unknown grid key(s) {unknown}; known: {sorted(known)}")
    for key in ("tasks", "seeds"):
        if key not in raw:
            raise SelftuneError(f"{path}: the grid needs '{key}'")
    base = path.parent

    def rel(value: str | None, key: str = "a path") -> Path | None:
        if value is not None and not isinstance(value, str):
            raise SelftuneError(f"{path}: {key} is a path, not {value!r}")
        return None if value is None else (base / value).resolve()

    def with_paths_resolved(options: dict | None) -> dict:
        if options is not None and not isinstance(options, dict):
            raise SelftuneError(f"{path}: options are a mapping of option names to values, "
                                f"not {options!r}")
        options = dict(options or {})
        for key in PATHS_RELATIVE_TO_GRID:
            if isinstance(options.get(key), str):
                options[key] = str(rel(options[key]))
        return options

    variants = raw.get("variants") or {"baseline": {}}
    if not isinstance(variants, dict):
        raise SelftuneError(f"{path}: 'variants' maps a name to its options")
    task_options = raw.get("task_options") or {}
    tasks = parse_tasks(raw["tasks"])
    if not isinstance(task_options, dict):
        raise SelftuneError(f"{path}: 'task_options' maps a task to its options")
    strays = sorted(set(task_options) - set(tasks))
    if strays:  # e.g. a misspelt task: its options would silently apply to nothing
        raise SelftuneError(f"{path}: task_options for {strays}, which are not among the "
                            f"tasks {tasks}")
    return Grid(
        name=str(raw.get("name", path.stem)),
        tasks=tasks,
        seeds=parse_seeds(raw["seeds"]),
        variants={name: with_paths_resolved(options) for name, options in variants.items()},
        common=with_paths_resolved(raw.get("common")),
        task_options={task: with_paths_resolved(options)
                      for task, options in task_options.items()},
        results=rel(raw.get("results"), "results")
        or path.with_name(f"{path.stem}.results.jsonl"),
        runs_dir=rel(raw.get("runs_dir"), "runs_dir"),
        timings_from=[rel(p, "timings_from") for p in _as_list(raw.get("timings_from"))],
    )


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (json keeps the last)."""
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise _DuplicateKey(f"{twice!r} is given twice")
    return dict(pairs)


def _yaml_load_unique_keys(text: str) -> Any:
    """yaml.safe_load, refusing a mapping key given twice (e.g. two variants of one name),
    which PyYAML would silently resolve to the last."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<: *defaults' keys may be overridden on purpose
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key]} "
                                                f"and {line})")
                        seen[key] = line
                    except TypeError:
                        continue  # an unhashable key: the loader names it
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def plan_runs(grid: Grid, runs_dir: Path) -> list[PlannedRun]:
    """Seed-major order: an interrupted grid has whole seeds for every task and variant."""
    from selftune.data.tasks import get_task

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
            for variant, options in grid.variants.items():
                if is_bam(options):
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
                runs.append(PlannedRun(run_id, task, variant, seed, config))
    return runs


def _check_options(config: Any, where: str, bam: bool = False) -> None:
    """The range and strategy checks 'selftune train' makes of a run's options before any
    work (for a BAM! run: of the student's options and of each --teachers auto teacher's),
    made here for every run before the first starts: a bad value fails at once, not hours
    into a grid. No data or model is read."""
    from selftune.config import check_strategy_options, validate_options

    try:
        if bam:
            from selftune.bam import check_bam_options

            check_bam_options(config)
        else:
            validate_options(config)
            check_strategy_options(config)
        if bam and config.teachers == "auto":
            from selftune.bam import teacher_config

            for task in config.tasks.split(","):
                _check_options(teacher_config(config, task, Path(config.output_dir or ".")),
                               f"{where}, its {task} teacher")
    except SelftuneError as err:
        if str(err).startswith(where):
            raise
        raise SelftuneError(f"{where}: {err}") from None


def _plan_bam(grid: Grid, variant: str, options: dict, seed: int, runs_dir: Path) -> PlannedRun:
    """A BAM!/multi-task variant: one ``selftune bam`` run per seed covers every task."""
    from selftune.bam import BamConfig
    from selftune.data.tasks import get_task

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


def _plan_shared_teachers(bam_runs: list[PlannedRun]) -> list[PlannedRun]:
    """The ``teachers: auto`` teachers that BAM! runs keep in a ``teachers_root``, as
    single-task runs of their own (variant ``teacher``, the recipe's teacher options), planned
    before the students: workers then train a seed's teachers side by side, and a deadline
    weighs a teacher run of minutes instead of a teachers-and-student run of hours. A student
    whose teacher another worker is still training waits for it (the recipe's teacher lock)."""
    from selftune.bam import teacher_config

    teachers: dict[Path, PlannedRun] = {}
    for run in bam_runs:
        if run.config.teachers != "auto" or not run.config.teachers_root:
            continue  # teachers inside a student's own folder stay part of its run
        for task, teacher_dir in _teacher_dirs(run, {}).items():
            planned = PlannedRun(f"{task}__{TEACHER_VARIANT}__seed{run.seed}", task,
                                 TEACHER_VARIANT, run.seed,
                                 teacher_config(run.config, task, teacher_dir))
            first = teachers.setdefault(teacher_dir, planned)  # variants share their teachers
            if first.config.hash() != planned.config.hash():
                # The recipe would refuse the shared teacher hours later, at the student.
                raise SelftuneError(
                    f"grid variant {run.variant!r} shares the teachers in {teacher_dir.parent} "
                    "with another variant but trains them with other teacher options; give "
                    "it its own teachers_root or the same teacher_* options")
    return list(teachers.values())


def read_recorded(results: Path) -> dict[tuple[str, str], dict]:
    """Finished runs in the results file, keyed by (run_id, config_hash); bad lines skipped."""
    if not results.is_file():
        return {}
    return _parse_recorded(results.read_text())


def _parse_recorded(text: str) -> dict[tuple[str, str], dict]:
    recorded: dict[tuple[str, str], dict] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            recorded[(record["run_id"], record["config_hash"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the report names such lines; here they only mean "not recorded"
    return recorded


def append_record(results: Path, record: dict, unless_recorded: bool = False) -> bool:
    """Append one line under an exclusive lock; repair a missing final newline first. With
    ``unless_recorded``, a run already in the file (same run_id and config_hash) is not
    appended again: checked under the same lock, since another worker may record it (e.g. a
    teacher shared by several BAM! runs) at any time. True when the line was appended."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            existing = f.read()
            if unless_recorded and (record["run_id"], record["config_hash"]) in \
                    _parse_recorded(existing.decode(errors="replace")):
                return False
            if existing and not existing.endswith(b"\n"):
                # A writer was killed mid-line: keep that line (the report flags it) and
                # start ours on a fresh line.
                f.write(b"\n")
            f.write((json.dumps(record, default=str) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return True


TEACHER_VARIANT = "teacher"
# Set on the lines of a multi-task student: its timings and memory are the whole run's (every
# task), comparable with other multi-task runs only.
MULTITASK_COST_SCOPE = "multitask-run"


def bam_records(run: PlannedRun, summary: dict) -> list[dict]:
    """One results line per task for the student (variant ``run.variant``), and one per task
    for its single-task teacher (variant ``teacher``, with the teacher's own options) when the
    run has teachers with metrics."""
    root = Path(run.config.output_dir or "")
    student = json.loads((root / BAM_STUDENT_DIR / METRICS_FILE).read_text())
    # A self-distilling student evaluates its averaged past per task (teacher_tasks); the
    # top-level teacher_score is the mean over tasks and belongs on no task's line.
    run_wide = {k: v for k, v in student.items() if k not in ("teacher_score", "teacher_metrics")}
    records = []
    for task, result in student["tasks"].items():
        history = [{"epoch": h["epoch"], "metrics": h["tasks"][task]["metrics"],
                    "score": h["tasks"][task]["score"]} for h in student.get("history", [])]
        own_teacher = student.get("teacher_tasks", {}).get(task, {})
        per_task = {**run_wide, **result, "history": history,
                    "teacher_metrics": own_teacher.get("metrics"),
                    "teacher_score": own_teacher.get("score")}
        records.append({**make_record(run, per_task), "task": task,
                        "run_id": f"{task}__{run.variant}__seed{run.seed}",
                        "cost_scope": MULTITASK_COST_SCOPE})
    for task, teacher_dir in _teacher_dirs(run, summary).items():
        metrics_file, config_file = teacher_dir / METRICS_FILE, teacher_dir / RUN_CONFIG_FILE
        if not (metrics_file.is_file() and config_file.is_file()):
            continue  # e.g. a teacher given as a model without its training run
        teacher_config = TrainConfig.from_dict(json.loads(config_file.read_text()))
        teacher_run = PlannedRun(f"{task}__{TEACHER_VARIANT}__seed{run.seed}", task,
                                 TEACHER_VARIANT, run.seed, teacher_config)
        records.append(make_record(teacher_run, json.loads(metrics_file.read_text())))
    return records


def _teacher_dirs(run: PlannedRun, summary: dict) -> dict[str, Path]:
    """The teacher folder of each task, as the run's bam.json names them (or, for a run that
    predates that field, as --teachers auto places them)."""
    teachers = getattr(run.config, "teachers", "none")
    if teachers == "none":
        return {}
    if "teacher_dirs" in summary:
        return {task: Path(d) for task, d in summary["teacher_dirs"].items()}
    if teachers != "auto":
        return {}
    from selftune.bam import teachers_root

    root = teachers_root(run.config, Path(run.config.output_dir or ""))
    return {task: root / task for task in run.task.split(",")}


def make_record(run: PlannedRun, metrics: dict) -> dict:
    keep = ("metrics", "score", "teacher_metrics", "teacher_score", "history", "wall_time_s",
            "train_time_s", "train_examples_per_s", "peak_memory_mb", "versions", "machine",
            "finished_at", "eval_split", "num_train_examples", "global_steps", "resumed_from")
    return {
        "schema": RESULTS_SCHEMA,
        "run_id": run.run_id,
        "config_hash": run.config.hash(),
        "task": run.task,
        "strategy": run.config.strategy,
        "variant": run.variant,
        "seed": run.seed,
        "config": run.config.to_dict(),
        **{k: metrics.get(k) for k in keep},
        # A task with several dev sets (MNLI): the others' scores too.
        **({"other_splits": metrics["other_splits"]} if metrics.get("other_splits") else {}),
    }


# Runs of one kind vary by 10-25% in wall time here, with what else shares the machine.
DEADLINE_MARGIN = 1.25


def parse_deadline(value: str, now: datetime | None = None) -> datetime:
    """``+2h30m`` or ``+90m`` (from now), ``13:40`` (the next such local time), or an ISO
    date-time (``2026-12-05T13:40``); returned as a naive local time."""
    now = now or datetime.now()
    text = value.strip()
    relative = re.fullmatch(r"\+(?:(\d+)h)?(?:(\d+)m)?", text)
    if relative and any(relative.groups()):
        hours, minutes = (int(g or 0) for g in relative.groups())
        return now + timedelta(hours=hours, minutes=minutes)
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    try:
        if clock:
            at = now.replace(hour=int(clock[1]), minute=int(clock[2]), second=0, microsecond=0)
            return at if at > now else at + timedelta(days=1)
        at = datetime.fromisoformat(text)
    except ValueError:
        raise SelftuneError(f"--deadline: cannot read {value!r}; use +2h30m, 13:40 or "
                            "2026-12-05T13:40") from None
    return at.astimezone().replace(tzinfo=None) if at.tzinfo else at


def current_setting() -> tuple[str, int]:
    """What a run's speed depends on here: the CPU model and torch's thread count (which
    OMP_NUM_THREADS sets for the worker and the runs it starts alike)."""
    import torch

    from selftune.runinfo import cpu_model

    return cpu_model(), torch.get_num_threads()


def record_setting(record: dict) -> tuple[Any, Any]:
    machine = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    return machine.get("cpu"), machine.get("torch_threads")


def expected_duration(run: PlannedRun, recorded: Iterable[dict]) -> float | None:
    """Seconds this run is expected to take: the median wall time of the recorded runs most
    like it (the same task and variant on other seeds; else the same task in any variant, or
    for a BAM! run any multi-task student), plus, for a BAM! run whose teachers are not
    trained yet, the median of each teacher's task; for a run that resumes from a checkpoint,
    only the share of its steps still to do. None when nothing alike is recorded."""
    # A resumed run's wall time covers its last attempt only.
    timed = [r for r in recorded
             if isinstance(r.get("wall_time_s"), (int, float)) and not r.get("resumed_from")]
    setting = current_setting()

    def median_wall_time(*candidates: list[dict]) -> float | None:
        for records in candidates:
            if records:
                # Runs timed in this setting if there are any: a process at one thread takes
                # about 1.7x as long as one at two (BENCHMARKS.md, Threads), more than the
                # deadline's margin covers.
                alike = [r for r in records if record_setting(r) == setting] or records
                return statistics.median(r["wall_time_s"] for r in alike)
        return None

    def single_task(task: str, variant: str) -> float | None:
        same_task = [r for r in timed if r.get("task") == task and not r.get("cost_scope")]
        return median_wall_time([r for r in same_task if r.get("variant") == variant],
                                same_task)

    if run.command == "train":
        expected = single_task(run.task, run.variant)
        return None if expected is None else expected * _share_left(run)
    # A student's lines (one per task) carry the whole run's wall time: one entry per run.
    students = {(r.get("variant"), r.get("seed")): r for r in timed
                if r.get("cost_scope") == MULTITASK_COST_SCOPE}
    expected = median_wall_time([r for (v, _), r in students.items() if v == run.variant],
                                list(students.values()))
    if expected is None:
        return None
    expected *= _share_left(run)
    if getattr(run.config, "teachers", "none") != "auto":
        return expected
    for task, teacher_dir in _teacher_dirs(run, {}).items():
        if not is_finished(teacher_dir):
            teacher = single_task(task, TEACHER_VARIANT)
            if teacher is None:
                return None
            expected += teacher
    return expected


def _share_left(run: PlannedRun) -> float:
    """The share of the run's training steps still to do: 1 for a run not started, less for
    one that resumes from a checkpoint (its own; a folder left by other options starts over),
    0 for one finished but not yet recorded (e.g. a teacher another grid trained)."""
    out = Path(run.config.output_dir or "")
    if _holds_other_config(out, run):
        return 1.0
    if _finished_metrics(out, run) is not None:
        return 0.0
    checkpoint = last_checkpoint(out if run.command == "train" else out / BAM_STUDENT_DIR)
    if checkpoint is None:
        return 1.0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    done, total = state.get("global_step") or 0, state.get("max_steps") or 0
    return max(0.0, 1.0 - done / total) if total > 0 else 1.0


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_grid(
    grid: Grid, results: Path, runs_dir: Path, dry_run: bool = False,
    max_runs: int | None = None, train_command: list[str] | None = None,
    deadline: datetime | None = None,
) -> dict[str, int]:
    """Run every planned run that is not yet recorded (with a deadline: that is expected to
    finish before it); return counts of what happened."""
    runs = plan_runs(grid, runs_dir)
    recorded = read_recorded(results)
    todo = [r for r in runs
            if any((rid, r.config.hash()) not in recorded for rid in r.record_ids())]
    print(f"grid {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} already recorded in "
          f"{results}, {len(todo)} to run", flush=True)
    if dry_run:
        history = _timing_history(grid, results)
        for run in todo:
            expected = expected_duration(run, history)
            length = "" if expected is None else " (finished: only to record)" \
                if expected == 0 else f" (~{_format_duration(expected)})"
            print(f"  would run {run.run_id}{length}")
        return {"planned": len(runs), "done": 0, "failed": 0, "skipped": len(runs) - len(todo)}
    done = failed = busy = deferred = attempted = 0
    durations: list[float] = []
    for index, run in enumerate(todo, start=1):
        if max_runs and attempted >= max_runs:
            break
        remaining = len(todo) - index + 1
        if max_runs:
            remaining = min(remaining, max_runs - attempted)
        eta = f", ETA {_format_duration(sum(durations) / len(durations) * remaining)}" \
            if durations else ""
        print(f"[{index}/{len(todo)}] {run.run_id}{eta}", flush=True)
        out = Path(run.config.output_dir or "")
        with directory_lock(out, wait=False) as lock:
            if lock is None:
                busy += 1
                print(f"  {run.run_id} is being run by another 'selftune bench'; left to it",
                      flush=True)
                continue
            if deadline is not None and not _fits_before(run, grid, results, deadline):
                deferred += 1
                continue
            outcome = _run_claimed(run, out, results, train_command, durations, lock.fileno())
        # --max-runs counts the runs this worker ran (or found finished and recorded), not
        # those another worker holds or that wait for the next session.
        attempted += outcome is not False
        if outcome is None:
            failed += 1
        elif outcome:
            done += 1
    return {"planned": len(runs), "done": done, "failed": failed, "busy": busy,
            "deferred": deferred, "skipped": len(runs) - len(todo)}


def _timing_history(grid: Grid, results: Path) -> list[dict]:
    """The finished runs whose wall times estimate this grid's: its own results (read anew:
    other workers append to it), then those of its ``timings_from`` files."""
    history = list(read_recorded(results).values())
    for other in grid.timings_from:
        history.extend(read_recorded(other).values())
    return history


def _fits_before(run: PlannedRun, grid: Grid, results: Path, deadline: datetime) -> bool:
    left = (deadline - datetime.now()).total_seconds()
    if left <= 0:
        print(f"  {run.run_id}: not started: the deadline {deadline:%Y-%m-%d %H:%M} has passed",
              flush=True)
        return False
    expected = expected_duration(run, _timing_history(grid, results))
    if expected is None:
        print(f"  {run.run_id}: nothing like it recorded yet, so its length is unknown; "
              "started anyway", flush=True)
        return True
    if expected * DEADLINE_MARGIN <= left:
        return True
    print(f"  {run.run_id}: not started: runs like it took ~{_format_duration(expected)}, "
          f"{_format_duration(max(left, 0))} are left before the deadline "
          f"{deadline:%Y-%m-%d %H:%M}", flush=True)
    return False


def _run_claimed(run: PlannedRun, out: Path, results: Path, train_command: list[str] | None,
                 durations: list[float], lock_fd: int) -> bool | None:
    """Run (or find finished) one claimed run and record it: True when recorded here, False
    when another worker had already recorded it, None when it failed."""
    recorded = read_recorded(results)  # another worker may have recorded it since we planned
    if all((rid, run.config.hash()) in recorded for rid in run.record_ids()):
        print(f"  {run.run_id}: recorded meanwhile by another 'selftune bench'", flush=True)
        return False
    metrics = _finished_metrics(out, run)
    if metrics is None:
        if _holds_other_config(out, run):
            # The grid changed since this folder was written: its old run is stale.
            run.config.overwrite_output_dir = True
        started = time.time()
        out.mkdir(parents=True, exist_ok=True)
        config_file = out / BENCH_RUN_FILE
        write_json_atomic(config_file, run.config.to_dict())
        command = train_command or [sys.executable, "-m", "selftune", run.command]
        # The run holds the claim too: if this worker is killed, the run it started goes on
        # training, and no other worker starts it a second time.
        proc = subprocess.run([*command, "--config", str(config_file)], pass_fds=(lock_fd,))
        metrics = _finished_metrics(out, run)
        if proc.returncode != 0 or metrics is None:
            log = _log_written_since(run, out, started)
            # A run that fails before its log starts (e.g. a bad option) printed its error.
            where = f"see {log}" if log else "see its error above"
            print(f"  run {run.run_id} failed (exit {proc.returncode}); {where}. Not recorded: "
                  "a rerun of this grid retries it (and fails the same way until the cause is "
                  "fixed)", flush=True)
            return None
        durations.append(time.time() - started)  # a failure, often instant, would skew the ETA
    for record in ([make_record(run, metrics)] if run.command == "train"
                   else bam_records(run, metrics)):
        # A teacher shared by several BAM! runs of a seed is recorded once.
        append_record(results, record, unless_recorded=True)
    score = metrics.get("score", metrics.get("student_average"))
    print(f"  {run.run_id}: score {score:.2f}", flush=True)
    return True


def _log_written_since(run: PlannedRun, out: Path, started: float) -> Path | None:
    """The run's train.log written to last since ``started`` (a BAM! run: its student's or
    a teacher's), or None when its attempt wrote none."""
    logs = [out / LOG_FILE] if run.command == "train" else [
        out / BAM_STUDENT_DIR / LOG_FILE,
        *(d / LOG_FILE for d in _teacher_dirs(run, {}).values())]
    written = [(log.stat().st_mtime, log) for log in logs if log.is_file()]
    written = [(mtime, log) for mtime, log in written if mtime >= started - 1]
    return max(written)[1] if written else None


def _holds_other_config(out: Path, run: PlannedRun) -> bool:
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


def _finished_metrics(out: Path, run: PlannedRun) -> dict | None:
    """metrics.json of a finished run with this exact configuration, else None (for a bam
    run: its bam.json summary)."""
    path = out / (METRICS_FILE if run.command == "train" else BAM_SUMMARY_FILE)
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("config_hash") == run.config.hash() else None
