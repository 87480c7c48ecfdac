"""How long a run is expected to take, and whether it fits before a deadline."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError
from selftune.outputs import BAM_STUDENT_DIR, is_finished, last_checkpoint
from selftune.runinfo import cpu_model
from selftune_experiments.bench.grid import TEACHER_VARIANT, Grid
from selftune_experiments.bench.planning import (
    PlannedRun,
    finished_metrics,
    holds_other_config,
    must_train_teacher_again,
    teacher_dirs,
)
from selftune_experiments.bench.results import MULTITASK_COST_SCOPE, read_recorded

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
    import torch  # here, not above: building the command line imports no torch

    return cpu_model(), torch.get_num_threads()


def record_setting(record: dict) -> tuple[Any, Any]:
    machine = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    return machine.get("cpu"), machine.get("torch_threads")


def expected_duration(run: PlannedRun, recorded: Iterable[dict],
                      with_teachers: bool = True) -> float | None:
    """Seconds this run is expected to take: the median wall time of the recorded runs most
    like it (the same task and variant on other seeds; else the same task in any variant, or
    for a BAM! run any multi-task student), plus, for a BAM! run whose teachers are not
    trained yet and ``with_teachers``, the median of each teacher's task (it waits for them or
    trains them); for a run that resumes from a checkpoint, only the share of its steps still
    to do. None when nothing alike is recorded."""
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
    if not with_teachers or getattr(run.config, "teachers", "none") != "auto":
        return expected
    for task, teacher_dir in teacher_dirs(run, {}).items():
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
    if holds_other_config(out, run) or must_train_teacher_again(run):
        return 1.0
    if finished_metrics(out, run) is not None:
        return 0.0
    checkpoint = last_checkpoint(out if run.command == "train" else out / BAM_STUDENT_DIR)
    if checkpoint is None:
        return 1.0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    done, total = state.get("global_step") or 0, state.get("max_steps") or 0
    return max(0.0, 1.0 - done / total) if total > 0 else 1.0


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def timing_history(grid: Grid, results: Path) -> list[dict]:
    """The finished runs whose wall times estimate this grid's: its own results (read anew:
    other workers append to it), then those of its ``timings_from`` files."""
    history = list(read_recorded(results).values())
    for other in grid.timings_from:
        history.extend(read_recorded(other).values())
    return history


def fits_before(run: PlannedRun, grid: Grid, results: Path, deadline: datetime) -> bool:
    left = (deadline - datetime.now()).total_seconds()
    if left <= 0:
        print(f"  {run.run_id}: not started: the deadline {deadline:%Y-%m-%d %H:%M} has passed",
              flush=True)
        return False
    expected = expected_duration(run, timing_history(grid, results))
    if expected is None:
        print(f"  {run.run_id}: nothing like it recorded yet, so its length is unknown; "
              "started anyway", flush=True)
        return True
    if expected * DEADLINE_MARGIN <= left:
        return True
    print(f"  {run.run_id}: not started: runs like it took ~{format_duration(expected)}, "
          f"{format_duration(max(left, 0))} are left before the deadline "
          f"{deadline:%Y-%m-%d %H:%M}", flush=True)
    return False
