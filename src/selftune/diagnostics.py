"""``selftune diagnose-cls``: the analysis that motivates [CLS] normalization (docs/methods.md §3).

Zhou et al. (2019) report that, before fine-tuning, the last-layer [CLS] values "concentrate on a
few dimensions and are non-zero centered", and that gradients through [CLS] may explode. This
module measures both on a task's training data:

- per-dimension mean and std of the [CLS] hidden state and of the pooler output (the pre-trained
  model, eval mode, padding excluded);
- the share of each example's squared norm held by its top-k dimensions, averaged over examples;
- the offset from zero: ‖mean‖ / mean ‖r‖ (0 for centred data, 1 when every vector is the mean);
- the norm of the loss gradient at the [CLS] representation over the first steps of fine-tuning,
  with each normalization.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from selftune.errors import SelftuneError
from selftune.extras import require_matplotlib
from selftune.models.cls_norm import CLS_NORM_KINDS, CLS_SOURCES, compute_cls_stats

TOP_K = (1, 5, 10)
if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def check_options(kinds: tuple[str, ...], sources: tuple[str, ...] | None, steps: int,
                  batch_size: int, learning_rate: float, seed: int) -> None:
    """Refuse option values that would otherwise fail deep in the run (with a traceback)."""
    for flag, values, valid in (("--norms", kinds, CLS_NORM_KINDS),
                                ("--sources", sources, CLS_SOURCES)):
        if values is None:
            continue
        if not values:
            raise SelftuneError(f"{flag} is empty; give one or more of {', '.join(valid)}, "
                                "comma-separated")
        bad = [v for v in values if v not in valid]
        if bad:
            raise SelftuneError(f"unknown {flag} value(s) {', '.join(map(repr, bad))}; "
                                f"valid values: {', '.join(valid)}")
    checks = [
        (steps >= 1, "--steps must be at least 1"),
        # batchnorm/isobn statistics of a single example are undefined
        (batch_size >= 2, "--batch-size must be at least 2"),
        (math.isfinite(learning_rate) and learning_rate > 0,
         f"--learning-rate must be positive, got {learning_rate:g}"),
        (0 <= seed < 2 ** 32, f"--seed must be between 0 and {2 ** 32 - 1}, got {seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SelftuneError(message)


def check_model(model: PreTrainedModel, sources: tuple[str, ...] | None) -> tuple[str, ...]:
    """The sources to measure (``None``: cls and pooler, or cls alone without a pooler), after
    refusing a model the gradient runs cannot normalize or a pooler it does not have."""
    from selftune.models.heads import check_pooled_head

    check_pooled_head(model, "diagnose-cls")
    base = model.base_model
    if base.pooler is not None:
        return sources or ("cls", "pooler")
    if sources is None:
        logger.warning("the model has no pooler: measuring the last-layer [CLS] only")
        return ("cls",)
    if "pooler" in sources:
        raise SelftuneError("the model has no pooler; use --sources cls")
    return sources


@dataclass
class Representations:
    source: str
    vectors: np.ndarray  # (examples, hidden)


def collect(model, loader: DataLoader, source: str) -> Representations:
    """[CLS] hidden states (``cls``) or pooler outputs (``pooler``) of the model in eval mode."""
    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    rows = []
    with torch.no_grad():
        for batch in loader:
            inputs = {k: v for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            out = encoder(**inputs)
            rows.append((out.last_hidden_state[:, 0] if source == "cls"
                         else out.pooler_output).float().numpy())
    encoder.train(was_training)
    return Representations(source, np.concatenate(rows))


def summarize(rep: Representations) -> dict[str, Any]:
    x = rep.vectors.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    squared = x ** 2
    ordered = -np.sort(-squared, axis=1)
    totals = squared.sum(1, keepdims=True)
    shares = {f"top{k}_share": float((ordered[:, :k].sum(1, keepdims=True) / totals).mean())
              for k in TOP_K}
    hidden = x.shape[1]
    order = np.argsort(-np.abs(mean))
    return {
        "source": rep.source,
        "examples": int(x.shape[0]),
        "hidden": hidden,
        "mean_abs_mean": float(np.abs(mean).mean()),
        "mean_std": float(std.mean()),
        "offset_ratio": float(np.linalg.norm(mean) / np.linalg.norm(x, axis=1).mean()),
        "dims_mean_beyond_std": int((np.abs(mean) > std).sum()),
        **shares,
        "uniform_top10_share": min(10, hidden) / hidden,
        "largest_mean_dims": [(int(i), float(mean[i]), float(std[i])) for i in order[:5]],
        "mean": mean.tolist(),
        "std": std.tolist(),
    }


def gradient_norms(
    model, batches: list[dict[str, torch.Tensor]], kind: str, source: str, learning_rate: float,
    seed: int, stats_loader: DataLoader | None = None,
) -> list[float]:
    """‖∂loss/∂r‖ per example, averaged over the batch, at each step, one step per batch.

    ``stats_loader`` gives the examples for the statistics of ``center``/``standardize``.
    """
    from selftune.models.heads import install_cls_norm

    student = copy.deepcopy(model)
    stats = None
    if kind in ("center", "standardize"):
        if stats_loader is None:
            raise ValueError(f"{kind} needs a stats_loader for its statistics")
        stats = compute_cls_stats(student, stats_loader, source=source)
    install_cls_norm(student, kind, source, stats)
    pooler = student.base_model.pooler
    pooler.keep_input = True
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
    student.train()
    torch.manual_seed(seed)  # the same dropout masks for every normalization
    norms: list[float] = []
    for batch in batches:
        loss = student(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        grad = pooler.last_input.grad
        norms.append(float(grad.norm(dim=1).mean()))
        optimizer.step()
    return norms


def diagnose(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_set: datasets.Dataset,
    out_dir: Path, kinds: tuple[str, ...] = CLS_NORM_KINDS,
    sources: tuple[str, ...] | None = None, steps: int = 20, batch_size: int = 32,
    learning_rate: float = 5e-5, seed: int = 0, task_name: str = "",
) -> str:
    """Run the analysis, write diagnostics.md / .json and PNG plots; return the Markdown.

    ``sources=None`` measures the [CLS] hidden state and the pooler output, or the [CLS] alone
    when the model has no pooler.
    """
    from tqdm.auto import tqdm

    check_options(kinds, sources, steps, batch_size, learning_rate, seed)
    sources = check_model(model, sources)
    require_matplotlib("selftune diagnose-cls")
    out_dir.mkdir(parents=True, exist_ok=True)
    features = train_set.remove_columns([c for c in ("example_id",) if c in train_set.column_names])
    collator = DataCollatorWithPadding(tokenizer)
    stats_loader = DataLoader(features.remove_columns(["labels"]), batch_size=128,
                              collate_fn=collator)
    summaries = [summarize(collect(model, stats_loader, s)) for s in sources]
    # Drawn once: every normalization is measured on the same batches, in the same order.
    train_loader = DataLoader(features, batch_size=batch_size, shuffle=True,
                              collate_fn=collator,
                              generator=torch.Generator().manual_seed(seed))
    batches: list[dict[str, torch.Tensor]] = []
    while len(batches) < steps:
        more = list(itertools.islice(train_loader, steps - len(batches)))
        if not more:
            raise ValueError("diagnose(): the training set is empty")
        batches += more
    grads: dict[str, dict[str, list[float]]] = {}
    runs = [(s, k) for s in sources for k in kinds]
    for source, kind in tqdm(runs, desc="gradient runs"):
        grads.setdefault(source, {})[kind] = gradient_norms(
            model, batches, kind, source, learning_rate, seed, stats_loader)
    result = {"task": task_name, "steps": steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "summaries": summaries, "gradient_norms": grads}
    (out_dir / "diagnostics.json").write_text(json.dumps(result, indent=1))
    _plot(summaries, grads, out_dir)
    markdown = _markdown(result)
    (out_dir / "diagnostics.md").write_text(markdown)
    return markdown


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# [CLS] diagnostics{': ' + result['task'] if result['task'] else ''}", "",
             "## The pre-trained representation", "",
             "| representation | examples | mean abs(mean_i) | mean std_i | offset ‖mean‖/mean‖r‖ "
             "| dims with abs(mean) > std | top-1 share | top-5 share | top-10 share "
             "(uniform) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["summaries"]:
        lines.append(
            f"| {s['source']} | {s['examples']} | {s['mean_abs_mean']:.4f} | {s['mean_std']:.4f} "
            f"| {s['offset_ratio']:.3f} | {s['dims_mean_beyond_std']}/{s['hidden']} "
            f"| {s['top1_share']:.3f} | {s['top5_share']:.3f} | {s['top10_share']:.3f} "
            f"({s['uniform_top10_share']:.3f}) |")
    lines += ["", "Largest per-dimension means (dimension: mean ± std):", ""]
    for s in result["summaries"]:
        dims = ", ".join(f"{i}: {m:+.3f} ± {sd:.3f}" for i, m, sd in s["largest_mean_dims"])
        lines.append(f"- {s['source']}: {dims}")
    lines += ["", f"## Gradient norm at [CLS] over the first {result['steps']} steps", "",
              f"‖∂loss/∂r‖ per example (batch mean), batch {result['batch_size']}, AdamW lr "
              f"{result['learning_rate']:g}; r is the representation the normalizer receives.",
              "", "| representation | normalization | step 1 | mean | max | last |",
              "|---|---|---:|---:|---:|---:|"]
    for source, by_kind in result["gradient_norms"].items():
        for kind, norms in by_kind.items():
            lines.append(f"| {source} | {kind} | {norms[0]:.4g} | {np.mean(norms):.4g} "
                         f"| {max(norms):.4g} | {norms[-1]:.4g} |")
    lines += ["", "![per-dimension statistics](cls_stats.png)", "",
              "![gradient norms](grad_norms.png)", ""]
    return "\n".join(lines)


def _plot(summaries: list[dict], grads: dict[str, dict[str, list[float]]], out_dir: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(summaries), 4), layout="constrained")
    for ax, s in zip(fig.subplots(1, len(summaries), squeeze=False)[0], summaries, strict=True):
        mean, std = np.array(s["mean"]), np.array(s["std"])
        order = np.argsort(-np.abs(mean))
        ax.bar(range(len(mean)), mean[order], width=1.0, label="mean", color="tab:blue")
        ax.plot(range(len(mean)), std[order], color="tab:orange", lw=1, label="std")
        ax.set_title(f"{s['source']}: per-dimension mean (sorted by |mean|) and std")
        ax.set_xlabel("dimension rank")
        ax.legend()
    fig.savefig(out_dir / "cls_stats.png", dpi=110)

    fig = Figure(figsize=(6 * len(grads), 4), layout="constrained")
    for ax, (source, by_kind) in zip(fig.subplots(1, len(grads), squeeze=False)[0],
                                     grads.items(), strict=True):
        for kind, norms in by_kind.items():
            ax.plot(range(1, len(norms) + 1), norms, label=kind, marker=".")
        ax.set_yscale("log")
        ax.set_title(f"gradient norm at [CLS] ({source})")
        ax.set_xlabel("step")
        ax.set_ylabel("‖∂loss/∂r‖")
        ax.legend(fontsize=8)
    fig.savefig(out_dir / "grad_norms.png", dpi=110)
