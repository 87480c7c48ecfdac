"""Numbers, p-values, verdicts and Markdown tables as the report prints them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from selftune_experiments.stats import Comparison, holm_adjust

DASH = "–"


def _is_missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x: float | None, digits: int = 2) -> str:
    return DASH if _is_missing(x) else f"{x:.{digits}f}"


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    """``mean ± std``; with one seed the spread is unknown, which we say instead of ``± 0``."""
    if n == 0 or _is_missing(mean):
        return DASH
    return f"{mean:.2f} ± {'n/a' if _is_missing(std) else f'{std:.2f}'}"


def fmt_p(p: float | None) -> str:
    """Three significant digits, trailing zeros kept so ``1.00`` and ``0.500`` read as p-values."""
    return DASH if p is None else f"{p:#.3g}"


def fmt_delta(d: float) -> str:
    return DASH if _is_missing(d) else f"{d:+.2f}"


def md_cell(text: Any) -> str:
    """Make a value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


_TEXT_COLUMNS = {"variant", "task", "verdict", "setting"}


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numeric columns right-aligned so the decimals line up."""
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_comparison_delta(cmp: Comparison) -> str:
    """The difference, with the std of the per-seed differences when they are paired."""
    text = fmt_delta(cmp.diff)
    if cmp.kind == "paired":
        text += " ± " + ("n/a" if _is_missing(cmp.diff_std) else f"{cmp.diff_std:.2f}")
    return text


def verdict_text(cmp: Comparison, better: str = "better", worse: str = "worse",
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
        return f"within noise (p={fmt_p(cmp.p)}){how}"
    verdict = better if cmp.diff > 0 else worse
    # A t-test with one degree of freedom: two steady differences pass it, and a third
    # seed often undoes that; the reader should see the verdict stands on two seeds.
    verdict += " (2 pairs: provisional)" if cmp.n_pairs == 2 else how
    if holm_p is not None and holm_p >= cmp.alpha:
        verdict += f" (not after Holm: p={fmt_p(holm_p)})"
    return verdict


def holm_by_key(comparisons: Mapping[Any, Comparison]) -> dict[Any, float | None]:
    """Holm-adjusted verdict p of each comparison, the mapping's comparisons being the family."""
    keys = list(comparisons)
    return dict(zip(keys, holm_adjust([comparisons[k].p for k in keys]), strict=True))
