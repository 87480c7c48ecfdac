"""Layer-wise learning-rate decay: depths, groups, and the Trainer's scheduler on top."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from selftune.errors import SelftuneError
from selftune.optim import depth_of, layerwise_param_groups, make_optimizer

L = 2


def tiny_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=L, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=16, **kw)


@pytest.fixture(scope="module")
def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(num_labels=2))


def group_of(groups: list[dict], param: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


@pytest.mark.parametrize(("name", "depth"), [
    ("bert.embeddings.word_embeddings.weight", 0),
    ("bert.embeddings.LayerNorm.bias", 0),
    ("bert.encoder.layer.0.attention.self.query.weight", 1),
    ("bert.encoder.layer.11.output.dense.bias", 12),
    ("bert.pooler.dense.weight", 13),
    ("classifier.weight", 14),
    ("embeddings.position_embeddings.weight", 0),      # a bare encoder
    ("encoder.layer.3.intermediate.dense.weight", 4),
    ("pooler.dense.bias", 13),
    ("model.layers.5.mlp.up_proj.weight", 6),          # other architectures
    ("model.embed_tokens.weight", 0),
    ("encoder.encoder.layer.2.output.dense.weight", 3),  # a wrapper around a BertModel
    ("heads.rte.weight", 14),
    ("cls_norm.weight", 14),
])
def test_depth_of(name: str, depth: int) -> None:
    assert depth_of(name, 12) == depth


def test_depth_with_backbone_prefix() -> None:
    assert depth_of("roberta.encoder.layer.1.output.dense.weight", 12, "roberta") == 2
    assert depth_of("classifier.dense.weight", 12, "roberta") == 14
    assert depth_of("heads.layers.0.weight", 12, "roberta") == 14  # outside the backbone
    assert depth_of("deberta.encoder.LayerNorm.weight", 12, "deberta") == 13
    with pytest.raises(SelftuneError):
        depth_of("bert.encoder.layer.12.output.dense.weight", 12, "bert")


def test_learning_rates_per_depth(classifier) -> None:
    groups = layerwise_param_groups(classifier, 1e-3, 0.5, 0.01)
    named = dict(classifier.named_parameters())
    expected = {
        "bert.embeddings.word_embeddings.weight": 1e-3 * 0.5 ** 4,
        "bert.encoder.layer.0.attention.self.query.weight": 1e-3 * 0.5 ** 3,
        "bert.encoder.layer.1.output.dense.weight": 1e-3 * 0.5 ** 2,
        "bert.pooler.dense.weight": 1e-3 * 0.5,
        "classifier.weight": 1e-3,
    }
    for name, lr in expected.items():
        assert math.isclose(group_of(groups, named[name])["lr"], lr)
    # every trainable parameter exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in classifier.parameters())


def test_weight_decay_split(classifier) -> None:
    groups = layerwise_param_groups(classifier, 1e-3, 0.9, 0.01)
    for name, param in classifier.named_parameters():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        assert group_of(groups, param)["weight_decay"] == (0.0 if no_decay else 0.01), name


def test_decay_one_is_a_single_lr_and_frozen_skipped() -> None:
    model = BertForSequenceClassification(tiny_config(num_labels=3))
    model.bert.embeddings.requires_grad_(False)
    groups = layerwise_param_groups(model, 2e-5, 1.0, 0.0)
    assert {g["lr"] for g in groups} == {2e-5}
    assert min(g["depth"] for g in groups) == 1
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_wrapper_without_prefix() -> None:
    class MultiTask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = BertModel(tiny_config())
            self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})

    model = MultiTask()
    groups = layerwise_param_groups(model, 1.0, 0.5, 0.0)
    assert group_of(groups, model.heads["b"].weight)["lr"] == 1.0
    assert group_of(groups, model.encoder.pooler.dense.weight)["lr"] == 0.5
    assert group_of(groups, model.encoder.embeddings.word_embeddings.weight)["lr"] == 0.5 ** 4


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5])
def test_bad_decay(classifier, decay: float) -> None:
    with pytest.raises(SelftuneError):
        layerwise_param_groups(classifier, 1e-3, decay, 0.01)


def test_make_optimizer_single_lr(classifier) -> None:
    opt = make_optimizer(classifier, 3e-5, 0.01, None, betas=(0.8, 0.99), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {3e-5}
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.99)}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}


def test_trainer_scheduler_keeps_layer_ratios(tmp_path) -> None:
    """The Trainer's own scheduler (LambdaLR) scales each group's initial lr by one factor."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=2))
    optimizer = make_optimizer(model, 1e-3, 0.01, 0.5)
    initial = [g["lr"] for g in optimizer.param_groups]
    seen: list[list[float]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([g["lr"] for g in optimizer.param_groups])

    data = [{"input_ids": [2, 5 + i % 7, 3], "attention_mask": [1, 1, 1], "labels": i % 2}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             lr_scheduler_type="linear", warmup_steps=0, save_strategy="no",
                             logging_strategy="no", report_to=[], disable_tqdm=True,
                             use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                      callbacks=[Record()])
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer or trainer.optimizer is optimizer
    assert [g["initial_lr"] for g in optimizer.param_groups] == initial
    assert len(seen) == 2
    # after step 1 of 2 with linear decay and no warm-up: every group at half its own lr
    for lr, lr0 in zip(seen[0], initial, strict=True):
        assert math.isclose(lr, 0.5 * lr0)
    assert len(set(initial)) == 4 + 1  # depths 0..L+2 with L = 2


def test_linear_schedule_scales_each_group() -> None:
    from transformers import get_linear_schedule_with_warmup

    model = BertForSequenceClassification(tiny_config(num_labels=2))
    optimizer = make_optimizer(model, 1e-3, 0.01, 0.9)
    initial = [g["lr"] for g in optimizer.param_groups]
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2,
                                                num_training_steps=10)
    for step in range(1, 6):
        optimizer.step()
        scheduler.step()
        factor = step / 2 if step < 2 else (10 - step) / 8
        for group, lr0 in zip(optimizer.param_groups, initial, strict=True):
            assert math.isclose(group["lr"], factor * lr0)
