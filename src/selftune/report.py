"""Turn a results file (JSON Lines, one finished run per line) into a Markdown report + figures.

The report answers the question the whole package is about: does a fine-tuning strategy beat the
baseline by more than the seed-to-seed noise, and at what cost? So every number is a mean ± std
over seeds, every difference from the baseline comes with a p-value from ``selftune.stats``, and
the verdict says "within noise" when the evidence is not there.

The results file is appended to by several processes over time, so it can hold a truncated last
line (a killed run), a hand-damaged middle line, or the same run twice (a re-run). None of these
is silently dropped: ``load_results`` returns every problem with its line number and the report
lists them at the top, because a comparison that quietly lost a seed can flip a verdict.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selftune.errors import SelftuneError
from selftune.stats import DEFAULT_ALPHA, Comparison, compare, holm_adjust, summarize

__all__ = [
    "SUPPORTED_SCHEMA",
    "Problem",
    "RunRecord",
    "build_report",
    "load_results",
    "write_report",
]

SUPPORTED_SCHEMA = 1

DASH = "–"

_RUN_ID_RE = re.compile(r'"run_id"\s*:\s*"([^"\\]*)"')


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something wrong in the results file, tied to a line when there is one.

    ``kind`` is ``"malformed"`` (not JSON: the line is not used), ``"invalid"`` (JSON, but not
    a usable run: not used), ``"duplicate"`` (an earlier line with the same ``run_id`` was
    replaced by this one) or ``"warning"`` (used, but worth a look).
    """

    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where} ({self.kind}): {self.message}"


@dataclass(frozen=True)
class RunRecord:
    """The fields of one results line that the report uses; unknown keys are ignored."""

    run_id: str
    task: str
    variant: str
    seed: int
    score: float
    metrics: Mapping[str, float]
    strategy: str | None = None
    config_hash: str | None = None
    teacher_score: float | None = None
    teacher_metrics: Mapping[str, float] | None = None
    # (epoch, dev score) pairs, in file order.
    history: tuple[tuple[float, float], ...] = ()
    wall_time_s: float | None = None
    train_examples_per_s: float | None = None
    peak_memory_mb: float | None = None
    # The setting the run was timed in (host, CPU, torch threads), used to group timings;
    # None when unknown.
    machine: str | None = None
    # Resumed from a checkpoint: its wall time covers only the last attempt.
    resumed: bool = False
    # "multitask-run" on a multi-task student's lines: timings of the whole run (every task).
    cost_scope: str | None = None
    # Line of the results file this came from (None when built from a dict in memory).
    line: int | None = None

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], line: int | None = None) -> RunRecord:
        """Validate one parsed results line; raises ``ValueError`` with the reason if unusable."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        schema = obj.get("schema", SUPPORTED_SCHEMA)
        if schema != SUPPORTED_SCHEMA:
            raise ValueError(
                f"schema {schema!r} is not supported (this selftune reads schema "
                f"{SUPPORTED_SCHEMA}); use the selftune version that wrote the file"
            )
        run_id = _req_str(obj, "run_id")
        task = _req_str(obj, "task")
        strategy = _opt_str(obj, "strategy")
        variant = _opt_str(obj, "variant") or strategy
        if variant is None:
            raise ValueError("missing 'variant' (and no 'strategy' to fall back on)")
        seed = obj.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"'seed' must be an integer, got {seed!r}")
        score = _opt_num(obj, "score")
        if score is None:
            raise ValueError("missing 'score'")
        if not math.isfinite(score):
            raise ValueError(f"'score' is {score!r} (a diverged run?); it cannot enter the stats")
        teacher_score = _opt_num(obj, "teacher_score")
        if teacher_score is not None and not math.isfinite(teacher_score):
            teacher_score = None
        teacher_metrics = obj.get("teacher_metrics")
        return cls(
            run_id=run_id,
            task=task,
            variant=variant,
            seed=seed,
            score=score,
            metrics=_metric_dict(obj.get("metrics"), "metrics"),
            strategy=strategy,
            config_hash=_opt_str(obj, "config_hash"),
            teacher_score=teacher_score,
            teacher_metrics=(
                None
                if teacher_metrics is None
                else _metric_dict(teacher_metrics, "teacher_metrics")
            ),
            history=_history(obj.get("history")),
            wall_time_s=_opt_num(obj, "wall_time_s"),
            train_examples_per_s=_opt_num(obj, "train_examples_per_s"),
            peak_memory_mb=_opt_num(obj, "peak_memory_mb"),
            machine=_machine_name(obj.get("machine")),
            resumed=bool(obj.get("resumed_from")),
            cost_scope=_opt_str(obj, "cost_scope"),
            line=line,
        )


def _req_str(obj: Mapping[str, Any], key: str) -> str:
    value = _opt_str(obj, key)
    if value is None:
        raise ValueError(f"missing '{key}'")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_num(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_num(value):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    return float(value)


def _metric_dict(value: Any, key: str) -> dict[str, float]:
    """Metric name -> value; a non-finite metric (e.g. Pearson of constant output) stays nan."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"'{key}' must be an object of metric name -> number")
    out: dict[str, float] = {}
    for name, v in value.items():
        if v is None:
            out[str(name)] = math.nan
        elif _is_num(v):
            out[str(name)] = float(v)
        else:
            raise ValueError(f"'{key}.{name}' must be a number, got {v!r}")
    return out


