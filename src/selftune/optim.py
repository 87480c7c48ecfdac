"""AdamW with layer-wise learning-rate decay, as in BAM! (Clark et al. 2019; docs/methods.md §2.4).

Lower layers of a pretrained encoder hold general features that fine-tuning should disturb
least, so their learning rate is smaller: lr(depth) = base_lr · decay^(L + 2 − depth), with

- heads (the classifier and every module outside the encoder, e.g. a [CLS] normalizer or the
  task heads of a multi-task model): depth L + 2, factor 1;
- the pooler: depth L + 1;
- encoder layer i (0-based): depth i + 1;
- embeddings: depth 0;

L being the number of encoder layers. Parameters of the encoder outside those parts (DeBERTa's
``encoder.LayerNorm``, a final norm) sit with the pooler at L + 1: they act on the output of
the layers, above the top one.

The optimizer only sets each group's initial lr. A scheduler built afterwards by
``transformers.Trainer`` (``optimizers=(optimizer, None)``) is a ``LambdaLR``, which multiplies
each group's own initial lr by the same factor, so warm-up and decay keep the per-layer ratios.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from selftune.errors import SelftuneError

NO_DECAY_NAMES = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm")

# A numbered encoder layer: "encoder.layer.3.", "layers.11.", "layer.0." at the start of a name.
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
# Norm modules whose parameters get no weight decay whatever they are called (as HF Trainer).
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


def _parts(name: str) -> list[str]:
    return name.split(".")


def depth_of(name: str, num_layers: int, backbone_prefix: str | None = None) -> int:
    """Depth of a parameter for layer-wise decay (0 = embeddings, ``num_layers + 2`` = heads).

    Decided from the name alone, so it works for any model that names its parts the way
    transformers does. With ``backbone_prefix`` (e.g. ``"bert"``) every parameter outside it,
    the pooler aside, is a head; without one, the name's parts decide: a ``pooler`` part, a
    ``.layer.N.``/``.layers.N.`` index, a part containing ``embed`` (embeddings, embed_tokens,
    ELECTRA's embeddings_project), an ``encoder`` part (encoder-level parameters outside the
    layers, depth L + 1), anything else a head.
    """
    parts = _parts(name)
    if any("pooler" in p for p in parts):
        return num_layers + 1
    if backbone_prefix and not name.startswith(backbone_prefix + "."):
        return num_layers + 2
    match = _LAYER.search(name)
    if match:
        index = int(match.group(1))
        if index >= num_layers:
            raise SelftuneError(f"parameter {name} is in layer {index}, but the encoder has "
                                f"{num_layers} layers")
        return index + 1
    if any("embed" in p for p in parts):
        return 0
    if backbone_prefix or "encoder" in parts:
        return num_layers + 1
    return num_layers + 2


def backbone_prefix_of(model: nn.Module) -> str | None:
    """The attribute holding the encoder of a transformers model with a head (``"bert"``, ...).

    ``None`` for a bare encoder or a custom wrapper, whose names are then read part by part.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return None


def count_layers(names: Iterable[str], backbone_prefix: str | None = None,
                 config_layers: int | None = None) -> int:
    """Number of encoder layers: one more than the highest layer index in the encoder's names.

    Counted from the names rather than read from the config, so that it also holds for custom
    wrappers; the config's ``num_hidden_layers`` is the fallback when no name has an index.
    """
    highest = -1
    for name in names:
        if backbone_prefix and not name.startswith(backbone_prefix + "."):
            continue
        if any("pooler" in p for p in _parts(name)):
            continue
        match = _LAYER.search(name)
        if match:
            highest = max(highest, int(match.group(1)))
    if highest >= 0:
        return highest + 1
    return config_layers or 0


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


def layerwise_param_groups(
    model: nn.Module,
    base_lr: float,
    decay: float,
    weight_decay: float,
    no_decay_names: tuple[str, ...] = NO_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per (depth, weight decay or not), ordered from the input up.

    Each group has ``params``, ``lr``, ``weight_decay`` and ``depth`` (kept for inspection;
    torch keeps extra keys). Frozen parameters (``requires_grad`` False) are left out. No weight
    decay for parameters whose name contains one of ``no_decay_names`` or that belong to a
    LayerNorm/RMSNorm module, as HF Trainer does. ``decay = 1.0`` gives every group ``base_lr``.
    """
    if not 0.0 < decay <= 1.0:
        raise SelftuneError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    if base_lr < 0:
        raise SelftuneError(f"learning rate must not be negative, got {base_lr}")
    named = list(model.named_parameters())
    prefix = backbone_prefix_of(model)
    config = getattr(model, "config", None)
    num_layers = count_layers((n for n, _ in named), prefix,
                              getattr(config, "num_hidden_layers", None))
    norm_names = _norm_parameter_names(model)
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        depth = depth_of(name, num_layers, prefix)
        no_decay = name in norm_names or any(nd in name for nd in no_decay_names)
        groups.setdefault((depth, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": base_lr * decay ** (num_layers + 2 - depth),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "depth": depth,
        }
        for (depth, no_decay), params in sorted(groups.items())
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layerwise_decay: float | None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`layerwise_param_groups`; ``layerwise_decay=None`` means one lr for all.

    Meant for ``transformers.Trainer(optimizers=(optimizer, None))``: the Trainer then builds
    its usual scheduler on top, which scales every group's lr by the same warm-up/decay factor.
    """
    groups = layerwise_param_groups(model, lr, 1.0 if layerwise_decay is None else layerwise_decay,
                                    weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
