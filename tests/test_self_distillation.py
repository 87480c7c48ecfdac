"""Self-distillation and self-ensemble on a tiny BERT: the semantics the paper fixes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
)

from selftune.errors import SelftuneError
from selftune.self_distillation import SelfDistillation
from selftune.teachers import float_state
from selftune.training import train

from .test_training import StopAfterFirstSave, dev_logits, tiny_config

TEXTS = ["the movie was good", "it was really dull", "a great plot", "not very bad"]


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(config)


def sgd_step(model: torch.nn.Module) -> None:
    batch = {"input_ids": torch.randint(5, 40, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
    model.train()
    model(**batch).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
            p.grad = None


def optimizer_step(model: torch.nn.Module, step: int, *objectives: SelfDistillation) -> None:
    """Update ``step`` as the Trainer runs it, with the objectives' hooks around it."""
    for objective in objectives:
        objective.before_optimizer_step(model, step - 1)
    sgd_step(model)
    for objective in objectives:
        objective.on_step_end(model, step)


def states_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def snapshot(model) -> dict:
    return {n: t.clone() for n, t in float_state(model).items()}


def mean_of(states: list[dict]) -> dict:
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def assert_state(actual: dict, expected: dict) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6)


def test_k1_sda_teacher_is_the_previous_student():
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind="sda", k=1)
    objective.on_train_begin(model)
    assert states_equal(float_state(objective.teacher.model), float_state(model))  # only θ_0 exists
    for step in range(1, 4):
        previous = snapshot(model)
        optimizer_step(model, step, objective)
        # The loss at θ_t uses θ̃_t = θ_{t-1}: the student of the previous step.
        assert states_equal(float_state(objective.teacher.model), previous)
        assert not states_equal(float_state(objective.teacher.model), float_state(model))


@pytest.mark.parametrize("lam", [-0.5, float("nan")])
def test_a_negative_or_nan_lambda_is_refused_when_the_objective_is_built(lam):
    with pytest.raises(ValueError, match="non-negative"):
        SelfDistillation.for_strategy(tiny_classifier(), kind="sda", k=1, lam=lam)


def test_sda_teacher_averages_the_k_states_before_the_student():
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind="sda", k=3)
    objective.on_train_begin(model)
    history = [snapshot(model)]
    for step in range(1, 6):
        optimizer_step(model, step, objective)
        history.append(snapshot(model))
        # θ̃_t = mean(θ_{t-1}, ..., θ_{t-K}), fewer while fewer exist.
        assert_state(float_state(objective.teacher.model), mean_of(history[-4:-1]))
    assert not objective.teacher.model.training  # eval mode: no dropout in the teacher
    assert not any(p.requires_grad for p in objective.teacher.model.parameters())


def test_snapshot_interval_teacher_never_includes_the_current_student():
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind="sda", k=2, interval=2)
    objective.on_train_begin(model)
    pushed = {0: snapshot(model)}
    expected = {2: [0], 3: [0, 2], 4: [0, 2], 5: [2, 4], 6: [2, 4], 7: [4, 6]}
    for step in range(1, 8):
        optimizer_step(model, step, objective)
        if step % 2 == 0:
            pushed[step] = snapshot(model)
        if step in expected:
            assert_state(float_state(objective.teacher.model),
                         mean_of([pushed[s] for s in expected[step]]))
    assert len(objective.teacher.window) == 2  # exactly the teacher's K states: 4, 6


def test_sdv_k1_equals_sda_k1_on_a_batch():
    model = tiny_classifier()
    sda = SelfDistillation.for_strategy(model, kind="sda", k=1)
    sdv = SelfDistillation.for_strategy(model, kind="sdv", k=1)
    for objective in (sda, sdv):
        objective.on_train_begin(model)
    for step in range(1, 3):
        optimizer_step(model, step, sda, sdv)
    batch = {"input_ids": torch.randint(5, 40, (3, 6))}
    torch.testing.assert_close(sda.teacher_logits(batch), sdv.teacher_logits(batch))


