"""[CLS] normalization inside the training path: save/load, folding into a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from selftune.cli import main
from selftune.data.loading import DataOptions
from selftune.errors import SelftuneError
from selftune.evaluation import evaluate_model
from selftune.models.heads import (
    UNFOLDED_FILE,
    NormalizedPooler,
    fold_cls_norm,
    saved_cls_norm,
)
from selftune.models.loading import load_finetuned
from selftune.training import train

from .test_training import tiny_config

TEXTS = ["the movie was good", "it was really dull", "a great plot", "not very bad"]


class KeepModel(TrainerCallback):
    """Hold on to the model the run trained, to compare it with what it saved."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def logits_of(model, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("kind, source", [
    ("center", "pooler"), ("standardize", "cls"), ("batchnorm", "auto"),
    ("layernorm", "auto"), ("isobn", "pooler"),
])
def test_saved_model_reloads_with_its_normalizer(kind, source, tiny_model, sentiment_files,
                                                 tmp_path):
    out = tmp_path / kind
    trained = KeepModel()
    result = train(tiny_config(tiny_model, sentiment_files, out, cls_norm=kind,
                               cls_source=source, num_train_epochs=2), callbacks=[trained])
    # Folded into a plain classifier (config.json names no normalizer) or refused by plain
    # transformers; either way selftune finds the normalizer it was trained with.
    assert saved_cls_norm(str(out))[0] == kind
    assert (out / "cls_stats.safetensors").exists() == (kind in ("center", "standardize"))
    model = load_finetuned(str(out))
    assert isinstance(model.base_model.pooler, NormalizedPooler)
    torch.testing.assert_close(logits_of(model, out), logits_of(trained.model, out),
                               rtol=0, atol=0)
    evaluated = evaluate_model(str(out), DataOptions(validation_file=str(sentiment_files[1])),
                               None, 128, 4)
    assert evaluated["metrics"] == pytest.approx(result["metrics"])


@pytest.mark.parametrize("kind", ["batchnorm", "isobn"])
def test_an_averaged_model_keeps_the_normalizer(kind, tiny_model, sentiment_files, tmp_path):
    """SE over a pool of one step snapshot: the saved average is the final student, normalizer
    and running statistics included (the averaging copies float tensors only; the teacher
    shell's side of it is tested in test_cls_norm.py)."""
    out = tmp_path / kind
    trained = KeepModel()
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm=kind, strategy="se",
                      se_pool="steps", sd_k=1, num_train_epochs=1), callbacks=[trained])
    average = load_finetuned(str(out))
    assert isinstance(average.base_model.pooler.cls_norm,
                      type(trained.model.base_model.pooler.cls_norm))
    expected = logits_of(trained.model, out)
    torch.testing.assert_close(logits_of(average, out), expected)
    average.base_model.pooler.cls_norm = torch.nn.Identity()
    assert not torch.allclose(logits_of(average, out), expected)  # the normalizer does act


def test_a_finetuned_starting_model_does_not_pass_on_its_normalizer(tiny_model, sentiment_files,
                                                                     tmp_path):
    first = tmp_path / "first"
    train(tiny_config(tiny_model, sentiment_files, first, cls_norm="layernorm",
                      num_train_epochs=1))
    second = tmp_path / "second"
    train(tiny_config(first, sentiment_files, second, num_train_epochs=1))
    config = json.loads((second / "config.json").read_text())
    assert "selftune_cls_norm" not in config and "selftune_cls_source" not in config
    assert not isinstance(load_finetuned(str(second)).base_model.pooler, NormalizedPooler)


def test_fine_tuning_again_with_the_same_normalizer_keeps_its_state(tiny_model,
                                                                    sentiment_files, tmp_path):
    """BAM!'s --finetune-after starts from the student's task model: a normalizer of the same
    kind keeps the statistics of the pre-trained model it was given, instead of new ones
    computed through the fine-tuned encoder."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train(tiny_config(tiny_model, sentiment_files, first, cls_norm="standardize",
                      learning_rate=1e-2, num_train_epochs=2))
    second = tmp_path / "second"
    train(tiny_config(first, sentiment_files, second, cls_norm="standardize",
                      num_train_epochs=1))
    # Folded models: the normalizer as trained is kept beside the plain model.
    prefix = "cls_norm."
    before, after = load_file(first / UNFOLDED_FILE), load_file(second / UNFOLDED_FILE)
    stats = [k for k in before if k.startswith(prefix)]
    assert stats
    for key in stats:
        torch.testing.assert_close(after[key], before[key])
    assert not (second / "cls_stats.safetensors").exists()  # nothing recomputed
    # Another kind replaces it: new statistics, through the encoder as it now is.
    third = tmp_path / "third"
    train(tiny_config(first, sentiment_files, third, cls_norm="center", num_train_epochs=1))
    recomputed = load_file(third / "cls_stats.safetensors")["mean"]
    assert not torch.allclose(recomputed, before[prefix + "mean"])


def test_normalizer_changes_the_model(tiny_model, sentiment_files, tmp_path):
    plain = train(tiny_config(tiny_model, sentiment_files, tmp_path / "none",
                              num_train_epochs=1))
    normed = train(tiny_config(tiny_model, sentiment_files, tmp_path / "ln",
                               num_train_epochs=1, cls_norm="layernorm"))
    assert normed["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-6)


@pytest.mark.parametrize("kind", ["center", "standardize", "batchnorm", "isobn"])
def test_fixed_normalizers_fold_exactly(kind, tiny_model, sentiment_files, tmp_path):
    out = tmp_path / kind
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm=kind, cls_source="pooler",
                      num_train_epochs=2))
    expected = logits_of(load_finetuned(str(out)), out)
    plain_dir = tmp_path / f"{kind}-plain"
    assert main(["export", str(out), str(plain_dir)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(plain_dir)
    assert not isinstance(plain.base_model.pooler, NormalizedPooler)
    torch.testing.assert_close(logits_of(plain, plain_dir), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_cannot_be_folded(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "ln"
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm="layernorm",
                      num_train_epochs=1))
    with pytest.raises(SelftuneError, match="cannot be folded"):
        fold_cls_norm(load_finetuned(str(out)))


def test_batchnorm_survives_a_last_batch_of_one(tiny_model, sentiment_files, tmp_path):
    # 48 examples, batch 47: the second batch of every epoch holds one example.
    result = train(tiny_config(tiny_model, sentiment_files, tmp_path / "bn", cls_norm="batchnorm",
                               per_device_train_batch_size=47, num_train_epochs=1))
    assert result["global_steps"] == 2


def test_models_that_do_not_read_the_pooler_are_refused():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from selftune.models.heads import install_cls_norm

    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    with pytest.raises(SelftuneError, match="reads the pooled"):
        install_cls_norm(roberta, "layernorm")


def test_sequence_length_beyond_the_model_is_refused(tiny_model, sentiment_files, tmp_path):
    with pytest.raises(SelftuneError, match="longer than the model.s 128 positions"):
        train(tiny_config(tiny_model, sentiment_files, tmp_path / "x", max_seq_length=256))
    assert not (tmp_path / "x").exists()
