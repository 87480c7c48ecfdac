"""``selftune ensemble``: the self-ensemble of a finished baseline run, built afterwards from the
snapshots it kept (``--save-snapshots K``), for the cost of an evaluation.

The parameter average of the last K snapshots is written as a standard model directory with
its own ``metrics.json``; ``--vote`` also scores the output vote of the same K models. The
average is the one ``--strategy se --se-pool steps`` computes during training (same states,
same order, same arithmetic), so both give the same model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.config import TrainConfig, opt
from selftune.errors import SelftuneError

ENSEMBLE, DATA, OUTPUT = "ensemble", "data", "output"


@dataclass
class EnsembleConfig:
    run_dir: str = opt(None, "A finished run of 'selftune train --save-snapshots K'.", ENSEMBLE,
                       positional=True)
    k: int | None = opt(None, "Average the last K saved snapshots (default: all of them).",
                        ENSEMBLE)
    vote: bool = opt(False, "Also score the output vote of the K snapshot models "
                     "(vote_metrics; K forward passes per example).", ENSEMBLE)
    data_dir: str | None = opt(None, "Where the run's data is now, if it moved (default: the "
                               "run's own --data-dir).", DATA)
    per_device_eval_batch_size: int = opt(128, "Evaluation batch size.", ENSEMBLE)
    output_dir: str | None = opt(None, "Where to write the ensemble's model directory "
                                 "(default: RUN_DIR/ensemble-k<K>).", OUTPUT)
    overwrite_output_dir: bool = opt(False, "Replace an ensemble written there before.", OUTPUT)


def check_ensemble_options(cfg: EnsembleConfig) -> None:
    if cfg.k is not None and cfg.k < 1:
        raise SelftuneError("--k must be at least 1")
    if cfg.per_device_eval_batch_size < 1:
        raise SelftuneError("--per-device-eval-batch-size must be positive")


def run_config_of(run_dir: Path) -> TrainConfig:
    """The options a finished run was trained with."""
    from selftune.outputs import METRICS_FILE, RUN_CONFIG_FILE

    if not (run_dir / METRICS_FILE).is_file():
        raise SelftuneError(f"{run_dir} holds no finished run ({METRICS_FILE} missing)")
    try:
        saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
        saved.pop("resolved", None)
        return TrainConfig.from_dict(saved)
    except (OSError, ValueError) as err:
        raise SelftuneError(f"{run_dir / RUN_CONFIG_FILE} is unreadable ({err})") from None


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Write the self-ensemble of ``cfg.run_dir`` and return its ``metrics.json`` content."""
    import time

    from selftune.evaluation import evaluate_model, predict_logits
    from selftune.models.loading import load_finetuned, load_tokenizer
    from selftune.runinfo import environment_info, peak_memory_mb
    from selftune.self_distillation import vote_logits
    from selftune.self_ensemble import SNAPSHOTS_FILE, load_snapshots
    from selftune.teachers import SnapshotWindow

    started = time.time()
    check_ensemble_options(cfg)
    run_dir = Path(cfg.run_dir)
    run = run_config_of(run_dir)
    states, steps, interval = load_snapshots(run_dir / SNAPSHOTS_FILE)
    k = cfg.k or len(states)
    if k > len(states):
        raise SelftuneError(f"{run_dir} kept {len(states)} snapshots; --k {k} is more")
    out = Path(cfg.output_dir) if cfg.output_dir else run_dir / f"ensemble-k{k}"
    _prepare(out, cfg.overwrite_output_dir)
    model = load_finetuned(str(run_dir))
    tokenizer = load_tokenizer(str(run_dir))
    window = SnapshotWindow(k)
    for state in states[-k:]:
        window.push(state)
    window.average_into(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    data = run.data_options()
    if cfg.data_dir:
        data = dataclasses.replace(data, data_dir=cfg.data_dir)
    evaluated = evaluate_model(str(out), data, run.eval_split, run.max_seq_length,
                               cfg.per_device_eval_batch_size)
    result = {"task": evaluated["task"], "eval_split": evaluated["eval_split"],
              "metrics": evaluated["metrics"], "score": evaluated["score"],
              "ensemble": f"parameter average of the last {k} of {len(states)} snapshots "
                          f"(every {interval} steps)",
              "snapshot_steps": steps[-k:], "source_run": str(run_dir), "seed": run.seed}
    if cfg.vote:
        def vote(model, tokenizer, records, max_seq_length, batch_size):
            return vote_logits(model, window.snapshots(), lambda shell: predict_logits(
                shell, tokenizer, records, max_seq_length, batch_size))

        voted = evaluate_model(str(out), data, run.eval_split, run.max_seq_length,
                               cfg.per_device_eval_batch_size, logits_fn=vote)
        result.update({"vote_metrics": voted["metrics"], "vote_score": voted["score"]})
    from selftune.outputs import METRICS_FILE, write_json_atomic

    result.update({"k": k, "history": [], "wall_time_s": time.time() - started,
                   "peak_memory_mb": peak_memory_mb(), **environment_info()})
    write_json_atomic(out / METRICS_FILE, result)  # last: the folder is complete
    return result


def _prepare(out: Path, overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    from selftune.outputs import METRICS_FILE

    if not overwrite:
        raise SelftuneError(f"{out} is not empty; pass --overwrite-output-dir to replace the "
                            "ensemble written there")
    try:
        ours = "ensemble" in json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise SelftuneError(f"{out} holds something other than an ensemble of selftune's; "
                            "choose another --output-dir")
    shutil.rmtree(out)
