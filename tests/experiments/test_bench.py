"""Experiment grids: resume after an interruption, append-only results, grid files."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from selftune.errors import SelftuneError
from selftune.outputs import directory_lock
from selftune_experiments.bench import (
    Grid,
    append_record,
    expected_duration,
    load_grid,
    make_record,
    parse_deadline,
    parse_seeds,
    parse_tasks,
    plan_runs,
    run_grid,
)
from selftune_experiments.cli import only_variants
from selftune_experiments.report import load_results


@pytest.fixture()
def grid(tiny_model, sentiment_files) -> Grid:
    train, dev = map(str, sentiment_files)
    return Grid(name="t", tasks=["custom"], seeds=[0, 1],
                variants={"base": {}, "fast": {"learning_rate": 2e-2}},
                common={"train_file": train, "validation_file": dev, "model": str(tiny_model),
                        "num_train_epochs": 1, "learning_rate": 1e-2,
                        "per_device_train_batch_size": 16})


def test_interrupted_grid_runs_only_the_rest(grid, tmp_path):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    first = run_grid(grid, results, runs, max_runs=2)  # "killed" after two runs
    assert first["done"] == 2
    recorded = [json.loads(line)["run_id"] for line in results.read_text().splitlines()]
    assert recorded == ["custom__base__seed0", "custom__fast__seed0"]  # seed-major order
    mtime = (runs / "custom__base__seed0" / "metrics.json").stat().st_mtime
    second = run_grid(grid, results, runs)
    assert second == {"planned": 4, "done": 2, "failed": 0, "busy": 0, "deferred": 0,
                      "skipped": 2}
    records, problems = load_results(results)
    assert not problems
    assert sorted(r.run_id for r in records) == sorted(r.run_id for r in plan_runs(grid, runs))
    assert (runs / "custom__base__seed0" / "metrics.json").stat().st_mtime == mtime
    line = json.loads(results.read_text().splitlines()[0])
    for key in ("config_hash", "seed", "metrics", "score", "history", "wall_time_s",
                "train_examples_per_s", "peak_memory_mb", "versions", "machine", "config",
                "resumed_from"):
        assert key in line
    assert line["resumed_from"] is None  # a run trained in one go: its timings count
    # A third invocation has nothing left to do.
    assert run_grid(grid, results, runs)["done"] == 0


def test_finished_but_unrecorded_run_is_recorded_without_training(grid, tmp_path):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    run_grid(grid, results, runs, max_runs=1)
    results.unlink()  # killed after the run finished but before its line was written
    counts = run_grid(grid, results, runs, max_runs=1, train_command=["false"])
    assert counts["done"] == 1 and counts["failed"] == 0


def test_changed_options_rerun(grid, tmp_path):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    grid.seeds, grid.variants = [0], {"base": {}}
    run_grid(grid, results, runs)
    grid.common["num_train_epochs"] = 2
    assert run_grid(grid, results, runs)["done"] == 1  # a new configuration is a new run
    assert len(results.read_text().splitlines()) == 2


def test_a_run_claimed_by_another_worker_is_left_to_it(grid, tmp_path):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    grid.seeds = [0]
    taken = plan_runs(grid, runs)[0]
    # Another worker is training this run:
    with directory_lock(runs / taken.run_id, wait=False) as lock:
        assert lock is not None
        # --max-runs counts only runs this worker ran: it goes past the one held elsewhere.
        counts = run_grid(grid, results, runs, max_runs=1)
    assert counts["busy"] == 1 and counts["done"] == 1
    assert taken.run_id not in results.read_text()
    assert not (runs / taken.run_id).exists()
    # The worker died (its lock with it): the next invocation takes the run over.
    assert run_grid(grid, results, runs)["done"] == 1


def test_a_record_keeps_the_scores_of_a_second_dev_set(grid, tmp_path):
    run = plan_runs(grid, tmp_path / "runs")[0]
    mismatched = {"validation_mismatched": {"metrics": {"accuracy": 61.0}, "score": 61.0}}
    record = make_record(run, {"metrics": {"accuracy": 60.0}, "score": 60.0,
                               "other_splits": mismatched})
    assert record["other_splits"] == mismatched and record["score"] == 60.0
    assert "other_splits" not in make_record(run, {"metrics": {"accuracy": 60.0}, "score": 60.0})


def test_a_killed_workers_training_keeps_its_claim_until_it_ends(grid, tmp_path):
    results, runs = tmp_path / "results.jsonl", tmp_path / "runs"
    grid.seeds, grid.variants = [0], {"base": {}}
    started, release = tmp_path / "started", tmp_path / "release"
    slow_start = tmp_path / "slow_start.py"  # a training that waits for the test's signal
    slow_start.write_text(
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.1)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'selftune', *sys.argv[1:]])\n")
    worker_script = (
        "import json, sys\nfrom pathlib import Path\n"
        "from selftune_experiments.bench import Grid, run_grid\n"
        f"grid = Grid(**json.loads({json.dumps(json.dumps(dataclasses.asdict(grid)))}))\n"
        f"run_grid(grid, Path({str(results)!r}), Path({str(runs)!r}), "
        f"train_command=[sys.executable, {str(slow_start)!r}, 'train'])\n")
    worker = subprocess.Popen([sys.executable, "-c", worker_script])
    try:
        # Generous: on a machine busy with other work, importing torch alone can take minutes.
        deadline = time.time() + 600
        while not started.exists():
            assert worker.poll() is None, "the worker ended before starting its training"
            assert time.time() < deadline, "the worker did not start its training in 10 min"
            time.sleep(0.1)
        worker.kill()  # the worker only: its training goes on
        worker.wait()
        assert run_grid(grid, results, runs)["busy"] == 1
    finally:
        worker.kill()
        release.touch()  # a failed test must not leave the training waiting forever
    (run,) = plan_runs(grid, runs)
    with directory_lock(runs / run.run_id, wait=True):  # the orphaned training has ended
        pass
    counts = run_grid(grid, results, runs, train_command=["false"])  # recorded, not retrained
    assert counts["done"] == 1 and counts["failed"] == 0
    assert run.run_id in results.read_text()


def test_two_workers_share_a_grid_and_train_each_run_once(grid, tmp_path):
    results, runs, log = tmp_path / "results.jsonl", tmp_path / "runs", tmp_path / "calls.log"
    wrapper = tmp_path / "train_and_log.py"
    wrapper.write_text(
        "import os, sys\n"
        f"open({str(log)!r}, 'a').write(sys.argv[-1] + '\\n')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'selftune', *sys.argv[1:]])\n")
    command = [sys.executable, str(wrapper), "train"]
    counts: list[dict] = []
    workers = [threading.Thread(target=lambda: counts.append(
        run_grid(grid, results, runs, train_command=command))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    calls = log.read_text().splitlines()
    assert len(calls) == len(set(calls)) == 4  # every run trained exactly once
    lines = [json.loads(line)["run_id"] for line in results.read_text().splitlines()]
    assert sorted(lines) == sorted(r.run_id for r in plan_runs(grid, runs))
    assert sum(c["done"] for c in counts) == 4 and not any(c["failed"] for c in counts)


def test_a_deadline_starts_only_the_runs_that_fit(grid, tmp_path):
    results = tmp_path / "r.jsonl"
    # Earlier seeds of "base" took 1.5 h (median), those of "fast" 5 min: only "fast" fits
    # in 30 min (and fails at once: the test needs no training).
    for seed in (7, 8, 9):
        for variant, seconds in (("base", 3000 + 300 * seed), ("fast", 300)):
            append_record(results, {"run_id": f"custom__{variant}__seed{seed}",
                                    "config_hash": "old", "task": "custom", "variant": variant,
                                    "seed": seed, "wall_time_s": seconds})
    counts = run_grid(grid, results, tmp_path / "runs", train_command=["false"],
                      deadline=datetime.now() + timedelta(minutes=30))
    assert counts["deferred"] == 2 and counts["failed"] == 2
    assert not (tmp_path / "runs" / "custom__base__seed0").exists()
    # With room for the median (5400 s) and its margin, they are started.
    counts = run_grid(grid, results, tmp_path / "runs", train_command=["false"],
                      deadline=datetime.now() + timedelta(hours=2))
    assert counts["deferred"] == 0 and counts["failed"] == 4
    # A run with nothing alike recorded has an unknown length: it is started.
    grid.tasks = ["other"]  # with the user's own files, any task name
    counts = run_grid(grid, results, tmp_path / "runs", train_command=["false"],
                      deadline=datetime.now() + timedelta(minutes=1))
    assert counts["deferred"] == 0 and counts["failed"] == 4
    # ... but not once the deadline has passed.
    counts = run_grid(grid, results, tmp_path / "runs", train_command=["false"],
                      deadline=datetime.now() - timedelta(minutes=1))
    assert counts["deferred"] == 4 and counts["failed"] == 0


def test_expected_duration_of_a_bam_run_counts_the_teachers_it_must_still_train(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: [rte, stsb]\nseeds: 0-1\n"
                    "common: {pipeline: bam, teachers_root: 't/seed{seed}'}\n"
                    "variants: {multi: {teachers: none}, bam: {teachers: auto}}\n")
    multi, bam = plan_runs(load_grid(path), tmp_path)[-2:]  # seed 1
    recorded = [
        # A student's lines repeat its run's wall time once per task: one run, one entry.
        *({"task": t, "variant": "multi", "seed": 0, "wall_time_s": 4000.0,
           "cost_scope": "multitask-run"} for t in ("rte", "stsb")),
        *({"task": t, "variant": "bam", "seed": 0, "wall_time_s": 3000.0,
           "cost_scope": "multitask-run"} for t in ("rte", "stsb")),
        {"task": "rte", "variant": "teacher", "seed": 0, "wall_time_s": 800.0},
        {"task": "stsb", "variant": "teacher", "seed": 0, "wall_time_s": 1400.0},
        {"task": "stsb", "variant": "baseline", "seed": 0, "wall_time_s": 9999.0},
    ]
    assert expected_duration(multi, recorded) == 4000.0
    assert expected_duration(bam, recorded) == 3000.0 + 800.0 + 1400.0
    assert expected_duration(bam, recorded, with_teachers=False) == 3000.0
    (tmp_path / "t" / "seed1" / "rte").mkdir(parents=True)
    (tmp_path / "t" / "seed1" / "rte" / "metrics.json").write_text("{}")  # trained ahead
    assert expected_duration(bam, recorded) == 3000.0 + 1400.0
    assert expected_duration(bam, recorded[:4]) is None  # stsb's teacher length unknown
    # Teachers trained and the student halfway (its checkpoint): half the student is left.
    (tmp_path / "t" / "seed1" / "stsb").mkdir(parents=True)
    (tmp_path / "t" / "seed1" / "stsb" / "metrics.json").write_text("{}")
    checkpoint = Path(bam.config.output_dir) / "student" / "checkpoints" / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 40, "max_steps": 80}')
    assert expected_duration(bam, recorded) == 1500.0


def test_dry_run_lists_each_run_left_with_its_expected_length_and_the_total(grid, tmp_path,
                                                                            capsys):
    results = tmp_path / "results.jsonl"
    runs = plan_runs(grid, tmp_path / "runs")
    append_record(results, {**make_record(runs[0], {"score": 50.0, "wall_time_s": 600.0}),
                            "machine": {}})
    counts = run_grid(grid, results, tmp_path / "runs", dry_run=True)
    out = capsys.readouterr().out
    assert counts == {"planned": 4, "done": 0, "failed": 0, "skipped": 1}
    assert "would run custom__base__seed0" not in out  # recorded
    # base seed 1 is timed by base seed 0; fast borrows the same task's other variant.
    assert "would run custom__base__seed1 (~10m00s)" in out
    assert "would run custom__fast__seed0 (~10m00s)" in out
    assert "in all ~30m00s of runs" in out and "not counted" not in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_of_a_bam_grid_counts_each_shared_teacher_once(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: [rte, stsb]\nseeds: 0-1\nresults: r.jsonl\n"
                    "common: {pipeline: bam, teachers: auto, teachers_root: 't/seed{seed}'}\n"
                    "variants: {bam: {}}\n")
    grid = load_grid(path)
    seed0 = [r for r in plan_runs(grid, tmp_path / "runs") if r.seed == 0]
    for run in seed0:
        metrics = {"score": 50.0, "wall_time_s": 600.0 if run.variant == "teacher" else 3000.0}
        for task in run.task.split(","):
            append_record(tmp_path / "r.jsonl",
                          {**make_record(run, metrics), "task": task, "machine": {},
                           "run_id": f"{task}__{run.variant}__seed0",
                           **({} if run.variant == "teacher" else
                              {"cost_scope": "multitask-run"})})
    run_grid(grid, tmp_path / "r.jsonl", tmp_path / "runs", dry_run=True)
    out = capsys.readouterr().out
    assert "would run rte__teacher__seed1 (~10m00s)" in out
    assert "would run bam__seed1 (~50m00s)" in out  # its teachers are the lines above
    assert "in all ~1h10m of runs" in out


def test_dry_run_total_says_how_many_runs_it_cannot_estimate(grid, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    run_grid(grid, results, tmp_path / "runs", dry_run=True)
    out = capsys.readouterr().out
    assert "would run custom__base__seed0\n" in out
    assert "in all: unknown, nothing like these runs is recorded yet" in out

    grid.tasks = ["custom", "other"]  # user files: the task name is free
    append_record(results, {**make_record(plan_runs(grid, tmp_path / "runs")[0],
                                          {"score": 50.0, "wall_time_s": 60.0}),
                            "machine": {}})
    run_grid(grid, results, tmp_path / "runs", dry_run=True)
    out = capsys.readouterr().out
    assert "would run other__base__seed0\n" in out
    assert "in all ~3m00s of runs, one after another, by the recorded runs like them; 4 run(s) " \
           "with nothing like them recorded yet are not counted" in out


def test_expected_duration_of_a_resumed_run_is_the_share_still_to_do(grid, tmp_path):
    runs = plan_runs(grid, tmp_path / "runs")
    recorded = [{"task": "custom", "variant": "base", "seed": 9, "wall_time_s": 1000.0},
                # Resumed: its wall time is that of its last attempt, not of a run.
                {"task": "custom", "variant": "base", "seed": 8, "wall_time_s": 10.0,
                 "resumed_from": "checkpoint-70"}]
    run = runs[0]
    assert expected_duration(run, recorded) == 1000.0

    def checkpoint(folder, step, max_steps=200):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "max_steps": max_steps}))

    out = Path(run.config.output_dir)
    checkpoint(out / "checkpoints" / "checkpoint-50", 50)
    checkpoint(out / "checkpoints" / "checkpoint-150", 150)
    assert expected_duration(run, recorded) == 250.0  # a quarter of the steps left
    # A folder left by other options is started over: the full length again.
    (out / "run_config.json").write_text(
        json.dumps({**run.config.to_dict(), "learning_rate": 0.5}))
    assert expected_duration(run, recorded) == 1000.0


def test_expected_duration_prefers_runs_timed_in_this_setting(grid, tmp_path):
    """Runs timed with another thread count (or CPU) are used only when none match."""
    import torch

    from selftune.runinfo import cpu_model

    run = plan_runs(grid, tmp_path / "runs")[0]
    here = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}
    elsewhere = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads() + 1}
    other = [{"task": "custom", "variant": "base", "seed": s, "wall_time_s": 100.0,
              "machine": elsewhere} for s in (1, 2, 3)]
    assert expected_duration(run, other) == 100.0  # nothing else to go by
    alike = [{"task": "custom", "variant": "base", "seed": 4, "wall_time_s": 170.0,
              "machine": here}]
    assert expected_duration(run, other + alike) == 170.0


def test_a_deadline_estimates_from_the_grids_named_in_timings_from(tmp_path):
    # An ablation grid has no runs of its own recorded yet; the main grid's students are as
    # long as its runs, and `timings_from` lets the deadline use them.
    main = tmp_path / "main.results.jsonl"
    for seed in (0, 1):
        append_record(main, {"run_id": f"rte__multi__seed{seed}", "config_hash": "h",
                             "task": "rte", "variant": "multi", "seed": seed,
                             "wall_time_s": 4000.0, "cost_scope": "multitask-run"})
    path = tmp_path / "ablation.yaml"
    grid_text = ("tasks: [rte]\nseeds: 0\ncommon: {pipeline: bam, teachers: none}\n"
                 "variants: {no-sampling: {task_sampling: proportional}}\n")
    path.write_text(grid_text + "timings_from: main.results.jsonl\n")
    grid = load_grid(path)
    assert grid.timings_from == [main]
    counts = run_grid(grid, tmp_path / "a.jsonl", tmp_path / "runs", train_command=["false"],
                      deadline=datetime.now() + timedelta(minutes=30))
    assert counts["deferred"] == 1 and counts["failed"] == 0
    path.write_text(grid_text)  # without it, the length is unknown: started (and fails)
    counts = run_grid(load_grid(path), tmp_path / "a.jsonl", tmp_path / "runs",
                      train_command=["false"], deadline=datetime.now() + timedelta(minutes=30))
    assert counts["deferred"] == 0 and counts["failed"] == 1


def test_parse_deadline():
    now = datetime(2026, 12, 5, 12, 0)
    assert parse_deadline("+2h30m", now) == datetime(2026, 12, 5, 14, 30)
    assert parse_deadline("+45m", now) == datetime(2026, 12, 5, 12, 45)
    assert parse_deadline("13:40", now) == datetime(2026, 12, 5, 13, 40)
    assert parse_deadline("9:05", now) == datetime(2026, 12, 6, 9, 5)  # the next 9:05
    assert parse_deadline("2026-12-07T08:00", now) == datetime(2026, 12, 7, 8, 0)
    for bad in ("soon", "+", "25:00", "+2x"):
        with pytest.raises(SelftuneError, match="--deadline"):
            parse_deadline(bad, now)


def test_truncated_last_line_is_kept_and_reported(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text('{"run_id": "a", "config_hash": "x"')  # killed mid-write
    append_record(results, {"run_id": "b", "config_hash": "y"})
    lines = results.read_text().splitlines()
    assert lines[0] == '{"run_id": "a", "config_hash": "x"'
    assert json.loads(lines[1])["run_id"] == "b"
    # A run recorded already (e.g. a shared teacher, by another worker) is not appended twice.
    assert not append_record(results, {"run_id": "b", "config_hash": "y"}, unless_recorded=True)
    assert append_record(results, {"run_id": "b", "config_hash": "z"}, unless_recorded=True)
    assert len(results.read_text().splitlines()) == 3


def test_failed_run_is_reported_and_retried(grid, tmp_path):
    grid.seeds, grid.variants = [0], {"base": {}}
    counts = run_grid(grid, tmp_path / "r.jsonl", tmp_path / "runs", train_command=["false"])
    assert counts["failed"] == 1 and not (tmp_path / "r.jsonl").exists()


def test_grid_tasks_may_be_a_comma_separated_string(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: rte, mrpc\nseeds: [0-1]\n")
    grid = load_grid(path)
    assert grid.tasks == ["rte", "mrpc"] and grid.seeds == [0, 1]


def test_grid_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\ntasks: [rte, mrpc]\nseeds: 0-2\ncommon: {data_dir: data}\n"
                    "variants: {baseline: {}, big: {learning_rate: 1.0e-4}}\n")
    grid = load_grid(path)
    assert grid.seeds == [0, 1, 2] and grid.results == tmp_path / "g.results.jsonl"
    assert grid.common["data_dir"] == str((tmp_path / "data").resolve())
    planned = plan_runs(grid, tmp_path / "runs")
    assert len(planned) == 12
    assert planned[1].run_id == "rte__big__seed0"
    assert planned[1].config.learning_rate == 1e-4
    # Where the data lives does not change a run's identity.
    assert planned[0].config.hash() == plan_runs(
        Grid("g", ["rte"], [0], {"baseline": {}}, {"data_dir": "/elsewhere"}), tmp_path)[0] \
        .config.hash()


@pytest.mark.parametrize("content, message", [
    ("tasks: [rte]\n", "needs 'seeds'"),
    ("tasks: [rte]\nseeds: 0\nvariant: {}\n", "unknown grid key"),
    ("tasks: [nope]\nseeds: 0\n", "unknown task"),
    ("tasks: [rte]\nseeds: 0\nvariants: {x: {learning_rte: 1}}\n", "unknown option"),
    ("tasks: [rte\n", "cannot parse"),
    ("tasks: [rte]\nseeds: 0\ntask_options: {sst-2: {learning_rate: 1.0e-5}}\n",
     "task_options for \\['sst-2'\\], which are not among the tasks"),
    ("tasks: [rte]\nseeds: 0\ntask_options: {rte: {learning_rate: 1.0e-5}}\n"
     "variants: {multi: {pipeline: bam}}\n", "task_options cannot apply"),
    ("tasks: [rte]\nseeds: 0\nvariants: {bam: {pipeline: bam, finetune_after: true}}\n",
     "finetune_after is not supported in a grid"),
    ("tasks:\nseeds: 0\n", "tasks: a list of task names"),
    ("tasks: []\nseeds: 0\n", "names no task"),
    ("tasks: [rte]\nseeds: [0-4, x]\n", "seeds: cannot read"),
    ("tasks: [rte]\nseeds: 0\nresults: [x]\n", "results is a path"),
])
def test_bad_grid_files(tmp_path, content, message):
    path = tmp_path / "g.yaml"
    path.write_text(content)
    with pytest.raises(SelftuneError, match=message):
        plan_runs(load_grid(path), tmp_path)


def test_parse_seeds():
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert parse_seeds(3) == [3] and parse_seeds([4, 5]) == [4, 5]
    assert parse_seeds(["0-2", 5]) == [0, 1, 2, 5]  # YAML reads [0-2, 5] as a string and an int
    for bad in ("a-b", "4-0", [1.5], "", [], True):
        with pytest.raises(SelftuneError, match="seeds: "):
            parse_seeds(bad)


def test_bam_variants_record_one_line_per_task(tiny_model, glue_dir, tmp_path):
    """Three BAM! variants sharing one teachers_root: every student has a line per task, the
    shared teachers are recorded once (with their own options), Multi gets no teacher lines,
    and a self-distilling student's lines carry its own task's averaged-past score."""
    small = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "teacher_epochs": 1,
             "teacher_batch_size": 4}
    grid = Grid(name="bam", tasks=["rte", "stsb"], seeds=[0],
                variants={"multi": {"pipeline": "bam", "teachers": "none", **small},
                          "bam": {"pipeline": "bam", **small},
                          "bam-sda": {"pipeline": "bam", "strategy": "sda", **small}},
                common={"model": str(tiny_model), "data_dir": str(glue_dir),
                        "teachers_root": str(tmp_path / "teachers-seed{seed}")})
    results = tmp_path / "r.jsonl"
    # The shared teachers are runs of their own, before the students (which find them done).
    assert [r.run_id for r in plan_runs(grid, tmp_path / "runs")][:2] == [
        "rte__teacher__seed0", "stsb__teacher__seed0"]
    counts = run_grid(grid, results, tmp_path / "runs")
    assert counts["done"] == 5 and counts["failed"] == 0
    records, problems = load_results(results)
    assert not problems
    assert sorted(r.run_id for r in records) == sorted(
        f"{task}__{variant}__seed0" for task in ("rte", "stsb")
        for variant in ("multi", "bam", "bam-sda", "teacher"))
    stsb = next(r for r in records if r.run_id == "stsb__bam__seed0")
    assert set(stsb.metrics) == {"pearson", "spearman"}
    assert stsb.cost_scope == "multitask-run" and stsb.teacher_score is None
    teacher = next(r for r in records if r.run_id == "rte__teacher__seed0")
    assert teacher.strategy == "baseline" and teacher.cost_scope is None
    teacher_run = json.loads((tmp_path / "teachers-seed0" / "rte" / "metrics.json").read_text())
    assert teacher.score == teacher_run["score"]
    sda_student = json.loads((tmp_path / "runs" / "bam-sda__seed0" / "student" /
                              "metrics.json").read_text())
    for task in ("rte", "stsb"):
        line = next(r for r in records if r.run_id == f"{task}__bam-sda__seed0")
        assert line.teacher_score == sda_student["teacher_tasks"][task]["score"]
    assert run_grid(grid, results, tmp_path / "runs")["done"] == 0


def test_shared_teacher_runs_leave_the_predictions_their_students_read(tiny_model, glue_dir,
                                                                       tmp_path, capsys):
    """Git keeps a shared teacher's folder without its model, so its own run makes the
    predictions its students will read; a teacher recorded without them (its model gone) is
    trained again, the same teacher, rather than failing its students sessions later."""
    from selftune.recipes.bam import teacher_predictions_file

    small = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "teacher_epochs": 1,
             "teacher_batch_size": 4}
    root = tmp_path / "teachers-seed0"
    grid = Grid(name="bam", tasks=["rte", "stsb"], seeds=[0],
                variants={"bam": {"pipeline": "bam", **small}},
                common={"model": str(tiny_model), "data_dir": str(glue_dir),
                        "teachers_root": str(tmp_path / "teachers-seed{seed}")})
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    student = next(r for r in plan_runs(grid, runs) if r.variant == "bam").config
    caches = {task: teacher_predictions_file(root / task, task, student)
              for task in ("rte", "stsb")}
    assert caches["stsb"].name == "train_predictions.both-orders.jsonl"

    assert run_grid(grid, results, runs, max_runs=2)["done"] == 2  # the two teachers only
    assert all(cache.is_file() for cache in caches.values())
    first_score = json.loads((root / "rte" / "metrics.json").read_text())["score"]

    # What a fresh checkout holds of the teachers (.gitignore), less rte's predictions: as
    # if its model had been lost before they were made.
    kept = ("run_config.json", "metrics.json", caches["stsb"].name)
    for path in root.glob("*/*"):
        if path.name not in kept:
            path.unlink() if path.is_file() else shutil.rmtree(path)
    caches["rte"].unlink(missing_ok=True)
    assert run_grid(grid, results, runs, dry_run=True)["skipped"] == 1  # stsb's teacher
    assert "would run rte__teacher__seed0 (~" in capsys.readouterr().out  # to train, not 0 s

    counts = run_grid(grid, results, runs)
    assert counts["done"] == 2 and counts["failed"] == 0
    assert "rte__teacher__seed0: its folder kept no model" in capsys.readouterr().out
    assert caches["rte"].is_file() and not (root / "stsb" / "config.json").is_file()
    assert json.loads((root / "rte" / "metrics.json").read_text())["score"] == first_score
    lines = [json.loads(line)["run_id"] for line in results.read_text().splitlines()]
    assert sorted(lines) == sorted(["rte__teacher__seed0", "stsb__teacher__seed0",
                                    "rte__bam__seed0", "stsb__bam__seed0"])


def test_two_workers_share_a_bam_seed_teachers_first(tiny_model, glue_dir, tmp_path):
    """Two workers on one BAM! seed: each teacher is claimed by one of them, and a student
    that reaches a teacher still in training waits for it instead of training it again."""
    small = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "teacher_epochs": 1,
             "teacher_batch_size": 4}
    grid = Grid(name="bam", tasks=["rte", "stsb"], seeds=[0],
                variants={"bam": {"pipeline": "bam", **small}},
                common={"model": str(tiny_model), "data_dir": str(glue_dir),
                        "teachers_root": str(tmp_path / "teachers-seed{seed}")})
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    counts: list[dict] = []
    workers = [threading.Thread(target=lambda: counts.append(run_grid(grid, results, runs)))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sum(c["done"] for c in counts) == 3 and not any(c["failed"] for c in counts)
    lines = [json.loads(line)["run_id"] for line in results.read_text().splitlines()]
    assert sorted(lines) == sorted(["rte__teacher__seed0", "stsb__teacher__seed0",
                                    "rte__bam__seed0", "stsb__bam__seed0"])
    for task in ("rte", "stsb"):  # trained once (train.log is appended to by every run)
        log = (tmp_path / "teachers-seed0" / task / "train.log").read_text()
        assert log.count("Done: ") == 1


def test_pipeline_in_common_makes_every_variant_a_bam_run(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: [rte, stsb]\nseeds: 0-1\n"
                    "common: {pipeline: bam, teachers_root: 'runs/t-seed{seed}'}\n"
                    "variants: {a: {layerwise_lr_decay: 1.0}, b: {task_sampling: uniform}}\n")
    runs = plan_runs(load_grid(path), tmp_path)
    # Both variants share the teachers of a seed: planned once, as single-task runs.
    assert [(r.run_id, r.command) for r in runs] == [
        ("rte__teacher__seed0", "train"), ("stsb__teacher__seed0", "train"),
        ("a__seed0", "bam"), ("b__seed0", "bam"),
        ("rte__teacher__seed1", "train"), ("stsb__teacher__seed1", "train"),
        ("a__seed1", "bam"), ("b__seed1", "bam")]
    assert runs[2].config.tasks == "rte,stsb" and runs[2].config.layerwise_lr_decay == 1.0
    # Like every path in a grid, relative to the grid file; the seed is filled in by the run.
    root = tmp_path.resolve() / "runs"
    assert runs[3].config.teachers_root == str(root / "t-seed{seed}")
    teacher = runs[4].config
    assert teacher.output_dir == str(root / "t-seed1" / "rte") and teacher.seed == 1
    # The teachers' own options, not the students' (layerwise_lr_decay 1.0 is a's).
    assert teacher.learning_rate == runs[2].config.teacher_learning_rate
    assert teacher.layerwise_lr_decay == runs[2].config.teacher_layerwise_lr_decay


def test_yaml_exponent_strings_become_numbers(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: [rte]\nseeds: 0\nvariants: {fast: {learning_rate: 1e-4}}\n")
    run = plan_runs(load_grid(path), tmp_path)[0]
    assert run.config.learning_rate == 1e-4
    from selftune.config import TrainConfig

    # The run's identity is the same whether read from the grid or from its saved options.
    assert TrainConfig.from_dict(run.config.to_dict()).hash() == run.config.hash()


@pytest.mark.parametrize("variants, message", [
    ("[a, b]", "'variants' maps a name to its options"),
    ("{a: lr1e-4}", "options are a mapping of option names to values, not 'lr1e-4'"),
])
def test_malformed_variants_are_named_errors(variants, message, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(f"tasks: [rte]\nseeds: 0\nvariants: {variants}\n")
    with pytest.raises(SelftuneError, match=message):
        load_grid(path)


def test_a_variants_data_dir_is_relative_to_the_grid_file(tmp_path):
    path = tmp_path / "grids" / "g.yaml"
    path.parent.mkdir()
    path.write_text("tasks: [rte]\nseeds: 0\nvariants: {other: {data_dir: ../data}}\n")
    assert load_grid(path).variants["other"]["data_dir"] == str(tmp_path.resolve() / "data")


def test_an_unfinished_bam_run_of_other_options_is_redone(tmp_path):
    """A BAM! run writes its bam.json only at the end: until then the options it was started
    with are in bench_run.json, and a grid that changed meanwhile must not resume it."""
    from selftune_experiments.bench.planning import holds_other_config

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("name: g\ntasks: [rte]\nseeds: [0]\n"
                         "variants: {bam: {pipeline: bam}}\n")
    run = plan_runs(load_grid(grid_file), tmp_path / "runs")[0]
    out = tmp_path / "runs" / run.run_id
    out.mkdir(parents=True)
    assert not holds_other_config(out, run)  # nothing started yet
    (out / "bench_run.json").write_text(json.dumps(run.config.to_dict()))
    assert not holds_other_config(out, run)
    (out / "bench_run.json").write_text(json.dumps({**run.config.to_dict(),
                                                    "learning_rate": 3e-4}))
    assert holds_other_config(out, run)


def bench_cli(capsys, monkeypatch, tmp_path, *argv: str) -> tuple[int, str, str]:
    from selftune.cli import main

    monkeypatch.chdir(tmp_path)  # a default results file or runs folder lands here
    code = main(["bench", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    """A one-line 'selftune: error: ...' and exit status 2, never a traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("selftune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


QUICK = ("--tasks", "rte", "--seeds", "0", "--dry-run")


@pytest.mark.parametrize("argv, fragments", [
    (["--variant", ""], ["is empty"]),
    (["--variant", ":learning_rate=1e-4"], ["is empty"]),
    (["--variant", "a/b:learning_rate=1e-4"], ["'a/b' cannot name a folder"]),
    (["--variant", ".."], ["'..' cannot name a folder"]),
    (["--name", "../../evil"], ["--name", "'../../evil' cannot name a folder"]),
    (["--variant", "a", "--variant", "a:learning_rate=1e-4"], ["'a' is given twice"]),
    (["--variant", "a:learning_rate=1e-4,learning_rate=2e-4"], ["learning_rate is given twice"]),
    (["--set", "output_dir=runs/shared"], ["--set: output_dir is set by 'selftune bench'",
                                           "--runs-dir"]),
    (["--set", "overwrite_output_dir=true"], ["--set: overwrite_output_dir"]),
    (["--set", "resume=false"], ["--set: resume"]),
    (["--set", "seed=3"], ["--set: seed", "--seeds"]),
    (["--variant", "a:output_dir=elsewhere"], ["--variant a: output_dir", "--runs-dir"]),
    (["--variant", "low:learning_rate=-1"], ["grid variant 'low' (rte)",
                                             "--learning-rate must be positive"]),
])
def test_bench_command_line_mistakes_are_one_line_errors(argv, fragments, capsys, monkeypatch,
                                                         tmp_path):
    code, out, err = bench_cli(capsys, monkeypatch, tmp_path, *QUICK, *argv)
    assert_refused(code, err, *fragments)
    assert "would run" not in out and not any(tmp_path.iterdir())


@pytest.mark.parametrize("content, message", [
    ("variants: {'': {}}\n", "variant name is empty"),
    ("variants: {'a/b': {}}\n", "variant name 'a/b' cannot name a folder"),
    ("variants: {0.5: {}}\n", "variant name 0.5 is not a string"),
    ("variants: {a__seed0: {}}\n", "variant name 'a__seed0' cannot name a folder"),
    ("variants: {teacher: {}}\n", "'teacher' is taken by the BAM! teachers"),
    ("name: ../evil\n", "grid name .* '../evil' cannot name a folder"),
    ("variants:\n  a: {learning_rate: 1.0e-4}\n  a: {learning_rate: 2.0e-4}\n",
     "'a' is given twice \\(lines 4 and 5\\); the second would silently replace"),
    ("common: {learning_rate: 1.0e-4, learning_rate: 2.0e-4}\n", "'learning_rate' is given twice"),
    ("common: {output_dir: runs/shared}\n", "common options .*output_dir is set by 'selftune "
                                            "bench'.*--runs-dir"),
    ("variants: {a: {overwrite_output_dir: true}}\n", "grid variant 'a': overwrite_output_dir"),
    ("task_options: {rte: {seed: 3}}\n", "task_options of rte: seed is set by"),
    ("variants: {a: {resume: false}}\n", "grid variant 'a': resume is set by"),
    ("variants: {low: {learning_rate: -1}}\n", "grid variant 'low' \\(rte\\): --learning-rate "
                                               "must be positive"),
    ("variants: {b: {pipeline: bam, teacher_learning_rate: -1}}\n",
     "grid variant 'b': --teacher-learning-rate, --teacher-epochs and --teacher-batch-size "
     "must be positive"),
    ("variants: {b: {pipeline: bam, teacher_layerwise_lr_decay: 2}}\n",
     "grid variant 'b', its rte teacher: --layerwise-lr-decay must be in"),
    ("variants: {b: {pipeline: bam, learning_rate: -1}}\n",
     "grid variant 'b': --learning-rate must be positive"),
    # The recipe's own checks, at planning rather than after the teachers' hours:
    ("variants: {b: {pipeline: bam, distill_weight: 0.3}}\n",
     "grid variant 'b': --distill-weight does nothing with --teacher-annealing linear"),
    ("variants: {b: {pipeline: bam, teachers_root: 't/{task}'}}\n",
     "grid variant 'b': --teachers-root .*t/{task}: only '{seed}' may stand in braces"),
    ("common: {pipeline: bam, teachers_root: 't/seed{seed}'}\n"
     "variants: {a: {}, b: {teacher_epochs: 1}}\n",
     "variant 'b' shares the teachers in .*t/seed0 with another variant but trains them with "
     "other teacher options"),
])
def test_grid_files_with_unsafe_names_duplicates_or_options_bench_sets_are_refused(
        content, message, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: [rte]\nseeds: 0\n" + content)
    with pytest.raises(SelftuneError, match=message):
        plan_runs(load_grid(path), tmp_path)


def test_a_json_grid_with_a_variant_given_twice_is_refused(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"tasks": ["rte"], "seeds": 0, "variants": {"a": {}, "a": {}}}')
    with pytest.raises(SelftuneError, match="'a' is given twice"):
        load_grid(path)


def test_a_task_given_twice_or_an_unsafe_task_name_is_refused(tmp_path):
    with pytest.raises(SelftuneError, match=r"\['rte'\] given twice"):
        parse_tasks("rte,mrpc,rte")
    with pytest.raises(SelftuneError, match="task '../x' cannot name a folder"):
        plan_runs(Grid("g", ["../x"], [0], common={"train_file": "t.csv"}), tmp_path)


def test_a_failed_run_points_to_its_log_only_when_it_wrote_one(grid, tmp_path, capsys):
    grid.seeds, grid.variants = [0], {"base": {}}
    # Failed before its log started (e.g. a bad option): its error was printed above.
    counts = run_grid(grid, tmp_path / "r.jsonl", tmp_path / "runs", train_command=["false"])
    out = capsys.readouterr().out
    assert counts["failed"] == 1
    assert "train.log" not in out and "see its error above" in out
    assert "a rerun of this grid retries it" in out and "will be retried" not in out
    # Failed after writing its log: the message names it.
    log = tmp_path / "runs" / "custom__base__seed0" / "train.log"
    write_log_then_fail = [sys.executable, "-c",
                           f"import pathlib, sys; pathlib.Path({str(log)!r}).write_text('x'); "
                           "sys.exit(1)"]
    run_grid(grid, tmp_path / "r.jsonl", tmp_path / "runs", train_command=write_log_then_fail)
    assert f"see {log}" in capsys.readouterr().out


def test_an_ensemble_variant_records_the_self_ensemble_of_its_sources_snapshots(grid,
                                                                              tmp_path):
    from safetensors.torch import load_file

    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    grid.seeds = [0]
    grid.variants = {"se": {"pipeline": "ensemble", "from": "base", "k": 2, "vote": True},
                     "base": {"save_snapshots": 3, "snapshot_interval": 1}}
    planned = plan_runs(grid, runs)
    assert [r.run_id for r in planned] == ["custom__base__seed0", "custom__se__seed0"]
    assert planned[1].hash() != planned[0].hash()
    counts = run_grid(grid, results, runs)
    assert counts["done"] == 2 and counts["failed"] == 0
    records = {r["variant"]: r for r in map(json.loads, results.read_text().splitlines())}
    se = records["se"]
    assert se["strategy"] == "se" and se["config"]["ensemble_of"] == "custom__base__seed0"
    assert se["score"] == json.loads((runs / "custom__se__seed0" / "metrics.json").read_text())[
        "score"]
    # The model is the mean of the source's two newest snapshots.
    saved = load_file(str(runs / "custom__base__seed0" / "snapshots.safetensors"))
    model = load_file(str(runs / "custom__se__seed0" / "model.safetensors"))
    mean = (saved["snapshot.1.classifier.weight"] + saved["snapshot.2.classifier.weight"]) / 2
    assert (model["classifier.weight"] - mean).abs().max() < 1e-6
    assert run_grid(grid, results, runs)["done"] == 0  # recorded: nothing to do again
    report_records, problems = load_results(results)
    assert {r.variant for r in report_records} == {"base", "se"} and not problems


@pytest.mark.parametrize("options, message", [
    ({"pipeline": "ensemble", "from": "nope"}, "'from' names the trained variant"),
    ({"pipeline": "ensemble", "from": "base", "k": 9}, "k must be a whole number from 1 to"),
    ({"pipeline": "ensemble", "from": "base", "lr": 1}, "takes only from, k and vote"),
])
def test_bad_ensemble_variants_are_refused_when_planned(options, message, grid, tmp_path):
    grid.variants = {"base": {"save_snapshots": 3, "snapshot_interval": 2}, "se": options}
    with pytest.raises(SelftuneError, match=message):
        plan_runs(grid, tmp_path / "runs")


ONLY_GRID = """\
tasks: [rte]
seeds: 0-1
variants:
  baseline: {save_snapshots: 2, snapshot_interval: 0.5ep}
  sda: {strategy: sda, sd_k: 2}
  ema: {strategy: ema}
  se: {pipeline: ensemble, from: baseline, k: 2}
"""


def test_only_variants_runs_those_of_the_grid_with_their_own_options(capsys, monkeypatch,
                                                                     tmp_path):
    (tmp_path / "g.yaml").write_text(ONLY_GRID)
    code, whole, _ = bench_cli(capsys, monkeypatch, tmp_path, "g.yaml", "--dry-run")
    assert code == 0
    code, some, _ = bench_cli(capsys, monkeypatch, tmp_path, "g.yaml", "--dry-run",
                              "--only-variants", "ema,se,baseline")
    assert code == 0
    # The grid's order, not the option's; each run listed as in the whole grid.
    listed = [line for line in some.splitlines() if "__seed" in line]
    assert [line.split()[-1] for line in listed] == [
        f"rte__{variant}__seed{seed}" for seed in (0, 1) for variant in ("baseline", "ema", "se")]
    assert all(line in whole.splitlines() for line in listed)
    # The same runs: same ids, same options (a run recorded by the whole grid is skipped).
    plan = {r.run_id: r.hash() for r in plan_runs(load_grid(tmp_path / "g.yaml"), tmp_path)}
    selected = load_grid(tmp_path / "g.yaml")
    selected.variants = only_variants(selected.variants, ["ema", "baseline"])
    assert {r.run_id: r.hash() for r in plan_runs(selected, tmp_path)}.items() <= plan.items()


@pytest.mark.parametrize("names, fragments", [
    ("sda,nope", ["--only-variants: nope", "baseline, sda, ema, se"]),
    ("se", ["se is built from baseline", "name baseline too"]),
    (",", ["no name given"]),
])
def test_only_variants_mistakes_are_one_line_errors(names, fragments, capsys, monkeypatch,
                                                    tmp_path):
    (tmp_path / "g.yaml").write_text(ONLY_GRID)
    code, out, err = bench_cli(capsys, monkeypatch, tmp_path, "g.yaml", "--dry-run",
                               "--only-variants", names)
    assert_refused(code, err, *fragments)
    assert "would run" not in out
