"""Is the run_glue-style peer as accurate as selftune? Its full-scale dev scores against
selftune's baseline seeds, per task.

With one peer seed the question is whether that run could be one more selftune seed: a
two-sided t test of the new observation against the seeds' mean, with the prediction
interval's spread s·sqrt(1 + 1/n). With two or more peer seeds: Welch's t test and
Mann-Whitney U between the two sets.

    python benchmarks/peer_accuracy.py --peer benchmarks/peer_full_scale.results.jsonl \
        --selftune benchmarks/baseline.results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from scipy import stats

from selftune_experiments.stats import summarize


def scores_by_task(path: Path, variant: str | None = None) -> dict[str, dict[int, float]]:
    by_task: dict[str, dict[int, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if variant is None or record.get("variant") == variant:
            by_task[record["task"]][int(record["seed"])] = float(record["score"])
    return by_task


def prediction_spread(std: float, n: int) -> float:
    """The spread of one new observation around the mean of n: s·sqrt(1 + 1/n)."""
    return std * math.sqrt(1 + 1 / n)


def compare(peer: list[float], ours: list[float]) -> tuple[str, float]:
    if len(peer) == 1:
        mean, std, n = summarize(ours)
        t = (peer[0] - mean) / prediction_spread(std, n)
        return "one new run vs the seeds (t, prediction interval)", 2 * stats.t.sf(abs(t), n - 1)
    welch = stats.ttest_ind(peer, ours, equal_var=False).pvalue
    mann_whitney = stats.mannwhitneyu(peer, ours, alternative="two-sided").pvalue
    return f"Welch t; Mann-Whitney U p = {mann_whitney:.3f}", welch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True)
    parser.add_argument("--selftune", type=Path, required=True)
    parser.add_argument("--variant", default="baseline")
    args = parser.parse_args()
    peer = scores_by_task(args.peer)
    ours = scores_by_task(args.selftune, args.variant)
    print("| task | peer (seeds) | selftune mean ± std (n) | 95% prediction interval | test | p |")
    print("|---|---|---|---|---|---:|")
    for task, peer_scores in peer.items():
        if len(ours.get(task, {})) < 2:
            print(f"| {task} | … | fewer than 2 selftune seeds | | | |")
            continue
        values = list(ours[task].values())
        mean, std, n = summarize(values)
        half = stats.t.ppf(0.975, n - 1) * prediction_spread(std, n)
        test, p = compare(list(peer_scores.values()), values)
        listed = ", ".join(f"{s:.2f} (seed {k})" for k, s in sorted(peer_scores.items()))
        print(f"| {task} | {listed} | {mean:.2f} ± {std:.2f} ({n}) | {mean - half:.2f} – "
              f"{mean + half:.2f} | {test} | {p:.3f} |")


if __name__ == "__main__":
    main()
