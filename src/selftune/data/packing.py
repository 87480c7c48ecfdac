"""Packed batches: a batch's examples laid end to end in as few rows as fit (docs/methods.md §4).

With random batches and dynamic padding a batch computes on its longest example times its size:
1.5–3× the real tokens on GLUE tasks (BENCHMARKS.md, Performance). Packing keeps exactly the
examples of the batch and lays them end to end in as few rows of at most ``capacity`` tokens as
first-fit decreasing needs, each row as short as that number of rows allows, so the padding
left is the tail of a few rows.

Each example keeps its own token types, and its positions restart at the model's first position.
The model sees no attention mask: transformers 5 encoders (BERT, RoBERTa, ELECTRA) find the
examples of a row from where the ``position_ids`` restart and let every token attend only to its
own example (``masking_utils.find_packed_sequence_indices``). The padding at a row's tail gets
positions that restart too, so it is a block of its own that no example sees.

``packed_cls_index`` gives, per example in the batch's order, the flat index (row × row length
+ offset) of its first token ([CLS]) in the packed rows: the model side
(``selftune.models.packed``) reads each example's [CLS] there. Where each example went is
deterministic: the same batch always gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

CLS_INDEX_KEY = "packed_cls_index"
# The per-token inputs a packed row carries; the attention mask is replaced by the positions.
TOKEN_FIELDS = ("input_ids", "token_type_ids")


@dataclass(frozen=True)
class PackingPlan:
    """Where each example of a batch goes: its row and its offset in that row."""

    row_of: tuple[int, ...]
    offset_of: tuple[int, ...]
    row_fill: tuple[int, ...]  # real tokens per row

    @property
    def num_rows(self) -> int:
        return len(self.row_fill)

    @property
    def row_length(self) -> int:
        return max(self.row_fill, default=0)


def plan_rows(lengths: Sequence[int], capacity: int) -> PackingPlan:
    """As few rows as first-fit decreasing needs with rows of ``capacity`` tokens, each row then
    as short as it can be: rows of full capacity would leave the last one mostly empty, and
    every row is as long as the longest. ``capacity`` grows to the longest example if need be."""
    capacity = max([capacity, *lengths])
    best = first_fit_decreasing(lengths, capacity)
    rows = best.num_rows
    # The narrowest width that still holds the examples in that many rows, found upwards from
    # the least it could be (usually a few tries).
    for width in range(max([*lengths, -(-sum(lengths) // rows)]), best.row_length):
        plan = first_fit_decreasing(lengths, width)
        if plan.num_rows == rows:
            return plan
    return best


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> PackingPlan:
    """The longest example first (ties in batch order), each into the first row it fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fill: list[int] = []
    row_of = [0] * len(lengths)
    offset_of = [0] * len(lengths)
    for i in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        row_of[i], offset_of[i] = row, fill[row]
        fill[row] += lengths[i]
    return PackingPlan(tuple(row_of), tuple(offset_of), tuple(fill))


def pack_padded_batch(batch: dict[str, Any], capacity: int, position_offset: int = 0,
                      pad_token_id: int = 0) -> dict[str, Any]:
    """The packed form of a padded batch (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``; either padding side). Other entries (labels, ...) are per example and
    pass through unchanged. ``position_offset`` is the model's first position (RoBERTa counts
    from ``padding_idx + 1``)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    plan = plan_rows(lengths.tolist(), capacity)
    rows, row_length, device = plan.num_rows, plan.row_length, mask.device
    row_of = torch.tensor(plan.row_of, dtype=torch.long, device=device)
    starts = row_of * row_length + torch.tensor(plan.offset_of, dtype=torch.long, device=device)
    # Each real token's flat destination, and its position within its example.
    first_token = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(
        first_token, lengths)
    destination = torch.repeat_interleave(starts, lengths) + within
    packed: dict[str, Any] = {CLS_INDEX_KEY: starts}  # first: the Trainer sizes a batch by it
    for name in TOKEN_FIELDS:
        if name not in batch:
            continue
        fill = pad_token_id if name == "input_ids" else 0
        values = batch[name]
        row_values = values.new_full((rows * row_length,), fill)
        row_values[destination] = values[mask]
        packed[name] = row_values.view(rows, row_length)
    positions = _tail_positions(plan.row_fill, row_length).to(device)
    positions[destination] = within
    packed["position_ids"] = (positions + position_offset).view(rows, row_length)
    packed.update({k: v for k, v in batch.items()
                   if k not in (*TOKEN_FIELDS, "attention_mask", "position_ids")})
    return packed


def _tail_positions(row_fill: Sequence[int], row_length: int) -> torch.Tensor:
    """Flat positions with every row's padding tail counted from 0: a block of its own (a
    tail that continued the last example's positions would join its attention block)."""
    positions = torch.zeros(len(row_fill) * row_length, dtype=torch.long)
    for row, used in enumerate(row_fill):
        start = row * row_length + used
        positions[start:(row + 1) * row_length] = torch.arange(row_length - used)
    return positions


class PackingCollator:
    """``DataCollatorWithPadding``, then :func:`pack_padded_batch`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, capacity: int,
                 position_offset: int = 0) -> None:
        self.padding = DataCollatorWithPadding(tokenizer)
        self.capacity = capacity
        self.position_offset = position_offset
        self.pad_token_id = tokenizer.pad_token_id or 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self.padding(features))
        return pack_padded_batch(batch, self.capacity, self.position_offset, self.pad_token_id)


def token_counts(lengths: Sequence[int], capacity: int) -> tuple[int, int, int]:
    """(real tokens, tokens of the padded batch, tokens of the packed rows) of one batch."""
    plan = plan_rows(lengths, capacity)
    return sum(lengths), len(lengths) * max(lengths), plan.num_rows * plan.row_length
