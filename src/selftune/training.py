"""The one training path: data → tokenizer/model → ``transformers.Trainer`` → run directory.

Checkpointing, resuming, mixed precision, progress bars and distributed execution all come from
the ``Trainer``; this module only decides what goes in and what comes out.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

from selftune import outputs
from selftune.config import TrainConfig, check_strategy_options, validate_options
from selftune.data.features import tokenize_records
from selftune.data.loading import TaskData, data_fingerprint, load_task_data
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError
from selftune.evaluation import dataset_logits
from selftune.integrity import write_manifest
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
from selftune.runinfo import environment_info, peak_memory_mb
from selftune.strategies import build_objective, objective_metrics, save_objective
from selftune.trainer import SelftuneTrainer

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers.trainer_utils import TrainOutput


logger = logging.getLogger("selftune")
# The Trainer already prints its log entries to the console; this one writes them to train.log.
file_logger = logging.getLogger("selftune_trainlog")


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


class LogToFile(TrainerCallback):
    """Mirror the Trainer's log entries (losses, learning rate, dev metrics) into train.log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in logs.items())
            file_logger.info("step %d (epoch %.2f): %s", state.global_step, state.epoch or 0, shown)


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes: a handler holding the stderr
    of its creation writes into a closed stream once pytest or a notebook has swapped it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(log_file: Path | None) -> None:
    """Log to the console and, for a run, to its train.log (appending across resumes)."""
    root = logging.getLogger("selftune")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
    root.propagate = False
    file_logger.setLevel(logging.INFO)
    file_logger.propagate = False
    for handler in list(file_logger.handlers):
        file_logger.removeHandler(handler)
        handler.close()
    if log_file is not None:
        file_logger.addHandler(file_handler)
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_error()


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, evaluate: bool) -> TrainingArguments:
    save = {"save_strategy": "steps", "save_steps": cfg.save_steps} if cfg.save_steps else {
        "save_strategy": "epoch"}
    report_to = [] if cfg.report_to in ("none", "") else cfg.report_to.split(",")
    try:
        args = _training_arguments(cfg, checkpoint_dir, evaluate, save, report_to)
    except ValueError as err:  # e.g. an unknown scheduler or tracker name
        raise SelftuneError(f"invalid training option: {str(err).splitlines()[0]}") from None
    # Sets up the (possibly distributed) process state now, before anything else asks for it.
    args.world_size  # noqa: B018
    return args


def _training_arguments(cfg, checkpoint_dir, evaluate, save, report_to) -> TrainingArguments:
    return TrainingArguments(**{**_selftune_training_arguments(
        cfg, checkpoint_dir, evaluate, save, report_to), **cfg.trainer_options})


def _selftune_training_arguments(cfg, checkpoint_dir, evaluate, save, report_to
                                 ) -> dict[str, Any]:
    return dict(
        output_dir=str(checkpoint_dir),
        seed=cfg.seed,
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
        bf16=cfg.bf16,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="epoch" if evaluate else "no",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        save_total_limit=1,  # with a best checkpoint, the Trainer keeps it and the last
        load_best_model_at_end=cfg.load_best_model_at_end,
        metric_for_best_model=(f"eval_{cfg.metric_for_best_model}"
                               if cfg.load_best_model_at_end else None),
        greater_is_better=cfg.metric_for_best_model != "loss",
        report_to=report_to,
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a machine without GPU this is what makes torchrun/accelerate launch run
        # data-parallel on CPU processes (gloo), rather than N independent runs.
        use_cpu=not torch.cuda.is_available(),
        **save,
    )


def early_stopping(cfg: TrainConfig) -> list[TrainerCallback]:
    """transformers' own early stopping, when asked for (its patience counter is saved in
    every checkpoint, so a resumed run stops where the uninterrupted one would)."""
    if not cfg.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def process_state() -> PartialState:
    """Accelerate's (possibly distributed) process state. Without a GPU, processes started by
    torchrun are data-parallel CPU processes only if Accelerate is told so (``cpu=True``);
    otherwise, until a ``TrainingArguments`` exists, each of them believes it is the main one."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def begin_run(cfg: TrainConfig, output_dir: Path) -> float:
    """Console logging, the output folder checked (a finished run or a foreign folder is
    refused before any work), the seed set; returns the run's start time."""
    setup_logging(None)
    outputs.check_output_dir(output_dir, cfg.to_dict(), cfg.overwrite_output_dir,
                             cfg.resume, type(cfg)().to_dict())
    started = time.time()
    transformers.set_seed(cfg.seed)
    return started


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


