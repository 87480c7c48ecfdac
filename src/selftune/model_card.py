"""What makes a finished run folder self-describing, as ``run_glue.py`` leaves one: a model card
(``README.md``, with the Hub's YAML metadata), ``train_results.json``, ``eval_results.json``,
``all_results.json`` and ``trainer_state.json``. All are written before ``metrics.json``, which
marks the run finished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from selftune import __version__
from selftune.config import NOT_HASHED
from selftune.data.tasks import TASKS, TaskSpec
from selftune.models.heads import selftune_only_config
from selftune.models.loading import DEFAULT_MODEL, _is_local

if TYPE_CHECKING:
    from transformers import Trainer
    from transformers.trainer_utils import TrainOutput

    from selftune.config import TrainConfig

# Options every card shows, changed or not; the others only when they differ from the default.
CORE_OPTIONS = ("strategy", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
                "max_seq_length", "seed")
# Options that say where things go, not what the model is.
UNSHOWN_OPTIONS = NOT_HASHED - {"seed"} | {"model", "task", "config_version"}
STRATEGY_NAMES = {
    "baseline": "plain fine-tuning",
    "se": "self-ensemble (parameter average of snapshots)",
    "sda": "self-distillation from the average of the last snapshots",
    "sdv": "self-distillation from the vote of the last snapshots",
    "ema": "self-distillation from an exponential moving average teacher",
}


def base_model_id(model_option: str | None) -> str | None:
    """The Hub id the run started from (the YAML's base_model), or None for a local folder."""
    if model_option in (None, "", "default"):
        return DEFAULT_MODEL
    return None if _is_local(model_option) else model_option


def shown_options(cfg: TrainConfig) -> dict[str, Any]:
    """The options that describe the training: the core ones and every changed one."""
    defaults = type(cfg)().to_dict()
    return {name: value for name, value in cfg.to_dict().items()
            if name not in UNSHOWN_OPTIONS
            and (name in CORE_OPTIONS or value != defaults.get(name))}


@contextlib.contextmanager
def _trainer_writing_to(trainer: Trainer, folder: Path) -> Iterator[None]:
    """The Trainer writes its results files into ``args.output_dir`` (our checkpoints/): point
    it at the run folder meanwhile."""
    saved = trainer.args.output_dir
    trainer.args.output_dir = str(folder)
    try:
        yield
    finally:
        trainer.args.output_dir = saved


def write_trainer_files(trainer: Trainer, train_output: TrainOutput, output_dir: Path,
                        num_train: int, eval_metrics: dict[str, Any] | None) -> None:
    """train_results.json, eval_results.json, all_results.json and trainer_state.json, written
    by the Trainer's own save_metrics/save_state, as in ``run_glue.py``."""
    with _trainer_writing_to(trainer, output_dir):
        trainer.save_metrics("train", {**train_output.metrics, "train_samples": num_train})
        if eval_metrics is not None:
            trainer.save_metrics("eval", eval_metrics)
        trainer.save_state()


def last_eval_metrics(trainer: Trainer) -> dict[str, Any]:
    """The Trainer's last evaluation as it logged it (eval_loss, eval_<metric>, runtime...)."""
    for entry in reversed(trainer.state.log_history):
        if "eval_score" in entry:
            return dict(entry)
    return {}


def single_task_eval_metrics(trainer: Trainer, result: dict[str, Any]) -> dict[str, Any]:
    """``eval_results.json`` of a single-task run; other dev sets (MNLI's mismatched one) with
    the split as suffix, as run_glue.py's ``_mm``."""
    metrics = {k: v for k, v in last_eval_metrics(trainer).items() if k != "step"}
    metrics["eval_samples"] = result["num_eval_examples"]
    for split, other in result.get("other_splits", {}).items():
        for name, value in {**other["metrics"], "score": other["score"]}.items():
            metrics[f"eval_{name}_{split}"] = value
    return metrics


def _card_data(task: TaskSpec | None, base_model: str | None, cfg: TrainConfig, split: str,
               metrics: dict[str, float], model_name: str) -> ModelCardData:
    tags = ["selftune", "text-classification", f"selftune-{cfg.strategy}"]
    if cfg.cls_norm != "none":
        tags.append(f"cls-norm-{cfg.cls_norm}")
    hub = task.hub if task is not None and task.name in TASKS else None
    eval_results = [
        EvalResult(task_type="text-classification", dataset_type=hub[0],
                   dataset_name=f"{hub[0]} {hub[1] or ''}".strip(), dataset_config=hub[1],
                   dataset_split=split, metric_type=name, metric_value=round(value, 4))
        for name, value in metrics.items()] if hub else None
    return ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="text-classification",
        tags=tags, datasets=[hub[0]] if hub else None, metrics=list(metrics) or None,
        model_name=model_name, eval_results=eval_results)


def _results_table(metrics: dict[str, float], score: float) -> list[str]:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in metrics.items()]
    return [*lines, f"| score (mean) | {score:.2f} |"]


