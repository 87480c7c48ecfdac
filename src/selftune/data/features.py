"""Tokenization: canonical records → a ``datasets.Dataset`` the model consumes.

Padding is left to the collator (dynamic padding per batch); texts are only truncated here.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
from transformers import PreTrainedTokenizerBase

from selftune.data.readers import Record


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    with_labels: bool = True,
) -> datasets.Dataset:
    """Tokenize records; keeps ``example_id`` so later stages can key predictions by it."""
    pair = "text_b" in records[0]
    columns: dict[str, list] = {
        "example_id": [str(r["example_id"]) for r in records],
        "text_a": [r["text_a"] for r in records],
    }
    if pair:
        columns["text_b"] = [r["text_b"] for r in records]
    if with_labels:
        columns["labels"] = [r["label"] for r in records]
    dataset = datasets.Dataset.from_dict(columns)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        return tokenizer(*texts, truncation=True, max_length=max_seq_length)

    text_columns = ["text_a", "text_b"] if pair else ["text_a"]
    return dataset.map(encode, batched=True, remove_columns=text_columns,
                       desc="Tokenizing", load_from_cache_file=False)