def _history(value: Any) -> tuple[tuple[float, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("'history' must be a list of {epoch, score} objects")
    points = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ValueError(f"'history[{i}]' must be an object")
        epoch, score = entry.get("epoch"), entry.get("score")
        if not (_is_num(epoch) and _is_num(score)):
            raise ValueError(f"'history[{i}]' needs numeric 'epoch' and 'score'")
        if math.isfinite(score):
            points.append((float(epoch), float(score)))
    return tuple(points)


def _machine_name(machine: Any) -> str | None:
    """Name the timing setting: hostname, CPU model and torch threads, as far as recorded (one
    hostname can stand for several machines, and a process at one thread runs at about half
    the speed of one at two); a machine dict with none of them is named by a hash of its
    content."""
    if machine is None:
        return None
    if isinstance(machine, Mapping):
        parts = [machine[key] for key in ("hostname", "cpu")
                 if isinstance(machine.get(key), str) and machine[key]]
        threads = machine.get("torch_threads")
        if isinstance(threads, int) and not isinstance(threads, bool):
            parts.append(f"{threads} thread" + ("" if threads == 1 else "s"))
        if parts:
            return ", ".join(parts)
        if not machine:
            return None
        blob = json.dumps(machine, sort_keys=True, default=str).encode()
        return "machine-" + hashlib.sha1(blob).hexdigest()[:8]
    return str(machine)


def _dedupe(records: Iterable[RunRecord]) -> tuple[list[RunRecord], list[Problem]]:
    """Keep the last record of each run_id: a re-run is appended after the run it replaces."""
    by_id: dict[str, RunRecord] = {}
    problems: list[Problem] = []
    for rec in records:
        previous = by_id.pop(rec.run_id, None)
        # The same run recorded twice (e.g. BAM! teachers shared by two grids' results files)
        # is no conflict.
        same_run = previous is not None and previous.config_hash == rec.config_hash and \
            previous.score == rec.score and previous.metrics == rec.metrics
        if previous is not None and not same_run:
            where = f"line {previous.line}" if previous.line is not None else "an earlier record"
            problems.append(
                Problem(
                    rec.line,
                    "duplicate",
                    f"run_id '{rec.run_id}' already appeared on {where}; keeping this later "
                    "one (delete the line you do not want to silence this)",
                )
            )
        by_id[rec.run_id] = rec
    return list(by_id.values()), problems


def load_results(path: Path | str) -> tuple[list[RunRecord], list[Problem]]:
    """Read a results file; return the usable runs and every problem found, by line.

    Blank lines are skipped. A line that is not JSON, or is JSON but not a usable run, is left
    out and reported (the last line gets its own message, since a truncated last line is what
    a killed process leaves behind). If a run_id appears twice the last one wins, reported as a
    duplicate. Raises ``SelftuneError`` if the file is missing or holds no usable run.
    """
    path = Path(path)
    if path.is_dir():
        raise SelftuneError(f"{path} is a folder; pass the results .jsonl file inside it")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SelftuneError(
            f"results file not found: {path}; check the path or run the benchmark first"
        ) from None
    except OSError as exc:
        raise SelftuneError(f"cannot read results file {path}: {exc.strerror}") from None

    lines = raw.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    parsed: list[RunRecord] = []
    problems: list[Problem] = []
    for i, blob in enumerate(lines):
        if not blob.strip():
            continue
        lineno = i + 1
        try:
            obj = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(Problem(lineno, "malformed", _malformed_message(blob, exc, i == last)))
            continue
        try:
            parsed.append(RunRecord.from_dict(obj, line=lineno))
        except ValueError as exc:
            has_id = isinstance(obj, dict) and "run_id" in obj
            run = f" (run_id '{obj['run_id']}')" if has_id else ""
            problems.append(
                Problem(lineno, "invalid", f"not a usable run{run}: {exc}; the line is left out")
            )
    records, dup_problems = _dedupe(parsed)
    problems.extend(dup_problems)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    if not records:
        detail = f"; first problem: {problems[0]}" if problems else " (the file is empty)"
        raise SelftuneError(
            f"no usable runs in {path}{detail}; check that this is a selftune results file"
        )
    return records, problems


def _malformed_message(blob: bytes, exc: Exception, is_last: bool) -> str:
    match = _RUN_ID_RE.search(blob.decode("utf-8", errors="replace"))
    run = f" (run_id '{match.group(1)}')" if match else ""
    if isinstance(exc, json.JSONDecodeError):
        at = "" if exc.msg.endswith(" at") else " at"
        reason = f"{exc.msg}{at} column {exc.colno}"
    else:
        reason = "not UTF-8 text"
    if is_last:
        return (
            f"last line is not valid JSON{run}: {reason}; probably truncated by a killed "
            "process: delete the line (`selftune bench` then records that run again from its "
            "run folder, if that is still there, without training it again)"
        )
    return f"not valid JSON{run}: {reason}; the line is left out: fix or delete it"


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _is_missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x: float | None, digits: int = 2) -> str:
    return DASH if _is_missing(x) else f"{x:.{digits}f}"


def _fmt_mean_std(mean: float, std: float, n: int) -> str:
    """``mean ± std``; with one seed the spread is unknown, which we say instead of ``± 0``."""
    if n == 0 or _is_missing(mean):
        return DASH
    return f"{mean:.2f} ± {'n/a' if _is_missing(std) else f'{std:.2f}'}"


def _fmt_p(p: float | None) -> str:
    """Three significant digits, trailing zeros kept so ``1.00`` and ``0.500`` read as p-values."""
    return DASH if p is None else f"{p:#.3g}"


def _fmt_delta(d: float) -> str:
    return DASH if _is_missing(d) else f"{d:+.2f}"


def _cell(text: Any) -> str:
    """Make a value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


_TEXT_COLUMNS = {"variant", "task", "verdict", "setting"}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numeric columns right-aligned so the decimals line up."""
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt_comparison_delta(cmp: Comparison) -> str:
    """The difference, with the std of the per-seed differences when they are paired."""
    text = _fmt_delta(cmp.diff)
    if cmp.kind == "paired":
        text += " ± " + ("n/a" if _is_missing(cmp.diff_std) else f"{cmp.diff_std:.2f}")
    return text


def _verdict(cmp: Comparison, better: str = "better", worse: str = "worse",
             holm_p: float | None = None) -> str:
    """The verdict on ``cmp``; ``holm_p``, its p adjusted over the report's family of tests,
    qualifies a significant difference that would not survive the number of tests made."""
    if cmp.kind == "insufficient":
        return "not enough seeds (need ≥ 2 per side)"
    if cmp.p is None:
        return "no test possible"
    # Every seed moved by the same amount: the t-test degenerates, the exact Wilcoxon decides.
    how = " (equal differences: exact Wilcoxon)" if cmp.kind == "paired" and cmp.t_p is None \
        else ""
    if not cmp.significant:
        return f"within noise (p={_fmt_p(cmp.p)}){how}"
    verdict = better if cmp.diff > 0 else worse
    # A t-test with one degree of freedom: two steady differences pass it, and a third
    # seed often undoes that; the reader should see the verdict stands on two seeds.
    verdict += " (2 pairs: provisional)" if cmp.n_pairs == 2 else how
    if holm_p is not None and holm_p >= cmp.alpha:
        verdict += f" (not after Holm: p={_fmt_p(holm_p)})"
    return verdict


def _holm_by_key(comparisons: Mapping[Any, Comparison]) -> dict[Any, float | None]:
    """Holm-adjusted verdict p of each comparison, the mapping's comparisons being the family."""
    keys = list(comparisons)
    return dict(zip(keys, holm_adjust([comparisons[k].p for k in keys]), strict=True))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _coerce(records: Iterable[RunRecord | Mapping[str, Any]]) -> list[RunRecord]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, RunRecord):
            out.append(rec)
            continue
        try:
            out.append(RunRecord.from_dict(rec))
        except ValueError as exc:
            raise SelftuneError(f"record {i} is not a usable run: {exc}") from None
    return out