def test_sdv_vote_is_the_mean_of_member_logits():
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind="sdv", k=3)
    objective.on_train_begin(model)
    members = [tiny_classifier().eval()]
    members[0].load_state_dict(model.state_dict())
    for step in range(1, 5):
        optimizer_step(model, step, objective)
        members.append(tiny_classifier().eval())
        members[-1].load_state_dict(model.state_dict())
    batch = {"input_ids": torch.randint(5, 40, (3, 6))}
    with torch.no_grad():  # the K states before the current one: θ_1, θ_2, θ_3
        direct = torch.stack([m(**batch).logits for m in members[-4:-1]]).mean(0)
    torch.testing.assert_close(objective.teacher_logits(batch), direct, rtol=1e-5, atol=1e-6)


def run(tiny_model, files, out, **options):
    return train(tiny_config(tiny_model, files, out, **options))


def test_lambda_zero_gives_exactly_the_baseline(tiny_model, sentiment_files, tmp_path):
    baseline = run(tiny_model, sentiment_files, tmp_path / "base")
    sda = run(tiny_model, sentiment_files, tmp_path / "sda", strategy="sda", sd_lambda=0.0)
    assert sda["train_loss"] == pytest.approx(baseline["train_loss"], rel=1e-6)
    assert sda["metrics"] == baseline["metrics"]
    np.testing.assert_allclose(dev_logits(tmp_path / "sda", TEXTS),
                               dev_logits(tmp_path / "base", TEXTS), atol=1e-6)


def test_sdv_k1_equals_sda_k1_end_to_end(tiny_model, sentiment_files, tmp_path):
    sda = run(tiny_model, sentiment_files, tmp_path / "sda", strategy="sda", sd_k=1)
    sdv = run(tiny_model, sentiment_files, tmp_path / "sdv", strategy="sdv", sd_k=1)
    assert sdv["train_loss"] == pytest.approx(sda["train_loss"], rel=1e-5)
    np.testing.assert_allclose(dev_logits(tmp_path / "sdv", TEXTS),
                               dev_logits(tmp_path / "sda", TEXTS), atol=1e-5)


@pytest.mark.parametrize("strategy", ["sda", "sdv", "ema"])
def test_distillation_outputs(strategy, tiny_model, sentiment_files, tmp_path):
    out = tmp_path / strategy
    result = run(tiny_model, sentiment_files, out, strategy=strategy)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["teacher_metrics"]) == {"accuracy", "f1"}
    assert metrics["teacher_score"] == result["teacher_score"]
    teacher = AutoModelForSequenceClassification.from_pretrained(out / "teacher")
    assert teacher.config.id2label == {0: "0", 1: "1"}
    log = (out / "train.log").read_text()
    assert "task_loss=" in log and "distill_loss=" in log
    if strategy != "sdv":  # the saved teacher reproduces the reported teacher metrics
        logits = dev_logits(out / "teacher", [line.rsplit(",", 1)[0] for line in
                                              sentiment_files[1].read_text().splitlines()[1:]])
        labels = [int(line.rsplit(",", 1)[1]) for line in
                  sentiment_files[1].read_text().splitlines()[1:]]
        accuracy = 100 * np.mean(logits.argmax(-1) == np.array(labels))
        assert accuracy == pytest.approx(metrics["teacher_metrics"]["accuracy"])


