"""diagnose-cls: statistics against direct computations, and the command's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selftune.cli import main
from selftune.diagnostics import Representations, summarize
from tests.conftest import WORDS
from tests.test_cli import assert_one_line_error


def test_summary_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    x[:, 3] = 10 + 0.1 * rng.normal(size=500)  # one large, non-centred dimension
    s = summarize(Representations("cls", x))
    np.testing.assert_allclose(s["mean"], x.mean(0))
    np.testing.assert_allclose(s["std"], x.std(0))
    assert s["largest_mean_dims"][0][0] == 3
    share = ((x ** 2).max(1) / (x ** 2).sum(1)).mean()
    assert s["top1_share"] == pytest.approx(share)
    assert s["offset_ratio"] == pytest.approx(
        np.linalg.norm(x.mean(0)) / np.linalg.norm(x, axis=1).mean())
    assert s["dims_mean_beyond_std"] == 1
    centred = summarize(Representations("cls", x - x.mean(0)))
    assert centred["offset_ratio"] < 1e-12


def test_diagnose_command_writes_tables_and_plots(tiny_model, sentiment_files, tmp_path, capsys):
    train, dev = map(str, sentiment_files)
    out = tmp_path / "diag"
    code = main(["diagnose-cls", "--train-file", train, "--validation-file", dev, "--model",
                 str(tiny_model), "--steps", "2", "--norms", "none,standardize,isobn",
                 "--batch-size", "8", "--out-dir", str(out)])
    assert code == 0
    result = json.loads((out / "diagnostics.json").read_text())
    assert [s["source"] for s in result["summaries"]] == ["cls", "pooler"]
    assert set(result["gradient_norms"]["pooler"]) == {"none", "standardize", "isobn"}
    assert all(len(v) == 2 and all(g > 0 for g in v)
               for v in result["gradient_norms"]["cls"].values())
    assert (out / "cls_stats.png").stat().st_size > 1000
    assert (out / "grad_norms.png").stat().st_size > 1000
    assert "| pooler | isobn |" in (out / "diagnostics.md").read_text()


def test_diagnose_rejects_unknown_norm(capsys):
    assert main(["diagnose-cls", "--task", "rte", "--norms", "none,whitening"]) == 2
    assert "unknown --norms" in capsys.readouterr().err


def test_every_normalization_is_measured_on_the_same_batches(tiny_model, sentiment_files,
                                                             tmp_path, monkeypatch):
    import selftune.diagnostics as diagnostics

    measured = diagnostics.gradient_norms
    seen: dict[tuple[str, str], list[list[list[int]]]] = {}

    def recording(model, batches, kind, source, *args, **kwargs):
        seen[(source, kind)] = [b["input_ids"].tolist() for b in batches]
        return measured(model, batches, kind, source, *args, **kwargs)

    monkeypatch.setattr(diagnostics, "gradient_norms", recording)
    train, dev = map(str, sentiment_files)
    # 48 examples in batches of 20: 3 batches per pass, so 4 steps start a second pass.
    assert main(["diagnose-cls", "--train-file", train, "--validation-file", dev, "--model",
                 str(tiny_model), "--steps", "4", "--norms", "none,center,batchnorm",
                 "--batch-size", "20", "--out-dir", str(tmp_path / "d")]) == 0
    assert len(seen) == 6
    first = next(iter(seen.values()))
    assert len(first) == 4
    assert all(batches == first for batches in seen.values())


def _diagnose(tiny_model, sentiment_files, tmp_path, *extra: str) -> int:
    train, dev = map(str, sentiment_files)
    return main(["diagnose-cls", "--train-file", train, "--validation-file", dev, "--model",
                 str(tiny_model), "--steps", "1", "--norms", "none,center", "--batch-size", "8",
                 "--out-dir", str(tmp_path / "diag"), *extra])


@pytest.mark.parametrize("option, value, message", [
    ("--learning-rate", "-1", "--learning-rate must be positive"),
    ("--learning-rate", "0", "--learning-rate must be positive"),
    ("--learning-rate", "nan", "--learning-rate must be positive"),
    ("--seed", "4294967296", "--seed must be between 0 and 4294967295"),
])
def test_diagnose_rejects_out_of_range_numbers(option, value, message, tiny_model,
                                               sentiment_files, tmp_path, capsys):
    code = _diagnose(tiny_model, sentiment_files, tmp_path, option, value)
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert not (tmp_path / "diag").exists()


def test_diagnose_rejects_a_negative_seed_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diagnose-cls", "--task", "rte", "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "--seed: must be at least 0" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--norms", ","), ("--sources", " , "),
                                           ("--norms", "")])
def test_diagnose_says_an_empty_list_is_empty(option, value, capsys):
    code = main(["diagnose-cls", "--task", "rte", option, value])
    assert_one_line_error(code, capsys.readouterr().err, f"{option} is empty; give one or more")


def test_diagnose_refuses_a_longer_sequence_than_the_model_has_positions(
        tiny_model, sentiment_files, tmp_path, capsys):
    code = _diagnose(tiny_model, sentiment_files, tmp_path, "--max-seq-length", "5000")
    assert_one_line_error(code, capsys.readouterr().err,
                          "--max-seq-length 5000 is longer than the model's 128 positions")


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    """A DistilBERT: no pooler, and a classifier of its own (not BERT's pooled head)."""
    import torch
    from transformers import BertTokenizer, DistilBertConfig, DistilBertModel

    path = tmp_path_factory.mktemp("tiny-distilbert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2,
                              hidden_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(path)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


@pytest.mark.parametrize("sources", [[], ["--sources", "cls"], ["--sources", "cls,pooler"]])
def test_diagnose_refuses_a_model_without_a_pooled_head(sources, tiny_distilbert,
                                                        sentiment_files, tmp_path, capsys):
    code = _diagnose(tiny_distilbert, sentiment_files, tmp_path, *sources)
    assert_one_line_error(code, capsys.readouterr().err,
                          "diagnose-cls needs an encoder whose classifier reads the pooled [CLS]",
                          "DistilBertForSequenceClassification")


@pytest.fixture()
def without_pooler(monkeypatch):
    """A BERT classifier whose encoder has no pooler (as after ``model.bert.pooler = None``)."""
    import selftune.models.loading as loading

    load = loading.load_for_training

    def load_without_pooler(*args, **kwargs):
        model = load(*args, **kwargs)
        model.base_model.pooler = None
        return model

    monkeypatch.setattr(loading, "load_for_training", load_without_pooler)


def test_diagnose_pooler_source_needs_a_pooler(without_pooler, tiny_model, sentiment_files,
                                               tmp_path, capsys):
    code = _diagnose(tiny_model, sentiment_files, tmp_path, "--sources", "cls,pooler")
    assert_one_line_error(code, capsys.readouterr().err,
                          "the model has no pooler; use --sources cls")


def test_diagnose_defaults_to_cls_without_a_pooler(without_pooler, tiny_model, sentiment_files,
                                                   tmp_path, caplog):
    with caplog.at_level("WARNING", logger="selftune.diagnostics"):
        assert _diagnose(tiny_model, sentiment_files, tmp_path) == 0
    assert "the model has no pooler: measuring the last-layer [CLS] only" in caplog.text
    result = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert [s["source"] for s in result["summaries"]] == ["cls"]
    assert set(result["gradient_norms"]) == {"cls"}
