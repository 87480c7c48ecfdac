"""The ``bench`` and ``report`` commands (experiment grids and their statistics), which the
``selftune`` command line offers beside its own. Building their options imports neither the
harness's runner nor anything heavy: that happens when a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from selftune.cli.common import Commands, HelpFormatter, add_common
from selftune.config import int_at_least
from selftune.errors import SelftuneError
from selftune_experiments.bench import (
    DEADLINE_MARGIN,
    Grid,
    check_bench_options,
    check_name,
    load_grid,
    parse_deadline,
    parse_seeds,
    parse_tasks,
    run_grid,
)

BENCH_EPILOG = """\
examples:
  selftune bench benchmarks/baseline.yaml
  selftune bench --name quick --tasks rte,mrpc --seeds 0-2 --set data_dir=../shared/data \\
      --variant baseline --variant 'lr1e-4:learning_rate=1e-4' --results quick.jsonl
  selftune report benchmarks/baseline.results.jsonl --baseline baseline

Each finished run appends one JSON line to the results file. Kill the grid at any time and
run the same command again: recorded runs are skipped, an interrupted run resumes from its last
checkpoint. Several machines may append to the same file (timings are comparable only between
runs on the same machine; metrics are comparable everywhere).

Several workers may run one grid at once: start the same command twice (e.g. with
OMP_NUM_THREADS=1 each on a 2-core machine, 1.2x the throughput of one 2-thread worker here).
Each run is claimed by one worker and by the training it starts: if a worker is killed, its
training goes on and a later worker records it; a run whose training died too is resumed by
the next worker to reach it.
"""


def register(commands: Commands) -> None:
    """Add the harness's commands, bench and report, to selftune's command line."""
    _add_bench(commands)
    _add_report(commands)


def _add_bench(commands: Commands) -> None:
    bench = commands.add_parser(
        "bench", help="Run a resumable multi-seed grid of tasks x strategies x seeds.",
        description="Run a grid of 'selftune train' runs, one per task, variant and seed (a "
                    "'pipeline: bam' variant: one 'selftune bam' per seed), and "
                    "record each finished run as a line of a JSON Lines results file.",
        formatter_class=HelpFormatter, epilog=BENCH_EPILOG)
    bench.add_argument("grid", nargs="?", help="Grid file (.yaml, .toml or .json).")
    bench.add_argument("--name", help="Grid name when given on the command line.")
    bench.add_argument("--tasks", help="Comma-separated tasks (overrides the grid file).")
    bench.add_argument("--seeds", help="Seeds, e.g. 0-4 or 0,1,2 (overrides the grid file).")
    bench.add_argument("--variant", action="append", default=[], metavar="NAME[:K=V,...]",
                       help="A variant: a name and its options, e.g. "
                            "'lr1e-4:learning_rate=1e-4'. Repeatable; replaces the grid's.")
    bench.add_argument("--only-variants", metavar="NAMES",
                       help="Run only these of the grid's variants (comma-separated), e.g. its "
                            "baseline before the variants that wait for another grid's "
                            "verdict. Their runs are the same as in the whole grid.")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="An option of every run (a 'selftune train' option name with "
                            "underscores), e.g. data_dir=../shared/data. Repeatable.")
    bench.add_argument("--results", help="Results file (default: from the grid, else "
                                         "<grid>.results.jsonl).")
    bench.add_argument("--runs-dir", dest="runs_dir",
                       help="Where run directories go (default: runs/bench/<grid name>).")
    bench.add_argument("--dry-run", action="store_true",
                       help="List the runs still to do, the expected length of each (the median "
                            "of the recorded runs most like it) and their total.")
    bench.add_argument("--max-runs", type=int_at_least(1), help="Stop after this many runs.")
    bench.add_argument("--deadline", metavar="WHEN",
                       help="Start only the runs expected to finish by WHEN: +2h30m (from "
                            "now), 13:40 (the next such local time) or 2026-12-05T13:40. A "
                            "run's expected length is the median wall time of the recorded runs "
                            "of its task and variant (other seeds; else of its task in any "
                            "variant; for a BAM! student, of the students, plus its teachers "
                            "not trained yet), timed on this CPU with this many threads if any "
                            f"were, x{DEADLINE_MARGIN}; for a run that resumes, the share of it "
                            "still to do. Results files named in the grid's timings_from "
                            "count too. A run that does not fit is left for later and shorter "
                            "ones are still started.")
    add_common(bench)
    bench.set_defaults(_run=run_bench)


def _add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report", help="Tables (mean ± std, paired tests) and plots from a results file.",
        description="Summarize a results file: per task and variant the mean ± std over seeds, "
                    "the paired difference to a baseline variant with a paired t-test and a "
                    "Wilcoxon signed-rank test (Mann-Whitney U when unpaired) and the p "
                    "adjusted (Holm-Bonferroni) for all the comparisons the report makes, the "
                    "mean across tasks, costs, and PNG plots.",
        formatter_class=HelpFormatter)
    report.add_argument("results", nargs="+",
                        help="Results file(s) written by 'selftune bench'; several files are "
                             "read as one set of runs.")
    report.add_argument("--baseline",
                        help="Variant to compare against (default: 'baseline' when the results "
                             "have it; 'none' for no comparison).")
    report.add_argument("--out-dir", dest="out_dir",
                        help="Where report.md and the plots go (default: <results dir>/report).")
    report.add_argument("--tasks",
                        help="Comma-separated tasks to report (default: every task in the "
                             "results), e.g. to leave out a task the compared grid did not run.")
    report.add_argument("--variants",
                        help="Comma-separated variants to report (default: all; the baseline "
                             "is always kept).")
    add_common(report)
    report.set_defaults(_run=run_report)


def _parse_value(text: str):
    return yaml.safe_load(text)


def _key_values(items: list[str], what: str) -> dict:
    values = {}
    for item in items:
        if "=" not in item:
            raise SelftuneError(f"{what} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in values:  # the last would silently win
            raise SelftuneError(f"{what}: {key} is given twice; give each option once")
        values[key] = _parse_value(value)
    return values


def run_bench(args: argparse.Namespace) -> int:
    if args.grid:
        grid = load_grid(Path(args.grid))
    else:
        if not (args.tasks and args.seeds):
            raise SelftuneError("give a grid file, or --tasks and --seeds")
        grid = Grid(name=args.name or "grid", tasks=[], seeds=[])
    if args.name:
        grid.name = args.name
    if args.tasks:
        grid.tasks = parse_tasks(args.tasks)
    if args.seeds:
        grid.seeds = parse_seeds(args.seeds)
    sets = _key_values(args.set, "--set")
    check_bench_options(sets, "--set")
    grid.common.update(sets)
    if args.variant:
        grid.variants = {}
        for spec in args.variant:
            name, _, options = spec.partition(":")
            check_name(name, f"--variant {spec!r}: the name")
            if name in grid.variants:
                raise SelftuneError(f"--variant {name!r} is given twice; give each variant "
                                    "once, with all its options: "
                                    "'NAME:KEY=VALUE,KEY=VALUE'")
            where = f"--variant {name}"
            grid.variants[name] = _key_values([o for o in options.split(",") if o], where)
            check_bench_options(grid.variants[name], where)
    if args.only_variants:
        grid.variants = only_variants(grid.variants, _names(args.only_variants) or [])
    check_name(grid.name, "--name" if args.name else "grid name")
    results = Path(args.results) if args.results else grid.results or Path(
        f"{grid.name}.results.jsonl")
    runs_dir = Path(args.runs_dir) if args.runs_dir else grid.runs_dir or (
        Path("runs") / "bench" / grid.name)
    deadline = parse_deadline(args.deadline) if args.deadline else None
    counts = run_grid(grid, results, runs_dir, dry_run=args.dry_run, max_runs=args.max_runs,
                      deadline=deadline)
    if not args.dry_run:
        busy = f", {counts['busy']} left to other workers" if counts["busy"] else ""
        late = f", {counts['deferred']} would not finish by the deadline" \
            if counts["deferred"] else ""
        print(f"grid {grid.name}: {counts['done']} runs recorded, {counts['failed']} failed, "
              f"{counts['skipped']} were already recorded{busy}{late}; results in {results}")
    return 1 if counts["failed"] else 0


def run_report(args: argparse.Namespace) -> int:
    from selftune_experiments.report import load_results, write_report

    baseline = args.baseline
    if baseline is None:
        variants = {r.variant for path in args.results for r in load_results(Path(path))[0]}
        baseline = "baseline" if "baseline" in variants else None
    elif baseline in ("none", ""):
        baseline = None
    out_dir = Path(args.out_dir) if args.out_dir else None
    print(write_report([Path(p) for p in args.results], out_dir, baseline,
                       tasks=_names(args.tasks), variants=_names(args.variants)))
    return 0


def only_variants(variants: dict[str, dict | None], names: list[str]) -> dict[str, dict | None]:
    """The grid's variants named in --only-variants, in the grid's order (which is the order
    runs are taken in), each with its own options."""
    unknown = [name for name in names if name not in variants]
    if unknown or not names:
        raise SelftuneError(f"--only-variants: {', '.join(unknown) or 'no name given'}: the "
                            f"grid's variants are {', '.join(variants)}")
    selected = {name: options for name, options in variants.items() if name in names}
    for name, options in selected.items():
        source = (options or {}).get("from")
        if source is not None and source not in selected:
            raise SelftuneError(f"--only-variants: {name} is built from {source}'s runs; "
                                f"name {source} too")
    return selected


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None
