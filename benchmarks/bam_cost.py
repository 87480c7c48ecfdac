"""Cost of the BAM! student against plain multi-task training (issue #5: target ≤ 1.05×).

Trains the single-task teachers once (cached predictions over each training set, as
`selftune bam` does), then trains the multi-task student with those teachers ("bam") and without
them ("multi"), alternating the order between repeats, on the same fixed subsets, and prints the
median training and wall time of each and their ratio. The student's training time includes its
per-epoch dev evaluation and checkpoint, the same for both. Finished runs are kept in
--work-dir and skipped on a restart. Run it alone on the machine.

    python benchmarks/bam_cost.py --data-dir ../shared/data --max-train-samples 500 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def student_run(variant: str, repeat: int, args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    out = work / f"{variant}-{repeat}"
    if not (out / "bam.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "selftune", "bam", "--tasks", args.tasks, "--data-dir",
             args.data_dir, "--max-train-samples", str(args.max_train_samples),
             "--num-train-epochs", str(args.epochs), "--teacher-epochs", str(args.epochs),
             "--teachers", "auto" if variant == "bam" else "none",
             "--teachers-root", str(work / "teachers"), "--output-dir", str(out)],
            check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    student = json.loads((out / "student" / "metrics.json").read_text())
    return {"train_s": student["train_time_s"], "wall_s": student["wall_time_s"],
            "peak_mb": student["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--max-train-samples", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="runs/bam_cost")
    args = parser.parse_args()

    # The first BAM run trains the teachers and caches their predictions; it is not timed, so
    # every timed student reads the cache, as in a grid where the teachers already exist.
    student_run("bam", -1, args)
    runs: dict[str, list[dict]] = {"bam": [], "multi": []}
    for repeat in range(args.repeats):
        for variant in ("bam", "multi") if repeat % 2 == 0 else ("multi", "bam"):
            runs[variant].append(student_run(variant, repeat, args))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print(f"tasks {args.tasks}, {args.max_train_samples} training examples per task, "
          f"{args.epochs:g} epoch(s), defaults otherwise; medians over {args.repeats} "
          f"alternating repeats\n")
    print("| student | train (s) | wall (s) | peak MB |")
    print("|---|---:|---:|---:|")
    for variant in ("multi", "bam"):
        print(f"| {variant} | {median(variant, 'train_s'):.1f} | {median(variant, 'wall_s'):.1f} "
              f"| {median(variant, 'peak_mb'):.0f} |")
    train_ratio = median("bam", "train_s") / median("multi", "train_s")
    wall_ratio = median("bam", "wall_s") / median("multi", "wall_s")
    print(f"\nBAM student / Multi: train time {train_ratio:.3f}×, wall time {wall_ratio:.3f}×")


if __name__ == "__main__":
    main()