class _Grid:
    """Runs indexed by task and variant, in the order they first appear in the file."""

    def __init__(self, records: Sequence[RunRecord], baseline: str | None) -> None:
        self.records = records
        self.tasks: list[str] = list(dict.fromkeys(r.task for r in records))
        variants = list(dict.fromkeys(r.variant for r in records))
        if baseline is not None and baseline in variants:
            variants.remove(baseline)
            variants.insert(0, baseline)
        self.variants = variants
        self.baseline = baseline
        self.cells: dict[tuple[str, str], dict[int, RunRecord]] = {}
        self.warnings: list[Problem] = []
        for rec in records:
            cell = self.cells.setdefault((rec.task, rec.variant), {})
            if rec.seed in cell:
                self.warnings.append(
                    Problem(
                        rec.line,
                        "warning",
                        f"{rec.task}/{rec.variant} has two runs with seed {rec.seed} "
                        f"('{cell[rec.seed].run_id}' and '{rec.run_id}'); only the later one is "
                        "used: give the grid entries distinct variant names",
                    )
                )
            cell[rec.seed] = rec
        for (task, variant), cell in self.cells.items():
            hashes = sorted({r.config_hash for r in cell.values() if r.config_hash})
            if len(hashes) > 1:
                self.warnings.append(
                    Problem(
                        None,
                        "warning",
                        f"{task}/{variant} mixes runs of {len(hashes)} different configurations "
                        f"(config_hash {', '.join(hashes)}); its seeds are not replicates of one "
                        "recipe: rename the variant or drop the stale runs",
                    )
                )

    def cell(self, task: str, variant: str) -> dict[int, RunRecord]:
        return self.cells.get((task, variant), {})

    def scores(self, task: str, variant: str) -> dict[int, float]:
        return {seed: r.score for seed, r in self.cell(task, variant).items()}

    def has_baseline(self, task: str) -> bool:
        return self.baseline is not None and bool(self.cell(task, self.baseline))


