"""Tests for selftune_experiments.stats: every p-value is checked against a direct scipy call."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as sps

from selftune_experiments.stats import compare, holm_adjust, summarize

BASE = {0: 60.2, 1: 62.9, 2: 58.4, 3: 61.7, 4: 59.9}
OTHER = {0: 61.0, 1: 64.1, 2: 58.2, 3: 63.5, 4: 61.2}


def _arrays(base: dict[int, float], other: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    shared = sorted(set(base) & set(other))
    return np.array([base[s] for s in shared]), np.array([other[s] for s in shared])


# ---------------------------------------------------------------------------------- summarize


def test_summarize_uses_sample_std() -> None:
    values = [55.6, 58.1, 53.0, 60.4]
    mean, std, n = summarize(values)
    assert n == 4
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert std != pytest.approx(np.std(values, ddof=0))


def test_summarize_one_value_has_nan_std() -> None:
    mean, std, n = summarize([71.5])
    assert (mean, n) == (71.5, 1)
    assert math.isnan(std)


def test_summarize_empty_and_generator() -> None:
    mean, std, n = summarize([])
    assert n == 0 and math.isnan(mean) and math.isnan(std)
    assert summarize(x for x in (1.0, 3.0))[0:2] == pytest.approx((2.0, math.sqrt(2.0)))


# ------------------------------------------------------------------------------------ paired


def test_paired_matches_scipy() -> None:
    c = compare(BASE, OTHER)
    b, o = _arrays(BASE, OTHER)
    d = o - b
    assert c.kind == "paired"
    assert c.n_pairs == 5 and c.n_baseline == 5 and c.n_other == 5
    assert c.diff == pytest.approx(d.mean())
    assert c.diff_std == pytest.approx(d.std(ddof=1))
    assert c.t_p == pytest.approx(sps.ttest_rel(o, b).pvalue)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon(o, b).pvalue)
    # Given beside the paired test (BAM! reports it), but the verdict is the t-test's.
    assert c.mannwhitney_p == pytest.approx(
        sps.mannwhitneyu(o, b, alternative="two-sided").pvalue)
    assert c.p == c.t_p
    assert c.significant == (c.t_p < 0.05)


def test_paired_direction_is_other_minus_baseline() -> None:
    forward = compare(BASE, OTHER)
    backward = compare(OTHER, BASE)
    assert forward.diff > 0
    assert backward.diff == pytest.approx(-forward.diff)
    assert backward.t_p == pytest.approx(forward.t_p)


def test_paired_uses_only_shared_seeds() -> None:
    base = {0: 70.0, 1: 71.5, 2: 69.0, 3: 72.0}
    other = {2: 70.5, 3: 74.0, 4: 99.0, 5: 10.0}  # seeds 4 and 5 have no partner
    c = compare(base, other)
    b, o = np.array([69.0, 72.0]), np.array([70.5, 74.0])
    assert c.kind == "paired" and c.n_pairs == 2
    assert c.n_baseline == 4 and c.n_other == 4
    assert c.diff == pytest.approx(np.mean(o - b))
    assert c.t_p == pytest.approx(sps.ttest_rel(o, b).pvalue)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon(o - b).pvalue)


def test_all_zero_differences_give_p_one() -> None:
    c = compare(BASE, dict(BASE))
    assert c.kind == "paired"
    assert c.diff == 0.0 and c.diff_std == 0.0
    assert c.t_p == 1.0 and c.wilcoxon_p == 1.0
    assert not c.significant


def test_the_same_difference_on_every_seed_rests_on_the_exact_sign_test() -> None:
    """t = ∞ (p = 0) whenever every seed gains the same: on RTE (steps of 1/277) three seeds
    one example better each is no proof. The verdict takes the exact Wilcoxon p, 2/2^n."""
    base = {0: 50.0, 1: 60.0, 2: 70.0}
    other = {s: v + 2.0 for s, v in base.items()}
    c = compare(base, other)
    assert c.kind == "paired" and c.diff == pytest.approx(2.0)
    assert c.t_p is None and c.wilcoxon_p == pytest.approx(0.25) and c.p == c.wilcoxon_p
    assert not c.significant
    six = {s: 50.0 + s for s in range(6)}
    c = compare(six, {s: v - 1.0 for s, v in six.items()})
    assert c.p == pytest.approx(1 / 32) and c.significant and c.diff == pytest.approx(-1.0)
    # The same as scipy's exact test where scipy can compute it without ties in the ranks.
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert sps.wilcoxon(d, method="exact").pvalue == pytest.approx(1 / 32)


def test_the_same_difference_on_two_seeds_gives_no_verdict() -> None:
    c = compare({0: 55.6, 1: 56.3}, {0: 55.96, 1: 56.66})
    assert c.kind == "paired" and c.t_p is None
    # Equal up to float rounding (accuracies are k/n·100) counts as the same difference.
    c = compare({0: 100 * 154 / 277, 1: 100 * 156 / 277}, {0: 100 * 155 / 277, 1: 100 * 157 / 277})
    assert c.kind == "paired" and c.n_pairs == 2
    assert c.t_p is None and c.p == pytest.approx(0.5) and not c.significant


def test_wilcoxon_with_zero_differences_matches_scipy_or_is_none() -> None:
    base = {0: 50.0, 1: 60.0, 2: 70.0}
    other = {0: 50.0, 1: 60.0, 2: 71.5}  # only one non-zero difference
    c = compare(base, other)
    b, o = _arrays(base, other)
    assert c.kind == "paired"
    assert c.t_p == pytest.approx(sps.ttest_rel(o, b).pvalue)
    try:
        expected = sps.wilcoxon(o - b).pvalue
    except ValueError:
        assert c.wilcoxon_p is None
    else:
        assert c.wilcoxon_p == pytest.approx(expected)


def test_two_pairs_is_enough_for_paired() -> None:
    base, other = {0: 80.0, 1: 82.0}, {0: 81.0, 1: 85.0}
    c = compare(base, other)
    assert c.kind == "paired" and c.n_pairs == 2
    assert c.t_p == pytest.approx(sps.ttest_rel([81.0, 85.0], [80.0, 82.0]).pvalue)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon([1.0, 3.0]).pvalue)


def test_large_consistent_gain_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    base = {s: 60.0 + rng.normal(0, 1.5) for s in range(8)}
    gain = {s: v + 5.0 + rng.normal(0, 0.3) for s, v in base.items()}
    noisy = {s: v + 0.1 + (6.0 if s % 2 else -6.0) for s, v in base.items()}
    assert compare(base, gain).significant
    tiny = compare(base, noisy)
    assert not tiny.significant
    assert tiny.t_p is not None and tiny.t_p >= 0.05


def test_alpha_is_configurable() -> None:
    c05 = compare(BASE, OTHER, alpha=0.05)
    p = c05.t_p
    assert p is not None and 0.01 < p < 0.05  # the fixture is chosen to sit between the two
    assert c05.significant
    c01 = compare(BASE, OTHER, alpha=0.01)
    assert c01.t_p == p and not c01.significant


# ---------------------------------------------------------------------------------- unpaired


def test_unpaired_when_seeds_do_not_overlap() -> None:
    base = {0: 60.0, 1: 61.5, 2: 59.0}
    other = {10: 66.0, 11: 64.5, 12: 67.0, 13: 65.0}
    c = compare(base, other)
    u = sps.mannwhitneyu([66.0, 64.5, 67.0, 65.0], [60.0, 61.5, 59.0], alternative="two-sided")
    assert c.kind == "unpaired"
    assert c.n_pairs == 0
    assert c.diff == pytest.approx(np.mean([66.0, 64.5, 67.0, 65.0]) - np.mean([60.0, 61.5, 59.0]))
    assert c.mannwhitney_p == pytest.approx(u.pvalue)
    assert c.t_p is None and c.wilcoxon_p is None
    assert c.p == c.mannwhitney_p
    assert c.significant == (u.pvalue < 0.05)


def test_one_shared_seed_falls_back_to_unpaired() -> None:
    base = {0: 60.0, 1: 61.5, 2: 59.0}
    other = {2: 66.0, 7: 64.5}
    c = compare(base, other)
    assert c.kind == "unpaired" and c.n_pairs == 1
    expected = sps.mannwhitneyu([66.0, 64.5], [60.0, 61.5, 59.0], alternative="two-sided")
    assert c.mannwhitney_p == pytest.approx(expected.pvalue)


def test_unpaired_identical_samples() -> None:
    c = compare({0: 5.0, 1: 5.0}, {5: 5.0, 6: 5.0})
    assert c.kind == "unpaired"
    assert c.mannwhitney_p == pytest.approx(1.0)
    assert not c.significant


# ------------------------------------------------------------------------------ insufficient


@pytest.mark.parametrize(
    ("base", "other"),
    [
        ({0: 60.0}, {0: 65.0}),  # one seed each, shared
        ({0: 60.0, 1: 61.0, 2: 62.0}, {9: 70.0}),  # other has one value, no pair
        ({0: 60.0}, {1: 70.0, 2: 71.0}),  # baseline has one value
    ],
)
def test_insufficient(base: dict[int, float], other: dict[int, float]) -> None:
    c = compare(base, other)
    assert c.kind == "insufficient"
    assert c.t_p is None and c.wilcoxon_p is None and c.mannwhitney_p is None
    assert c.p is None and not c.significant
    assert c.diff == pytest.approx(np.mean(list(other.values())) - np.mean(list(base.values())))


def test_insufficient_with_an_empty_side() -> None:
    c = compare({0: 60.0, 1: 61.0}, {})
    assert c.kind == "insufficient" and math.isnan(c.diff) and c.n_other == 0


# -------------------------------------------------------------------------------------- misc


def test_rejects_non_finite_scores_and_bad_alpha() -> None:
    with pytest.raises(ValueError, match="seed 1"):
        compare({0: 1.0, 1: math.nan}, {0: 1.0, 1: 2.0})
    with pytest.raises(ValueError, match="alpha"):
        compare(BASE, OTHER, alpha=1.5)


def test_comparison_asdict_keeps_the_verdict() -> None:
    d = dataclasses.asdict(compare(BASE, OTHER))
    assert d["kind"] == "paired"
    assert "significant" in d and "p" in d
    assert d["p"] == d["t_p"]


# -------------------------------------------------------------------------------- holm_adjust


def test_holm_adjust_on_a_worked_example() -> None:
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → kept monotone: 0.06.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_adjust_caps_at_one_and_skips_missing_tests() -> None:
    # None is not a test: m = 2 here, not 3.
    assert holm_adjust([0.6, None, 0.02]) == [pytest.approx(0.6), None, pytest.approx(0.04)]
    assert holm_adjust([0.7, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == [] and holm_adjust([None]) == [None]
    assert holm_adjust([0.3]) == pytest.approx([0.3])


def _holm_step_down_rejects(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as published: walk the sorted p-values, reject while
    p₍ⱼ₎ ≤ alpha / (m − j + 1), stop at the first that is not."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    reject = [False] * len(p_values)
    for j, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - j):
            break
        reject[i] = True
    return reject


def test_adjusted_p_below_alpha_is_holms_step_down_procedure() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 25))
        # A mix of tiny and null-like p-values, so both rejecting and stopping happen.
        p_values = list(np.where(rng.random(m) < 0.4, rng.random(m) * 0.01, rng.random(m)))
        adjusted = holm_adjust(p_values)
        for alpha in (0.01, 0.05, 0.1):
            # Strict "<" as the report's verdict uses it; ties at exactly alpha have measure 0.
            assert [a < alpha for a in adjusted] == _holm_step_down_rejects(p_values, alpha)
        assert all(a >= p for a, p in zip(adjusted, p_values, strict=True))


def test_holm_adjust_rejects_impossible_p_values() -> None:
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm_adjust([0.2, 1.5])
