"""The results file: one JSON line per finished run, appended under a lock."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from selftune.config import TrainConfig
from selftune.outputs import BAM_STUDENT_DIR, METRICS_FILE, RUN_CONFIG_FILE
from selftune_experiments.bench.grid import TEACHER_VARIANT
from selftune_experiments.bench.planning import PlannedRun, teacher_dirs

RESULTS_SCHEMA = 1
# Set on the lines of a multi-task student: its timings and memory are the whole run's (every
# task), comparable with other multi-task runs only.
MULTITASK_COST_SCOPE = "multitask-run"


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
    for task, teacher_dir in teacher_dirs(run, summary).items():
        metrics_file, config_file = teacher_dir / METRICS_FILE, teacher_dir / RUN_CONFIG_FILE
        if not (metrics_file.is_file() and config_file.is_file()):
            continue  # e.g. a teacher given as a model without its training run
        teacher_config = TrainConfig.from_dict(json.loads(config_file.read_text()))
        teacher_run = PlannedRun(f"{task}__{TEACHER_VARIANT}__seed{run.seed}", task,
                                 TEACHER_VARIANT, run.seed, teacher_config)
        records.append(make_record(teacher_run, json.loads(metrics_file.read_text())))
    return records


def make_record(run: PlannedRun, metrics: dict) -> dict:
    keep = ("metrics", "score", "teacher_metrics", "teacher_score", "history", "wall_time_s",
            "train_time_s", "train_examples_per_s", "peak_memory_mb", "versions", "machine",
            "finished_at", "eval_split", "num_train_examples", "global_steps", "resumed_from")
    return {
        "schema": RESULTS_SCHEMA,
        "run_id": run.run_id,
        "config_hash": run.hash(),
        "task": run.task,
        "strategy": "se" if run.source is not None else run.config.strategy,
        "variant": run.variant,
        "seed": run.seed,
        "config": {**run.config.to_dict(),
                   **({"ensemble_of": run.source.run_id, "ensemble_k": run.k}
                      if run.source is not None else {})},
        **{k: metrics.get(k) for k in keep},
        # A task with several dev sets (MNLI): the others' scores too.
        **({"other_splits": metrics["other_splits"]} if metrics.get("other_splits") else {}),
    }
