"""The lifecycle of one run, shared by single-task runs (``training.py``), multi-task runs
(``multitask/training.py``) and so by every stage of BAM!.

:func:`run` takes a run through its steps: begin (console logging, the output folder checked,
the seed), load its inputs (nothing is written yet, so a bad input leaves no trace), open the
run folder (lock, marker, run_config.json, the checkpoint to resume from), build the Trainer,
train (or resume), evaluate, account for the cost, save and mark the folder finished. What
differs between kinds of run (data, model, sampler, objective, evaluation, export) comes from
a :class:`RunParts`. Checkpointing, resuming, mixed precision, progress bars and distributed
execution all come from the ``Trainer``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

from selftune import outputs
from selftune.errors import SelftuneError
from selftune.integrity import write_manifest
from selftune.runinfo import environment_info, peak_memory_mb

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers.trainer_utils import TrainOutput

    from selftune.config import TrainConfig
    from selftune.trainer import SelftuneTrainer

logger = logging.getLogger("selftune")
# The Trainer already prints its log entries to the console; this one writes them to train.log.
file_logger = logging.getLogger("selftune_trainlog")


class RunParts(ABC):
    """What one kind of run supplies to :func:`run`, which calls these in the order below.
    ``cfg`` holds the run's options, already checked; ``output_dir`` is its folder."""

    cfg: TrainConfig
    output_dir: Path
    # Whether the Trainer evaluates on its eval_dataset after every epoch.
    trainer_evaluates: bool = False

    @abstractmethod
    def load(self) -> None:
        """Data, tokenizer and model, before anything is written."""

    def resolve(self, args: TrainingArguments) -> dict[str, Any]:
        """Option values that needed the data to resolve (for run_config.json and
        metrics.json)."""
        return {}

    @abstractmethod
    def data_fingerprint(self) -> str:
        """Of the training data, kept in the folder's marker: a resume over other data is
        refused."""

    @abstractmethod
    def prepare(self, args: TrainingArguments) -> None:
        """Once the folder is open: the training set as the Trainer takes it, the [CLS]
        normalizer, the objective (and whatever else the Trainer will need)."""

    def callbacks(self) -> list[TrainerCallback]:
        """The run kind's own Trainer callbacks."""
        return []

    @abstractmethod
    def build_trainer(self, args: TrainingArguments,
                      callbacks: list[TrainerCallback]) -> SelftuneTrainer:
        """The Trainer of the run, with ``callbacks`` (the lifecycle's, the run kind's, the
        caller's)."""

    @abstractmethod
    def results(self, trainer: SelftuneTrainer) -> dict[str, Any]:
        """The dev metrics and what the run trained on, for metrics.json."""

    def objective_results(self, trainer: SelftuneTrainer,
                          result: dict[str, Any]) -> dict[str, Any]:
        """What the objective adds to metrics.json (its teacher's dev metrics...), computed by
        every process."""
        return {}

    @abstractmethod
    def save(self, trainer: SelftuneTrainer, train_output: TrainOutput,
             result: dict[str, Any]) -> None:
        """The main process writes the model(s) and model card (and may add to ``result``)."""

    def publish(self, result: dict[str, Any]) -> None:
        """After the folder is finished (main process): hand the run out, e.g. to the Hub.
        Nothing by default."""
        return

    @abstractmethod
    def announce(self, result: dict[str, Any]) -> None:
        """Log what the run achieved and where it is."""


@outputs.releases_run_locks
def run(parts: RunParts, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Take one run through its lifecycle; return the content of its ``metrics.json``.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects handed to the Trainer."""
    cfg, output_dir = parts.cfg, parts.output_dir
    started = begin_run(cfg, output_dir)
    parts.load()
    args = training_arguments(cfg, output_dir / outputs.CHECKPOINTS, parts.trainer_evaluates)
    resolved = parts.resolve(args)
    resume_from = open_run_directory(cfg, output_dir, parts.data_fingerprint(), resolved)
    parts.prepare(args)
    trainer = parts.build_trainer(args, [LogToFile(), *parts.callbacks(), *(callbacks or [])])
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    result = {**parts.results(trainer), **resolved,
              **run_accounting(cfg, trainer, train_output, started, resume_from)}
    result.update(parts.objective_results(trainer, result))
    if trainer.is_world_process_zero():
        parts.save(trainer, train_output, result)
        finish_run_dir(output_dir, result, cfg.keep_checkpoints)
        parts.publish(result)
    parts.announce(result)
    return result


# ---- the steps


def begin_run(cfg: TrainConfig, output_dir: Path) -> float:
    """Console logging, the output folder checked (a finished run or a foreign folder is
    refused before any work), the seed set; returns the run's start time."""
    setup_logging(None)
    outputs.check_output_dir(output_dir, cfg.to_dict(), cfg.overwrite_output_dir,
                             cfg.resume, type(cfg)().to_dict())
    started = time.time()
    transformers.set_seed(cfg.seed)
    return started


def process_state() -> PartialState:
    """Accelerate's (possibly distributed) process state. Without a GPU, processes started by
    torchrun are data-parallel CPU processes only if Accelerate is told so (``cpu=True``);
    otherwise, until a ``TrainingArguments`` exists, each of them believes it is the main one."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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


# ---- the Trainer's arguments


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, evaluate: bool) -> TrainingArguments:
    save = {"save_strategy": "steps", "save_steps": cfg.save_steps} if cfg.save_steps else {
        "save_strategy": "epoch"}
    report_to = [] if cfg.report_to in ("none", "") else cfg.report_to.split(",")
    try:
        args = TrainingArguments(**{**_selftune_training_arguments(
            cfg, checkpoint_dir, evaluate, save, report_to), **cfg.trainer_options})
    except ValueError as err:  # e.g. an unknown scheduler or tracker name
        raise SelftuneError(f"invalid training option: {str(err).splitlines()[0]}") from None
    # Sets up the (possibly distributed) process state now, before anything else asks for it.
    args.world_size  # noqa: B018
    return args


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


# ---- logging


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
    _remove_handlers(root)
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.propagate = False
    file_logger.setLevel(logging.INFO)
    file_logger.propagate = False
    _remove_handlers(file_logger)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
        file_logger.addHandler(file_handler)
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_error()


def _remove_handlers(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
