"""Multi-task training (BAM!'s student, or plain "Multi") through the same run lifecycle as
single-task runs (``lifecycle.py``): ``SelftuneTrainer`` with the teacher-annealing objective
and a batch sampler that mixes tasks by |D|^0.75.

Output directory: ``tasks/<task>/`` holds each task as a standard model directory (the shared
encoder plus that task's head; STS-B's head scaled back to 0-5), ``metrics.json`` the dev
metrics of every task and their average, plus ``run_config.json``, ``train.log`` and the
checkpoints while the run is going.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

from selftune.config import MultiTaskConfig, check_strategy_options, validate_options
from selftune.data.loading import data_fingerprint
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError
from selftune.lifecycle import RunParts, process_state, run
from selftune.metrics import compute_task_metrics, metrics_and_score
from selftune.model_card import write_multitask_summary
from selftune.models.heads import add_cls_norm
from selftune.models.loading import check_sequence_length, load_tokenizer, resolve_model_path
from selftune.multitask.data import (
    UNORDERED_TASKS,
    build_train_set,
    eval_set,
    label_scale,
    with_swapped_pairs,
)
from selftune.multitask.model import build_multitask_model
from selftune.multitask.objective import SelfDistilledAnnealing, TeacherAnnealing
from selftune.multitask.sampling import MultiTaskBatchSampler, ProcessChunks, task_shares
from selftune.multitask.task_list import (
    apply_task_list,
    load_multitask_data,
    resolve_tasks,
    task_data_options,
    task_name,
)
from selftune.multitask.teacher_cache import check_coverage, read_predictions
from selftune.optim import make_optimizer
from selftune.strategies import build_objective
from selftune.teachers import WindowAverageTeacher
from selftune.trainer import SelftuneTrainer

if TYPE_CHECKING:
    from transformers.trainer_utils import TrainOutput

logger = logging.getLogger("selftune")


def check_multitask_options(cfg: MultiTaskConfig,
                            with_teachers: bool | None = None) -> list[TaskSpec]:
    """Every option of a multi-task run, checked before any work; returns the tasks.
    ``with_teachers``: whether the run distills from teachers (default: whether it has
    --teacher-predictions)."""
    validate_options(cfg)
    check_strategy_options(cfg, strategies="sda/sdv/ema")
    apply_task_list(cfg)
    tasks = resolve_tasks(cfg)
    if len(tasks) < 1 or len({t.name for t in tasks}) != len(tasks):
        raise SelftuneError("--tasks: give distinct task names, e.g. rte,mrpc,stsb,cola")
    if cfg.train_file or cfg.validation_file:
        raise SelftuneError("multi-task runs use registry tasks (--tasks); --train-file is "
                            "for single-task runs")
    if cfg.strategy == "se":
        raise SelftuneError("--strategy se (a self-ensemble of the final weights) is for "
                            "single-task runs; a multi-task student takes sda, sdv or ema")
    if cfg.dataset_name or cfg.push_to_hub:
        raise SelftuneError("--dataset-name and --push-to-hub apply to single-task runs")
    if (cfg.load_best_model_at_end or cfg.early_stopping_patience
            or cfg.metric_for_best_model != "score"):
        raise SelftuneError("--load-best-model-at-end and --early-stopping-patience apply to "
                            "single-task runs; a multi-task student keeps its last state")
    if cfg.save_snapshots:
        raise SelftuneError("--save-snapshots keeps a single-task baseline's snapshots for "
                            "'selftune ensemble'; a multi-task student takes sda, sdv or ema")
    if cfg.se_pool != "epochs" or cfg.se_combine != "average":
        raise SelftuneError("--se-pool and --se-combine apply to --strategy se, which is for "
                            "single-task runs")
    if cfg.group_by_length:
        raise SelftuneError("--group-by-length applies to single-task runs; multi-task batches "
                            "come from the task sampler")
    if not 0 <= cfg.distill_weight <= 1:
        raise SelftuneError("--distill-weight must be in [0, 1]")
    # Options that would be silently ignored: refused when changed from their defaults (a
    # config built from a grid carries every option, with its default value).
    if with_teachers is None:
        with_teachers = bool(cfg.teacher_predictions)
    if not with_teachers and cfg.teacher_annealing != "linear":
        raise SelftuneError(f"--teacher-annealing {cfg.teacher_annealing} does nothing "
                            "without teachers (plain multi-task training); give teachers or "
                            "drop the option")
    if cfg.teacher_annealing == "linear" and \
            cfg.distill_weight != MultiTaskConfig.distill_weight:
        raise SelftuneError("--distill-weight does nothing with --teacher-annealing linear "
                            "(the teacher's share falls from 1 to 0); add --teacher-annealing "
                            "fixed or drop the option")
    if not 0 < cfg.sampling_alpha <= 1:
        raise SelftuneError("--sampling-alpha must be in (0, 1]")
    return tasks


def default_output_dir(cfg: MultiTaskConfig) -> str:
    """Where a multi-task run called from Python writes without --output-dir."""
    return cfg.output_dir or str(Path("runs") / "multitask" / f"seed{cfg.seed}")


def parse_task_paths(value: str | None, what: str,
                     names: list[str] | None = None) -> dict[str, Path]:
    """``task=PATH,...``; ``names``: the run's tasks, whose own (non-registry) names count."""
    if not value:
        return {}
    pairs = {}
    for item in value.split(","):
        if "=" not in item:
            raise SelftuneError(f"{what} expects task=PATH,..., got {item!r}")
        task, path = item.split("=", 1)
        name = task_name(task.strip(), names)
        if name in pairs:
            raise SelftuneError(f"{what} names {name} twice; give one path per task")
        pairs[name] = Path(path.strip())
    return pairs