def _how_to_load(model_dir: Path) -> list[str]:
    if selftune_only_config(str(model_dir)) is not None:
        return ["Its [CLS] normalizer cannot be folded into a plain classifier, so plain "
                "transformers refuses this folder (rather than silently dropping it). Load it "
                "with selftune:", "", "```bash",
                "selftune predict MODEL_DIR --input-file texts.csv --output-file "
                "predictions.jsonl", "selftune evaluate MODEL_DIR --task TASK", "```"]
    return ["A plain transformers sequence classifier (a fixed [CLS] normalizer, if any, is "
            "folded into the classifier):", "", "```python",
            "from transformers import pipeline", "",
            'classify = pipeline("text-classification", model="MODEL_DIR")',
            "```", "", "or `selftune predict MODEL_DIR --input-file texts.csv`."]


def write_model_card(model_dir: Path, cfg: TrainConfig, task: TaskSpec | None,
                     data: dict[str, Any], metrics: dict[str, float], score: float,
                     notes: list[str] = (), method: str | None = None) -> None:
    """README.md of a model directory: YAML metadata for the Hub, then base model, method and
    its options, data, dev results with the seed, how to load it, the selftune version.

    ``data`` holds ``source``, ``eval_split``, ``num_train_examples``, ``num_eval_examples``
    and optionally ``other_splits``."""
    import transformers

    base = base_model_id(cfg.model)
    task_name = task.name if task is not None else "custom data"
    method = method or STRATEGY_NAMES.get(cfg.strategy, cfg.strategy)
    title = f"{task_name} · selftune {cfg.strategy} · seed {cfg.seed}"
    card_data = _card_data(task, base, cfg, data["eval_split"], metrics, title)
    options = shown_options(cfg)
    lines = [f"# {title}", "",
             f"Fine-tuned from `{base or cfg.model}` with selftune: "
             f"{method}.", "",
             "## Method and options", "", "| option | value |", "|---|---|",
             *[f"| `{name}` | `{value}` |" for name, value in options.items()], "",
             "## Data", "",
             f"Task `{task_name}` from `{data['source']}`: {data['num_train_examples']} training "
             f"examples, evaluated on the `{data['eval_split']}` split "
             f"({data['num_eval_examples']} examples).", "",
             f"## Dev results (seed {cfg.seed}, in percent)", "",
             *_results_table(metrics, score)]
    for split, other in data.get("other_splits", {}).items():
        lines += ["", f"Split `{split}`:", "", *_results_table(other["metrics"], other["score"])]
    lines += ["", *notes, "", "## How to load it", "", *_how_to_load(model_dir), "",
              "## Written by", "",
              f"selftune {__version__} (transformers {transformers.__version__}); the run's "
              "every option is in `run_config.json`, its dev metrics, learning curve and cost "
              "in `metrics.json` beside this model (when the folder is a run folder)."]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).replace(
        "\n\n\n", "\n\n") + "\n"
    ModelCard(content).save(model_dir / "README.md")


def write_run_summary(trainer: Trainer, train_output: TrainOutput, cfg: TrainConfig,
                      task: TaskSpec, result: dict[str, Any], output_dir: Path) -> None:
    """Everything a finished single-task run folder holds besides the model and metrics.json."""
    write_trainer_files(trainer, train_output, output_dir, result["num_train_examples"],
                        single_task_eval_metrics(trainer, result))
    data = {"source": result["data_source"], **{k: result[k] for k in (
        "eval_split", "num_train_examples", "num_eval_examples") if k in result},
            "other_splits": result.get("other_splits", {})}
    notes = []
    if "teacher_score" in result:
        notes = [f"The self-distillation teacher ({result['teacher']}) scored "
                 f"{result['teacher_score']:.2f}; it is saved in `teacher/`."]
    write_model_card(output_dir, cfg, task, data, result["metrics"], result["score"], notes)
    if (output_dir / "teacher" / "config.json").is_file() and "teacher_score" in result:
        write_model_card(output_dir / "teacher", cfg, task, {**data, "other_splits": {}},
                         result["teacher_metrics"],
                         result["teacher_score"],
                         [f"This is the run's self-distillation teacher ({result['teacher']}); "
                          "the student is the model in the folder above."])


def write_multitask_summary(trainer: Trainer, train_output: TrainOutput, cfg: TrainConfig,
                            tasks: list[TaskSpec], result: dict[str, Any],
                            described: dict[str, dict[str, Any]], output_dir: Path) -> None:
    """A multi-task run folder's results files (each task's dev metrics as
    ``eval_<task>_<metric>``) and a model card in every exported task model directory.
    ``described[task]`` holds the task's ``source``, ``eval_split`` and ``num_eval_examples``."""
    eval_metrics = {f"eval_{task}_{name}": value for task, final in result["tasks"].items()
                    for name, value in {**final["metrics"], "score": final["score"]}.items()}
    num_train = sum(result["num_train_examples"].values())
    write_trainer_files(trainer, train_output, output_dir, num_train, eval_metrics)
    teachers = ("with teacher annealing from single-task teachers (BAM!)"
                if result["with_teachers"] else "without teachers")
    method = (f"multi-task training on {cfg.tasks} {teachers}, self-distillation: "
              f"{STRATEGY_NAMES.get(cfg.strategy, cfg.strategy)}; this folder is one task's head "
              "on the shared encoder")
    for task in tasks:
        final = result["tasks"][task.name]
        data = {**described[task.name],
                "num_train_examples": result["num_train_examples"][task.name],
                "other_splits": final.get("other_splits", {})}
        write_model_card(output_dir / "tasks" / task.name, cfg, task, data, final["metrics"],
                         final["score"], method=method)
