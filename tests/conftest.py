"""Shared fixtures: a tiny random BERT (2 layers, width 32) and small data written by the tests."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELFTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))

WORDS = ("the a an movie film plot actor story good great fine wonderful bad awful boring dull "
         "is was not very really quite and but it this that").split()
POSITIVE = {"good", "great", "fine", "wonderful"}
NEGATIVE = {"bad", "awful", "boring", "dull"}


def make_tiny_model(path: Path, with_head: bool = False, **config_overrides) -> Path:
    """Save a randomly initialised 2-layer BERT of width 32 with a word-level tokenizer (with
    ``with_head``, a sequence classifier with a random two-class head: what ``evaluate`` and
    ``predict`` take)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, **config_overrides)
    torch.manual_seed(0)
    (BertForSequenceClassification if with_head else BertModel)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-classifier"), with_head=True)


@pytest.fixture(scope="session")
def tiny_model_without_dropout(tmp_path_factory) -> Path:
    """For runs that must agree to rounding: dropout masks depend on how work is split."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert-no-dropout"),
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Short sentences whose label is learnable from one word (so a few steps can learn it)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(sorted(POSITIVE if label else NEGATIVE))
        filler = rng.sample(["the", "movie", "plot", "was", "very", "really", "it"], 3)
        rows.append((" ".join([*filler, word]), label))
    return rows


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def sentiment_files(tmp_path) -> tuple[Path, Path]:
    train = write_csv(tmp_path / "train.csv", ["text", "label"], sentiment_rows(48, 0))
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, 1))
    return train, dev


@pytest.fixture()
def varied_length_files(tmp_path) -> tuple[Path, Path]:
    """As sentiment_files, with sentences of five lengths (for length-grouped batches)."""
    rows = [(" ".join(["really"] * (i % 5) + [text]), label)
            for i, (text, label) in enumerate(sentiment_rows(48, 0))]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, 1))
    return train, dev


def write_glue_folder(root: Path) -> Path:
    """A miniature glue_data folder with the quirks of the real files (quotes, BOM, no header)."""
    glue = root / "glue"
    (glue / "RTE").mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    rte_rows = [
        '0\t"Quoted start of a premise.\tthe movie was good\tentailment\n',
        "1\tthe plot was bad\tthe film was awful\tnot_entailment\n",
        "2\tthe actor was great\tthe story was dull\tnot_entailment\n",
        "3\tit was really good\tit was good\tentailment\n",
    ]
    (glue / "RTE" / "train.tsv").write_text(header + "".join(rte_rows * 4))
    (glue / "RTE" / "dev.tsv").write_text(header + "".join(rte_rows))
    (glue / "MRPC").mkdir()
    mrpc = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t1\t2\tthe movie was good\tthe film was good\n"
            "0\t3\t4\tthe plot was bad\tthe actor was great\n")
    (glue / "MRPC" / "train.tsv").write_text(mrpc, encoding="utf-8")
    (glue / "MRPC" / "dev.tsv").write_text(mrpc, encoding="utf-8")
    (glue / "CoLA").mkdir()
    cola = "gj04\t1\t\tthe movie was good .\ngj04\t0\t*\tmovie the good was .\n"
    (glue / "CoLA" / "train.tsv").write_text(cola * 3)
    (glue / "CoLA" / "dev.tsv").write_text(cola.rstrip("\n"))  # no final newline, as the real one
    (glue / "STS-B").mkdir()
    sts = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
           "\tscore\n"
           "0\tg\tf\t2012\t1\tnone\tnone\tthe movie was good\tthe film was good\t4.500\n"
           "1\tg\tf\t2012\t2\tnone\tnone\tthe plot was bad\tthe actor was great\t0.750\n")
    (glue / "STS-B" / "train.tsv").write_text(sts)
    (glue / "STS-B" / "dev.tsv").write_text(sts)
    return root


@pytest.fixture()
def glue_dir(tmp_path) -> Path:
    return write_glue_folder(tmp_path / "data")


@pytest.fixture()
def glue_dir_with_mnli(glue_dir) -> Path:
    """The miniature GLUE folder plus MNLI: two dev sets (matched, mismatched) of different
    sizes and contents, so a test can tell which one was evaluated."""
    mnli = glue_dir / "glue" / "MNLI"
    mnli.mkdir(parents=True)
    header = "index\tgenre\tsentence1\tsentence2\tgold_label\n"
    rows = ["the movie was good\tthe film was good\tentailment",
            "the plot was bad\tthe plot was good\tcontradiction",
            "the actor was great\tthe actor was tall\tneutral"]
    numbered = "".join(f"{i}\tfiction\t{row}\n" for i, row in enumerate(rows * 4))
    (mnli / "train.tsv").write_text(header + numbered)
    (mnli / "dev_matched.tsv").write_text(header + numbered)
    (mnli / "dev_mismatched.tsv").write_text(
        header + "".join(f"{i}\tslate\t{row}\n" for i, row in enumerate(rows[:2] * 2)))
    return glue_dir
