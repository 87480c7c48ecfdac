"""``SelftuneTrainer``: ``transformers.Trainer`` plus an optional training objective.

An objective (self-distillation, teacher annealing...) owns its teachers and its loss; the
Trainer keeps owning the loop, the optimizer, checkpoints, mixed precision and distribution.
The objective's state (snapshot window, EMA...) is written into every Trainer checkpoint and
read back on resume, so an interrupted run continues exactly where it stopped.

Use it in your own script::

    from selftune.self_distillation import SelfDistillation
    from selftune.teachers import make_teacher
    from selftune.trainer import SelftuneTrainer

    objective = SelfDistillation(make_teacher("sda", model, k=3), lam=1.0)
    trainer = SelftuneTrainer(model=model, args=args, train_dataset=train, objective=objective)
    trainer.train()

(A plain ``transformers.Trainer`` takes the same objective through
:class:`selftune.plain_trainer.TrainerHooks`.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from selftune.data.length_grouping import EpochSeededLengthGroupedSampler
from selftune.models.cls_norm import has_running_statistics

OBJECTIVE_STATE_FILE = "selftune_objective.safetensors"


class _ProgressOnStderr(ProgressCallback):
    """The Trainer's progress bar, whose log lines (``tqdm.write``: stdout by default) go to
    stderr beside the bar: stdout is left to the command's result (``selftune train | jq``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            super().on_log(args, state, control, logs=logs, **kwargs)


class _PrinterOnStderr(PrinterCallback):
    """The Trainer's log printer without progress bars (--disable-tqdm), on stderr."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            super().on_log(args, state, control, logs=logs, **kwargs)


class Objective(Protocol):
    """What the Trainer needs from a training objective."""

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """Return (loss averaged over the batch, model outputs, loss parts for logging)."""

    def on_train_begin(self, model: torch.nn.Module, global_step: int, max_steps: int) -> None:
        """Training starts (or resumes at ``global_step``) and will end at ``max_steps``."""

    def before_optimizer_step(self, model: torch.nn.Module, global_step: int) -> None:
        """The model still holds the state after ``global_step`` updates; the next overwrites
        it."""

    def on_step_end(self, model: torch.nn.Module, global_step: int) -> None: ...

    def on_epoch_end(self, model: torch.nn.Module, epoch: float) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class _SkipNonFiniteUpdates(TrainerCallback):
    def __init__(self, trainer: SelftuneTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.finish_update()


def write_objective_state(objective: Objective, checkpoint: Path) -> None:
    """The objective's state into a checkpoint folder, atomically. Written before the
    Trainer's own files: its trainer_state.json, which marks a checkpoint complete, comes last."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint / f".{OBJECTIVE_STATE_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in objective.state_dict().items()}, str(tmp))
    os.replace(tmp, checkpoint / OBJECTIVE_STATE_FILE)


