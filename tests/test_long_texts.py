"""Very long texts are cut before tokenizing, and the model still sees exactly the tokens it
saw when the whole text was tokenized and then truncated."""

from __future__ import annotations

import random
import tarfile

import pytest

from selftune.data.features import cut_long_pair, cut_long_text, tokenize_records

from .conftest import SHARED_DATA, WORDS


def long_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    spaces = [" ", "  ", "\n", "\t "]
    return "".join(rng.choice(WORDS) + rng.choice(spaces) for _ in range(words)).strip()


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from .conftest import make_tiny_model

    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("max_tokens", [8, 32, 100])
def test_a_cut_text_truncates_to_the_same_tokens(word_tokenizer, max_tokens):
    for seed in range(20):
        text = long_text(3000, seed)
        cut = cut_long_text(text, word_tokenizer, max_tokens)
        assert len(cut) < len(text) / 5 and text.startswith(cut)
        whole = word_tokenizer(text, truncation=True, max_length=max_tokens)
        assert word_tokenizer(cut, truncation=True, max_length=max_tokens) == whole


def test_short_texts_are_left_alone(word_tokenizer):
    text = long_text(20, 0)
    assert cut_long_text(text, word_tokenizer, 8) == text
    assert cut_long_pair(text, text, word_tokenizer, 8) == (text, text)


@pytest.mark.parametrize("max_tokens", [16, 64])
def test_a_pair_with_one_long_text_truncates_to_the_same_tokens(word_tokenizer, max_tokens):
    for seed in range(10):
        long, short = long_text(4000, seed), long_text(seed * 3 + 3, seed + 100)
        for a, b in ((long, short), (short, long)):
            cut_a, cut_b = cut_long_pair(a, b, word_tokenizer, max_tokens)
            assert len(cut_a) + len(cut_b) < len(a) + len(b)
            whole = word_tokenizer(a, b, truncation=True, max_length=max_tokens)
            assert word_tokenizer(cut_a, cut_b, truncation=True, max_length=max_tokens) == whole


def test_tokenized_records_of_long_texts_are_unchanged(word_tokenizer):
    records = [{"example_id": str(i), "text_a": long_text(2000 + i, i), "label": i % 2}
               for i in range(6)]
    dataset = tokenize_records(records, word_tokenizer, 48)
    for record, ids in zip(records, dataset["input_ids"], strict=True):
        assert ids == word_tokenizer(record["text_a"], truncation=True,
                                     max_length=48)["input_ids"]


@pytest.mark.skipif(not (SHARED_DATA / "imdb").is_dir(), reason="no shared IMDb data")
def test_real_reviews_and_the_default_tokenizer_keep_their_tokens():
    from selftune.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("default"))
    reviews = []
    with tarfile.open(SHARED_DATA / "imdb" / "aclImdb_train.tar.gz") as archive:
        for member in archive:
            if member.isfile() and "/neg/" in member.name and member.name.endswith(".txt"):
                text = archive.extractfile(member).read().decode()
                if len(text) > 2100:
                    reviews.append(text)
                if len(reviews) == 60:
                    break
    short = "A short hypothesis about the film."
    for text in reviews:
        assert len(cut_long_text(text, tokenizer, 128)) < len(text)
        for a, b in ((text, None), (text, short), (short, text)):
            whole = tokenizer(a, b, truncation=True, max_length=128)["input_ids"]
            cut = cut_long_pair(a, b, tokenizer, 128) if b else (cut_long_text(a, tokenizer,
                                                                                128), None)
            assert tokenizer(*cut, truncation=True, max_length=128)["input_ids"] == whole
