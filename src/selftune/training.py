"""A single-task run: one task's data → tokenizer/model → ``SelftuneTrainer`` → run folder,
through the run lifecycle of ``lifecycle.py``; this module supplies what is particular to one
task (its data and model, the strategy's objective, the dev evaluation, the saved model).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import TrainerCallback, TrainingArguments

from selftune.config import TrainConfig, check_strategy_options, validate_options
from selftune.data.features import tokenize_records
from selftune.data.loading import TaskData, data_fingerprint, load_task_data
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError
from selftune.evaluation import dataset_logits
from selftune.lifecycle import RunParts, process_state, run
from selftune.metrics import compute_task_metrics, metrics_and_score, trainer_metrics_fn
from selftune.model_card import write_run_summary
from selftune.models.heads import add_cls_norm, save_portable
from selftune.models.loading import (
    check_sequence_length,
    load_for_training,
    load_tokenizer,
    resolve_model_path,
)
from selftune.models.packed import training_collator
from selftune.optim import make_optimizer
from selftune.strategies import build_objective, objective_metrics, save_objective
from selftune.trainer import SelftuneTrainer

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger("selftune")


def train(cfg: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune one model as ``cfg`` says; return the content of ``metrics.json``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects handed to the Trainer.
    """
    return run_single_task(resolve_config(cfg), callbacks)


def run_single_task(cfg: TrainConfig,
                    callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """:func:`train` with options already checked by :func:`resolve_config` (BAM! checks the
    options of its single-task stages with its own, before its first stage)."""
    return run(SingleTaskRun(cfg), callbacks)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in defaults that depend on other options, and reject impossible combinations."""
    if cfg.task is None and not cfg.train_file and not cfg.dataset_name:
        raise SelftuneError("give --task NAME, your own data with --train-file and "
                            "--validation-file, or a Hub dataset with --dataset-name")
    if cfg.output_dir is None:
        name = cfg.task or (cfg.dataset_name or "").rsplit("/", 1)[-1] or Path(
            cfg.train_file or "custom").stem
        cfg.output_dir = str(Path("runs") / name / f"{cfg.strategy}-seed{cfg.seed}")
    validate_options(cfg)
    check_strategy_options(cfg)
    check_best_model_options(cfg)
    if cfg.push_to_hub:
        from selftune.hub_upload import check_can_push

        check_can_push(cfg.hub_model_id, Path(cfg.output_dir))
    return cfg


def check_best_model_options(cfg: TrainConfig) -> None:
    """Best-checkpoint selection needs a checkpoint at every evaluation (after each epoch)."""
    if cfg.early_stopping_patience:
        cfg.load_best_model_at_end = True
    if not cfg.load_best_model_at_end:
        if cfg.metric_for_best_model != "score":
            raise SelftuneError("--metric-for-best-model needs --load-best-model-at-end (or "
                                "--early-stopping-patience)")
        return
    if not cfg.eval_each_epoch:
        raise SelftuneError("--load-best-model-at-end picks among the epochs' evaluations; "
                            "drop --no-eval-each-epoch")
    if cfg.save_steps:
        raise SelftuneError("--load-best-model-at-end keeps the checkpoint of the best epoch, "
                            "so checkpoints are written at each epoch's end: drop --save-steps")
    if cfg.strategy == "se":
        raise SelftuneError("--load-best-model-at-end does not apply to --strategy se, whose "
                            "model is the average of its snapshot pool")


def check_best_metric(metric: str, task: TaskSpec) -> None:
    if metric not in ("score", "loss", *task.metrics):
        raise SelftuneError(f"--metric-for-best-model {metric}: task {task.name} reports "
                            f"{', '.join(('score', *task.metrics, 'loss'))}")


def early_stopping(cfg: TrainConfig) -> list[TrainerCallback]:
    """transformers' own early stopping, when asked for (its patience counter is saved in
    every checkpoint, so a resumed run stops where the uninterrupted one would)."""
    if not cfg.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def update_steps_per_epoch(num_examples: int, args: TrainingArguments) -> int:
    """Optimizer steps per epoch, as the Trainer counts them: each process takes every
    world_size-th batch of the per-device size, an epoch's last partial update included."""
    batches = math.ceil(math.ceil(num_examples / args.per_device_train_batch_size)
                        / args.world_size)
    accumulation = args.gradient_accumulation_steps
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def resolved_options(cfg: TrainConfig, snapshot_interval_steps: int) -> dict[str, Any]:
    """Values derived from the options once the data is known, for run_config.json and
    metrics.json (only where an option needed resolving, so other runs' files stay as
    they were)."""
    if isinstance(cfg.snapshot_interval, str):
        return {"snapshot_interval_steps": snapshot_interval_steps}
    return {}


