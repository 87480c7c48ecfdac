"""selftune's methods inside anyone's ``transformers.Trainer``, without a subclass.

One object plugs an objective (:class:`~selftune.self_distillation.SelfDistillation` or
:class:`~selftune.self_ensemble.SelfEnsemble`) into a plain ``Trainer``: it is the
``TrainerCallback`` that forwards the Trainer's events to the objective and keeps its state in
every checkpoint, and its :meth:`TrainerHooks.compute_loss` is the ``compute_loss_func``::

    from transformers import Trainer
    from selftune import SelfDistillation, TrainerHooks, make_teacher

    objective = SelfDistillation(make_teacher("sda", model, k=3), lam=1.0)
    hooks = TrainerHooks(objective)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      compute_loss_func=hooks.compute_loss, callbacks=[hooks])
    trainer.train()                       # resume_from_checkpoint=... restores the teacher too
    teacher = objective.averaged_teacher()

A ``compute_loss_func`` sees the model's outputs and the labels, not the inputs the teacher
needs: a forward pre-hook on the student keeps the features of its latest forward pass. The
loss is the one ``SelftuneTrainer`` computes, rescaled to the convention the Trainer assumes of
a ``compute_loss_func`` (normalized by ``num_items_in_batch``, so not divided again for
gradient accumulation): with batches of equal size, the same losses and the same weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from selftune.errors import SelftuneError
from selftune.trainer import OBJECTIVE_STATE_FILE, ObjectiveEvents, write_objective_state


class TrainerHooks(ObjectiveEvents):
    """Callback and loss function that run a selftune objective in a plain ``Trainer`` (the
    objective's events forwarded as in ``SelftuneTrainer``)."""

    def __init__(self, objective: Any) -> None:
        super().__init__(objective)
        self._features: dict[str, Any] = {}
        self._training = False
        self._hooked: torch.nn.Module | None = None
        self._autocast: Any = contextlib.nullcontext

    # ---- the loss

    def compute_loss(self, outputs: Any, labels: torch.Tensor,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """``Trainer(compute_loss_func=...)``: the objective's loss of the latest batch."""
        if not self._training or not hasattr(self.objective, "loss_from_outputs"):
            loss = outputs["loss"] if isinstance(outputs, dict) and "loss" in outputs else None
            if loss is None:  # the labels were taken from the inputs: the model's own loss
                loss = _model_loss(outputs.logits, labels)
        else:
            with self._autocast():
                loss, _ = self.objective.loss_from_outputs(outputs, labels, self._features)
        if num_items_in_batch is None:
            return loss
        # The Trainer takes this loss as a sum over the batch / num_items_in_batch.
        return loss * (labels.shape[0] / num_items_in_batch)

    def _keep_features(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._training = module.training
        self._features = {k: v for k, v in kwargs.items()
                          if k not in ("labels", "num_items_in_batch")}

    # ---- the Trainer's events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._hooked is not model:
            model.register_forward_pre_hook(self._keep_features, with_kwargs=True)
            self._hooked = model
        if args.bf16 or args.fp16:  # the teacher runs in the student's precision
            dtype = torch.bfloat16 if args.bf16 else torch.float16
            device = next(model.parameters()).device.type
            self._autocast = lambda: torch.autocast(device, dtype=dtype)
        if state.global_step > 0:  # resumed: the objective's state is in the checkpoint
            self.load_state(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, model=model, **kwargs)
        self._save_if_due(args, state, control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        super().on_epoch_end(args, state, control, model=model, **kwargs)
        self._save_if_due(args, state, control)

    # ---- checkpoints

    def _save_if_due(self, args, state, control) -> None:
        # Written when the Trainer has decided to save, before its own files: its
        # trainer_state.json, which marks a checkpoint as complete, still comes last.
        if control.should_save and state.is_world_process_zero:
            write_objective_state(self.objective, Path(args.output_dir) / (
                f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def load_state(self, checkpoint: Path) -> None:
        path = Path(checkpoint) / OBJECTIVE_STATE_FILE
        if not path.is_file():
            raise SelftuneError(f"{checkpoint} holds no {OBJECTIVE_STATE_FILE}: it was not "
                                "written with these TrainerHooks; start the run over")
        self.objective.load_state_dict(load_file(str(path)))


def _model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a sequence classifier computes as its own loss: MSE for one output, else CE."""
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return torch.nn.functional.cross_entropy(logits.float(), labels.long())