def build_report(
    records: Sequence[RunRecord | Mapping[str, Any]],
    baseline: str | None,
    out_dir: Path,
    *,
    problems: Sequence[Problem] = (),
    source: str | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> str:
    """Build the Markdown report, write it and its figures into ``out_dir``, return the text.

    ``records`` are runs (``RunRecord`` or results-line dicts); ``problems`` are those found
    while loading them (``load_results``), shown at the top so no lost run goes unnoticed.
    ``baseline`` names the variant every other variant is compared with; ``None`` gives a
    report without comparisons. Writes ``report.md``, ``scores.png`` and, if any run has a
    per-epoch history, ``learning_curves.png`` (a stale one from an earlier report is removed,
    so the folder never shows curves that do not belong to this report).
    """
    runs, dup_problems = _dedupe(_coerce(records))
    if not runs:
        raise SelftuneError("no runs to report; run the benchmark first or check the results file")
    grid = _Grid(runs, baseline)
    if baseline is not None and baseline not in grid.variants:
        raise SelftuneError(
            f"baseline variant '{baseline}' is not in the results; variants found: "
            f"{', '.join(grid.variants)}: pass one of them as the baseline"
        )
    all_problems = [*problems, *dup_problems, *grid.warnings]

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SelftuneError(
            f"cannot create report folder {out_dir}: {exc.strerror}; choose another output folder"
        ) from None

    has_history = any(r.history for r in runs)
    sections = [
        _header(grid, all_problems, source, alpha),
        _score_section(grid, alpha),
        _teacher_section(grid, alpha),
        _across_tasks_section(grid, alpha),
        _cost_section(grid),
    ]
    if has_history:
        sections.append(
            "## Learning curves\n\n"
            "Dev score after each evaluation, mean over the seeds that evaluated at that epoch.\n\n"
            "![learning curves](learning_curves.png)"
        )
    markdown = "\n\n".join(s for s in sections if s) + "\n"

    _plot_scores(grid, out_dir / "scores.png")
    curves = out_dir / "learning_curves.png"
    if has_history:
        _plot_learning_curves(grid, curves)
    else:
        curves.unlink(missing_ok=True)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    return markdown


def write_report(
    results_path: Path | Sequence[Path], out_dir: Path | None = None,
    baseline: str | None = None, *, tasks: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
) -> str:
    """Load one or several results files, write the report into ``out_dir``, return Markdown.

    Several files are read as one set of runs (e.g. a baseline grid and a strategy grid that
    reuses its seeds); a run_id found in two files keeps the later file's run. ``out_dir``
    defaults to a ``report`` folder next to the first results file. ``tasks`` and ``variants``
    keep only those runs (the baseline variant is always kept); a name with no run is an error.
    """
    paths = [Path(results_path)] if isinstance(results_path, str | Path) else \
        [Path(p) for p in results_path]
    records: list[RunRecord] = []
    problems: list[Problem] = []
    for path in paths:
        file_records, file_problems = load_results(path)
        records.extend(file_records)
        if len(paths) > 1:
            file_problems = [Problem(p.line, p.kind, f"{path.name}: {p.message}")
                             for p in file_problems]
        problems.extend(file_problems)
    if len(paths) > 1:
        records, duplicates = _dedupe(records)
        problems.extend(duplicates)
    records = _select(records, "task", tasks)
    records = _select(records, "variant", variants, keep=baseline)
    if out_dir is None:
        out_dir = paths[0].parent / "report"
    return build_report(records, baseline, out_dir, problems=problems,
                        source=", ".join(str(p) for p in paths))


def _select(records: list[RunRecord], field: str, names: Sequence[str] | None,
            keep: str | None = None) -> list[RunRecord]:
    """The records whose ``field`` is one of ``names`` (all when ``names`` is None)."""
    if names is None:
        return records
    found = {getattr(r, field) for r in records}
    missing = [n for n in names if n not in found]
    if missing:
        raise SelftuneError(f"no runs with {field} {', '.join(missing)} in the results; "
                            f"{field}s found: {', '.join(sorted(found))}")
    wanted = {*names, keep}
    return [r for r in records if getattr(r, field) in wanted]


def _header(grid: _Grid, problems: Sequence[Problem], source: str | None, alpha: float) -> str:
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
    lines += [f"- **{_cell(p)}**" for p in problems]
    return "\n".join(lines)


def _score_section(grid: _Grid, alpha: float) -> str:
    parts = [
        "## Scores per task",
        "",
        "Dev metrics in percent, mean ± sample std over seeds (n/a with a single seed). "
        "Δ score is variant − baseline, averaged over the seeds both ran (± std of those "
        f"differences); a verdict needs p < {alpha:g}, otherwise the difference is within noise.",
    ]
    comparisons = {task: _task_comparisons(grid, task, alpha) for task in grid.tasks}
    holm = _holm_by_key({(task, variant): c for task, by_variant in comparisons.items()
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


def _task_comparisons(grid: _Grid, task: str, alpha: float) -> dict[str, Comparison]:
    """Each variant with runs on ``task`` against the baseline; empty without baseline runs."""
    if not grid.has_baseline(task):
        return {}
    assert grid.baseline is not None
    base_scores = grid.scores(task, grid.baseline)
    return {variant: compare(base_scores, grid.scores(task, variant), alpha)
            for variant in grid.variants
            if variant != grid.baseline and grid.cell(task, variant)}


def _task_table(grid: _Grid, task: str, comparisons: Mapping[str, Comparison],
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
            row.append(_fmt_mean_std(*summarize(_finite(r.metrics.get(m) for r in runs))))
        row.append(_fmt_mean_std(*summarize(r.score for r in runs)))
        if with_base:
            if variant == grid.baseline:
                row += [DASH] * (n_cmp_cols - 1) + ["baseline"]
            else:
                c = comparisons[variant]
                delta = _fmt_comparison_delta(c)
                row += [delta, c.n_pairs if c.kind == "paired" else DASH]
                row += [_fmt_p(c.t_p), _fmt_p(c.wilcoxon_p), _fmt_p(c.mannwhitney_p),
                        _fmt_p(holm[variant]), _verdict(c, holm_p=holm[variant])]
        rows.append(row)

    text = _table(header, rows)
    if grid.baseline is not None and not with_base:
        note = f"_Baseline `{grid.baseline}` has no runs on {task}, so no comparison here._"
        text = note + "\n\n" + text
    return text


def _teacher_section(grid: _Grid, alpha: float) -> str:
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
            delta = _fmt_comparison_delta(c)
            rows.append([
                variant,
                len(runs),
                _fmt_mean_std(*summarize(student.values())),
                _fmt_mean_std(*summarize(teacher.values())),
                delta,
                _fmt_p(c.t_p),
                _fmt_p(c.wilcoxon_p),
                _verdict(c, better="teacher better", worse="student better"),
            ])
        if rows:
            header = ["variant", "runs", "student score", "teacher score",
                      "Δ (teacher − student)", "t-test p", "Wilcoxon p", "verdict"]
            parts += ["", f"### {task}", "", _table(header, rows)]
    if not parts:
        return ""
    intro = [
        "## Teacher vs student",
        "",
        "For strategies that also evaluate their teacher: student and teacher score from the "
        "same runs, mean ± std; Δ is teacher − student, paired by run.",
    ]
    return "\n".join(intro + parts)


def _seed_averages(grid: _Grid, variant: str, tasks: Sequence[str]) -> dict[int, float]:
    """Per seed, the mean score over ``tasks``; only seeds that ran every one of them."""
    per_task = [grid.scores(t, variant) for t in tasks]
    seeds = set.intersection(*(set(scores) for scores in per_task)) if per_task else set()
    return {s: float(np.mean([scores[s] for scores in per_task])) for s in sorted(seeds)}


def _across_tasks_section(grid: _Grid, alpha: float) -> str:
    n_tasks = len(grid.tasks)
    task_means: dict[str, dict[str, float]] = {}
    for variant in grid.variants:
        task_means[variant] = {
            t: summarize(grid.scores(t, variant).values())[0]
            for t in grid.tasks
            if grid.cell(t, variant)
        }
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
    holm = _holm_by_key(comparisons)
    rows = []
    incomplete = False
    for variant in grid.variants:
        means = task_means[variant]
        tasks_cell = f"{len(means)}/{n_tasks}"
        if len(means) < n_tasks:
            incomplete = True
            missing = [t for t in grid.tasks if t not in means]
            tasks_cell += f" † (missing: {', '.join(missing)})"
        row: list[Any] = [variant, tasks_cell, _fmt(float(np.mean(list(means.values()))))]
        if base_means:
            if variant not in comparisons:
                row += [DASH] * 6 + ["baseline" if variant == grid.baseline else "no shared task"]
            else:
                shared = shared_tasks[variant]
                d = float(np.mean([means[t] - base_means[t] for t in shared]))
                c = comparisons[variant]
                row += [f"{_fmt_delta(d)} ({len(shared)} task(s))",
                        c.n_pairs if c.kind == "paired" else DASH, _fmt_comparison_delta(c),
                        _fmt_p(c.t_p), _fmt_p(c.mannwhitney_p), _fmt_p(holm[variant]),
                        _verdict(c, holm_p=holm[variant])]
        rows.append(row)
    parts = [
        "## Mean across tasks",
        "",
        "Per variant, the mean over tasks of its per-task mean score, over the tasks where it "
        "has runs.",
    ]
    if incomplete:
        parts[-1] += (
            " † marks a variant missing some tasks: its mean covers other tasks than the rest "
            "and is not directly comparable."
        )
    if base_means:
        parts[-1] += (
            " The Δ columns compare with the baseline on the tasks both have: first the "
            "difference of the means above, then a test of it: per seed, the average over "
            "those tasks, paired on the seeds where both variants ran every one of them."
        )
    parts += ["", _table(header, rows)]
    return "\n".join(parts)


def _cost_section(grid: _Grid) -> str:
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
                    _fmt(_mean_or_nan(wall), 1),
                    _fmt(_mean_or_nan(_finite(r.train_examples_per_s for r in runs)), 1),
                    _fmt(_mean_or_nan(_finite(r.peak_memory_mb for r in runs)), 0),
                    ratio,
                ])
    return "\n\n".join([*parts, _table(header, rows)])


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _subplots(n: int, title: str):
    """A grid of ``n`` axes on a Figure bound to the Agg canvas: no display, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n]


def _colors(grid: _Grid) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(grid.variants)}


def _plot_scores(grid: _Grid, path: Path) -> None:
    fig, axes = _subplots(len(grid.tasks), "Dev score per seed (points) and mean ± std (bars)")
    colors = _colors(grid)
    for ax, task in zip(axes, grid.tasks, strict=True):
        for i, variant in enumerate(grid.variants):
            scores = list(grid.scores(task, variant).values())
            if not scores:
                continue
            jitter = np.linspace(-0.12, 0.12, len(scores)) if len(scores) > 1 else np.zeros(1)
            ax.scatter(i + jitter, scores, s=14, alpha=0.6, color=colors[variant], zorder=2)
            mean, std, _ = summarize(scores)
            ax.errorbar(
                i + 0.3, mean, yerr=0.0 if math.isnan(std) else std, fmt="D",
                color=colors[variant], capsize=4, markersize=5, zorder=3,
            )
        if grid.has_baseline(task):
            base_mean = summarize(grid.scores(task, str(grid.baseline)).values())[0]
            ax.axhline(base_mean, color="grey", linestyle="--", linewidth=0.8, zorder=1)
        ax.set_xticks(range(len(grid.variants)))
        ax.set_xticklabels(grid.variants, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(grid.variants) - 0.3)
        ax.set_title(task)
        ax.set_ylabel("score")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


def _plot_learning_curves(grid: _Grid, path: Path) -> None:
    fig, axes = _subplots(len(grid.tasks), "Dev score per epoch (mean over seeds)")
    colors = _colors(grid)
    for ax, task in zip(axes, grid.tasks, strict=True):
        drawn = False
        for variant in grid.variants:
            by_epoch: dict[float, list[float]] = {}
            for rec in grid.cell(task, variant).values():
                for epoch, score in rec.history:
                    by_epoch.setdefault(epoch, []).append(score)
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            ax.plot(
                epochs, [float(np.mean(by_epoch[e])) for e in epochs], marker="o",
                markersize=3, color=colors[variant], label=variant,
            )
            drawn = True
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(task)
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev score")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