def eval_split_name(cfg: TrainConfig, data: TaskData) -> str:
    split = cfg.eval_split or next(iter(data.eval_splits))
    if split not in data.eval_splits:
        raise SelftuneError(f"task {data.task.name} has no split {split!r}; choose one of "
                            f"{list(data.eval_splits)}")
    return split


def dev_history(log_history: list[dict]) -> list[dict]:
    """Dev metrics per evaluation, from the Trainer's log history."""
    history = []
    for entry in log_history:
        if "eval_score" in entry:
            metrics = {k.removeprefix("eval_"): v for k, v in entry.items()
                       if k.startswith("eval_") and k not in ("eval_loss", "eval_runtime",
                                                               "eval_samples_per_second",
                                                               "eval_steps_per_second")}
            score = metrics.pop("score")
            history.append({"epoch": entry.get("epoch"), "step": entry.get("step"),
                            "metrics": metrics, "score": score, "loss": entry.get("eval_loss")})
    return history




def _task_metrics(eval_metrics: dict[str, float], task: TaskSpec) -> dict[str, float]:
    """The task's metrics and score out of the Trainer's ``eval_``-prefixed metrics."""
    return {k.removeprefix("eval_"): v for k, v in eval_metrics.items()
            if k.removeprefix("eval_") in (*task.metrics, "score")}


