"""The report's Markdown sections: header, scores per task, stability across seeds, teacher vs
student, the mean across tasks, and cost."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from selftune_experiments.report.formatting import (
    DASH,
    fmt,
    fmt_comparison_delta,
    fmt_delta,
    fmt_mean_std,
    fmt_p,
    holm_by_key,
    md_cell,
    md_table,
    verdict_text,
)
from selftune_experiments.report.grid import RunGrid
from selftune_experiments.report.records import Problem, RunRecord
from selftune_experiments.stats import Comparison, compare, summarize


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]



def header_section(grid: RunGrid, problems: Sequence[Problem], source: str | None,
                   alpha: float) -> str:
    seeds = sorted({r.seed for r in grid.records})
    lines = ["# selftune report", ""]
    if source:
        lines.append(f"- Results file: `{source}`")
    lines.append(
        f"- Runs: {len(grid.records)} ({len(grid.tasks)} task(s), {len(grid.variants)} "
        f"variant(s), seeds {', '.join(map(str, seeds))})"
    )
    if grid.baseline is None:
        lines.append("- Baseline: none named, so no comparisons (name a baseline variant for them)")
    else:
        lines.append(f"- Baseline: `{grid.baseline}`")
    lines.append(
        "- Tests: paired t-test on the seeds both variants ran (Wilcoxon signed-rank alongside); "
        "Mann-Whitney U when they share fewer than 2 seeds (shown for paired variants too, "
        f"as BAM! reports it, but the verdict is the t-test's); alpha = {alpha:g}"
    )
    if grid.baseline is not None:
        lines.append(
            "- Multiple tests: each table's \"Holm p\" is the verdict's p adjusted "
            "(Holm-Bonferroni) over all the comparisons of its section: every variant on every "
            "task in \"Scores per task\", every variant in \"Mean across tasks\". A verdict "
            "that does not survive the adjustment says \"not after Holm\": at alpha "
            f"{alpha:g}, one in {round(1 / alpha)} tests of a variant that changes nothing "
            "comes out significant by chance alone."
        )
    if not problems:
        lines.append("- Problems in the results file: none")
        return "\n".join(lines)
    not_used = sum(p.kind in ("malformed", "invalid") for p in problems)
    lines += [
        "",
        f"## ⚠ Problems in the results file ({len(problems)})",
        "",
        f"{not_used} line(s) could not be used. Fix or delete the lines listed (or re-run the "
        "affected runs), then rebuild the report; until then the tables below leave them out.",
        "",
    ]
    lines += [f"- **{md_cell(p)}**" for p in problems]
    return "\n".join(lines)


def scores_section(grid: RunGrid, alpha: float) -> str:
    parts = [
        "## Scores per task",
        "",
        "Dev metrics in percent, mean ± sample std over seeds (n/a with a single seed). "
        "Δ score is variant − baseline, averaged over the seeds both ran (± std of those "
        f"differences); a verdict needs p < {alpha:g}, otherwise the difference is within noise.",
    ]
    comparisons = {task: _task_comparisons(grid, task, alpha) for task in grid.tasks}
    holm = holm_by_key({(task, variant): c for task, by_variant in comparisons.items()
                         for variant, c in by_variant.items()})
    low_power = False
    for task in grid.tasks:
        table = _task_table(grid, task, comparisons[task],
                            {v: holm[(task, v)] for v in comparisons[task]})
        low_power |= any(c.kind == "paired" and 2 / 2**c.n_pairs >= alpha
                         for c in comparisons[task].values())
        parts += ["", f"### {task}", "", table]
    if low_power:
        parts += [
            "",
            "Note: with 5 or fewer pairs the two-sided Wilcoxon p cannot go below 0.0625, so it "
            "cannot confirm a difference at this alpha; it is shown as a check on the t-test's "
            "normality assumption, not as a second verdict.",
        ]
    parts += ["", "![scores per seed](scores.png)"]
    return "\n".join(parts)


def _task_comparisons(grid: RunGrid, task: str, alpha: float) -> dict[str, Comparison]:
    """Each variant with runs on ``task`` against the baseline; empty without baseline runs."""
    if not grid.has_baseline(task):
        return {}
    assert grid.baseline is not None
    base_scores = grid.scores(task, grid.baseline)
    return {variant: compare(base_scores, grid.scores(task, variant), alpha)
            for variant in grid.variants
            if variant != grid.baseline and grid.cell(task, variant)}


def _task_table(grid: RunGrid, task: str, comparisons: Mapping[str, Comparison],
                holm: Mapping[str, float | None]) -> str:
    metric_names = list(
        dict.fromkeys(m for r in grid.records if r.task == task for m in r.metrics)
    )
    with_base = grid.has_baseline(task)
    header = ["variant", "seeds", *metric_names, "score"]
    if with_base:
        header += ["Δ score", "pairs", "t-test p", "Wilcoxon p", "Mann-Whitney p", "Holm p",
                   "verdict"]
    n_cmp_cols = len(header) - 3 - len(metric_names)  # Δ score ... verdict

    rows = []
    for variant in grid.variants:
        cell = grid.cell(task, variant)
        if not cell:
            row_missing: list[Any] = [variant, 0, *[DASH] * len(metric_names)]
            if with_base:
                row_missing += [DASH] * (1 + n_cmp_cols)  # score, then Δ ... verdict
                row_missing[-1] = "no runs"
            else:
                row_missing.append("no runs")
            rows.append(row_missing)
            continue
        runs = list(cell.values())
        row: list[Any] = [variant, len(runs)]
        for m in metric_names:
            row.append(fmt_mean_std(*summarize(_finite(r.metrics.get(m) for r in runs))))
        row.append(fmt_mean_std(*summarize(r.score for r in runs)))
        if with_base:
            if variant == grid.baseline:
                row += [DASH] * (n_cmp_cols - 1) + ["baseline"]
            else:
                c = comparisons[variant]
                delta = fmt_comparison_delta(c)
                row += [delta, c.n_pairs if c.kind == "paired" else DASH]
                row += [fmt_p(c.t_p), fmt_p(c.wilcoxon_p), fmt_p(c.mannwhitney_p),
                        fmt_p(holm[variant]), verdict_text(c, holm_p=holm[variant])]
        rows.append(row)

    text = md_table(header, rows)
    if grid.baseline is not None and not with_base:
        note = f"_Baseline `{grid.baseline}` has no runs on {task}, so no comparison here._"
        text = note + "\n\n" + text
    return text


def stability_section(grid: RunGrid) -> str:
    """Per task and variant: the seed spread and the worst seed.

    Self-ensembling and self-distillation are claimed to make fine-tuning *more stable* (Xu et
    al. 2020), i.e. to lift the bad seeds, not only the mean; a mean can rise while the worst
    seed stays where it was. With five seeds no test of a difference in spread has power, so
    this section shows the numbers rather than a verdict. Empty when no cell has two seeds.
    """
    if not any(len(grid.cell(t, v)) >= 2 for t in grid.tasks for v in grid.variants):
        return ""
    with_base = grid.baseline is not None
    parts = [
        "## Stability across seeds",
        "",
        "Seed standard deviation of the score, the worst and the best seed (seed in brackets) "
        "and their range"
        + (", and the worst seed against the baseline's worst. " if with_base else ". ")
        + "Descriptive: a handful of seeds cannot test a difference in spread.",
    ]
    header = ["task", "variant", "seeds", "std", "worst (seed)", "best (seed)", "range"]
    if with_base:
        header.append("worst − baseline's worst")
    rows = []
    for task in grid.tasks:
        base_scores = grid.scores(task, grid.baseline) if with_base else {}
        base_worst = min(base_scores.values()) if base_scores else math.nan
        for variant in grid.variants:
            scores = grid.scores(task, variant)
            if not scores:
                continue
            _, std, n = summarize(scores.values())
            worst_seed = min(scores, key=scores.get)
            best_seed = max(scores, key=scores.get)
            row = [task, variant, n, fmt(std), f"{scores[worst_seed]:.2f} ({worst_seed})",
                   f"{scores[best_seed]:.2f} ({best_seed})",
                   fmt(scores[best_seed] - scores[worst_seed])]
            if with_base:
                row.append(DASH if variant == grid.baseline or math.isnan(base_worst)
                           else fmt_delta(scores[worst_seed] - base_worst))
            rows.append(row)
    parts += ["", md_table(header, rows)]
    return "\n".join(parts)


def teacher_section(grid: RunGrid, alpha: float) -> str:
    parts: list[str] = []
    for task in grid.tasks:
        rows = []
        for variant in grid.variants:
            runs = [r for r in grid.cell(task, variant).values() if r.teacher_score is not None]
            if not runs:
                continue
            student = {r.seed: r.score for r in runs}
            teacher = {r.seed: float(r.teacher_score or 0.0) for r in runs}
            c = compare(student, teacher, alpha)
            delta = fmt_comparison_delta(c)
            rows.append([
                variant,
                len(runs),
                fmt_mean_std(*summarize(student.values())),
                fmt_mean_std(*summarize(teacher.values())),
                delta,
                fmt_p(c.t_p),
                fmt_p(c.wilcoxon_p),
                verdict_text(c, better="teacher better", worse="student better"),
            ])
        if rows:
            header = ["variant", "runs", "student score", "teacher score",
                      "Δ (teacher − student)", "t-test p", "Wilcoxon p", "verdict"]
            parts += ["", f"### {task}", "", md_table(header, rows)]
    if not parts:
        return ""
    intro = [
        "## Teacher vs student",
        "",
        "For strategies that also evaluate their teacher: student and teacher score from the "
        "same runs, mean ± std; Δ is teacher − student, paired by run.",
    ]
    return "\n".join(intro + parts)


def _seed_averages(grid: RunGrid, variant: str, tasks: Sequence[str]) -> dict[int, float]:
    """Per seed, the mean score over ``tasks``; only seeds that ran every one of them."""
    per_task = [grid.scores(t, variant) for t in tasks]
    seeds = set.intersection(*(set(scores) for scores in per_task)) if per_task else set()
    return {s: float(np.mean([scores[s] for scores in per_task])) for s in sorted(seeds)}


def across_tasks_section(grid: RunGrid, alpha: float) -> str:
    task_means = {variant: {t: summarize(grid.scores(t, variant).values())[0]
                            for t in grid.tasks if grid.cell(t, variant)}
                  for variant in grid.variants}
    base_means = task_means.get(grid.baseline, {}) if grid.baseline else {}
    header = ["variant", "tasks", "mean score"]
    if base_means:
        header += ["Δ vs baseline (shared tasks)", "seeds on all shared tasks",
                   "Δ of per-seed averages", "t-test p", "Mann-Whitney p", "Holm p", "verdict"]
    shared_tasks: dict[str, list[str]] = {}
    comparisons: dict[str, Comparison] = {}
    for variant in grid.variants:
        shared = [t for t in task_means[variant] if t in base_means]
        if variant != grid.baseline and shared:
            assert grid.baseline is not None
            shared_tasks[variant] = shared
            comparisons[variant] = compare(_seed_averages(grid, grid.baseline, shared),
                                           _seed_averages(grid, variant, shared), alpha)
    holm = holm_by_key(comparisons)
    rows = []
    for variant in grid.variants:
        row = _across_tasks_cells(grid, variant, task_means[variant])
        if base_means:
            row += _across_tasks_delta(grid, variant, task_means[variant], base_means,
                                       shared_tasks, comparisons, holm)
        rows.append(row)
    incomplete = any(len(means) < len(grid.tasks) for means in task_means.values())
    return "\n".join([_across_tasks_intro(incomplete, bool(base_means)), "",
                      md_table(header, rows)])


def _across_tasks_cells(grid: RunGrid, variant: str, means: dict[str, float]) -> list[Any]:
    """A variant's name, the tasks its mean covers, and that mean."""
    tasks_cell = f"{len(means)}/{len(grid.tasks)}"
    if len(means) < len(grid.tasks):
        missing = [t for t in grid.tasks if t not in means]
        tasks_cell += f" † (missing: {', '.join(missing)})"
    return [variant, tasks_cell, fmt(float(np.mean(list(means.values()))))]


