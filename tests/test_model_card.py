"""A finished run folder describes itself as run_glue.py's do: a model card with Hub metadata,
train/eval/all_results.json and trainer_state.json, all written before metrics.json."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard

from selftune import __version__
from selftune.model_card import base_model_id
from selftune.models.loading import DEFAULT_MODEL
from selftune.multitask.training import train_multitask
from selftune.training import train

from .test_multitask import mt_config
from .test_training import tiny_config

RESULTS_FILES = ("train_results.json", "eval_results.json", "all_results.json",
                 "trainer_state.json", "README.md")


def check_written_before_metrics(folder, names=RESULTS_FILES) -> None:
    finished = (folder / "metrics.json").stat().st_mtime_ns
    for name in names:
        assert (folder / name).stat().st_mtime_ns <= finished, name


def test_a_single_task_run_folder_describes_itself(tiny_model, glue_dir_with_mnli, tmp_path):
    out = tmp_path / "mnli"
    result = train(tiny_config(tiny_model, (None, None), out, task="mnli",
                               data_dir=str(glue_dir_with_mnli), train_file=None,
                               validation_file=None, cls_norm="batchnorm", seed=7,
                               num_train_epochs=1))
    check_written_before_metrics(out)
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results == {**train_results, **eval_results}
    assert train_results["train_samples"] == result["num_train_examples"]
    assert eval_results["eval_samples"] == result["num_eval_examples"]
    assert eval_results["eval_score"] == result["score"]
    for name, value in result["metrics"].items():
        assert eval_results[f"eval_{name}"] == value
    mismatched = result["other_splits"]["validation_mismatched"]
    assert eval_results["eval_score_validation_mismatched"] == mismatched["score"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == result["global_steps"]
    assert any("eval_score" in entry for entry in state["log_history"])

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert {"selftune", "selftune-baseline", "cls-norm-batchnorm"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id; the body names it
    assert card.data.datasets == ["nyu-mll/glue"]
    reported = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert reported.keys() == result["metrics"].keys()
    for name, value in result["metrics"].items():
        assert reported[name] == round(value, 4)
    assert {r.dataset_config for r in card.data.eval_results} == {"mnli"}
    assert str(tiny_model) in card.text and "seed 7" in card.text
    assert f"selftune {__version__}" in card.text
    assert f"| score (mean) | {result['score']:.2f} |" in card.text
    assert "| `cls_norm` | `batchnorm` |" in card.text
    assert 'pipeline("text-classification"' in card.text


def test_an_unfoldable_model_card_says_to_load_it_with_selftune(tiny_model, sentiment_files,
                                                                tmp_path):
    out = tmp_path / "ln"
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm="layernorm",
                      num_train_epochs=1))
    text = (out / "README.md").read_text()
    assert "selftune predict" in text and "pipeline(" not in text


def test_an_sda_run_describes_its_teacher_too(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "sda"
    result = train(tiny_config(tiny_model, sentiment_files, out, strategy="sda",
                               num_train_epochs=2))
    teacher_card = ModelCard.load(out / "teacher" / "README.md")
    assert "self-distillation teacher" in teacher_card.text
    assert f"| score (mean) | {result['teacher_score']:.2f} |" in teacher_card.text


def test_the_default_model_is_named_by_its_hub_id():
    assert base_model_id("default") == base_model_id(None) == DEFAULT_MODEL
    assert base_model_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert base_model_id("/some/local/dir") is None


def test_every_task_model_of_a_multitask_run_has_a_card(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "mt"
    result = train_multitask(mt_config(tiny_model, glue_dir, out, num_train_epochs=1))
    check_written_before_metrics(out, [*RESULTS_FILES[:-1],
                                       *(f"tasks/{t}/README.md" for t in result["tasks"])])
    all_results = json.loads((out / "all_results.json").read_text())
    for task, final in result["tasks"].items():
        assert all_results[f"eval_{task}_score"] == final["score"]
        card = ModelCard.load(out / "tasks" / task / "README.md")
        assert card.data.library_name == "transformers" and "selftune" in card.data.tags
        assert {r.dataset_config for r in card.data.eval_results} == {task}
        assert re.search(rf"\| score \(mean\) \| {final['score']:.2f} \|", card.text)
        assert "multi-task training on rte,stsb,cola" in card.text
