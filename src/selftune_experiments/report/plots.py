"""The report's figures: scores per seed and learning curves, one panel per task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from selftune_experiments.report.grid import RunGrid
from selftune_experiments.stats import summarize


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


def _colors(grid: RunGrid) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(grid.variants)}


def plot_scores(grid: RunGrid, path: Path) -> None:
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


def plot_learning_curves(grid: RunGrid, path: Path) -> None:
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
