"""Packed batches (selftune.data.packing, selftune.models.packed): the same per-example logits,
loss and gradient as the padded batch, deterministic rows, resume, teachers, fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    DataCollatorWithPadding,
)

from selftune.config import TrainConfig
from selftune.data.packing import CLS_INDEX_KEY, PackingCollator, pack_padded_batch, plan_rows
from selftune.evaluation import predict_logits
from selftune.models.cls_norm import ClsStats
from selftune.models.heads import install_cls_norm
from selftune.models.packed import (
    enable_packing,
    packing_collator,
    packing_enabled,
    position_offset,
)
from selftune.self_distillation import SelfDistillation
from selftune.training import train

from .conftest import WORDS, make_tiny_model
from .test_training import StopAfterFirstSave, dev_logits, tiny_config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
SENTENCES = ["the movie was good", "a film", "it", "this is not fine",
             "the plot is very very boring and dull but the actor was really great",
             "the story was awful", "an actor", "good good good good good good good good"]
SECOND = ["it was great", "the film is dull and boring", "bad", "a story", "fine", "not good",
          "that was a very very long and really quite boring plot", "the"]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def tiny_bert(num_labels: int = 2, attention: str = "sdpa") -> BertForSequenceClassification:
    """Random weights large enough (init 0.3) that examples get clearly different logits, and
    no dropout: outputs that must agree to rounding."""
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=num_labels, initializer_range=0.3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation=attention)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def padded_batch(tokenizer, pairs: bool, regression: bool) -> dict[str, torch.Tensor]:
    texts = (SENTENCES, SECOND) if pairs else (SENTENCES,)
    features = [dict(tokenizer(*t)) for t in zip(*texts, strict=True)]
    for i, feature in enumerate(features):
        feature["labels"] = 0.7 * i - 1.0 if regression else i % 2
    return dict(DataCollatorWithPadding(tokenizer)(features))


def packed_and_padded(model, batch, capacity=24, **kwargs):
    """(packed outputs, padded outputs) of the same batch."""
    padded = model(**batch, **kwargs)
    assert enable_packing(model)
    packed = model(**pack_padded_batch(batch, capacity), **kwargs)
    return packed, padded


def test_rows_are_first_fit_decreasing_and_cover_every_example_once():
    lengths = [5, 12, 3, 9, 7, 2, 12, 1]
    plan = plan_rows(lengths, capacity=14)
    assert plan.num_rows == 4  # 51 tokens in rows of 14: at least 4
    spans = {}
    for i, (row, offset) in enumerate(zip(plan.row_of, plan.offset_of, strict=True)):
        spans.setdefault(row, []).append((offset, offset + lengths[i]))
    for row, used in spans.items():
        used.sort()
        assert all(a[1] <= b[0] for a, b in zip(used, used[1:], strict=False))  # no overlap
        assert used[-1][1] == plan.row_fill[row] <= 14
    assert sum(plan.row_fill) == sum(lengths)
    # The longest examples open the first rows, in batch order on ties.
    assert (plan.row_of[1], plan.offset_of[1]) == (0, 0)
    assert (plan.row_of[6], plan.offset_of[6]) == (1, 0)
    # An example longer than the capacity gets a row of its own length.
    assert plan_rows([20, 3], capacity=8).row_length == 20


def test_the_same_batch_gives_the_same_rows(tokenizer):
    features = [dict(tokenizer(a, b), labels=i % 2)
                for i, (a, b) in enumerate(zip(SENTENCES, SECOND, strict=True))]
    collate = PackingCollator(tokenizer, capacity=32)
    first, second = collate(features), collate([dict(f) for f in features])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key])
    padded = DataCollatorWithPadding(tokenizer)(features)
    assert first["input_ids"].numel() < padded["input_ids"].numel()
    # Every example's tokens, token types and restarting positions are in its row.
    row_length = first["input_ids"].shape[1]
    for i, start in enumerate(first[CLS_INDEX_KEY].tolist()):
        length = int(padded["attention_mask"][i].sum())
        row, offset = divmod(start, row_length)
        span = slice(offset, offset + length)
        assert torch.equal(first["input_ids"][row, span], padded["input_ids"][i, :length])
        assert torch.equal(first["token_type_ids"][row, span],
                           padded["token_type_ids"][i, :length])
        assert first["position_ids"][row, span].tolist() == list(range(length))
    assert "attention_mask" not in first
    assert torch.equal(first["labels"], padded["labels"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
def test_packed_logits_and_loss_equal_the_padded_ones(tokenizer, pairs, regression, attention):
    model = tiny_bert(1 if regression else 3, attention).eval()
    batch = padded_batch(tokenizer, pairs, regression)
    packed, padded = packed_and_padded(model, batch)
    assert packed.logits.shape == padded.logits.shape
    assert padded.logits.std() > 0.1  # examples differ: a mix-up of examples would show
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)


def test_examples_of_a_row_do_not_see_each_other(tokenizer):
    """The check above would fail if attention crossed examples: with a mask over whole rows
    the outputs move far beyond rounding."""
    model = tiny_bert().eval()
    batch = padded_batch(tokenizer, pairs=True, regression=False)
    packed = pack_padded_batch(batch, 24)
    assert enable_packing(model)
    leaky = model(**packed, attention_mask=torch.ones_like(packed["input_ids"])).logits
    assert (leaky - model(**batch).logits).abs().max() > 1e-3


def test_packed_gradient_equals_the_padded_one(tokenizer):
    model = tiny_bert().train()  # no dropout: training mode is deterministic
    batch = padded_batch(tokenizer, pairs=True, regression=False)
    model(**batch).loss.backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_packing(model)
    model(**pack_padded_batch(batch, 24)).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, padded[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("norm,source", [("standardize", "pooler"), ("batchnorm", "pooler"),
                                         ("layernorm", "cls"), ("isobn", "pooler")])
def test_packed_reads_the_cls_normalizer(tokenizer, norm, source):
    model = tiny_bert(3)
    # Installed after packing is enabled: the hooks find the pooler when the model runs.
    enable_packing(model)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    stats = ClsStats(torch.randn(hidden, generator=generator), torch.rand(hidden) + 0.5)
    install_cls_norm(model, norm, source, stats)
    batch = padded_batch(tokenizer, pairs=True, regression=False)
    padded_model = tiny_bert(3)
    install_cls_norm(padded_model, norm, source, stats)
    padded_model.load_state_dict(model.state_dict())
    for mode in ("train", "eval"):  # batch statistics, then the running ones
        model.train(mode == "train")
        padded_model.train(mode == "train")
        packed = model(**pack_padded_batch(batch, 24))
        padded = padded_model(**batch)
        torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)
    for name, buffer in padded_model.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("kind", ["sda", "sdv", "ema"])
def test_teachers_read_the_same_packed_batch(tokenizer, kind):
    model = tiny_bert().train()
    enable_packing(model)
    objective = SelfDistillation.for_strategy(model, kind=kind, k=2)  # a copy, hooks included
    objective.on_train_begin(model)
    objective.before_optimizer_step(model, 0)  # the initial model enters the window
    with torch.no_grad():  # the student moves on: the teacher differs from it
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = padded_batch(tokenizer, pairs=True, regression=False)
    packed_loss, _, packed_parts = objective.compute_loss(model, pack_padded_batch(batch, 24))
    padded_loss, _, padded_parts = objective.compute_loss(model, batch)
    assert padded_parts["distill_loss"] > 1e-4
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    for name, value in padded_parts.items():
        torch.testing.assert_close(packed_parts[name], value, atol=1e-5, rtol=0)


ARCHITECTURES = {
    "roberta": {"pad_token_id": 1},
    "electra": {"embedding_size": 16},
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_other_verified_architectures(model_type):
    config = AutoConfig.for_model(
        model_type, vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=130, num_labels=3,
        initializer_range=0.3, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pad = config.pad_token_id
    lengths = [5, 12, 3, 9, 7, 2]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.full((len(lengths), max(lengths)), pad)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(5, 60, (n,), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
             "labels": torch.arange(len(lengths)) % 3}
    padded = model(**batch)
    assert enable_packing(model)
    packed = model(**pack_padded_batch(batch, 16, position_offset(model), pad))
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)


def test_an_unverified_architecture_falls_back_to_padded_batches(tmp_path, sentiment_files):
    """DistilBERT builds its attention mask without the position ids: not packed."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model_dir = tmp_path / "distilbert"
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    config = DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=1, n_heads=2,
                              hidden_dim=64, max_position_embeddings=128)
    DistilBertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = train(tiny_config(model_dir, sentiment_files, tmp_path / "run", num_train_epochs=1))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("Packing is not verified") == 1 and "model type distilbert" in log
    assert result["global_steps"] > 0
    model = DistilBertForSequenceClassification(config)
    assert not enable_packing(model)
    assert isinstance(packing_collator(model, tokenizer, 128), DataCollatorWithPadding)


