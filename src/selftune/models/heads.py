"""Put a [CLS] normalizer between the encoder and the classifier, and take it out again.

The encoder's pooler is replaced by a ``NormalizedPooler`` that returns norm(r), where r is the
pooler output (``source="pooler"``, what BERT's classifier reads) or the last layer's [CLS]
hidden state (``source="cls"``, bypassing the pooler). The pooler's dense weights keep their
names, so checkpoints stay compatible, and the normalizer's statistics are buffers saved in
model.safetensors. ``config.json`` records the choice (``selftune_cls_norm``,
``selftune_cls_source``) so that ``selftune evaluate``/``predict`` rebuild the same model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from selftune.errors import SelftuneError
from selftune.models.cls_norm import ClsStats, make_cls_norm

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from selftune.config import TrainConfig

logger = logging.getLogger("selftune")

# Architectures whose sequence classifier reads the pooled [CLS] through BERT's pooler (dense
# layer + activation on the first token), which NormalizedPooler replaces. Others, e.g. RoBERTa,
# classify from the sequence output with a head of their own, where a normalizer in the pooler
# would silently do nothing; ALBERT and MobileBERT pool differently and are not supported.
POOLED_HEAD_TYPES = ("bert", "megatron-bert", "ernie")
NORM_KEY = "selftune_cls_norm"
SOURCE_KEY = "selftune_cls_source"


class NormalizedPooler(nn.Module):
    """The pooler (or a plain [CLS] pick) followed by a [CLS] normalizer."""

    def __init__(self, pooler: nn.Module | None, norm: nn.Module, source: str) -> None:
        super().__init__()
        self.source = source
        if source == "pooler":
            # The pooler's own layers, registered directly on this module (not under a child
            # "pooler"), so the weights keep their names (pooler.dense.*).
            self.dense = pooler.dense
            self.activation = pooler.activation
        self.cls_norm = norm
        # The model's own pooler, in a tuple so it is not registered twice (for folding).
        self.original_pooler = (pooler,)
        self.last_input: torch.Tensor | None = None  # for diagnostics (gradient at [CLS])
        self.keep_input = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        r = hidden_states[:, 0]
        if self.source == "pooler":
            r = self.activation(self.dense(r))
        if self.keep_input and r.requires_grad:
            r.retain_grad()
            self.last_input = r
        return self.cls_norm(r)


def default_source(model: PreTrainedModel) -> str:
    """The representation the model's classifier consumes: the pooler output if it has one."""
    return "pooler" if getattr(model.base_model, "pooler", None) is not None else "cls"


def check_pooled_head(model: PreTrainedModel, what: str) -> None:
    """Refuse a model whose classifier does not read the pooled [CLS]: nothing to normalize."""
    if model.config.model_type not in POOLED_HEAD_TYPES or not hasattr(model.base_model,
                                                                        "pooler"):
        raise SelftuneError(
            f"{what} needs an encoder whose classifier reads the pooled [CLS] (model types "
            f"{', '.join(POOLED_HEAD_TYPES)}); {type(model).__name__} classifies otherwise")


def install_cls_norm(
    model: PreTrainedModel, kind: str, source: str = "auto", stats: ClsStats | None = None
) -> None:
    """Insert the normalizer ``kind`` before the classifier of a BERT-like model (in place)."""
    check_pooled_head(model, "--cls-norm")
    base = model.base_model
    if source == "auto":
        source = default_source(model)
    if source not in ("cls", "pooler"):
        raise SelftuneError(f"--cls-source must be auto, cls or pooler, got {source!r}")
    if source == "pooler" and base.pooler is None:
        raise SelftuneError("--cls-source pooler: this model has no pooler; use --cls-source cls")
    if isinstance(base.pooler, NormalizedPooler):
        raise SelftuneError("this model already has a [CLS] normalizer")
    norm = make_cls_norm(kind, model.config.hidden_size, stats)
    device = next(model.parameters()).device
    base.pooler = NormalizedPooler(base.pooler, norm.to(device), source)
    setattr(model.config, NORM_KEY, kind)
    setattr(model.config, SOURCE_KEY, source)


def saved_cls_norm(model_dir: str) -> tuple[str, str] | None:
    """The (normalizer, source) a selftune model directory was saved with, or None."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():  # a Hub id: not a selftune model
        return None
    config = json.loads(config_file.read_text())
    kind, source = config.get(NORM_KEY), config.get(SOURCE_KEY, "pooler")
    if kind in (None, "none") and source == "pooler":
        return None
    return kind or "none", source


def restore_cls_norm(model: PreTrainedModel, model_dir: Path) -> None:
    """Rebuild the normalizer recorded in a saved model's config and load its statistics."""
    kind = getattr(model.config, NORM_KEY, None)
    if kind in (None, "none") and getattr(model.config, SOURCE_KEY, "pooler") == "pooler":
        return
    hidden = model.config.hidden_size
    placeholder = ClsStats(torch.zeros(hidden), torch.ones(hidden))  # overwritten below
    install_cls_norm(model, kind or "none", getattr(model.config, SOURCE_KEY, "pooler"),
                     placeholder)
    prefix = f"{model.base_model_prefix}.pooler.cls_norm."
    saved: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:  # only these few tensors
            saved.update({k: weights.get_tensor(k) for k in weights.keys()
                          if k.startswith(prefix)})
    expected = {f"{prefix}{k}" for k in model.base_model.pooler.cls_norm.state_dict()}
    missing = sorted(expected - set(saved))
    if missing:
        raise SelftuneError(f"{model_dir}: the [CLS] normalizer's statistics are missing "
                            f"({missing[0]}...); the model directory is incomplete")
    model.base_model.pooler.cls_norm.load_state_dict(
        {k.removeprefix(prefix): v for k, v in saved.items()})