def _across_tasks_delta(grid: RunGrid, variant: str, means: dict[str, float],
                        base_means: dict[str, float], shared_tasks: dict[str, list[str]],
                        comparisons: dict[str, Comparison],
                        holm: dict[str, float | None]) -> list[Any]:
    """A variant's difference from the baseline, and the test of it."""
    if variant not in comparisons:
        return [DASH] * 6 + ["baseline" if variant == grid.baseline else "no shared task"]
    shared = shared_tasks[variant]
    d = float(np.mean([means[t] - base_means[t] for t in shared]))
    c = comparisons[variant]
    return [f"{fmt_delta(d)} ({len(shared)} task(s))",
            c.n_pairs if c.kind == "paired" else DASH, fmt_comparison_delta(c),
            fmt_p(c.t_p), fmt_p(c.mannwhitney_p), fmt_p(holm[variant]),
            verdict_text(c, holm_p=holm[variant])]


def _across_tasks_intro(incomplete: bool, with_baseline: bool) -> str:
    text = ("## Mean across tasks\n\nPer variant, the mean over tasks of its per-task mean "
            "score, over the tasks where it has runs.")
    if incomplete:
        text += (" † marks a variant missing some tasks: its mean covers other tasks than the "
                 "rest and is not directly comparable.")
    if with_baseline:
        text += (" The Δ columns compare with the baseline on the tasks both have: first the "
                 "difference of the means above, then a test of it: per seed, the average over "
                 "those tasks, paired on the seeds where both variants ran every one of them.")
    return text