def test_no_packing_leaves_the_model_and_batches_as_before(tokenizer):
    model = tiny_bert()
    assert not enable_packing(model, wanted=False)
    assert not packing_enabled(model)
    assert isinstance(packing_collator(model, tokenizer, 128), DataCollatorWithPadding)
    assert not model._forward_pre_hooks and not model.base_model._forward_hooks


def test_predictions_are_the_same_packed_or_padded(tiny_classifier):
    from selftune.models.loading import load_finetuned, load_tokenizer

    records = [{"example_id": str(i), "text_a": a, "text_b": b}
               for i, (a, b) in enumerate(zip(SENTENCES * 3, SECOND * 3, strict=True))]
    tokenizer = load_tokenizer(str(tiny_classifier))
    padded = predict_logits(load_finetuned(str(tiny_classifier)), tokenizer, records, 64, 7,
                            packing=False)
    model = load_finetuned(str(tiny_classifier))
    packed = predict_logits(model, tokenizer, records, 64, 7)
    assert packing_enabled(model)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=0)
    # A model once packed still predicts from padded batches when told to.
    assert isinstance(packing_collator(model, tokenizer, packing=False), DataCollatorWithPadding)
    again = predict_logits(model, tokenizer, records, 64, 7, packing=False)
    np.testing.assert_array_equal(again, padded)