def open_run_directory(cfg: TrainConfig, output_dir: Path, fingerprint: str | None = None,
                       resolved: dict[str, Any] | None = None) -> Path | None:
    """Create the run folder (once the inputs are known to be good), start train.log, save
    run_config.json; return the checkpoint to resume from, if any.

    Under ``accelerate launch``/``torchrun`` only the main process touches the folder (and
    holds its lock); the others wait for it, then find the same checkpoint. ``fingerprint``
    (of the training data) is kept in the folder's marker: a resume over other data is refused.
    """
    state = process_state()
    if state.is_main_process:
        outputs.prepare_output_dir(output_dir, cfg.to_dict(), cfg.overwrite_output_dir,
                                   cfg.resume, type(cfg)().to_dict(), fingerprint)
        outputs.write_json_atomic(output_dir / outputs.RUN_CONFIG_FILE,
                                  {**cfg.to_dict(), **({"resolved": resolved} if resolved else {})})
    state.wait_for_everyone()
    setup_logging(output_dir / outputs.LOG_FILE if state.is_main_process else None)
    resume_from = (outputs.checkpoint_to_resume(output_dir, state.is_main_process)
                   if cfg.resume else None)
    if resume_from:
        logger.info("Resuming from %s", resume_from)
    return resume_from


def eval_split_name(cfg: TrainConfig, data: TaskData) -> str:
    split = cfg.eval_split or next(iter(data.eval_splits))
    if split not in data.eval_splits:
        raise SelftuneError(f"task {data.task.name} has no split {split!r}; choose one of "
                            f"{list(data.eval_splits)}")
    return split


def history_from_logs(log_history: list[dict]) -> list[dict]:
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


