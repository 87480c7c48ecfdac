"""selftune: fine-tuning of pretrained Transformer encoders with self-ensemble, self-distillation,
BAM! and [CLS] normalization, each measured against plain fine-tuning (BENCHMARKS.md).

From Python (docs/api.md)::

    import selftune
    result = selftune.train(task="rte", data_dir="../shared/data", strategy="sda")
    result = selftune.bam(tasks_file="tasks.yaml", output_dir="runs/mine")

The public names are imported on first use (PEP 562), so ``import selftune`` stays light: no
torch or transformers until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "train": "selftune.api",
    "bam": "selftune.api",
    "RunResult": "selftune.api",
    "TrainConfig": "selftune.config",
    "BamConfig": "selftune.config",
    "MultiTaskConfig": "selftune.config",
    "make_teacher": "selftune.teachers",
    "SelfEnsemble": "selftune.self_ensemble",
    "TrainerHooks": "selftune.plain_trainer",
    "SelftuneError": "selftune.errors",
    "SelftuneTrainer": "selftune.trainer",
    "SelfDistillation": "selftune.self_distillation",
    "SnapshotWindow": "selftune.teachers",
    "EmaAverage": "selftune.teachers",
    "ClsStats": "selftune.models.cls_norm",
    "CenterNorm": "selftune.models.cls_norm",
    "StandardizeNorm": "selftune.models.cls_norm",
    "BatchNormNoAffine": "selftune.models.cls_norm",
    "IsoBN": "selftune.models.cls_norm",
    "make_cls_norm": "selftune.models.cls_norm",
    "MultiTaskModel": "selftune.multitask.model",
    "build_multitask_model": "selftune.multitask.model",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'selftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