def add_cls_norm(cfg: TrainConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 train_set: datasets.Dataset, output_dir: Path, *, is_main_process: bool,
                 start_dir: str | None = None) -> None:
    """Insert the run's [CLS] normalizer (``cfg.cls_norm`` on ``cfg.cls_source``);
    center/standardize get the pre-trained model's statistics over the training set, computed
    once here and saved with the run (cls_stats.safetensors, by the main process).

    A run that starts from a selftune model saved with the same normalizer (``start_dir``;
    e.g. BAM!'s --finetune-after from the student's task model) keeps that one: its
    classifier was trained on what it outputs, and its statistics are already the
    pre-trained model's (recomputed now, they would be the fine-tuned encoder's)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    from selftune.models.cls_norm import compute_cls_stats

    source = default_source(model) if cfg.cls_source == "auto" else cfg.cls_source
    saved = saved_cls_norm(start_dir) if start_dir else None
    if saved == (cfg.cls_norm, source):
        setattr(model.config, NORM_KEY, cfg.cls_norm)
        setattr(model.config, SOURCE_KEY, source)
        restore_cls_norm(model, Path(start_dir))
        logger.info("[CLS] normalization %s on the %s representation, with its state as "
                    "saved in %s", cfg.cls_norm, source, start_dir)
        return
    if saved is not None:
        logger.warning("%s was fine-tuned with [CLS] normalization %s on %s; this run replaces "
                       "it with --cls-norm %s on %s", start_dir, *saved, cfg.cls_norm, source)
    if cfg.cls_norm == "none" and cfg.cls_source == "auto":
        return  # the model as it comes
    stats = None
    if cfg.cls_norm in ("center", "standardize"):
        features = train_set.select_columns(
            [c for c in train_set.column_names if c in tokenizer.model_input_names])
        loader = torch.utils.data.DataLoader(features, batch_size=cfg.per_device_eval_batch_size,
                                             collate_fn=DataCollatorWithPadding(tokenizer))
        # One forward pass over the training set: minutes on a CPU, so it shows progress.
        progress = tqdm(loader, desc="[CLS] statistics", unit="batch",
                        disable=not is_main_process)
        stats = compute_cls_stats(model, progress, source=source)
        if is_main_process:
            save_file({"mean": stats.mean.contiguous(), "std": stats.std.contiguous()},
                      str(output_dir / "cls_stats.safetensors"))
    install_cls_norm(model, cfg.cls_norm, source, stats)
    logger.info("[CLS] normalization %s on the %s representation", cfg.cls_norm, source)


def fold_cls_norm(model: PreTrainedModel) -> PreTrainedModel:
    """Fold a fixed normalizer into the classifier, leaving a plain model (where exact).

    At evaluation center, standardize, batchnorm and isobn are affine maps a·r + c of the
    pooler output, so classifier(a·r + c) = (W·diag(a))·r + (W·c + b) exactly. LayerNorm (it
    depends on each example) and ``source="cls"`` (the plain model would apply the pooler) cannot
    be folded.
    """
    from selftune.models.cls_norm import CenterNorm, IsoBN, StandardizeNorm

    pooler = model.base_model.pooler
    if not isinstance(pooler, NormalizedPooler):
        return model
    if pooler.source != "pooler":
        raise SelftuneError("a [CLS] normalizer on the last-layer [CLS] (--cls-source cls) "
                            "cannot be folded into a plain model; load it with selftune")
    norm = pooler.cls_norm
    hidden = model.config.hidden_size
    with torch.no_grad():
        if isinstance(norm, nn.Identity):
            a, c = torch.ones(hidden), torch.zeros(hidden)
        elif isinstance(norm, CenterNorm):
            a, c = torch.ones(hidden), -norm.mean.float()
        elif isinstance(norm, StandardizeNorm):
            a = norm.scale()
            c = -norm.mean.float() * a
        elif isinstance(norm, nn.BatchNorm1d):
            a = 1.0 / torch.sqrt(norm.running_var.float() + norm.eps)
            c = -norm.running_mean.float() * a
        elif isinstance(norm, IsoBN):
            a = norm.scale() if norm.has_statistics() else torch.ones(hidden)
            c = torch.zeros(hidden)
        else:
            raise SelftuneError(f"a {type(norm).__name__} [CLS] normalizer depends on each "
                                "example and cannot be folded into a plain model")
        classifier = model.classifier
        weight = classifier.weight.float()
        classifier.bias.copy_(classifier.bias.float() + weight @ c.to(weight.device))
        classifier.weight.copy_(weight * a.to(weight.device).unsqueeze(0))
    model.base_model.pooler = pooler.original_pooler[0]
    setattr(model.config, NORM_KEY, "none")
    setattr(model.config, SOURCE_KEY, "pooler")
    return model
