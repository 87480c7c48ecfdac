"""One shared encoder, one head per task (BAM!, docs/methods.md §2.1).

Each task keeps the head of a standard ``AutoModelForSequenceClassification`` (for BERT:
pooled [CLS] → dropout → linear), so every task can be exported as an ordinary Hugging Face
model directory and used on its own. The encoder is registered once, on the multi-task model;
each task model only refers to it, so the state dict holds it once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from selftune.data.packing import pack_padded_batch
from selftune.data.tasks import TaskSpec
from selftune.models.cls_norm import ClsStats
from selftune.models.heads import NORM_KEY, SOURCE_KEY, install_cls_norm, save_portable
from selftune.models.packed import enable_packing, position_offset

# STS-B is trained on y/5 (as BAM!); exported heads are scaled back to the 0-5 range.
REGRESSION_SCALE = {"stsb": 5.0}


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the trailing columns that are padding in every row.

    A mixed batch is padded to its longest example, usually another task's (an RTE pair is
    several times longer than a CoLA sentence), and every padded position costs as much as a
    real token. Only trailing all-padding columns are cut, so the positions of the real tokens
    do not move and the outputs are the same (up to float rounding) for either padding side.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    length = mask.shape[1]
    real_columns = mask.any(dim=0).nonzero()
    keep = int(real_columns.max()) + 1 if real_columns.numel() else length
    if keep == length:
        return inputs
    return {k: v[:, :keep] if v.dim() >= 2 and v.shape[1] == length else v
            for k, v in inputs.items()}


class MultiTaskModel(nn.Module):
    """A shared encoder and per-task heads; ``forward`` routes every example to its own head."""

    def __init__(self, task_models: dict[str, PreTrainedModel], tasks: list[TaskSpec]) -> None:
        super().__init__()
        first = next(iter(task_models.values()))
        self.encoder = first.base_model  # shared by every task
        prefix = first.base_model_prefix
        self.task_names = [t.name for t in tasks]
        self.tasks = {t.name: t for t in tasks}
        self.max_labels = max(t.num_labels for t in tasks)
        self.heads = nn.ModuleDict()
        for name, model in task_models.items():
            # The task model keeps a plain reference to the shared encoder (not a submodule), so
            # its forward works unchanged and the encoder's weights are stored once.
            del model._modules[prefix]
            object.__setattr__(model, prefix, self.encoder)
            self.heads[name] = model
        self.config = first.config
        # (row capacity, first position, pad id) once packing is enabled: see enable_packing.
        self.packing: tuple[int, int, int] | None = None

    def forward(self, task_ids: torch.Tensor, labels: torch.Tensor | None = None,
                **inputs: torch.Tensor) -> SequenceClassifierOutput:
        """Logits (batch, max_labels); columns past a task's number of labels are 0.

        The encoder runs once per task present in the batch, on that task's rows. A [CLS]
        normalizer with batch statistics (batchnorm, isobn) therefore sees each task's rows as
        a batch of their own, and updates its running statistics once per task and step.
        """
        batch = task_ids.shape[0]
        logits = None
        for index, name in enumerate(self.task_names):
            rows = (task_ids == index).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            task_inputs = trim_padding({k: v[rows] for k, v in inputs.items()})
            if self.packing is not None:
                task_inputs = pack_padded_batch(task_inputs, *self.packing)
            head_logits = self.heads[name](**task_inputs).logits
            if logits is None:
                logits = head_logits.new_zeros(batch, self.max_labels)
            logits[rows, : head_logits.shape[1]] = head_logits
        return SequenceClassifierOutput(logits=logits)

    def enable_packing(self, wanted: bool, capacity: int) -> bool:
        """Pack each task's rows of a batch (``selftune.data.packing``) in rows of up to
        ``capacity`` tokens, if the architecture is verified; return whether it does."""
        heads = [self.heads[name] for name in self.task_names]
        if not enable_packing(heads[0], wanted):
            return False
        for head in heads[1:]:
            enable_packing(head)
        self.packing = (capacity, position_offset(heads[0]), self.config.pad_token_id or 0)
        return True

    def add_cls_norm(self, install) -> None:
        """Put a [CLS] normalizer on the shared encoder: ``install(head_model)`` inserts it
        through one task's model (they share the encoder); every task's config records it."""
        first = self.heads[self.task_names[0]]
        install(first)
        for head in self.heads.values():
            for key in (NORM_KEY, SOURCE_KEY):
                setattr(head.config, key, getattr(first.config, key))

    def export_task(self, task: str, out_dir: Path, tokenizer=None) -> None:
        """Save task ``task`` as a standard sequence-classification model directory."""
        head = self.heads[task]
        spec = self.tasks[task]
        standalone = AutoModelForSequenceClassification.from_config(head.config)
        if getattr(head.config, NORM_KEY, "none") != "none" or \
                getattr(head.config, SOURCE_KEY, "pooler") != "pooler":
            # The same normalizer module; its statistics come with the encoder's state below.
            hidden = head.config.hidden_size
            install_cls_norm(standalone, getattr(head.config, NORM_KEY),
                             getattr(head.config, SOURCE_KEY),
                             ClsStats(torch.zeros(hidden), torch.ones(hidden)))
        standalone.base_model.load_state_dict(self.encoder.state_dict())
        missing = standalone.load_state_dict(head.state_dict(), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        scale = REGRESSION_SCALE.get(task, 1.0) if spec.is_regression else 1.0
        if scale != 1.0:
            last = [m for m in standalone.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                last.weight.mul_(scale)
                last.bias.mul_(scale)
        standalone.save_pretrained(out_dir)
        save_portable(standalone, out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def build_multitask_model(
    model_path: str, tasks: list[TaskSpec], trust_remote_code: bool = False
) -> MultiTaskModel:
    """Load the encoder once and a fresh head per task."""
    from selftune.models.loading import load_for_training

    models = {}
    for task in tasks:
        models[task.name] = load_for_training(model_path, task, trust_remote_code)
    encoder_state = next(iter(models.values())).base_model.state_dict()
    for model in models.values():  # every head starts from the same pretrained encoder
        model.base_model.load_state_dict(encoder_state)
    return MultiTaskModel(models, tasks)
