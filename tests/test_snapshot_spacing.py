"""Spaced snapshots: an interval in fractions of an epoch, when distillation starts, and the
self-ensemble built afterwards from a baseline's saved snapshots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from selftune.cli import main
from selftune.config import TrainConfig, parse_snapshot_interval, resolve_snapshot_interval
from selftune.errors import SelftuneError
from selftune.self_distillation import SelfDistillation
from selftune.self_ensemble import SNAPSHOTS_FILE
from selftune.teachers import float_state
from selftune.training import train, update_steps_per_epoch

from .test_self_distillation import TEXTS, optimizer_step, snapshot, tiny_classifier
from .test_training import StopAfterFirstSave, dev_logits, tiny_config


@pytest.mark.parametrize("given, parsed", [
    ("0.1ep", "0.1ep"), ("0.10EP", "0.1ep"), ("2ep", "2ep"), ("100", 100), (7, 7),
    ("12.0", 12)])
def test_snapshot_interval_reads_steps_or_fractions_of_an_epoch(given, parsed):
    assert parse_snapshot_interval(given) == parsed


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "0ep", "-0.1ep", "nanep", "infep", "x", True])
def test_a_snapshot_interval_that_means_nothing_is_refused(bad):
    with pytest.raises(ValueError):
        parse_snapshot_interval(bad)


def test_a_bad_snapshot_interval_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "rte", "--strategy", "sda", "--snapshot-interval", "0.1"])
    assert stop.value.code == 2
    assert "snapshot interval" in capsys.readouterr().err
    with pytest.raises(SelftuneError, match="snapshot_interval"):
        TrainConfig.from_dict({"strategy": "sda", "snapshot_interval": "-1ep"})


@pytest.mark.parametrize("examples, batch, accumulation, world, expected", [
    (48, 8, 1, 1, 6), (49, 8, 1, 1, 7), (48, 8, 4, 1, 2), (50, 8, 4, 1, 2), (48, 8, 1, 2, 3),
    (3, 8, 4, 1, 1)])
def test_steps_per_epoch_are_counted_as_the_trainer_counts_them(examples, batch, accumulation,
                                                                 world, expected, monkeypatch):
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, use_cpu=True,
                             report_to=[])
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: world))
    assert update_steps_per_epoch(examples, args) == expected


def test_fraction_of_an_epoch_resolves_to_steps():
    assert resolve_snapshot_interval("0.1ep", 4210) == 421
    assert resolve_snapshot_interval("0.5ep", 6) == 3
    assert resolve_snapshot_interval("0.01ep", 6) == 1  # never less than one step
    assert resolve_snapshot_interval(25, 6) == 25


def test_a_run_records_the_resolved_interval(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "sda"
    result = train(tiny_config(tiny_model, sentiment_files, out, strategy="sda",
                               snapshot_interval="0.5ep", num_train_epochs=1))
    # 48 examples in batches of 8: 6 steps an epoch, a snapshot every 3.
    assert result["snapshot_interval_steps"] == 3
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["snapshot_interval"] == "0.5ep"
    assert saved["resolved"] == {"snapshot_interval_steps": 3}
    # A step interval resolves to itself and leaves the files as they were.
    other = train(tiny_config(tiny_model, sentiment_files, tmp_path / "steps", strategy="sda",
                              snapshot_interval=3, num_train_epochs=1))
    assert "snapshot_interval_steps" not in other
    assert "resolved" not in json.loads((tmp_path / "steps" / "run_config.json").read_text())
    # The same run given in steps, with the same start, computes the same thing.
    same = train(tiny_config(tiny_model, sentiment_files, tmp_path / "same", strategy="sda",
                             snapshot_interval=3, snapshot_start="first-snapshot",
                             num_train_epochs=1))
    assert same["metrics"] == result["metrics"]
    np.testing.assert_array_equal(dev_logits(tmp_path / "same", TEXTS), dev_logits(out, TEXTS))


def batch_of(n: int = 4) -> dict:
    return {"input_ids": torch.randint(5, 40, (n, 6)), "labels": torch.tensor([0, 1] * (n // 2))}


@pytest.mark.parametrize("kind", ["sda", "sdv", "ema"])
def test_distillation_waits_for_a_snapshot_past_the_initial_model(kind):
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind=kind, k=2, interval=2,
                                              distill_start="first-snapshot")
    teacher_calls = []
    original = objective.teacher.logits
    objective.teacher.logits = lambda features: teacher_calls.append(1) or original(features)
    objective.on_train_begin(model)
    initial = snapshot(model)
    for step in (1, 2):
        assert not objective.teacher.ready
        loss, _, parts = objective.compute_loss(model, batch_of())
        assert float(parts["distill_loss"]) == 0.0
        torch.testing.assert_close(loss, parts["task_loss"])
        optimizer_step(model, step, objective)
    assert not teacher_calls  # no teacher forward pass before it is ready
    # θ_2 is the first snapshot: sda/sdv take it before update 3, ema after update 2.
    taken = snapshot(model)
    if kind != "ema":
        assert not objective.teacher.ready
        optimizer_step(model, 3, objective)
    assert objective.teacher.ready
    loss, _, parts = objective.compute_loss(model, batch_of())
    assert teacher_calls and float(parts["distill_loss"]) > 0
    teacher_state = float_state(objective.averaged_teacher())
    for name, tensor in taken.items():  # the initial model is not part of the teacher
        torch.testing.assert_close(teacher_state[name], tensor)
        assert not torch.equal(teacher_state[name], initial[name]) or "position" in name


def test_the_initial_start_keeps_the_papers_formula():
    model = tiny_classifier()
    objective = SelfDistillation.for_strategy(model, kind="sda", k=2, interval=2)
    objective.on_train_begin(model)
    assert objective.teacher.ready
    assert torch.equal(float_state(objective.teacher.model)["classifier.weight"],
                       float_state(model)["classifier.weight"])


@pytest.mark.parametrize("strategy", ["sda", "ema"])
def test_resume_inside_a_spaced_window_is_exact(strategy, tiny_model, sentiment_files,
                                                tmp_path):
    options = {"strategy": strategy, "snapshot_interval": "0.34ep", "save_steps": 4}
    reference = train(tiny_config(tiny_model, sentiment_files, tmp_path / "ref", **options))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # killed at step 4: after one snapshot (step 2)
        train(tiny_config(tiny_model, sentiment_files, out, **options),
              callbacks=[StopAfterFirstSave()])
    resumed = train(tiny_config(tiny_model, sentiment_files, out, **options))
    assert resumed["resumed_from"]
    assert resumed["snapshot_interval_steps"] == reference["snapshot_interval_steps"] == 2
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["teacher_metrics"] == reference["teacher_metrics"]
    for sub in ("", "teacher"):
        np.testing.assert_array_equal(dev_logits(out / sub, TEXTS),
                                      dev_logits(tmp_path / "ref" / sub, TEXTS))


def test_saving_snapshots_changes_no_training(tiny_model, sentiment_files, tmp_path):
    base = train(tiny_config(tiny_model, sentiment_files, tmp_path / "base"))
    kept = train(tiny_config(tiny_model, sentiment_files, tmp_path / "kept", save_snapshots=3,
                             snapshot_interval=4))
    assert kept["metrics"] == base["metrics"]
    np.testing.assert_array_equal(dev_logits(tmp_path / "kept", TEXTS),
                                  dev_logits(tmp_path / "base", TEXTS))
    saved = load_file(str(tmp_path / "kept" / SNAPSHOTS_FILE))
    assert {key.split(".")[1] for key in saved} == {"0", "1", "2"}  # the last 3 of 4


def test_the_ensemble_afterwards_is_the_self_ensemble_of_training(tiny_model, sentiment_files,
                                                                  tmp_path, capsys):
    se = train(tiny_config(tiny_model, sentiment_files, tmp_path / "se", strategy="se",
                           se_pool="steps", sd_k=3, snapshot_interval=4,
                           snapshot_start="first-snapshot"))
    train(tiny_config(tiny_model, sentiment_files, tmp_path / "base", save_snapshots=3,
                      snapshot_interval=4, snapshot_start="first-snapshot"))
    capsys.readouterr()
    assert main(["ensemble", str(tmp_path / "base"), "--k", "3", "--vote"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = tmp_path / "base" / "ensemble-k3"
    ours, direct = load_file(str(out / "model.safetensors")), load_file(
        str(tmp_path / "se" / "model.safetensors"))
    assert ours.keys() == direct.keys()
    for name in ours:
        assert torch.equal(ours[name], direct[name]), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"] == se["metrics"] and printed["score"] == se["score"]
    assert metrics["snapshot_steps"] == [8, 12, 16]  # 18 steps, a snapshot every 4: the last 3
    assert "vote_metrics" in metrics and "vote_score" in printed
    # Two of the three: the direct mean of the two newest saved snapshots.
    assert main(["ensemble", str(tmp_path / "base"), "--k", "2"]) == 0
    saved = load_file(str(tmp_path / "base" / SNAPSHOTS_FILE))
    two = load_file(str(tmp_path / "base" / "ensemble-k2" / "model.safetensors"))
    for name in ("classifier.weight", "bert.pooler.dense.bias"):
        mean = (saved[f"snapshot.1.{name}"] + saved[f"snapshot.2.{name}"]) / 2
        torch.testing.assert_close(two[name], mean, rtol=1e-6, atol=1e-7)


def test_ensemble_errors_are_one_line(tiny_model, sentiment_files, tmp_path, capsys):
    train(tiny_config(tiny_model, sentiment_files, tmp_path / "plain", num_train_epochs=1))
    assert main(["ensemble", str(tmp_path / "plain")]) == 2
    assert "--save-snapshots" in capsys.readouterr().err
    train(tiny_config(tiny_model, sentiment_files, tmp_path / "kept", num_train_epochs=1,
                      save_snapshots=2, snapshot_interval=2))
    assert main(["ensemble", str(tmp_path / "kept"), "--k", "5"]) == 2
    assert "kept 2 snapshots" in capsys.readouterr().err
    assert main(["ensemble", str(tmp_path / "nowhere")]) == 2
    assert main(["ensemble", str(tmp_path / "kept")]) == 0
    assert main(["ensemble", str(tmp_path / "kept")]) == 2  # written already
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert main(["ensemble", str(tmp_path / "kept"), "--overwrite-output-dir"]) == 0


@pytest.mark.parametrize("options, message", [
    ({"snapshot_interval": 4}, "or to a baseline with --save-snapshots"),
    ({"snapshot_start": "initial"}, "or to a baseline with --save-snapshots"),
    ({"save_snapshots": 3, "strategy": "sda"}, "--save-snapshots does nothing with"),
    ({"strategy": "se", "snapshot_start": "initial"}, "--se-pool epochs"),
])
def test_snapshot_options_without_a_use_are_refused(options, message):
    from selftune.config import check_strategy_options

    with pytest.raises(SelftuneError, match=message):
        check_strategy_options(TrainConfig(**options))


class PreferStep(TrainerCallback):
    """Makes the evaluation at ``step`` the best by --metric-for-best-model loss (the Trainer
    reads the metrics after its callbacks), whatever a tiny model learns."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = 0.0 if state.global_step == self.step else 1.0


