"""The model side of packed batches (``selftune.data.packing``): each example's own [CLS].

A sequence classifier called with a packed batch (``packed_cls_index``, ``position_ids``, no
attention mask) runs its encoder on the packed rows; transformers 5 builds the block-diagonal
attention from the restarting positions. Just before the model reads [CLS] (the input of
BERT's pooler, or the encoder output that RoBERTa's and ELECTRA's heads read), a hook replaces
the rows by each example's own [CLS] hidden state, in the batch's order. Everything after it is
the model's own: pooler (or the [CLS] normalizer of --cls-norm, which sits in the pooler's
place), dropout, classifier and loss (cross-entropy, or MSE for regression). So the logits and
the loss are the padded batch's up to float rounding, and the call still goes through the
model (and its DDP or autocast wrapper) as ``model(**batch)``. In training, dropout draws its
masks over other shapes: the same distribution, not the same draws.

The hooks are registered on the model once (:func:`enable_packing`) and are copied with it
(a teacher made by ``copy.deepcopy`` reads packed batches too). A model without them is handed
padded batches: :func:`packing_collator` is the one place deciding which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from selftune.data.packing import CLS_INDEX_KEY, PackingCollator

logger = logging.getLogger("selftune")

_HOOKED = "_selftune_packing"  # attribute marking a model whose hooks are registered
_PENDING = "_selftune_packed_cls_index"  # the batch's [CLS] index, during one forward
_POOLER_HOOK = "_selftune_pooler_hook"  # the pooler's gather, during one forward


@dataclass(frozen=True)
class PackedReadout:
    """Where an architecture reads [CLS], and where its positions start."""

    at_pooler: bool  # the pooler's input (BERT); else the base model's output
    position_offset_from_padding_idx: bool = False  # RoBERTa: positions from padding_idx + 1


# Architectures whose packed outputs are verified equal to the padded ones (tests/test_packing.py)
# with sdpa and eager attention. DistilBERT is not among them: its encoder builds its attention
# mask without the position ids, so examples of a row would see each other.
VERIFIED = {
    "bert": PackedReadout(at_pooler=True),
    "roberta": PackedReadout(at_pooler=False, position_offset_from_padding_idx=True),
    "electra": PackedReadout(at_pooler=False),
}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def packing_readout(model: nn.Module) -> PackedReadout | None:
    """How ``model`` reads a packed batch, or None when packing is not verified for it."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_decoder", False):
        return None
    if getattr(config, "_attn_implementation", None) not in ATTENTION_IMPLEMENTATIONS:
        return None
    readout = VERIFIED.get(getattr(config, "model_type", None))
    if readout is not None and readout.at_pooler and getattr(model.base_model, "pooler",
                                                              None) is None:
        return None
    return readout


def position_offset(model: nn.Module) -> int:
    """The first position id of an example for this architecture."""
    readout = packing_readout(model)
    if readout is not None and readout.position_offset_from_padding_idx:
        return model.config.pad_token_id + 1
    return 0


def enable_packing(model: nn.Module, wanted: bool = True) -> bool:
    """Let ``model`` read packed batches; return whether it does (and say once why not)."""
    if not wanted:
        return False
    if getattr(model, _HOOKED, False):
        return True
    if packing_readout(model) is None:
        config = getattr(model, "config", None)
        logger.info("Packing is not verified for %s (model type %s, attention %s): padded "
                    "batches", type(model).__name__, getattr(config, "model_type", None),
                    getattr(config, "_attn_implementation", None))
        return False
    model.register_forward_pre_hook(_take_cls_index, with_kwargs=True)
    model.register_forward_hook(_forget_cls_index, always_call=True)
    base = model.base_model
    if not getattr(base, _HOOKED, False):  # an encoder shared by several heads: hooked once
        base.register_forward_hook(_gather_base_output, always_call=True)
        if getattr(base, "pooler", None) is not None:
            # The pooler may be replaced later (--cls-norm): it is found at call time.
            base.register_forward_pre_hook(_arm_pooler)
        object.__setattr__(base, _HOOKED, True)
    object.__setattr__(model, _HOOKED, True)
    return True


def packing_enabled(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "module", model), _HOOKED, False))


def packing_collator(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     capacity: int | None = None, packing: bool = True,
                     ) -> PackingCollator | DataCollatorWithPadding:
    """The collator for batches ``model`` reads: packed rows of up to ``capacity`` tokens (None:
    the batch's longest example) if ``packing`` and the model's packing is enabled, else padded
    batches as before."""
    model = getattr(model, "module", model)
    if not (packing and packing_enabled(model)):
        return DataCollatorWithPadding(tokenizer)
    return PackingCollator(tokenizer, capacity or 0, position_offset(model))


def training_collator(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                      packing: bool) -> PackingCollator | DataCollatorWithPadding:
    """A run's training collator: with ``packing`` (and a verified architecture) the model's
    packing hooks are registered and batches are packed in rows of ``max_seq_length``."""
    enable_packing(model, packing)
    return packing_collator(model, tokenizer, max_seq_length)


# ---- the hooks (module-level functions: a deep copy of the model shares them, not a model)


def _take_cls_index(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    index = kwargs.pop(CLS_INDEX_KEY, None)
    object.__setattr__(model.base_model, _PENDING, index)
    return args, kwargs


def _forget_cls_index(model: nn.Module, args: tuple, output: Any) -> None:
    object.__setattr__(model.base_model, _PENDING, None)


def _gather_cls(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(rows, row length, hidden) → (examples, 1, hidden): each example's first token."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, index.to(hidden.device)).unsqueeze(1)


def _arm_pooler(base: nn.Module, args: tuple) -> None:
    index = getattr(base, _PENDING, None)
    if index is None:
        return
    handle = base.pooler.register_forward_pre_hook(
        lambda _module, inputs: (_gather_cls(inputs[0], index), *inputs[1:]))
    object.__setattr__(base, _POOLER_HOOK, handle)


def _gather_base_output(base: nn.Module, args: tuple, output: Any) -> Any:
    handle = base.__dict__.pop(_POOLER_HOOK, None)
    if handle is not None:
        handle.remove()
    index = getattr(base, _PENDING, None)
    if index is None or output is None or getattr(base, "pooler", None) is not None:
        return output  # a padded batch, or BERT: read at the pooler
    hidden = output[0]
    gathered = _gather_cls(hidden, index)
    if hasattr(output, "last_hidden_state"):  # a ModelOutput: its tuple view follows
        output.last_hidden_state = gathered
        return output
    return (gathered, *output[1:])
