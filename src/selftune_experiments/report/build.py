"""Put a report together: load results files, pick runs, write report.md and its figures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError
from selftune.extras import require_matplotlib
from selftune_experiments.report.grid import RunGrid
from selftune_experiments.report.plots import plot_learning_curves, plot_scores
from selftune_experiments.report.records import Problem, RunRecord, dedupe, load_results
from selftune_experiments.report.sections import (
    across_tasks_section,
    cost_section,
    header_section,
    scores_section,
    stability_section,
    teacher_section,
)
from selftune_experiments.stats import DEFAULT_ALPHA


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
    require_matplotlib("selftune report")
    runs, dup_problems = dedupe(_coerce(records))
    grid = _run_grid(runs, baseline)
    all_problems = [*problems, *dup_problems, *grid.warnings]
    out_dir = _report_folder(Path(out_dir))
    has_history = any(r.history for r in runs)
    sections = [
        header_section(grid, all_problems, source, alpha),
        scores_section(grid, alpha),
        stability_section(grid),
        teacher_section(grid, alpha),
        across_tasks_section(grid, alpha),
        cost_section(grid),
    ]
    if has_history:
        sections.append(
            "## Learning curves\n\n"
            "Dev score after each evaluation, mean over the seeds that evaluated at that epoch.\n\n"
            "![learning curves](learning_curves.png)"
        )
    markdown = "\n\n".join(s for s in sections if s) + "\n"

    plot_scores(grid, out_dir / "scores.png")
    curves = out_dir / "learning_curves.png"
    if has_history:
        plot_learning_curves(grid, curves)
    else:
        curves.unlink(missing_ok=True)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    return markdown


def _run_grid(runs: list[RunRecord], baseline: str | None) -> RunGrid:
    if not runs:
        raise SelftuneError("no runs to report; run the benchmark first or check the results file")
    grid = RunGrid(runs, baseline)
    if baseline is not None and baseline not in grid.variants:
        raise SelftuneError(
            f"baseline variant '{baseline}' is not in the results; variants found: "
            f"{', '.join(grid.variants)}: pass one of them as the baseline"
        )
    return grid


def _report_folder(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SelftuneError(
            f"cannot create report folder {out_dir}: {exc.strerror}; choose another output folder"
        ) from None
    return out_dir


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
        records, duplicates = dedupe(records)
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