def test_the_best_epoch_is_kept_with_its_teacher(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "best"
    result = train(tiny_config(tiny_model, sentiment_files, out, strategy="sda", sd_k=2,
                               num_train_epochs=4, load_best_model_at_end=True,
                               metric_for_best_model="loss", keep_checkpoints=True),
                   callbacks=[PreferStep(12)])
    assert result["best_model_step"] == 12 and result["global_steps"] == 24
    kept = next(e for e in result["history"] if e["step"] == 12)
    assert result["metrics"] == kept["metrics"] and result["score"] == kept["score"]
    # The saved student and teacher are those of step 12, as its checkpoint holds them.
    checkpoint = out / "checkpoints" / "checkpoint-12"
    student = load_file(str(out / "model.safetensors"))
    assert torch.equal(student["classifier.weight"],
                       load_file(str(checkpoint / "model.safetensors"))["classifier.weight"])
    state = load_file(str(checkpoint / "selftune_objective.safetensors"))
    teacher = load_file(str(out / "teacher" / "model.safetensors"))
    name = "classifier.weight"
    mean = (state[f"snapshot.0.{name}"] + state[f"snapshot.1.{name}"]) / 2
    torch.testing.assert_close(teacher[name], mean, rtol=1e-6, atol=1e-7)
    # (The Trainer deletes the last checkpoint once it has loaded a better one.)
    assert not (out / "checkpoints" / "checkpoint-24").exists()


def test_early_stopping_resumes_to_the_same_choice(tiny_model, sentiment_files, tmp_path):
    options = dict(num_train_epochs=6, early_stopping_patience=2,
                   metric_for_best_model="loss")
    reference = train(tiny_config(tiny_model, sentiment_files, tmp_path / "ref", **options),
                      callbacks=[PreferStep(6)])
    # Best at step 6, no better at 12 and 18: stopped after the third epoch.
    assert reference["best_model_step"] == 6 and reference["global_steps"] == 18
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out, **options),
              callbacks=[PreferStep(6), StopAfterFirstSave()])
    resumed = train(tiny_config(tiny_model, sentiment_files, out, **options),
                    callbacks=[PreferStep(6)])
    assert resumed["resumed_from"]
    assert resumed["best_model_step"] == reference["best_model_step"]
    assert resumed["global_steps"] == reference["global_steps"]
    assert resumed["metrics"] == reference["metrics"]
    np.testing.assert_array_equal(dev_logits(out, TEXTS), dev_logits(tmp_path / "ref", TEXTS))


@pytest.mark.parametrize("options, message", [
    ({"metric_for_best_model": "loss"}, "needs --load-best-model-at-end"),
    ({"load_best_model_at_end": True, "save_steps": 4}, "drop --save-steps"),
    ({"load_best_model_at_end": True, "eval_each_epoch": False}, "--no-eval-each-epoch"),
    ({"load_best_model_at_end": True, "strategy": "se"}, "does not apply to --strategy se"),
    ({"early_stopping_patience": 0}, "at least 1"),
    ({"load_best_model_at_end": True, "metric_for_best_model": "mcc"}, "reports score, "),
])
def test_best_model_options_that_cannot_work_are_refused(options, message, tiny_model,
                                                         sentiment_files, tmp_path):
    with pytest.raises(SelftuneError, match=message):
        train(tiny_config(tiny_model, sentiment_files, tmp_path / "x", **options))
    assert not (tmp_path / "x").exists()
