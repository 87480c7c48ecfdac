"""Train the single-task teachers of a BAM! grid ahead of its students.

A BAM! run of ``selftune bench`` trains its four teachers one after another before its student
(about 70 minutes per seed here, one thread). Started once per worker with a share of the tasks,
this script trains them in parallel instead, with exactly the options the grid's BAM! variant
gives them, into the grid's ``teachers_root``; the bench run then finds them finished and goes
straight to its student. Finished teachers are skipped; an interrupted one resumes.

    python benchmarks/bam_teachers.py benchmarks/bam.yaml --seeds 1,2 --tasks rte,stsb &
    python benchmarks/bam_teachers.py benchmarks/bam.yaml --seeds 1,2 --tasks mrpc,cola &
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from selftune.bam import BamConfig
from selftune.bench import load_grid, parse_seeds, plan_runs
from selftune.outputs import write_json_atomic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="A grid with a 'teachers: auto' BAM! variant.")
    parser.add_argument("--seeds", required=True, help="e.g. 1,2 or 1-4")
    parser.add_argument("--tasks", required=True, help="This worker's share, e.g. rte,stsb.")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="Where each call's (small) recipe folder goes (default: runs).")
    args = parser.parse_args()

    grid = load_grid(args.grid)
    seeds = parse_seeds(args.seeds)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(grid.tasks))
    if unknown:
        parser.error(f"{unknown} are not tasks of {args.grid} ({grid.tasks})")
    bam_runs = [run for run in plan_runs(grid, args.runs_dir)
                if run.command == "bam" and run.config.teachers == "auto"
                and run.seed in seeds]
    if not bam_runs:
        parser.error(f"{args.grid} has no BAM! variant with 'teachers: auto' for those seeds")
    if any(not run.config.teachers_root for run in bam_runs):
        parser.error(f"{args.grid}: without a teachers_root, a BAM! run keeps its teachers in "
                     "its own run folder, where nothing trained ahead would be found")
    done = set()
    for run in bam_runs:
        config: BamConfig = run.config
        for task in tasks:
            if (run.seed, config.teachers_root, task) in done:
                continue  # variants of one seed share their teachers
            done.add((run.seed, config.teachers_root, task))
            out = args.runs_dir / "bam_teachers" / f"seed{run.seed}-{task}"
            out.mkdir(parents=True, exist_ok=True)
            config_file = out / "bench_run.json"
            write_json_atomic(config_file, dataclasses.replace(
                config, tasks=task, teachers_only=True, output_dir=str(out)).to_dict())
            root = config.teachers_root.format(seed=run.seed)
            print(f"teacher {task}, seed {run.seed} → {root}", flush=True)
            subprocess.run([sys.executable, "-m", "selftune", "bam", "--config",
                            str(config_file)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
