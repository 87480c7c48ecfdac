"""The training path end to end on a tiny random BERT: outputs, reload, resume, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from selftune.config import TrainConfig
from selftune.data.loading import DataOptions
from selftune.errors import SelftuneError
from selftune.evaluation import evaluate_model, predict_file
from selftune.models.heads import UNFOLDED_FILE
from selftune.training import train


def tiny_config(tiny_model, files, out, **overrides) -> TrainConfig:
    train_file, dev_file = files
    values = dict(model=str(tiny_model), train_file=str(train_file),
                  validation_file=str(dev_file), output_dir=str(out), seed=3,
                  num_train_epochs=3, learning_rate=1e-2, per_device_train_batch_size=8,
                  warmup_ratio=0.0, logging_steps=2)
    values.update(overrides)
    return TrainConfig(**values)


def dev_logits(model_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        return model(**batch).logits.numpy()


def test_train_writes_a_standard_model_directory(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(tiny_model, sentiment_files, out, num_train_epochs=6,
                               learning_rate=5e-3))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json",
            "run_config.json", "train.log"} <= names
    assert "checkpoints" not in names and "training_args.bin" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"] == result["metrics"]
    assert [round(h["epoch"]) for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    assert metrics["train_examples_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    # The label is one word of the sentence: the tiny model learns it in six epochs.
    assert metrics["metrics"]["accuracy"] >= 75.0, metrics
    assert "step" in (out / "train.log").read_text()


@pytest.mark.parametrize("strategy", ["baseline", "se"])
def test_a_task_with_two_dev_sets_reports_both(strategy, tiny_model, glue_dir_with_mnli,
                                                tmp_path, monkeypatch):
    """MNLI: the score is the matched dev set's (or --eval-split's); the mismatched one is
    evaluated too, at the end, and equals what `selftune evaluate` measures on it — for se on
    the saved self-ensemble, not on the last iterate."""
    from selftune import training as training_module

    predicted_with = []  # (rows, parameters) of every model scored outside the Trainer

    def spy(model, tokenizer, dataset, batch_size, *args):
        predicted_with.append((len(dataset), {k: v.clone() for k, v in
                                              model.state_dict().items()}))
        return dataset_logits(model, tokenizer, dataset, batch_size, *args)

    dataset_logits = training_module.dataset_logits
    monkeypatch.setattr(training_module, "dataset_logits", spy)
    out = tmp_path / "mnli"
    result = train(TrainConfig(task="mnli", model=str(tiny_model),
                               data_dir=str(glue_dir_with_mnli), output_dir=str(out),
                               num_train_epochs=2, per_device_train_batch_size=4,
                               strategy=strategy,
                               **({"se_pool": "steps"} if strategy == "se" else {})))
    if strategy == "se":
        assert set(result["last_iterate_other_splits"]) == {"validation_mismatched"}
        saved = load_file(out / "model.safetensors")
        (mismatched,) = [params for rows, params in predicted_with if rows == 4]
        for name, tensor in saved.items():
            torch.testing.assert_close(mismatched[name], tensor)
    assert result["eval_split"] == "validation_matched"
    assert set(result["other_splits"]) == {"validation_mismatched"}
    options = DataOptions(task="mnli", data_dir=str(glue_dir_with_mnli))
    for split, reported in (("validation_matched", result),
                            ("validation_mismatched", result["other_splits"][
                                "validation_mismatched"])):
        evaluated = evaluate_model(str(out), options, split, 128, 4)
        assert evaluated["num_examples"] == (12 if split == "validation_matched" else 4)
        assert evaluated["metrics"] == pytest.approx(reported["metrics"])
    assert json.loads((out / "metrics.json").read_text())["other_splits"] == \
        result["other_splits"]


def test_reloaded_model_reproduces_the_reported_metrics(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(tiny_model, sentiment_files, out))
    dev = sentiment_files[1]
    rows = [line.rsplit(",", 1) for line in dev.read_text().splitlines()[1:]]
    logits = dev_logits(out, [t for t, _ in rows])
    accuracy = 100 * np.mean(logits.argmax(-1) == np.array([int(y) for _, y in rows]))
    assert accuracy == pytest.approx(result["metrics"]["accuracy"])
    evaluated = evaluate_model(str(out), DataOptions(validation_file=str(dev)), None, 128, 4)
    assert evaluated["metrics"]["accuracy"] == pytest.approx(accuracy)

    predictions = tmp_path / "pred.csv"
    assert predict_file(str(out), str(dev), str(predictions), ("text",), None, 128, 4) == 16
    lines = predictions.read_text().splitlines()
    assert lines[0] == "example_id,label,prob_0,prob_1"
    probs = np.array([[float(x) for x in line.split(",")[2:]] for line in lines[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(logits), -1).numpy(),
                               rtol=1e-4, atol=1e-6)


def test_regression_task(tiny_model, tmp_path):
    rows = "".join(f"the movie was {w},{s}\n" for w, s in
                   [("good", 4.5), ("bad", 0.5), ("great", 4.0), ("dull", 1.25)] * 6)
    (tmp_path / "r.csv").write_text("text,label\n" + rows)
    files = (tmp_path / "r.csv", tmp_path / "r.csv")
    result = train(tiny_config(tiny_model, files, tmp_path / "run"))
    assert set(result["metrics"]) == {"pearson", "spearman"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression"


class StopAfterFirstSave(TrainerCallback):
    """Simulate a kill right after the first checkpoint is on disk."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.parametrize("save_steps,options", [
    (None, {}), (4, {}), (6, {}),  # epoch end, inside, just before eval
    # Inside the second epoch, whose length-grouped order must not depend on the global RNG.
    (8, {"group_by_length": True})])