class EpochStates(TrainerCallback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.states.append({n: t.clone() for n, t in float_state(model).items()})


def test_se_saves_the_average_of_the_epoch_pool(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "se"
    epochs = EpochStates()
    result = train(tiny_config(tiny_model, sentiment_files, out, strategy="se"),
                   callbacks=[epochs])
    assert "last_iterate_metrics" in result
    assert result["ensemble"] == "parameter average of 3 snapshots (epochs pool)"
    # The saved model is the mean of the three end-of-epoch states, and the reported metrics
    # are that model's.
    assert len(epochs.states) == 3
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in saved.items():
        if name in epochs.states[0]:
            mean = torch.stack([s[name] for s in epochs.states]).double().mean(0).float()
            torch.testing.assert_close(tensor, mean, rtol=1e-6, atol=1e-6)
    dev_rows = sentiment_files[1].read_text().splitlines()[1:]
    logits = dev_logits(out, [line.rsplit(",", 1)[0] for line in dev_rows])
    labels = np.array([int(line.rsplit(",", 1)[1]) for line in dev_rows])
    assert 100 * np.mean(logits.argmax(-1) == labels) == pytest.approx(
        result["metrics"]["accuracy"])
    base = run(tiny_model, sentiment_files, tmp_path / "base")
    # Training itself is the baseline's: the last iterate is the baseline's final model.
    assert result["last_iterate_metrics"] == base["metrics"]
    assert result["train_loss"] == pytest.approx(base["train_loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["sda", "sdv", "ema"])
def test_resume_gives_the_same_teacher(strategy, tiny_model, sentiment_files, tmp_path):
    reference = run(tiny_model, sentiment_files, tmp_path / "ref", strategy=strategy)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out, strategy=strategy),
              callbacks=[StopAfterFirstSave()])
    resumed = run(tiny_model, sentiment_files, out, strategy=strategy)
    assert resumed["resumed_from"]
    assert resumed["metrics"] == pytest.approx(reference["metrics"], abs=1e-9)
    assert resumed["teacher_metrics"] == pytest.approx(reference["teacher_metrics"], abs=1e-9)
    for sub in ("", "teacher"):
        np.testing.assert_allclose(dev_logits(out / sub, TEXTS),
                                   dev_logits(tmp_path / "ref" / sub, TEXTS), atol=1e-6)


def test_self_distillation_options_need_a_strategy(tiny_model, sentiment_files, tmp_path):
    with pytest.raises(SelftuneError, match="--sd-k only apply to --strategy"):
        run(tiny_model, sentiment_files, tmp_path / "x", sd_k=5)


@pytest.mark.parametrize("strategy, option, applies", [
    ("se", {"sd_lambda": 0.5}, False), ("se", {"teacher_dropout": True}, False),
    ("ema", {"sd_k": 5}, False), ("sda", {"se_pool": "steps"}, False),
    ("sdv", {"se_combine": "vote"}, False),
    ("se", {"sd_k": 5, "se_pool": "steps", "se_combine": "vote"}, True),
    ("se", {"snapshot_interval": 10}, False),  # the default pool is per epoch
    ("se", {"snapshot_interval": 10, "se_pool": "steps"}, True),
    ("ema", {"sd_lambda": 0.5, "snapshot_interval": 10, "teacher_dropout": True}, True),
    ("sda", {"sd_k": 1, "sd_lambda": 0.1}, True),
])
def test_an_option_the_strategy_does_not_use_is_refused(strategy, option, applies):
    from selftune.config import TrainConfig, check_strategy_options

    cfg = TrainConfig(strategy=strategy, **option)
    if applies:
        check_strategy_options(cfg)
    else:
        name = "--" + next(iter(option)).replace("_", "-")
        with pytest.raises(SelftuneError, match=f"{name} does nothing with --strategy {strategy}"):
            check_strategy_options(cfg)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_teacher_runs_in_the_students_precision(bf16, tiny_model, sentiment_files,
                                                    tmp_path, monkeypatch):
    seen = []
    original = SelfDistillation.teacher_logits

    def recording(self, features):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, features)

    monkeypatch.setattr(SelfDistillation, "teacher_logits", recording)
    run(tiny_model, sentiment_files, tmp_path / "sda", strategy="sda", bf16=bf16,
        num_train_epochs=1)
    assert seen and all(enabled == bf16 for enabled in seen)