def test_predict_command_packs_unless_told_not_to(tiny_classifier, tmp_path, capsys):
    import json

    from selftune.cli import main

    data = tmp_path / "texts.csv"
    data.write_text("text\n" + "\n".join(SENTENCES * 3) + "\n")
    written = {}
    for flag in ("--packing", "--no-packing"):
        out = tmp_path / f"{flag}.jsonl"
        assert main(["predict", str(tiny_classifier), "--input-file", str(data),
                     "--text-columns", "text", "--output-file", str(out), "--batch-size", "5",
                     flag]) == 0
        written[flag] = [json.loads(line) for line in out.read_text().splitlines()]
    capsys.readouterr()
    assert len(written["--packing"]) == len(SENTENCES) * 3
    for packed, padded in zip(written["--packing"], written["--no-packing"], strict=True):
        assert packed["example_id"] == padded["example_id"] and packed["label"] == padded["label"]
        assert packed["prob_LABEL_0"] == pytest.approx(padded["prob_LABEL_0"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["baseline", "sda"])
def test_a_packed_run_trains_as_the_padded_one(strategy, tiny_model_without_dropout,
                                               sentiment_files, tmp_path):
    runs = {packing: train(tiny_config(tiny_model_without_dropout, sentiment_files,
                                       tmp_path / str(packing), packing=packing,
                                       strategy=strategy, num_train_epochs=2))
            for packing in (True, False)}
    assert runs[True]["train_loss"] == pytest.approx(runs[False]["train_loss"], abs=1e-5)
    assert runs[True]["metrics"] == pytest.approx(runs[False]["metrics"], abs=1e-9)
    texts = ["the movie was good", "it was really dull"]
    np.testing.assert_allclose(dev_logits(tmp_path / "True", texts),
                               dev_logits(tmp_path / "False", texts), atol=1e-4)


@pytest.mark.parametrize("strategy", ["baseline", "sda"])
def test_an_interrupted_packed_run_resumes_exactly(strategy, tiny_model, sentiment_files,
                                                   tmp_path):
    options = dict(save_steps=4, strategy=strategy, packing=True)
    reference = train(tiny_config(tiny_model, sentiment_files, tmp_path / "ref", **options))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out, **options),
              callbacks=[StopAfterFirstSave()])
    resumed = train(tiny_config(tiny_model, sentiment_files, out, **options))
    assert resumed["resumed_from"] is not None
    assert resumed["metrics"] == pytest.approx(reference["metrics"], abs=1e-9)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    texts = ["the movie was good", "it was really dull"]
    np.testing.assert_allclose(dev_logits(out, texts), dev_logits(tmp_path / "ref", texts),
                               atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_the_multitask_student_packs_each_tasks_rows(tmp_path, tokenizer, norm):
    from selftune.data.tasks import get_task
    from selftune.multitask.model import build_multitask_model

    path = make_tiny_model(tmp_path / "bert", initializer_range=0.3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    tasks = [get_task("rte"), get_task("stsb"), get_task("cola")]
    models = {}
    for packing in (False, True):
        torch.manual_seed(0)
        models[packing] = build_multitask_model(str(path), tasks)
        if norm != "none":
            models[packing].add_cls_norm(lambda head: install_cls_norm(head, norm))
        models[packing].enable_packing(packing, capacity=24)
    assert models[True].packing is not None and models[False].packing is None
    batch = padded_batch(tokenizer, pairs=True, regression=False)
    task_ids = torch.tensor([0, 1, 2, 0, 2, 1, 0, 2])
    for mode in (True, False):  # batch statistics of each task's rows, then the running ones
        outputs = {}
        for packing, model in models.items():
            model.train(mode)
            outputs[packing] = model(task_ids=task_ids, input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"],
                                     token_type_ids=batch["token_type_ids"]).logits
        assert outputs[False].std() > 0.1
        torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=0)


def test_packing_is_an_option_on_by_default():
    assert TrainConfig().packing is True
    assert TrainConfig(packing=False).hash() != TrainConfig().hash()


@pytest.mark.slow
def test_packed_equals_padded_on_the_default_model_and_real_rte():
    from .conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "RTE").is_dir():
        pytest.skip(f"real RTE data not found under {SHARED_DATA}")
    from selftune.data.features import tokenize_records
    from selftune.data.loading import DataOptions, load_task_data
    from selftune.models.loading import load_for_training, load_tokenizer, resolve_model_path

    data = load_task_data(DataOptions(task="rte", data_dir=str(SHARED_DATA),
                                      max_train_samples=64))
    path = resolve_model_path("default")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_for_training(path, data.task).eval()
    # A head of unit scale: logits of order 1, so an encoder difference would show in them.
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    dataset = tokenize_records(data.train, tokenizer, 128)
    features = [{k: dataset[i][k] for k in ("input_ids", "token_type_ids", "attention_mask",
                                            "labels")} for i in range(32)]
    padded_collate = DataCollatorWithPadding(tokenizer)
    assert enable_packing(model)
    packed_collate = packing_collator(model, tokenizer, 128)
    for start in (0, 16):  # two batches of 16 pairs
        batch = features[start:start + 16]
        with torch.no_grad():
            padded = model(**padded_collate(batch))
            packed_batch = packed_collate(batch)
            packed = model(**packed_batch)
        assert packed_batch["input_ids"].numel() < padded_collate(batch)["input_ids"].numel()
        row_length = packed_batch["input_ids"].shape[1]
        assert (packed_batch[CLS_INDEX_KEY] % row_length).count_nonzero() > 0  # rows shared
        assert padded.logits.std() > 0.1
        torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)
