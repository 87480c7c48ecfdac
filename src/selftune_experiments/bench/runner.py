"""Run a grid: claim each run not yet recorded, train it in its own process, record it."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from selftune.errors import SelftuneError
from selftune.outputs import (
    BAM_STUDENT_DIR,
    BENCH_RUN_FILE,
    LOG_FILE,
    directory_lock,
    write_json_atomic,
)
from selftune_experiments.bench.grid import Grid
from selftune_experiments.bench.planning import (
    PlannedRun,
    finished_metrics,
    has_shared_teachers,
    holds_other_config,
    must_train_teacher_again,
    plan_runs,
    students_without_predictions,
    teacher_dirs,
)
from selftune_experiments.bench.results import (
    append_record,
    bam_records,
    make_record,
    read_recorded,
)
from selftune_experiments.bench.schedule import (
    expected_duration,
    fits_before,
    format_duration,
    timing_history,
)


def run_grid(
    grid: Grid, results: Path, runs_dir: Path, dry_run: bool = False,
    max_runs: int | None = None, train_command: list[str] | None = None,
    deadline: datetime | None = None,
) -> dict[str, int]:
    """Run every planned run that is not yet recorded (with a deadline: that is expected to
    finish before it); return counts of what happened."""
    runs = plan_runs(grid, runs_dir)
    recorded = read_recorded(results)

    def is_recorded(run: PlannedRun) -> bool:
        return all((rid, run.hash()) in recorded for rid in run.record_ids())

    for run in runs:  # a teacher's predictions are for the students still to run
        run.students = [student for student in run.students if not is_recorded(student)]
    todo = [r for r in runs if not is_recorded(r) or students_without_predictions(r)]
    print(f"grid {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} already recorded in "
          f"{results}, {len(todo)} to run", flush=True)
    if dry_run:
        _print_plan(todo, timing_history(grid, results))
        return {"planned": len(runs), "done": 0, "failed": 0, "skipped": len(runs) - len(todo)}
    done = failed = busy = deferred = attempted = 0
    durations: list[float] = []
    for index, run in enumerate(todo, start=1):
        if max_runs and attempted >= max_runs:
            break
        remaining = len(todo) - index + 1
        if max_runs:
            remaining = min(remaining, max_runs - attempted)
        eta = f", ETA {format_duration(sum(durations) / len(durations) * remaining)}" \
            if durations else ""
        print(f"[{index}/{len(todo)}] {run.run_id}{eta}", flush=True)
        out = Path(run.config.output_dir or "")
        with directory_lock(out, wait=False) as lock:
            if lock is None:
                busy += 1
                print(f"  {run.run_id} is being run by another 'selftune bench'; left to it",
                      flush=True)
                continue
            if deadline is not None and not fits_before(run, grid, results, deadline):
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


def _print_plan(todo: list[PlannedRun], history: list[dict]) -> None:
    """Each run to do with its expected length, then the total: what a session (or an
    allocation) must hold for the rest of the grid."""
    total, unknown = 0.0, 0
    for run in todo:
        # Teachers planned as runs of their own are listed (and counted) once, as such.
        expected = expected_duration(run, history, with_teachers=not has_shared_teachers(run))
        if expected is None:
            unknown += 1
        else:
            total += expected
        length = "" if expected is None else f" (finished: only {_left_of_finished(run)})" \
            if expected == 0 else f" (~{format_duration(expected)})"
        print(f"  would run {run.run_id}{length}")
    if not todo:
        return
    if unknown == len(todo):
        print("  in all: unknown, nothing like these runs is recorded yet", flush=True)
        return
    rest = f"; {unknown} run(s) with nothing like them recorded yet are not counted" \
        if unknown else ""
    print(f"  in all ~{format_duration(total)} of runs, one after another, by the recorded "
          f"runs like them{rest}", flush=True)


def _left_of_finished(run: PlannedRun) -> str:
    return "its students' teacher predictions to make" if students_without_predictions(run) \
        else "to record"


def _run_claimed(run: PlannedRun, out: Path, results: Path, train_command: list[str] | None,
                 durations: list[float], lock_fd: int) -> bool | None:
    """Run (or find finished) one claimed run and record it: True when recorded here, False
    when another worker had already recorded it, None when it failed."""
    recorded = read_recorded(results)  # another worker may have recorded it since we planned
    if all((rid, run.hash()) in recorded for rid in run.record_ids()) \
            and not students_without_predictions(run):
        print(f"  {run.run_id}: recorded meanwhile by another 'selftune bench'", flush=True)
        return False
    if run.source is not None:
        return _run_ensemble(run, out, results, durations)
    metrics = finished_metrics(out, run)
    if must_train_teacher_again(run):
        print(f"  {run.run_id}: its folder kept no model to make its students' predictions "
              "with; training it again (same options and seed: the same teacher)", flush=True)
        metrics = None
        run.config.overwrite_output_dir = True
    if metrics is None:
        if holds_other_config(out, run):
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
        metrics = finished_metrics(out, run)
        if proc.returncode != 0 or metrics is None:
            log = _log_written_since(run, out, started)
            # A run that fails before its log starts (e.g. a bad option) printed its error.
            where = f"see {log}" if log else "see its error above"
            print(f"  run {run.run_id} failed (exit {proc.returncode}); {where}. Not recorded: "
                  "a rerun of this grid retries it (and fails the same way until the cause is "
                  "fixed)", flush=True)
            return None
        durations.append(time.time() - started)  # a failure, often instant, would skew the ETA
    if not _make_students_predictions(run):
        return None
    for record in ([make_record(run, metrics)] if run.command == "train"
                   else bam_records(run, metrics)):
        # A teacher shared by several BAM! runs of a seed is recorded once.
        append_record(results, record, unless_recorded=True)
    score = metrics.get("score", metrics.get("student_average"))
    print(f"  {run.run_id}: score {score:.2f}", flush=True)
    return True


def _run_ensemble(run: PlannedRun, out: Path, results: Path,
                  durations: list[float]) -> bool | None:
    """A self-ensemble of its source run's saved snapshots: 'selftune ensemble', recorded."""
    source_dir = Path(run.source.config.output_dir or "")
    metrics = finished_metrics(out, run)
    if metrics is None:
        if finished_metrics(source_dir, run.source) is None:
            print(f"  {run.run_id}: waits for {run.source.run_id} to finish", flush=True)
            return False
        started = time.time()
        command = [sys.executable, "-m", "selftune", "ensemble", str(source_dir),
                   "--k", str(run.k), "--output-dir", str(out), "--overwrite-output-dir",
                   "--quiet", *(["--vote"] if run.vote else [])]
        proc = subprocess.run(command)
        metrics = finished_metrics(out, run)
        if proc.returncode != 0 or metrics is None:
            print(f"  run {run.run_id} failed (exit {proc.returncode}); see its error above. "
                  "Not recorded: a rerun of this grid retries it", flush=True)
            return None
        durations.append(time.time() - started)
    append_record(results, make_record(run, metrics), unless_recorded=True)
    print(f"  {run.run_id}: score {metrics['score']:.2f}", flush=True)
    return True


def _make_students_predictions(run: PlannedRun) -> bool:
    """A shared teacher's run ends with the predictions its students will read, made while
    its model is there (git keeps no models); False when they cannot be made."""
    from selftune.recipes.bam import prepare_teacher_predictions

    for student in students_without_predictions(run):
        try:
            cache = prepare_teacher_predictions(student, run.task, Path(run.config.output_dir))
        except SelftuneError as err:
            print(f"  run {run.run_id}: its students' predictions could not be made: {err}. "
                  "Not recorded: a rerun of this grid retries it", flush=True)
            return False
        print(f"  {run.run_id}: predictions for its students in {cache}", flush=True)
    return True


def _log_written_since(run: PlannedRun, out: Path, started: float) -> Path | None:
    """The run's train.log written to last since ``started`` (a BAM! run: its student's or
    a teacher's), or None when its attempt wrote none."""
    logs = [out / LOG_FILE] if run.command == "train" else [
        out / BAM_STUDENT_DIR / LOG_FILE,
        *(d / LOG_FILE for d in teacher_dirs(run, {}).values())]
    written = [(log.stat().st_mtime, log) for log in logs if log.is_file()]
    written = [(mtime, log) for mtime, log in written if mtime >= started - 1]
    return max(written)[1] if written else None