def test_interrupted_run_resumes_to_the_same_result(save_steps, options, tiny_model,
                                                    sentiment_files, tmp_path):
    reference = train(tiny_config(tiny_model, sentiment_files, tmp_path / "ref",
                                  save_steps=save_steps, **options))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out, save_steps=save_steps, **options),
              callbacks=[StopAfterFirstSave()])
    assert not (out / "metrics.json").exists()
    assert (out / "checkpoints").is_dir()
    resumed = train(tiny_config(tiny_model, sentiment_files, out, save_steps=save_steps,
                                **options))
    assert resumed["resumed_from"] is not None
    assert resumed["metrics"] == pytest.approx(reference["metrics"], abs=1e-9)
    # Over the whole run, not only the steps after the resume.
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    texts = ["the movie was good", "it was really dull"]
    np.testing.assert_allclose(dev_logits(out, texts), dev_logits(tmp_path / "ref", texts),
                               atol=1e-6)


def test_finished_run_is_not_overwritten(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model, sentiment_files, out, num_train_epochs=1))
    with pytest.raises(SelftuneError, match="already holds a finished run"):
        train(tiny_config(tiny_model, sentiment_files, out, num_train_epochs=1))
    train(tiny_config(tiny_model, sentiment_files, out, num_train_epochs=1,
                      overwrite_output_dir=True))


def test_unfinished_run_with_other_options_is_refused(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out), callbacks=[StopAfterFirstSave()])
    with pytest.raises(SelftuneError, match="other options \\(learning_rate\\)"):
        train(tiny_config(tiny_model, sentiment_files, out, learning_rate=2e-3))


def test_overwrite_still_resumes_an_interrupted_run_of_the_same_options(
        tiny_model, sentiment_files, tmp_path):
    """--overwrite-output-dir replaces what cannot be resumed (a finished run, other options,
    --no-resume); the same command rerun after a crash resumes."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out, overwrite_output_dir=True),
              callbacks=[StopAfterFirstSave()])
    resumed = train(tiny_config(tiny_model, sentiment_files, out, overwrite_output_dir=True))
    assert resumed["resumed_from"] is not None
    again = train(tiny_config(tiny_model, sentiment_files, out, overwrite_output_dir=True))
    assert again["resumed_from"] is None  # the finished run was replaced, not resumed
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, tmp_path / "other"),
              callbacks=[StopAfterFirstSave()])
    changed = train(tiny_config(tiny_model, sentiment_files, tmp_path / "other",
                                learning_rate=2e-3, overwrite_output_dir=True))
    assert changed["resumed_from"] is None
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, tmp_path / "third"),
              callbacks=[StopAfterFirstSave()])
    assert train(tiny_config(tiny_model, sentiment_files, tmp_path / "third", resume=False,
                             overwrite_output_dir=True))["resumed_from"] is None


def test_resume_does_not_depend_on_how_paths_are_spelled(tiny_model, sentiment_files, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_file, dev_file = (Path(p).relative_to(tmp_path) for p in sentiment_files)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, (train_file, dev_file), "runs/r"),
              callbacks=[StopAfterFirstSave()])
    # Nor on the options the results' config hash leaves out, such as how often to log.
    resumed = train(tiny_config(tiny_model, sentiment_files, str(tmp_path / "runs" / "r") + "/",
                                logging_steps=1))
    assert resumed["resumed_from"] is not None


def test_unreadable_run_config_is_named(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out), callbacks=[StopAfterFirstSave()])
    (out / "run_config.json").write_text("{truncated")
    with pytest.raises(SelftuneError, match="run_config.json is unreadable"):
        train(tiny_config(tiny_model, sentiment_files, out))
    assert train(tiny_config(tiny_model, sentiment_files, out,
                             overwrite_output_dir=True))["resumed_from"] is None


def test_run_started_before_an_option_existed_resumes(tiny_model, sentiment_files, tmp_path):
    """A run_config.json written by an older selftune lacks the newer options: they count as
    their defaults, so the same command still resumes the run."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model, sentiment_files, out), callbacks=[StopAfterFirstSave()])
    saved = json.loads((out / "run_config.json").read_text())
    del saved["group_by_length"]
    (out / "run_config.json").write_text(json.dumps(saved))
    assert train(tiny_config(tiny_model, sentiment_files, out))["resumed_from"] is not None


