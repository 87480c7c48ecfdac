"""Put a [CLS] normalizer between the encoder and the classifier, and take it out again.

The encoder's pooler is replaced by a ``NormalizedPooler`` that returns norm(r), where r is the
pooler output (``source="pooler"``, what BERT's classifier reads) or the last layer's [CLS]
hidden state (``source="cls"``, bypassing the pooler). The pooler's dense weights keep their
names, so checkpoints stay compatible, and the normalizer's statistics are buffers saved in
model.safetensors. ``config.json`` records the choice (``selftune_cls_norm``,
``selftune_cls_source``) so that ``selftune evaluate``/``predict`` rebuild the same model.

A finished model directory must load correctly with plain transformers or not at all
(:func:`save_portable`): a fixed normalizer on the pooler output is folded into the classifier,
the unfolded state kept in ``cls_norm/unfolded.safetensors`` for selftune (evaluation, further
training); any other normalizer is saved under a ``model_type`` transformers does not know, so
``AutoModel*.from_pretrained`` and ``pipeline()`` fail loudly instead of dropping it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from selftune.errors import SelftuneError
from selftune.models.cls_norm import ClsStats, make_cls_norm

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("selftune")

# Architectures whose sequence classifier reads the pooled [CLS] through BERT's pooler (dense
# layer + activation on the first token), which NormalizedPooler replaces. Others, e.g. RoBERTa,
# classify from the sequence output with a head of their own, where a normalizer in the pooler
# would silently do nothing; ALBERT and MobileBERT pool differently and are not supported.
POOLED_HEAD_TYPES = ("bert", "megatron-bert", "ernie")
NORM_KEY = "selftune_cls_norm"
SOURCE_KEY = "selftune_cls_source"
# A folded model directory keeps the normalizer and the classifier as trained here.
UNFOLDED_FILE = Path("cls_norm") / "unfolded.safetensors"
# What config.json says instead of its model_type when the normalizer cannot be folded: the
# text of transformers' "does not recognize this architecture" error. The real one is kept in
# ORIGINAL_TYPE_KEY for selftune's own loading.
UNFOLDABLE_MODEL_TYPE = ("selftune-cls-norm (a [CLS] normalizer transformers cannot apply: use "
                         "selftune predict / selftune evaluate on this folder; selftune export "
                         "explains which normalizers fold into a plain model)")
ORIGINAL_TYPE_KEY = "selftune_model_type"


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
    unfolded = Path(model_dir) / UNFOLDED_FILE
    if unfolded.is_file():
        with safe_open(str(unfolded), framework="pt") as saved:
            meta = saved.metadata()
        return meta["kind"], meta["source"]
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():  # a Hub id: not a selftune model
        return None
    config = json.loads(config_file.read_text())
    kind, source = config.get(NORM_KEY), config.get(SOURCE_KEY, "pooler")
    if kind in (None, "none") and source == "pooler":
        return None
    return kind or "none", source


def restore_cls_norm(model: PreTrainedModel, model_dir: Path) -> None:
    """Rebuild the normalizer recorded in a saved model's config and load its statistics
    (of a folded model: the normalizer and classifier as trained, unfolded)."""
    if (model_dir / UNFOLDED_FILE).is_file():
        restore_unfolded(model, model_dir, with_norm=True)
        return
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


def add_cls_norm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 train_set: datasets.Dataset, output_dir: Path, *, kind: str, source: str,
                 batch_size: int, is_main_process: bool, start_dir: str | None = None) -> None:
    """Insert a run's [CLS] normalizer ``kind`` (--cls-norm) on the representation ``source``
    (--cls-source: auto, cls or pooler); center/standardize get the pre-trained model's
    statistics over the training set (in batches of ``batch_size``), computed once here and
    saved with the run (cls_stats.safetensors, by the main process).

    A run that starts from a selftune model saved with the same normalizer (``start_dir``;
    e.g. BAM!'s --finetune-after from the student's task model) keeps that one: its
    classifier was trained on what it outputs, and its statistics are already the
    pre-trained model's (recomputed now, they would be the fine-tuned encoder's)."""
    resolved_source = default_source(model) if source == "auto" else source
    saved = saved_cls_norm(start_dir) if start_dir else None
    if saved is not None and (Path(start_dir) / UNFOLDED_FILE).is_file():
        # The classifier as trained beside its normalizer, as before folding existed.
        restore_unfolded(model, Path(start_dir), with_norm=False)
    if saved == (kind, resolved_source):
        setattr(model.config, NORM_KEY, kind)
        setattr(model.config, SOURCE_KEY, resolved_source)
        restore_cls_norm(model, Path(start_dir))
        logger.info("[CLS] normalization %s on the %s representation, with its state as "
                    "saved in %s", kind, resolved_source, start_dir)
        return
    if saved is not None:
        logger.warning("%s was fine-tuned with [CLS] normalization %s on %s; this run replaces "
                       "it with --cls-norm %s on %s", start_dir, *saved, kind, resolved_source)
    if kind == "none" and source == "auto":
        return  # the model as it comes
    stats = None
    if kind in ("center", "standardize"):
        stats = training_set_stats(model, tokenizer, train_set, resolved_source, batch_size,
                                   is_main_process)
        if is_main_process:
            save_file({"mean": stats.mean.contiguous(), "std": stats.std.contiguous()},
                      str(output_dir / "cls_stats.safetensors"))
    install_cls_norm(model, kind, resolved_source, stats)
    logger.info("[CLS] normalization %s on the %s representation", kind, resolved_source)


def training_set_stats(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       train_set: datasets.Dataset, source: str, batch_size: int,
                       show_progress: bool) -> ClsStats:
    """The pre-trained model's [CLS] statistics over a tokenized training set."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    from selftune.models.cls_norm import compute_cls_stats

    features = train_set.select_columns(
        [c for c in train_set.column_names if c in tokenizer.model_input_names])
    loader = torch.utils.data.DataLoader(features, batch_size=batch_size,
                                         collate_fn=DataCollatorWithPadding(tokenizer))
    # One forward pass over the training set: minutes on a CPU, so it shows progress.
    progress = tqdm(loader, desc="[CLS] statistics", unit="batch", disable=not show_progress)
    return compute_cls_stats(model, progress, source=source)


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


