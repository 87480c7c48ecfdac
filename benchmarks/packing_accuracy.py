"""Issue #35's accuracy check: do packed batches train as well as padded ones?

A packed step sees the same examples, loss and gradient as the padded step up to float rounding,
but rounding differences compound over a run, so two runs of one seed end apart by about what
two seeds do. The check, fixed before the last seed's packed runs (BENCHMARKS.md, Performance):
per task, the packed baselines against the padded baselines at the same learning rate, paired
by seed; paired t-test (Wilcoxon beside it), Holm over the tasks. A task "matches within seed
noise" when its Holm p is at least 0.05 and the mean difference is at most two seed standard
deviations of the padded runs.

    python benchmarks/packing_accuracy.py --packed benchmarks/sd_tuned.results.jsonl \
        --padded benchmarks/baseline.results.jsonl benchmarks/baseline_lr.results.jsonl \
        --seeds 0-2

Runs are matched by (task, learning rate, seed): each packed task is compared at the rate its
packed runs used. Only baseline runs count; a padded run is one whose config says
`packing: false` or has no `packing` key (the runs from before packing existed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from selftune_experiments.bench import parse_seeds
from selftune_experiments.stats import compare, holm_adjust

ALPHA = 0.05
MAX_DIFF_IN_SEED_STDS = 2.0

Cells = dict[tuple[str, float], dict[int, float]]


def load_baselines(paths: list[Path], seeds: set[int], packed: bool) -> Cells:
    """(task, learning rate) -> {seed: dev score} of the baseline runs with that packing."""
    cells: Cells = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            run = json.loads(line)
            config = run["config"]
            if (run["strategy"] != "baseline" or run["seed"] not in seeds
                    or bool(config.get("packing", False)) != packed
                    or config.get("group_by_length")):
                continue
            cells[(run["task"], float(config["learning_rate"]))][run["seed"]] = run["score"]
    return cells


def check(packed: Cells, padded: Cells, seeds: set[int]) -> list[dict]:
    """One row per packed task with every seed on both sides; the Holm family is those rows."""
    rows = []
    for (task, rate), packed_scores in sorted(packed.items()):
        padded_scores = padded.get((task, rate), {})
        missing = sorted(seeds - set(packed_scores) | seeds - set(padded_scores))
        if missing:
            rows.append({"task": task, "rate": rate, "missing": missing})
            continue
        result = compare(padded_scores, packed_scores, alpha=ALPHA)
        rows.append({
            "task": task, "rate": rate, "missing": [],
            "packed": statistics.mean(packed_scores.values()),
            "packed_std": statistics.stdev(packed_scores.values()),
            "padded": statistics.mean(padded_scores.values()),
            "padded_std": statistics.stdev(padded_scores.values()),
            "diffs": [packed_scores[s] - padded_scores[s] for s in sorted(seeds)],
            "comparison": result,
        })
    complete = [row for row in rows if not row["missing"]]
    holm_ps = holm_adjust([row["comparison"].p for row in complete])
    for row, holm in zip(complete, holm_ps, strict=True):
        row["holm_p"] = holm
        within = abs(row["comparison"].diff) <= MAX_DIFF_IN_SEED_STDS * row["padded_std"]
        row["matches"] = holm is not None and holm >= ALPHA and within
    return rows


def fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2f}"


def render(rows: list[dict]) -> str:
    lines = [
        "| task | lr | padded | packed | packed − padded per seed | mean diff ± std | "
        "t p | Wilcoxon p | Holm p | matches |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["missing"]:
            lines.append(f"| {row['task']} | {row['rate']:g} | seeds missing: "
                         f"{', '.join(map(str, row['missing']))} | | | | | | | |")
            continue
        c = row["comparison"]
        per_seed = " / ".join(f"{d:+.2f}" for d in row["diffs"])
        lines.append(
            f"| {row['task']} | {row['rate']:g} | {row['padded']:.2f} ± {row['padded_std']:.2f} "
            f"| {row['packed']:.2f} ± {row['packed_std']:.2f} | {per_seed} "
            f"| {c.diff:+.2f} ± {c.diff_std:.2f} | {fmt_p(c.t_p)} | {fmt_p(c.wilcoxon_p)} "
            f"| {fmt_p(row['holm_p'])} | {'yes' if row['matches'] else 'no'} |")
    complete = [row for row in rows if not row["missing"]]
    if complete and len(complete) == len(rows):
        mean_diff = statistics.mean(row["comparison"].diff for row in complete)
        lines.append("")
        lines.append(f"Mean of the {len(complete)} tasks: padded "
                     f"{statistics.mean(r['padded'] for r in complete):.2f}, packed "
                     f"{statistics.mean(r['packed'] for r in complete):.2f} "
                     f"(difference {mean_diff:+.2f}).")
        verdict = all(row["matches"] for row in complete)
        lines.append(f"Every task matches within seed noise: {'yes' if verdict else 'no'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", type=Path, nargs="+", required=True,
                        help="results files holding the packed baseline runs")
    parser.add_argument("--padded", type=Path, nargs="+", required=True,
                        help="results files holding the padded baseline runs")
    parser.add_argument("--seeds", default="0-2", help="seeds to pair, e.g. 0-2 or 0,1,2")
    args = parser.parse_args(argv)
    for path in [*args.packed, *args.padded]:
        if not path.is_file():
            parser.error(f"no results file {path}")
    seeds = set(parse_seeds(args.seeds))
    rows = check(load_baselines(args.packed, seeds, packed=True),
                 load_baselines(args.padded, seeds, packed=False), seeds)
    if not rows:
        print("no packed baseline runs in the files given", file=sys.stderr)
        return 1
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