class PoisonWeights(TrainerCallback):
    """Make the model produce NaN from the given step on."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            with torch.no_grad():
                model.classifier.weight.fill_(float("nan"))


def test_non_finite_loss_stops_the_run(tiny_model, sentiment_files, tmp_path):
    with pytest.raises(SelftuneError, match="loss became nan at step 3.*--nan-policy skip"):
        train(tiny_config(tiny_model, sentiment_files, tmp_path / "run"),
              callbacks=[PoisonWeights(2)])
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_non_finite_loss_can_skip_updates(tiny_model, sentiment_files, tmp_path):
    result = train(tiny_config(tiny_model, sentiment_files, tmp_path / "run",
                               nan_policy="skip"), callbacks=[PoisonWeights(2)])
    assert result["skipped_steps"] == result["global_steps"] - 2


class NanOnce(TrainerCallback):
    """Make the pooler output NaN during one step only (a transient overflow)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at_step:
            dense = model.base_model.pooler.dense

            def poison(module, inputs, output):
                handle.remove()
                return torch.full_like(output, float("nan"))

            handle = dense.register_forward_hook(poison)


@pytest.mark.parametrize("norm", ["batchnorm", "isobn"])
def test_a_skipped_step_leaves_no_nan_in_running_statistics(norm, tiny_model, sentiment_files,
                                                            tmp_path):
    result = train(tiny_config(tiny_model, sentiment_files, tmp_path / "run", cls_norm=norm,
                               nan_policy="skip"), callbacks=[NanOnce(3)])
    assert result["skipped_steps"] == 1  # not every step after it
    # The normalizer as trained is kept beside the model it is folded into.
    saved = load_file(str(tmp_path / "run" / UNFOLDED_FILE))
    statistics = {k: v for k, v in saved.items() if k.startswith("cls_norm.running_")}
    assert statistics and all(torch.isfinite(v).all() for v in statistics.values())
    folded = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in folded.values() if v.is_floating_point())


class WeightsAcrossStep(TrainerCallback):
    """The trainable weights before and after one optimizer step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at_step:
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_non_finite_micro_batch_skips_its_whole_update(tiny_model, sentiment_files,
                                                         tmp_path):
    """With gradient accumulation the update is skipped as a whole: not applied with the
    gradients of the other micro-batches alone, and counted once."""
    weights = WeightsAcrossStep(3)
    result = train(tiny_config(tiny_model, sentiment_files, tmp_path / "run", nan_policy="skip",
                               per_device_train_batch_size=4, gradient_accumulation_steps=2),
                   callbacks=[NanOnce(3), weights])
    assert result["skipped_steps"] == 1
    assert all(torch.equal(weights.before[n], weights.after[n]) for n in weights.before)
    assert result["global_steps"] > 3


def test_gradient_accumulation_keeps_the_loss_scale(tiny_model, sentiment_files, tmp_path):
    whole = train(tiny_config(tiny_model, sentiment_files, tmp_path / "a", num_train_epochs=1,
                              learning_rate=1e-5))
    accumulated = train(tiny_config(tiny_model, sentiment_files, tmp_path / "b",
                                    num_train_epochs=1, learning_rate=1e-5,
                                    per_device_train_batch_size=4,
                                    gradient_accumulation_steps=2))
    assert whole["global_steps"] == accumulated["global_steps"] == 6
    # Both are means over the same examples (a model that barely moves: ~log 2 each); counting
    # the accumulated micro-batches twice would double it.
    assert accumulated["train_loss"] == pytest.approx(whole["train_loss"], abs=0.02)