def cost_section(grid: RunGrid) -> str:
    """Timings per task, variant and setting; a ratio only between runs timed alike."""
    timed = [r for r in grid.records if not r.resumed]
    settings: dict[str | None, int] = {}
    for r in timed:
        settings[r.machine] = settings.get(r.machine, 0) + 1
    several = len(settings) > 1
    parts = [
        "## Cost",
        "Means over seeds. Timings are only comparable between runs timed in the same setting "
        "(machine, CPU, torch threads): the ratio to the baseline uses the baseline's runs of "
        "that setting only.",
    ]
    listing = ", ".join(f"`{m or 'unknown'}` ({_runs(n)})" for m, n in settings.items())
    if several:
        parts.append(f"The runs were timed in {len(settings)} settings: {listing}. A variant "
                     "without a baseline run in its setting has no ratio (–).")
    elif settings:
        parts.append(f"Setting: {listing}.")
    if any(r.cost_scope for r in timed):
        parts.append("A multi-task student's lines carry the timings of its whole run (every "
                     "task, teachers excluded): they are the same on each of its tasks, and "
                     "their ratio is only to a baseline that is a multi-task run too.")
    resumed = len(grid.records) - len(timed)
    if resumed:
        parts.append(f"{_runs(resumed)} resumed from a checkpoint: their wall time covers only "
                     "the last attempt, so they are left out of this table.")

    header = ["task", "variant", *(["setting"] if several else []), "runs", "wall time (s)",
              "train examples/s", "peak memory (MB)", "wall time ÷ baseline"]
    return "\n\n".join([*parts, md_table(header, _cost_rows(grid, several))])