@outputs.releases_run_locks
def train(cfg: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune one model as ``cfg`` says; return the content of ``metrics.json``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects handed to the Trainer.
    """
    cfg = resolve_config(cfg)
    output_dir = Path(cfg.output_dir)
    started = begin_run(cfg, output_dir)
    # Data and model are loaded before anything is written, so a bad input leaves no trace.
    data = load_task_data(cfg.data_options())
    split = eval_split_name(cfg, data)
    task = data.task
    check_best_metric(cfg.metric_for_best_model, task)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    model = load_for_training(model_path, task, cfg.trust_remote_code)
    check_sequence_length(cfg.max_seq_length, model)

    args = training_arguments(cfg, output_dir / outputs.CHECKPOINTS, cfg.eval_each_epoch)
    strategy = cfg.strategy_options(update_steps_per_epoch(len(data.train), args))
    resolved = resolved_options(cfg, strategy.interval)
    resume_from = open_run_directory(cfg, output_dir, data_fingerprint(data.train), resolved)
    logger.info("Task %s from %s: %d train, %d %s examples; model %s", task.name, data.source,
                len(data.train), len(data.eval_splits[split]), split, model_path)
    train_set = tokenize_records(data.train, tokenizer, cfg.max_seq_length)
    eval_set = tokenize_records(data.eval_splits[split], tokenizer, cfg.max_seq_length)
    add_cls_norm(cfg, model, tokenizer, train_set, output_dir, start_dir=model_path,
                 is_main_process=process_state().is_main_process)

    # Before the objective: its teachers are copies of the model, packing hooks included.
    collator = training_collator(model, tokenizer, cfg.max_seq_length, cfg.packing)
    objective = build_objective(strategy, model, task.is_regression)
    trainer = SelftuneTrainer(
        objective=objective,
        nan_policy=cfg.nan_policy,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=trainer_metrics_fn(task),
        callbacks=[LogToFile(), *early_stopping(cfg), *(callbacks or [])],
        # Without layer-wise decay the Trainer builds its own (identical) AdamW.
        optimizers=(make_optimizer(model, cfg.learning_rate, cfg.weight_decay,
                                   cfg.layerwise_lr_decay) if cfg.layerwise_lr_decay else None,
                    None),
    )
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = history_from_logs(trainer.state.log_history)
    kept_step = (trainer.state.best_global_step if cfg.load_best_model_at_end
                 else None) or trainer.state.global_step
    kept = [entry for entry in history if entry["step"] == kept_step]
    if kept:
        final = {**kept[-1]["metrics"], "score": kept[-1]["score"]}
    else:
        final = _task_metrics(trainer.evaluate(), task)
    # The task's other dev sets (MNLI's mismatched one), once at the end, as run_glue.py does.
    other_sets = {name: tokenize_records(records, tokenizer, cfg.max_seq_length)
                  for name, records in data.eval_splits.items() if name != split}
    other_splits = {name: metrics_and_score(_task_metrics(
                        trainer.predict(other, metric_key_prefix="eval").metrics, task))
                    for name, other in other_sets.items()}

    result: dict[str, Any] = {
        "task": task.name,
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "eval_split": split,
        **metrics_and_score(final),
        **({"other_splits": other_splits} if other_splits else {}),
        "history": history,
        "num_train_examples": len(train_set),
        "num_eval_examples": len(eval_set),
        "data_source": data.source,
        "model_path": model_path,
        **({"best_model_step": kept_step} if cfg.load_best_model_at_end else {}),
        **resolved,
        **run_accounting(cfg, trainer, train_output, started, resume_from),
    }
    if objective is not None:
        def metrics_of(logits: np.ndarray, dataset=eval_set) -> dict[str, float]:
            return compute_task_metrics(task, logits, np.array(dataset["labels"]))

        def predict(model, dataset=eval_set) -> np.ndarray:
            return dataset_logits(model, tokenizer, dataset, cfg.per_device_eval_batch_size,
                                  cfg.packing)

        result.update(objective_metrics(strategy, objective, metrics_of, predict, other_sets,
                                        final, other_splits))
    if trainer.is_world_process_zero():
        if objective is not None:
            save_objective(strategy, objective, trainer.accelerator.unwrap_model(trainer.model),
                           tokenizer, output_dir)
        trainer.save_model(str(output_dir))
        save_portable(trainer.model, output_dir)  # a [CLS] normalizer folded in, or refused
        # The Trainer also pickles its arguments there; a model directory we hand out holds no
        # pickle (the run's options are in run_config.json).
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        write_run_summary(trainer, train_output, cfg, task, result, output_dir)
        finish_run_dir(output_dir, result, cfg.keep_checkpoints)
        if cfg.push_to_hub:
            from selftune.hub_upload import push_run

            result["hub_url"] = push_run(output_dir, cfg.hub_model_id, cfg.hub_private_repo)
    logger.info("Done: %s %s = %s (score %.2f) in %.0f s; model and metrics in %s", task.name,
                split, ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()),
                result["score"], result["wall_time_s"], output_dir)
    for name, other in result.get("other_splits", {}).items():
        logger.info("      %s %s = %s", task.name, name,
                    ", ".join(f"{k} {v:.2f}" for k, v in other["metrics"].items()))
    return result


def run_accounting(cfg: TrainConfig, trainer: SelftuneTrainer, train_output: TrainOutput,
                   started: float, resume_from: Path | None) -> dict[str, Any]:
    """What a run's metrics.json says of its cost and provenance, single- or multi-task."""
    train_seconds, examples_per_s = trainer.training_throughput(
        train_output.metrics.get("train_runtime", 0.0))
    return {
        "train_loss": trainer.mean_logged_loss(),
        "global_steps": trainer.state.global_step,
        "wall_time_s": time.time() - started,
        "train_time_s": train_seconds,
        "train_examples_per_s": examples_per_s,
        "peak_memory_mb": peak_memory_mb(),
        "resumed_from": str(resume_from) if resume_from else None,
        "skipped_steps": trainer.skipped_steps,
        "config_hash": cfg.hash(),
        **environment_info(),
    }


def finish_run_dir(output_dir: Path, result: dict[str, Any], keep_checkpoints: bool) -> None:
    """Mark the run finished (metrics.json), drop its checkpoints, then list every file of the
    folder in its manifest (written last)."""
    outputs.write_json_atomic(output_dir / outputs.METRICS_FILE, result)
    # Only now: a kill before metrics.json must leave the checkpoints to resume from.
    if not keep_checkpoints:
        shutil.rmtree(output_dir / outputs.CHECKPOINTS, ignore_errors=True)
    # (train.log is not listed: it goes on being appended to.)
    write_manifest(output_dir, skip=(outputs.CHECKPOINTS, outputs.LOG_FILE))


def _task_metrics(eval_metrics: dict[str, float], task: TaskSpec) -> dict[str, float]:
    """The task's metrics and score out of the Trainer's ``eval_``-prefixed metrics."""
    return {k.removeprefix("eval_"): v for k, v in eval_metrics.items()
            if k.removeprefix("eval_") in (*task.metrics, "score")}
