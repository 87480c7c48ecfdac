"""Seed statistics: is a variant's gain over the baseline real, or inside the seed noise?

Fine-tuning a pretrained encoder on a small task swings by several points from one random seed
to the next, so a single-seed difference says almost nothing. The report therefore runs every
variant on several seeds and compares it with the baseline here:

* When the two variants share seeds, the comparison is *paired* on those seeds: the same seed
  fixes the same data order and the same classifier-head initialisation for both, so the
  per-seed difference cancels much of that noise. We report the paired t-test and, because
  five to ten differences are far too few to trust a normality assumption, the Wilcoxon
  signed-rank test next to it.
* When they share fewer than two seeds (e.g. results from grids run with different seed lists),
  pairing is impossible and we fall back to the Mann-Whitney U test on the two samples.
* The Mann-Whitney p is also given beside a paired test, because some papers report it (BAM!
  compares its variants with it); it ignores the pairing, so it is the weaker of the two and the
  verdict stays with the paired test.
* With fewer than two values on a side, no test is meaningful and we say so instead of
  printing a p-value that looks precise and is not.
* A report tests every variant on every task, twenty tests for five variants on four tasks,
  and at alpha = 0.05 one in twenty tests of a variant that changes nothing comes out
  "significant" by chance alone. ``holm_adjust`` gives
  the Holm-Bonferroni adjusted p-values over such a family, so a reader can see which
  differences survive the number of tests made (scipy has Benjamini-Hochberg, which controls the
  false discovery rate, but no family-wise correction; Holm is uniformly more powerful than
  Bonferroni and needs no assumption about how the tests depend on each other, and runs on
  the same seeds are dependent).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as _scipy_stats

ComparisonKind = Literal["paired", "unpaired", "insufficient"]

DEFAULT_ALPHA = 0.05


def summarize(values: Iterable[float]) -> tuple[float, float, int]:
    """Return ``(mean, std, n)`` of ``values``, with the sample std (``ddof=1``).

    The sample std is what estimates the seed-to-seed spread of a fine-tuning recipe; the
    population std (``ddof=0``) understates it for the handful of seeds one can afford. With a
    single value the spread is unknown, so std is ``nan`` rather than a misleading ``0``; with
    no values both mean and std are ``nan``.
    """
    arr = np.asarray(list(values), dtype=float)
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n >= 2 else math.nan
    return mean, std, n


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing one variant (``other``) with the baseline across seeds.

    ``diff`` is always ``other - baseline``: for a paired comparison, the mean of the per-seed
    differences over the shared seeds (so it can differ from the difference of the two overall
    means when the variants were run on different seed sets); for an unpaired one, the
    difference of the two means. p-values that do not apply, or that the test could not
    produce, are ``None``, never ``nan``, so callers cannot mistake them for numbers.
    """

    kind: ComparisonKind
    diff: float
    diff_std: float
    n_pairs: int
    n_baseline: int
    n_other: int
    t_p: float | None
    wilcoxon_p: float | None
    mannwhitney_p: float | None
    alpha: float

    p: float | None = field(init=False)
    """The p-value the verdict rests on: t-test if paired (the Wilcoxon p when the differences
    are all equal, where the t-test degenerates), Mann-Whitney U if unpaired."""
    significant: bool = field(init=False)
    """Whether ``p < alpha``; a difference with ``p >= alpha`` is inside the seed noise."""

    def __post_init__(self) -> None:
        # Derived, but stored as fields so ``dataclasses.asdict`` (e.g. a JSON dump) keeps them.
        if self.kind == "paired":
            p = self.t_p if self.t_p is not None else self.wilcoxon_p
        elif self.kind == "unpaired":
            p = self.mannwhitney_p
        else:
            p = None
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "significant", p is not None and p < self.alpha)


def _finite_values(name: str, values: Mapping[int, float]) -> dict[int, float]:
    """Check ``values`` are finite numbers; a nan would silently turn every statistic to nan."""
    out: dict[int, float] = {}
    for seed, value in values.items():
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"compare(): {name} score for seed {seed} is {value!r}, not finite")
        out[seed] = v
    return out


def _clean_p(p: float) -> float | None:
    """Map scipy's ``nan`` (test undefined) to ``None`` and clip rounding noise into [0, 1]."""
    p = float(p)
    if math.isnan(p):
        return None
    return min(max(p, 0.0), 1.0)