class EvaluateTasks(TrainerCallback):
    """Dev metrics of every task at the end of each epoch (the learning curve), logged into the
    Trainer's log history so that they survive in checkpoints and come back on resume."""

    def __init__(self, evaluate, log) -> None:
        self.evaluate, self.log = evaluate, log

    def on_epoch_end(self, args, state, control, **kwargs):
        results = self.evaluate()
        flat = {"multitask_eval": 1.0}
        for task, result in results.items():
            flat[f"{task}/score"] = result["score"]
            flat.update({f"{task}/{m}": v for m, v in result["metrics"].items()})
        self.log(flat)
        logger.info("epoch %.2f: %s", state.epoch, ", ".join(
            f"{t} {r['score']:.2f}" for t, r in results.items()))


def task_history(log_history: list[dict], tasks: list[TaskSpec]) -> list[dict]:
    """Every task's dev metrics per evaluation (:class:`EvaluateTasks`), from the Trainer's
    log history."""
    history = []
    for entry in log_history:
        if "multitask_eval" not in entry:
            continue
        results = {t.name: {"metrics": {m: entry[f"{t.name}/{m}"] for m in t.metrics},
                            "score": entry[f"{t.name}/score"]} for t in tasks}
        history.append({"epoch": entry.get("epoch"), "step": entry.get("step"), "tasks": results,
                        "score": float(np.mean([r["score"] for r in results.values()]))})
    return history


class MultiTaskTrainer(SelftuneTrainer):
    """Draws batches from a task-mixing batch sampler."""

    def __init__(self, *args: Any, batch_sampler: ProcessChunks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler,
                            collate_fn=self.data_collator)
        return self.accelerator.prepare(loader)