class ObjectiveEvents(TrainerCallback):
    """Forwards the Trainer's events to an objective, each epoch's end once: the one
    implementation behind ``SelftuneTrainer`` and a plain Trainer's ``TrainerHooks``."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self._ended_epoch: float | None = None

    def student(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the objective sees, from the one the Trainer hands to its callbacks."""
        return model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.objective.on_train_begin(self.student(model), state.global_step, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.objective.before_optimizer_step(self.student(model), state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.objective.on_step_end(self.student(model), state.global_step)
        # A step checkpoint due at an epoch's last step is written before the Trainer's
        # on_epoch_end; ending the epoch here puts its effect (e.g. se's epoch pool) in it.
        if state.epoch and float(state.epoch).is_integer():
            self._end_epoch(model, state.epoch)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._end_epoch(model, state.epoch or 0.0)

    def _end_epoch(self, model: torch.nn.Module, epoch: float) -> None:
        if epoch != self._ended_epoch:
            self._ended_epoch = epoch
            self.objective.on_epoch_end(self.student(model), epoch)


class _ObjectiveHooks(ObjectiveEvents):
    """The objective's events in a SelftuneTrainer, with the unwrapped student."""

    def __init__(self, trainer: SelftuneTrainer) -> None:
        super().__init__(trainer.objective)
        self.trainer = trainer

    def student(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)


def _rng_untouched():
    """Evaluation must not change training: a DataLoader draws a seed from the global RNG even
    without workers, so an evaluation between a checkpoint and the next epoch would give a
    resumed run another data order than the uninterrupted one."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


class _SessionStart(TrainerCallback):
    """Remembers where this session's training began (after a resume, not at step 0)."""

    def __init__(self, trainer: SelftuneTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.session_start_step = state.global_step
        self.trainer.eval_seconds = 0.0


class SelftuneTrainer(Trainer):
    """A ``Trainer`` whose training loss comes from an optional ``objective``."""

    def __init__(self, *args: Any, objective: Objective | None = None,
                 nan_policy: str = "stop", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for printed, on_stderr in ((ProgressCallback, _ProgressOnStderr),
                                   (PrinterCallback, _PrinterOnStderr)):
            if self.pop_callback(printed) is not None:
                self.add_callback(on_stderr)
        self.objective = objective
        self.nan_policy = nan_policy  # "stop" the run, or "skip" the update
        self.skipped_steps = 0
        self._skip_update = False  # a micro-batch of the current update was not finite
        self._statistics_before_update: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._loss_parts: dict[str, list[float]] = {}
        # Set by train() when it resumes from a checkpoint saved before its epoch's evaluation.
        self._evaluation_owed = False
        # Every loss here (the model's own for sequence classification, or the objective's) is a
        # per-batch mean: the Trainer must divide it for gradient accumulation, and must not
        # rescale it by the number of processes. (It would assume otherwise for models whose
        # forward takes **kwargs, as BERT's does in transformers 5.)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.session_start_step = 0
        self.eval_seconds = 0.0  # time spent evaluating during this session's training
        self.add_callback(_SessionStart(self))
        if objective is not None:
            self.add_callback(_ObjectiveHooks(self))
        if nan_policy == "skip":
            self.add_callback(_SkipNonFiniteUpdates(self))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(
                dataset, datasets.Dataset) or "input_ids" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        # The Trainer's own LengthGroupedSampler draws its order from the global RNG, which a
        # resumed run does not share with the uninterrupted one. Grouped by the global batch:
        # Accelerate deals consecutive per-process batches to the processes, so N processes
        # see the same global batches as one.
        lengths = [len(ids) for ids in dataset["input_ids"]]
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * \
            self.args.world_size
        return EpochSeededLengthGroupedSampler(lengths, global_batch, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Under --bf16 Accelerate autocasts the student's forward only; the teacher's forward
        # (a model of its own) must run in the same precision, or the distillation target
        # carries a bf16-vs-fp32 gap.
        with self.accelerator.autocast():
            loss, outputs, parts = self.objective.compute_loss(model, inputs)
        for name, value in parts.items():
            self._loss_parts.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        with _rng_untouched():
            result = super().evaluate(*args, **kwargs)
        self.eval_seconds += time.perf_counter() - started
        return result

    def predict(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()
        with _rng_untouched():
            result = super().predict(*args, **kwargs)
        self.eval_seconds += time.perf_counter() - started
        return result

    def mean_logged_loss(self) -> float | None:
        """Mean of the training losses logged over the whole run. The Trainer's own
        ``train_loss`` covers only the steps of this session: a resumed run would report a
        partial mean, or 0.0 when it resumed from its final checkpoint."""
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        return float(np.mean(losses)) if losses else None

    def training_throughput(self, train_runtime: float) -> tuple[float, float]:
        """(seconds spent training, examples per second) in this session, evaluation excluded."""
        steps = self.state.global_step - self.session_start_step
        examples = steps * self.args.per_device_train_batch_size * \
            self.args.gradient_accumulation_steps * self.args.world_size
        seconds = max(train_runtime - self.eval_seconds, 1e-9)
        return seconds, examples / seconds

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._evaluation_owed:
            # Resumed from a checkpoint saved at an epoch's last step, which the Trainer writes
            # before that epoch's evaluation: evaluate now, on the same weights, so the
            # learning curve keeps the epoch's point (the RNG is left untouched).
            self._evaluation_owed = False
            self.evaluate()
        if self.nan_policy == "skip" and self._statistics_before_update is None:
            # The forward passes update running statistics (a [CLS] batchnorm or IsoBN): a
            # skipped update must not leave a non-finite batch in them.
            self._statistics_before_update = [
                (b, b.clone()) for m in model.modules() if has_running_statistics(m)
                for b in m.buffers(recurse=False)]
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._all_finite(loss):
            # The backward pass has run, the optimizer step has not: nothing else is spoiled.
            if self.nan_policy == "skip":
                # Skipped as a whole at the optimizer step, with the other micro-batches of
                # the update (gradient accumulation): see finish_update.
                self._skip_update = True
                model.zero_grad(set_to_none=True)
                return torch.zeros_like(loss)
            from selftune.errors import SelftuneError
            from selftune.outputs import newest_complete_checkpoint

            kept = newest_complete_checkpoint(Path(self.args.output_dir))
            raise SelftuneError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; "
                "lower --learning-rate, check the labels, or pass --nan-policy skip to skip such "
                "steps " + (f"(the last checkpoint, {kept.name}, is kept: rerun to resume)"
                            if kept else "(no checkpoint was written yet)"))
        return loss

    def finish_update(self) -> None:
        """Just before the optimizer step: drop the whole update if one of its micro-batches
        was not finite (--nan-policy skip)."""
        if self._skip_update:
            self.skipped_steps += 1
            self.model.zero_grad(set_to_none=True)  # AdamW leaves parameters without grad alone
            with torch.no_grad():
                for buffer, before in self._statistics_before_update or []:
                    buffer.copy_(before)
        self._skip_update = False
        self._statistics_before_update = None

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite: they must all stop, or all skip, together."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.args.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._loss_parts:
            # The loss parts (task loss, distillation loss), averaged since the last log.
            for name, values in self._loss_parts.items():
                logs[name] = round(sum(values) / len(values), 6)
            self._loss_parts = {}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.objective is not None and self.args.should_save:
            write_objective_state(self.objective, Path(self._get_output_dir(trial=trial)) / (
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            # Last: a checkpoint whose files all match its manifest is intact (resume checks).
            from selftune.integrity import write_manifest

            write_manifest(Path(self._get_output_dir(trial=trial)) / (
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; resuming also restores the objective's state (teacher window...)."""
        if resume_from_checkpoint is True:
            # Resolved once, so the Trainer and the objective resume from the same checkpoint;
            # unlike the Trainer's own lookup, a half-written one (killed mid-save) is skipped.
            from selftune.outputs import newest_complete_checkpoint

            found = newest_complete_checkpoint(Path(self.args.output_dir))
            if found is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume")
            resume_from_checkpoint = str(found)
        if resume_from_checkpoint and self.objective is not None:
            self.load_objective_state(resume_from_checkpoint)
        self._evaluation_owed = bool(resume_from_checkpoint) and \
            self.args.eval_strategy == "epoch" and \
            epoch_evaluation_missing(Path(resume_from_checkpoint))
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and self.objective is not None:
            # The Trainer has loaded the best checkpoint's student: its teacher goes with it.
            self.load_objective_state(best)
        return output

    def load_objective_state(self, checkpoint: str | Path) -> None:
        """Restore the objective's state saved in ``checkpoint`` (call before ``train``)."""
        if self.objective is None:
            return
        path = Path(checkpoint) / OBJECTIVE_STATE_FILE
        if not path.is_file():
            from selftune.errors import SelftuneError

            raise SelftuneError(f"{checkpoint} has no {OBJECTIVE_STATE_FILE}: it was written by "
                                "another strategy; use --overwrite-output-dir to start over")
        try:
            self.objective.load_state_dict(load_file(str(path)))
        except Exception as err:  # SafetensorError (truncated, garbled), wrong tensors
            from selftune.errors import SelftuneError

            raise SelftuneError(f"{path} cannot be read ({str(err).splitlines()[0]}); run "
                                "again with --no-resume to start over") from None


def epoch_evaluation_missing(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved at the end of an epoch before that epoch's evaluation
    (its log history has no evaluation at its step)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        epoch, step = float(state["epoch"]), state["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    at_epoch_end = epoch > 0 and abs(epoch - round(epoch)) < 1e-6
    evaluated = any(entry.get("step") == step and any(k.startswith("eval_") for k in entry)
                    for entry in state.get("log_history", []))
    return at_epoch_end and not evaluated
