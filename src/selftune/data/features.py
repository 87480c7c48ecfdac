"""Tokenization: canonical records → a ``datasets.Dataset`` the model consumes.

Padding is left to the collator (dynamic padding per batch); texts are only truncated here.
A very long text is cut to a prefix before it is tokenized (its tokens past max_seq_length
would be thrown away anyway), so one 10 MB text costs the tokens it keeps, not 10 MB of tokens.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import datasets
from transformers import PreTrainedTokenizerBase

from selftune.data.readers import Record


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    with_labels: bool = True,
    progress: bool = True,
) -> datasets.Dataset:
    """Tokenize records; keeps ``example_id`` so later stages can key predictions by it.

    ``progress=False``: no "Tokenizing" bar (for a stream tokenized chunk by chunk, whose
    caller shows one bar for the whole stream)."""
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
        if pair:
            cut = [cut_long_pair(a, b, tokenizer, max_seq_length)
                   for a, b in zip(batch["text_a"], batch["text_b"], strict=True)]
            texts = ([a for a, _ in cut], [b for _, b in cut])
        else:
            texts = ([cut_long_text(t, tokenizer, max_seq_length) for t in batch["text_a"]],)
        return tokenizer(*texts, truncation=True, max_length=max_seq_length)

    text_columns = ["text_a", "text_b"] if pair else ["text_a"]
    with _progress_bars(progress):
        return dataset.map(encode, batched=True, remove_columns=text_columns,
                           desc="Tokenizing", load_from_cache_file=False)


@contextlib.contextmanager
def _progress_bars(wanted: bool) -> Iterator[None]:
    """``datasets``' progress bars off for the block unless ``wanted`` (map has no switch of
    its own); as they were after it."""
    if wanted or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


# A token spans at most this many characters in the texts one meets (a longer word is one
# unknown token); a text longer than max_seq_length times this is worth cutting first.
CHARS_PER_TOKEN = 16
_LAST_SPACE = re.compile(r"\s\S*\Z")


def _char_limit(max_tokens: int) -> int:
    return max(256, max_tokens * CHARS_PER_TOKEN)


def cut_long_text(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """A prefix of ``text`` whose tokens begin with the same first ``max_tokens`` tokens, so
    truncation gives the same input: cut at a whitespace, and kept only once it holds more than
    ``max_tokens`` tokens of its own (else a prefix four times as long is tried)."""
    limit = _char_limit(max_tokens)
    while len(text) > limit:
        space = _LAST_SPACE.search(text, 0, limit)
        if space is not None and space.start() > 0:
            prefix = text[:space.start()]
            if len(tokenizer.tokenize(prefix)) > max_tokens:
                return prefix
        limit *= 4
    return text


def cut_long_pair(text_a: str, text_b: str, tokenizer: PreTrainedTokenizerBase,
                  max_tokens: int) -> tuple[str, str]:
    """A pair cut so that truncation (longest first) gives the same input. Which text is
    cut depends on which is longer, and with two long texts that cannot be known without
    tokenizing both: only a pair with one long text is cut, and that text keeps more tokens
    than the other has."""
    limit = _char_limit(max_tokens)
    if (len(text_a) > limit) == (len(text_b) > limit):
        return text_a, text_b
    long_first = len(text_a) > limit
    other = text_b if long_first else text_a
    keep = max(max_tokens, len(tokenizer.tokenize(other)))
    cut = cut_long_text(text_a if long_first else text_b, tokenizer, keep)
    return (cut, text_b) if long_first else (text_a, cut)