class SingleTaskRun(RunParts):
    """What a run on one task supplies to the lifecycle."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.trainer_evaluates = cfg.eval_each_epoch

    def load(self) -> None:
        cfg = self.cfg
        self.data = load_task_data(cfg.data_options())
        self.split = eval_split_name(cfg, self.data)
        self.task = self.data.task
        check_best_metric(cfg.metric_for_best_model, self.task)
        self.model_path = resolve_model_path(cfg.model)
        self.tokenizer = load_tokenizer(self.model_path, cfg.trust_remote_code)
        self.model = load_for_training(self.model_path, self.task, cfg.trust_remote_code)
        check_sequence_length(cfg.max_seq_length, self.model)

    def resolve(self, args: TrainingArguments) -> dict[str, Any]:
        self.strategy = self.cfg.strategy_options(
            update_steps_per_epoch(len(self.data.train), args))
        return resolved_options(self.cfg, self.strategy.interval)

    def data_fingerprint(self) -> str:
        return data_fingerprint(self.data.train)

    def prepare(self, args: TrainingArguments) -> None:
        cfg, data, split = self.cfg, self.data, self.split
        logger.info("Task %s from %s: %d train, %d %s examples; model %s", self.task.name,
                    data.source, len(data.train), len(data.eval_splits[split]), split,
                    self.model_path)
        self.train_set = tokenize_records(data.train, self.tokenizer, cfg.max_seq_length)
        self.eval_set = tokenize_records(data.eval_splits[split], self.tokenizer,
                                         cfg.max_seq_length)
        add_cls_norm(self.model, self.tokenizer, self.train_set, self.output_dir,
                     kind=cfg.cls_norm, source=cfg.cls_source,
                     batch_size=cfg.per_device_eval_batch_size, start_dir=self.model_path,
                     is_main_process=process_state().is_main_process)
        # Before the objective: its teachers are copies of the model, packing hooks included.
        self.collator = training_collator(self.model, self.tokenizer, cfg.max_seq_length,
                                          cfg.packing)
        self.objective = build_objective(self.strategy, self.model, self.task.is_regression)

    def callbacks(self) -> list[TrainerCallback]:
        return early_stopping(self.cfg)

    def build_trainer(self, args: TrainingArguments,
                      callbacks: list[TrainerCallback]) -> SelftuneTrainer:
        cfg = self.cfg
        return SelftuneTrainer(
            objective=self.objective,
            nan_policy=cfg.nan_policy,
            model=self.model,
            args=args,
            train_dataset=self.train_set,
            eval_dataset=self.eval_set,
            processing_class=self.tokenizer,
            data_collator=self.collator,
            compute_metrics=trainer_metrics_fn(self.task),
            callbacks=callbacks,
            # Without layer-wise decay the Trainer builds its own (identical) AdamW.
            optimizers=(make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay,
                                       cfg.layerwise_lr_decay) if cfg.layerwise_lr_decay
                        else None, None),
        )

    def results(self, trainer: SelftuneTrainer) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        history = dev_history(trainer.state.log_history)
        kept_step = (trainer.state.best_global_step if cfg.load_best_model_at_end
                     else None) or trainer.state.global_step
        kept = [entry for entry in history if entry["step"] == kept_step]
        if kept:
            self.final = {**kept[-1]["metrics"], "score": kept[-1]["score"]}
        else:
            self.final = _task_metrics(trainer.evaluate(), task)
        self._evaluate_other_splits(trainer)
        return {
            "task": task.name,
            "strategy": cfg.strategy,
            "seed": cfg.seed,
            "eval_split": self.split,
            **metrics_and_score(self.final),
            **({"other_splits": self.other_splits} if self.other_splits else {}),
            "history": history,
            "num_train_examples": len(self.train_set),
            "num_eval_examples": len(self.eval_set),
            "data_source": self.data.source,
            "model_path": self.model_path,
            **({"best_model_step": kept_step} if cfg.load_best_model_at_end else {}),
        }

    def _evaluate_other_splits(self, trainer: SelftuneTrainer) -> None:
        """The task's other dev sets (MNLI's mismatched one), once at the end, as run_glue.py
        does."""
        self.other_sets = {name: tokenize_records(records, self.tokenizer,
                                                  self.cfg.max_seq_length)
                           for name, records in self.data.eval_splits.items()
                           if name != self.split}
        self.other_splits = {name: metrics_and_score(_task_metrics(
                                 trainer.predict(other, metric_key_prefix="eval").metrics,
                                 self.task))
                             for name, other in self.other_sets.items()}

    def objective_results(self, trainer: SelftuneTrainer,
                          result: dict[str, Any]) -> dict[str, Any]:
        if self.objective is None:
            return {}
        cfg, task, tokenizer, eval_set = self.cfg, self.task, self.tokenizer, self.eval_set

        def metrics_of(logits: np.ndarray, dataset=eval_set) -> dict[str, float]:
            return compute_task_metrics(task, logits, np.array(dataset["labels"]))

        def predict(model, dataset=eval_set) -> np.ndarray:
            return dataset_logits(model, tokenizer, dataset, cfg.per_device_eval_batch_size,
                                  cfg.packing)

        return objective_metrics(self.strategy, self.objective, metrics_of, predict,
                                 self.other_sets, self.final, self.other_splits)

    def save(self, trainer: SelftuneTrainer, train_output: TrainOutput,
             result: dict[str, Any]) -> None:
        output_dir = self.output_dir
        if self.objective is not None:
            save_objective(self.strategy, self.objective,
                           trainer.accelerator.unwrap_model(trainer.model), self.tokenizer,
                           output_dir)
        trainer.save_model(str(output_dir))
        save_portable(trainer.model, output_dir)  # a [CLS] normalizer folded in, or refused
        # The Trainer also pickles its arguments there; a model directory we hand out holds no
        # pickle (the run's options are in run_config.json).
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        write_run_summary(trainer, train_output, self.cfg, self.task, result, output_dir)

    def publish(self, result: dict[str, Any]) -> None:
        if self.cfg.push_to_hub:
            from selftune.hub_upload import push_run

            result["hub_url"] = push_run(self.output_dir, self.cfg.hub_model_id,
                                         self.cfg.hub_private_repo)

    def announce(self, result: dict[str, Any]) -> None:
        task = self.task.name
        logger.info("Done: %s %s = %s (score %.2f) in %.0f s; model and metrics in %s", task,
                    self.split, ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()),
                    result["score"], result["wall_time_s"], self.output_dir)
        for name, other in result.get("other_splits", {}).items():
            logger.info("      %s %s = %s", task, name,
                        ", ".join(f"{k} {v:.2f}" for k, v in other["metrics"].items()))