def _cost_rows(grid: RunGrid, several: bool) -> list[list[Any]]:
    """A row per task, variant and setting (``several``: a column naming the setting)."""
    rows = []
    for task in grid.tasks:
        base_runs = [r for r in grid.cell(task, grid.baseline).values() if not r.resumed] \
            if grid.baseline else []
        for variant in grid.variants:
            by_setting: dict[str | None, list[RunRecord]] = {}
            for r in grid.cell(task, variant).values():
                if not r.resumed:
                    by_setting.setdefault(r.machine, []).append(r)
            for setting, runs in by_setting.items():
                wall = _finite(r.wall_time_s for r in runs)
                scope = runs[0].cost_scope
                base_wall = _finite(r.wall_time_s for r in base_runs
                                    if r.machine == setting and r.cost_scope == scope)
                ratio = DASH
                if variant == grid.baseline and wall:
                    ratio = "1.00"
                elif base_wall and wall:
                    ratio = f"{np.mean(wall) / np.mean(base_wall):.2f}"
                rows.append([
                    task,
                    variant,
                    *([f"`{setting or 'unknown'}`"] if several else []),
                    len(runs),
                    fmt(_mean_or_nan(wall), 1),
                    fmt(_mean_or_nan(_finite(r.train_examples_per_s for r in runs)), 1),
                    fmt(_mean_or_nan(_finite(r.peak_memory_mb for r in runs)), 0),
                    ratio,
                ])
    return rows


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan
