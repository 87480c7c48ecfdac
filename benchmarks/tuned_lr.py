"""Name the tuned learning rate of issue #32 from the baseline's learning-rate sweep, by the rule
BENCHMARKS.md fixed before the sweep's third seed ("Self-distillation at a tuned baseline and at
scale"):

- per task, the rate with the best mean score over the seeds;
- the rate with the best mean over the tasks is used for all of them if, on every task, its mean
  is within one seed standard deviation (of that task's best rate) of that task's best; else each
  task takes its own best rate. Tasks outside the sweep (SST-2, IMDb) take that common rate.

    python benchmarks/tuned_lr.py benchmarks/baseline.results.jsonl \
        benchmarks/baseline_lr.results.jsonl --seeds 0-2

Only cells (task, rate) with every seed asked for are compared; a missing run is named, and no
rate is named until the sweep is complete.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from selftune_experiments.bench import parse_seeds


def load_scores(paths: list[Path], seeds: set[int]) -> dict[tuple[str, float], dict[int, float]]:
    """(task, learning rate) -> {seed: dev score} of the baseline runs in the results files."""
    cells: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            run = json.loads(line)
            if run["strategy"] != "baseline" or run["seed"] not in seeds:
                continue
            cells[(run["task"], float(run["config"]["learning_rate"]))][run["seed"]] = run["score"]
    return cells


def name_rates(cells: dict[tuple[str, float], dict[int, float]]) -> dict:
    """Apply the rule. Returns the per-task statistics, the per-task best, the common rate and
    whether it is used for all tasks."""
    tasks = sorted({task for task, _ in cells})
    rates = sorted({rate for _, rate in cells})
    stats = {cell: (statistics.mean(s.values()), statistics.stdev(s.values()))
             for cell, s in cells.items()}
    best = {task: max(rates, key=lambda rate: stats[(task, rate)][0]) for task in tasks}
    task_mean = {rate: statistics.mean(stats[(task, rate)][0] for task in tasks) for rate in rates}
    common = max(rates, key=task_mean.get)
    within = {task: stats[(task, best[task])][0] - stats[(task, common)][0]
              <= stats[(task, best[task])][1] for task in tasks}
    return {"tasks": tasks, "rates": rates, "stats": stats, "best": best,
            "task_mean": task_mean, "common": common, "within": within,
            "use_common": all(within.values())}


def rate_text(rate: float) -> str:
    """1e-4, not 0.0001: as the grids and BENCHMARKS.md write rates."""
    return f"{rate:.0e}".replace("e-0", "e-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("results", nargs="+", type=Path, help="Results files (JSON Lines).")
    parser.add_argument("--seeds", default="0-2", help="Seeds to compare, e.g. 0-2 or 0,1,2.")
    args = parser.parse_args()
    seeds = set(parse_seeds(args.seeds))

    cells = load_scores(args.results, seeds)
    # A task run at one rate only (baseline.yaml's SST-2) is not part of the sweep.
    rates_of: dict[str, set[float]] = defaultdict(set)
    for task, rate in cells:
        rates_of[task].add(rate)
    swept = {task for task, rates in rates_of.items() if len(rates) > 1}
    cells = {(task, rate): s for (task, rate), s in cells.items() if task in swept}
    missing = [f"{task} lr {rate_text(rate)} seed {seed}"
               for (task, rate), s in sorted(cells.items()) for seed in sorted(seeds - set(s))]
    if missing:
        sys.exit("tuned_lr.py: the sweep is not complete; missing: " + ", ".join(missing))
    named = name_rates(cells)
    stats, best = named["stats"], named["best"]
    print("| task | " + " | ".join(f"lr {rate_text(rate)}" for rate in named["rates"]) + " |")
    print("|---|" + "---:|" * len(named["rates"]))
    for task in named["tasks"]:
        row = []
        for rate in named["rates"]:
            mean, std = stats[(task, rate)]
            text = f"{mean:.2f} ± {std:.2f}"
            row.append(f"**{text}**" if rate == best[task] else text)
        print(f"| {task} | " + " | ".join(row) + " |")
    print("| mean of tasks | " + " | ".join(f"{named['task_mean'][rate]:.2f}"
                                          for rate in named["rates"]) + " |")
    common = named["common"]
    print(f"\nBest mean over the tasks: lr {rate_text(common)}.")
    for task in named["tasks"]:
        best_mean, best_std = stats[(task, best[task])]
        gap = best_mean - stats[(task, common)][0]
        print(f"  {task}: best lr {rate_text(best[task])}; lr {rate_text(common)} is "
              f"{gap:.2f} below it (one seed std of the best: {best_std:.2f}) -> "
              + ("within" if named["within"][task] else "not within"))
    if named["use_common"]:
        print(f"\nTuned learning rate: {rate_text(common)} for every task (SST-2 and IMDb too).")
    else:
        print("\nTuned learning rate per task: "
              + ", ".join(f"{task} {rate_text(best[task])}" for task in named["tasks"])
              + f"; SST-2 and IMDb take the common rate, {rate_text(common)}.")


if __name__ == "__main__":
    main()