class _SamplerEpoch(TrainerCallback):
    def __init__(self, sampler: MultiTaskBatchSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The epoch index: a run resumed mid-epoch has state.epoch = 1.6 in epoch 1 (not 2).
        self.sampler.set_epoch(int((state.epoch or 0) + 1e-6))


def evaluate_multitask_teacher(cfg: MultiTaskConfig, self_distillation, tasks: list[TaskSpec],
                               tokenizer, teacher_dir: Path) -> dict[str, Any]:
    """Export the self-distillation teacher (the averaged multi-task model) task by task, as
    the student, into ``teacher/tasks/<task>``, and evaluate each on its dev split."""
    from selftune.evaluation import evaluate_model

    teacher = self_distillation.averaged_teacher()
    results = {}
    for task in tasks:
        task_dir = teacher_dir / "tasks" / task.name
        teacher.export_task(task.name, task_dir, tokenizer)
        evaluated = evaluate_model(str(task_dir), task_data_options(cfg, task.name), None,
                                   cfg.max_seq_length, cfg.per_device_eval_batch_size,
                                   packing=cfg.packing)
        results[task.name] = {"metrics": evaluated["metrics"], "score": evaluated["score"]}
    return {"teacher_tasks": results,
            "teacher_score": float(np.mean([r["score"] for r in results.values()])),
            "teacher": WindowAverageTeacher.name + " (the vote is used in training only)"
            if cfg.strategy == "sdv" else self_distillation.teacher.name}


def train_multitask(cfg: MultiTaskConfig,
                    callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train one multi-task model; return the content of its ``metrics.json``.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects handed to the Trainer."""
    tasks = check_multitask_options(cfg)
    return run_multitask(dataclasses.replace(cfg, output_dir=default_output_dir(cfg)), tasks,
                         callbacks)


def run_multitask(cfg: MultiTaskConfig, tasks: list[TaskSpec],
                  callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """:func:`train_multitask` with options already checked (:func:`check_multitask_options`
    gave ``tasks``) and an output folder (BAM!'s student, checked with the recipe)."""
    return run(MultiTaskRun(cfg, tasks), callbacks)


class MultiTaskRun(RunParts):
    """What a multi-task run supplies to the lifecycle."""

    def __init__(self, cfg: MultiTaskConfig, tasks: list[TaskSpec]) -> None:
        self.cfg, self.tasks = cfg, tasks
        self.output_dir = Path(cfg.output_dir)

    def load(self) -> None:
        cfg, tasks = self.cfg, self.tasks
        teacher_files = parse_task_paths(cfg.teacher_predictions, "--teacher-predictions",
                                         [t.name for t in tasks])
        unknown = sorted(set(teacher_files) - {t.name for t in tasks})
        if unknown or (teacher_files and len(teacher_files) != len(tasks)):
            raise SelftuneError("--teacher-predictions must name one file for each of --tasks "
                                f"({cfg.tasks}); got {sorted(teacher_files)}")
        self.records, self.dev_records, self.other_dev_records, self.described = {}, {}, {}, {}
        for task in tasks:
            self._load_task(task)
        self.teachers = self._teacher_logits(teacher_files) if teacher_files else None
        self.model_path = resolve_model_path(cfg.model)
        self.tokenizer = load_tokenizer(self.model_path, cfg.trust_remote_code)
        self.model = build_multitask_model(self.model_path, tasks, cfg.trust_remote_code)
        check_sequence_length(cfg.max_seq_length, self.model)

    def _load_task(self, task: TaskSpec) -> None:
        data = load_multitask_data(task_data_options(self.cfg, task.name))
        rows = data.train
        if self.cfg.double_unordered and task.name in UNORDERED_TASKS:
            rows = with_swapped_pairs(rows)
        self.records[task.name] = rows
        first, *others = data.eval_splits  # MNLI: matched, then mismatched
        self.dev_records[task.name] = data.eval_splits[first]
        self.other_dev_records[task.name] = {name: data.eval_splits[name] for name in others}
        self.described[task.name] = {"source": data.source, "eval_split": first,
                                     "num_eval_examples": len(self.dev_records[task.name])}

    def _teacher_logits(self, teacher_files: dict[str, Path]) -> dict[str, Any]:
        teachers = {}
        for task in self.tasks:
            predictions = read_predictions(teacher_files[task.name], task)
            check_coverage(predictions, self.records[task.name], teacher_files[task.name], task)
            teachers[task.name] = predictions.logits
        return teachers

    def data_fingerprint(self) -> str:
        return data_fingerprint([row for task in self.tasks for row in self.records[task.name]])

    def prepare(self, args: TrainingArguments) -> None:
        cfg, tasks, tokenizer = self.cfg, self.tasks, self.tokenizer
        self.data = build_train_set(tasks, self.records, tokenizer, cfg.max_seq_length,
                                    self.teachers, self.model.max_labels)
        if cfg.cls_norm != "none" or cfg.cls_source != "auto":
            # One normalizer on the shared encoder's [CLS]; its statistics are over every
            # task's training examples, as the encoder sees them.
            is_main_process = process_state().is_main_process
            self.model.add_cls_norm(lambda head: add_cls_norm(
                head, tokenizer, self.data.train, self.output_dir, kind=cfg.cls_norm,
                source=cfg.cls_source, batch_size=cfg.per_device_eval_batch_size,
                is_main_process=is_main_process))
        self.model.enable_packing(cfg.packing, cfg.max_seq_length)  # before the teacher copies it
        self.shares = task_shares(self.data.sizes, cfg.task_sampling, cfg.sampling_alpha)
        logger.info("Multi-task run on %s: %s examples, shares %s, %s", cfg.tasks,
                    self.data.sizes, {t: round(s, 3) for t, s in self.shares.items()},
                    "with teachers" if self.teachers else "without teachers")
        self.evals = {t.name: eval_set(i, self.dev_records[t.name], tokenizer,
                                       cfg.max_seq_length) for i, t in enumerate(tasks)}
        # The sampler draws global batches; each process trains on its own chunk of every one.
        self.sampler = MultiTaskBatchSampler(
            self.data.task_indices, cfg.per_device_train_batch_size * args.world_size,
            self.shares, num_batches=None, seed=cfg.seed, mix=cfg.mix_tasks)
        args.remove_unused_columns = False  # the model takes task_ids and **inputs
        self.objective = self._objective(args)

    def _objective(self, args: TrainingArguments) -> TeacherAnnealing | SelfDistilledAnnealing:
        cfg = self.cfg
        objective = TeacherAnnealing(self.tasks, self.teachers is not None,
                                     cfg.teacher_annealing, cfg.distill_weight,
                                     cfg.loss_reduction,
                                     batch_parts=args.gradient_accumulation_steps * args.world_size)
        if cfg.strategy == "baseline":
            return objective
        # The student also distills from its own averaged past.
        steps_per_epoch = max(1, math.ceil(len(self.sampler) / args.gradient_accumulation_steps))
        return SelfDistilledAnnealing(objective, build_objective(
            cfg.strategy_options(steps_per_epoch), self.model, False))

    def callbacks(self) -> list[TrainerCallback]:
        return [_SamplerEpoch(self.sampler)]

    def build_trainer(self, args: TrainingArguments,
                      callbacks: list[TrainerCallback]) -> SelftuneTrainer:
        cfg = self.cfg
        trainer = MultiTaskTrainer(
            model=self.model, args=args, train_dataset=self.data.train,
            processing_class=self.tokenizer,
            data_collator=DataCollatorWithPadding(self.tokenizer), objective=self.objective,
            batch_sampler=ProcessChunks(self.sampler, args.world_size),
            nan_policy=cfg.nan_policy, callbacks=callbacks,
            optimizers=(make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay,
                                       cfg.layerwise_lr_decay or 1.0), None),
        )
        if cfg.eval_each_epoch:  # after the objective's own callback: it ends the epoch first
            trainer.add_callback(EvaluateTasks(lambda: self.evaluate(trainer), trainer.log))
        return trainer

    def evaluate_task(self, trainer: SelftuneTrainer, task: TaskSpec, dataset,
                      dev: list) -> dict:
        logits = trainer.predict(dataset).predictions
        logits = np.asarray(logits)[:, : task.num_labels] * label_scale(task)
        return metrics_and_score(
            compute_task_metrics(task, logits, np.array([r["label"] for r in dev])))

    def evaluate(self, trainer: SelftuneTrainer) -> dict[str, dict]:
        """Every task's dev metrics."""
        return {t.name: self.evaluate_task(trainer, t, self.evals[t.name],
                                           self.dev_records[t.name]) for t in self.tasks}

    def results(self, trainer: SelftuneTrainer) -> dict[str, Any]:
        history = task_history(trainer.state.log_history, self.tasks)
        final = history[-1]["tasks"] if history and history[-1]["step"] == \
            trainer.state.global_step else self.evaluate(trainer)
        # A task's other dev sets (MNLI's mismatched one), once at the end, as run_glue.py does.
        final = {name: dict(r) for name, r in final.items()}  # history keeps its own entries
        for index, task in enumerate(self.tasks):
            others = {name: self.evaluate_task(
                          trainer, task,
                          eval_set(index, dev, self.tokenizer, self.cfg.max_seq_length), dev)
                      for name, dev in self.other_dev_records[task.name].items()}
            if others:
                final[task.name]["other_splits"] = others
        return {
            "tasks": final,
            "score": float(np.mean([r["score"] for r in final.values()])),
            "history": history,
            "num_train_examples": self.data.sizes,
            "task_shares": self.shares,
            "with_teachers": self.teachers is not None,
        }

    def save(self, trainer: SelftuneTrainer, train_output: TrainOutput,
             result: dict[str, Any]) -> None:
        cfg, output_dir = self.cfg, self.output_dir
        for task in self.tasks:
            self.model.export_task(task.name, output_dir / "tasks" / task.name, self.tokenizer)
        if cfg.strategy != "baseline":
            result.update(evaluate_multitask_teacher(cfg, self.objective.self_distillation,
                                                     self.tasks, self.tokenizer,
                                                     output_dir / "teacher"))
        write_multitask_summary(trainer, train_output, cfg, self.tasks, result, self.described,
                                output_dir)

    def announce(self, result: dict[str, Any]) -> None:
        logger.info("Done: %s; average %.2f; task models in %s", ", ".join(
            f"{t} {r['score']:.2f}" + "".join(f" ({name} {other['score']:.2f})" for name, other
                                              in r.get("other_splits", {}).items())
            for t, r in result["tasks"].items()), result["score"], self.output_dir / "tasks")
