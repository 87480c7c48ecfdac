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
single-task run of its own (variant ``teacher``) before the students of its seed, which ends
by caching the predictions its students will read (so a teacher folder kept without its model,
as git keeps them, still serves them; a recorded teacher found without those predictions and
without its model is trained again, the same teacher). When a run finishes, one JSON line is
appended to the results file. A restart skips the runs already
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

One module per job: ``grid`` reads and checks grid files, ``planning`` turns a grid into runs
(and reads a run folder's state), ``results`` writes the results file, ``schedule`` estimates
run lengths for a deadline, and ``runner`` runs the grid.
"""

from selftune_experiments.bench.grid import (
    BENCH_CONTROLLED,
    TEACHER_VARIANT,
    Grid,
    check_bench_options,
    check_grid,
    check_name,
    load_grid,
    parse_seeds,
    parse_tasks,
)
from selftune_experiments.bench.planning import PlannedRun, plan_runs
from selftune_experiments.bench.results import (
    MULTITASK_COST_SCOPE,
    RESULTS_SCHEMA,
    append_record,
    bam_records,
    make_record,
    read_recorded,
)
from selftune_experiments.bench.runner import run_grid
from selftune_experiments.bench.schedule import DEADLINE_MARGIN, expected_duration, parse_deadline

__all__ = [
    "BENCH_CONTROLLED",
    "DEADLINE_MARGIN",
    "MULTITASK_COST_SCOPE",
    "RESULTS_SCHEMA",
    "TEACHER_VARIANT",
    "Grid",
    "PlannedRun",
    "append_record",
    "bam_records",
    "check_bench_options",
    "check_grid",
    "check_name",
    "expected_duration",
    "load_grid",
    "make_record",
    "parse_deadline",
    "parse_seeds",
    "parse_tasks",
    "plan_runs",
    "read_recorded",
    "run_grid",
]