def compare(
    baseline: Mapping[int, float],
    other: Mapping[int, float],
    alpha: float = DEFAULT_ALPHA,
) -> Comparison:
    """Compare per-seed scores of ``other`` against ``baseline`` (both keyed by seed).

    Paired analysis on the shared seeds if there are at least two of them; otherwise an
    unpaired Mann-Whitney U test if each side has at least two values; otherwise
    ``kind="insufficient"``. See the module docstring for why. ``mannwhitney_p`` is filled
    whenever each side has two values, paired or not; only an unpaired verdict rests on it.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"compare(): alpha must be in (0, 1), got {alpha!r}")
    base = _finite_values("baseline", baseline)
    oth = _finite_values("other", other)
    shared = sorted(set(base) & set(oth))

    # Mann-Whitney U on the two samples is computed whenever it is defined: it is the verdict
    # for unpaired variants, and beside a paired test it is the number to set next to papers
    # that used it (BAM!), although it ignores the pairing and so is the weaker test.
    u_p: float | None = None
    two_samples = len(base) >= 2 and len(oth) >= 2
    if two_samples:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            u_p = _clean_p(_scipy_stats.mannwhitneyu(
                list(oth.values()), list(base.values()), alternative="two-sided").pvalue)

    def comparison(kind: ComparisonKind, diff: float, diff_std: float = math.nan,
                   t_p: float | None = None, w_p: float | None = None) -> Comparison:
        return Comparison(kind=kind, diff=diff, diff_std=diff_std, n_pairs=len(shared),
                          n_baseline=len(base), n_other=len(oth), t_p=t_p, wilcoxon_p=w_p,
                          mannwhitney_p=u_p, alpha=alpha)

    if len(shared) >= 2:
        o = np.array([oth[s] for s in shared])
        b = np.array([base[s] for s in shared])
        d = o - b
        return comparison("paired", float(d.mean()), float(d.std(ddof=1)),
                          *_paired_p_values(o, b))
    diff = (
        float(np.mean(list(oth.values())) - np.mean(list(base.values())))
        if base and oth
        else math.nan
    )
    return comparison("unpaired" if two_samples else "insufficient", diff)


def _paired_p_values(o: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """(paired t-test p, Wilcoxon signed-rank p) of the scores ``o`` against ``b``, seed by
    seed."""
    d = o - b
    if np.all(d == 0):
        # Identical scores on every seed: no evidence of any difference. scipy returns nan
        # (t-test) or raises/warns (Wilcoxon, version-dependent) here, so decide ourselves.
        return 1.0, 1.0
    if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):
        # The same difference on every seed gives t = ∞ and a t-test p of 0, at any number
        # of seeds; but scores move in steps (RTE's dev set: 1/277), so equal steps happen
        # by chance. The exact Wilcoxon (sign-flip) p of n same-sign pairs, 2/2^n, is the
        # honest number, and the verdict rests on it.
        return None, min(1.0, 2.0 ** (1 - len(d)))
    with warnings.catch_warnings():
        # Nearly-constant differences trigger precision warnings; the p-value is still
        # the right limit (tiny when the differences are consistent), so keep it.
        warnings.simplefilter("ignore", RuntimeWarning)
        t_p = _clean_p(_scipy_stats.ttest_rel(o, b).pvalue)
        try:
            w_p = _clean_p(_scipy_stats.wilcoxon(d).pvalue)
        except ValueError:
            # Too few non-zero differences for this scipy version's Wilcoxon.
            w_p = None
    return t_p, w_p


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the order given; ``None`` (no test) stays ``None``.

    With the m real p-values sorted ascending, p₍₁₎ ≤ … ≤ p₍ₘ₎, the adjusted p₍ᵢ₎ is
    ``max over j ≤ i of min(1, (m - j + 1) · p₍ⱼ₎)``; rejecting every hypothesis whose adjusted
    p is below alpha is Holm's step-down procedure, which keeps the chance of even one false
    "significant" in the family below alpha. ``None`` entries are not tests and do not count
    towards m.
    """
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    for p, _ in tested:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"holm_adjust(): p-values must be in [0, 1], got {p!r}")
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running_max = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running_max = max(running_max, min(1.0, (m - rank) * p))
        adjusted[i] = running_max
    return adjusted