def can_fold(model: PreTrainedModel) -> bool:
    """Whether the model's [CLS] normalizer is an exact affine map of the pooler output."""
    from selftune.models.cls_norm import CenterNorm, IsoBN, StandardizeNorm

    pooler = model.base_model.pooler
    return pooler.source == "pooler" and isinstance(
        pooler.cls_norm, nn.Identity | CenterNorm | StandardizeNorm | nn.BatchNorm1d | IsoBN)


def save_portable(model: PreTrainedModel, out_dir: Path) -> None:
    """Make the model directory ``out_dir`` (just written by ``save_pretrained``) load right
    anywhere: a foldable [CLS] normalizer is folded into the saved classifier (the unfolded
    state goes to cls_norm/); an unfoldable one makes plain transformers refuse the folder.
    A model without a normalizer is left as saved."""
    pooler = getattr(model.base_model, "pooler", None)  # DistilBERT has none
    if not isinstance(pooler, NormalizedPooler):
        return
    if not can_fold(model):
        refuse_plain_loading(out_dir)
        return
    fold_cls_norm(copy.deepcopy(model)).save_pretrained(out_dir)
    tensors = {f"cls_norm.{k}": v.detach().cpu().contiguous()
               for k, v in pooler.cls_norm.state_dict().items()}
    tensors.update({f"classifier.{k}": v.detach().cpu().contiguous()
                    for k, v in model.classifier.state_dict().items()})
    (out_dir / UNFOLDED_FILE).parent.mkdir(exist_ok=True)
    save_file(tensors, str(out_dir / UNFOLDED_FILE),
              metadata={"kind": getattr(model.config, NORM_KEY),
                        "source": getattr(model.config, SOURCE_KEY)})


def restore_unfolded(model: PreTrainedModel, model_dir: Path, with_norm: bool) -> None:
    """Load the classifier as trained (when it has the model's shape: a run on another task
    keeps its fresh head) and, ``with_norm``, put the normalizer back, from a folded model
    directory's cls_norm/."""
    file = model_dir / UNFOLDED_FILE
    with safe_open(str(file), framework="pt") as saved:
        meta = saved.metadata()
    tensors = load_file(str(file))
    head = {k.removeprefix("classifier."): v for k, v in tensors.items()
            if k.startswith("classifier.")}
    current = model.classifier.state_dict()
    if all(head[k].shape == current[k].shape for k in current):
        with torch.no_grad():
            model.classifier.load_state_dict(head)
    if not with_norm:
        return
    hidden = model.config.hidden_size
    placeholder = ClsStats(torch.zeros(hidden), torch.ones(hidden))  # overwritten below
    install_cls_norm(model, meta["kind"], meta["source"], placeholder)
    model.base_model.pooler.cls_norm.load_state_dict(
        {k.removeprefix("cls_norm."): v for k, v in tensors.items() if k.startswith("cls_norm.")})


def refuse_plain_loading(out_dir: Path) -> None:
    """Rename the model_type in ``out_dir``'s config.json to one transformers does not know."""
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config[ORIGINAL_TYPE_KEY] = config["model_type"]
    config["model_type"] = UNFOLDABLE_MODEL_TYPE
    tmp = config_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)


def selftune_only_config(path: str, **kwargs) -> PreTrainedConfig | None:
    """The configuration of a model directory that plain transformers refuses (an unfoldable
    [CLS] normalizer), with its real model_type; None for any other model."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("model_type") != UNFOLDABLE_MODEL_TYPE:
        return None
    config["model_type"] = config.pop(ORIGINAL_TYPE_KEY)
    config_class = type(AutoConfig.for_model(config["model_type"]))
    return config_class.from_dict(config, **kwargs)
