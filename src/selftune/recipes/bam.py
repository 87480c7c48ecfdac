"""``selftune bam``: the whole BAM! recipe (Clark et al. 2019), each stage resumable.

1. Single-task teachers: one ``selftune train`` run per task (reused when finished, resumed when
   interrupted, or given with --teachers task=DIR).
2. Teacher predictions over each task's training set, computed once and cached beside the
   teacher (``train_predictions[.both-orders].jsonl``).
3. The multi-task student with teacher annealing.
4. Optionally, single-task fine-tuning of the student's task models (--finetune-after).

Output: ``teachers/<task>/``, ``student/`` (``student/tasks/<task>/`` are standard model
directories), ``finetuned/<task>/``, and ``bam.json`` with every stage's dev scores.

A finished teacher folder may be pruned to ``run_config.json``, ``metrics.json`` and its cached
predictions (a few MB instead of a model): the recipe still reuses it, since the student needs
only the predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selftune import outputs
from selftune.config import SD_OPTIONS, BamConfig, TrainConfig
from selftune.data.loading import DataOptions
from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError
from selftune.lifecycle import process_state, setup_logging
from selftune.multitask.data import UNORDERED_TASKS, with_swapped_pairs
from selftune.multitask.task_list import (
    apply_task_list,
    check_given_teachers,
    load_multitask_data,
    task_data_options,
    task_entries,
    task_train_options,
)
from selftune.multitask.teacher_cache import (
    mismatches,
    read_header,
    read_predictions,
    write_predictions,
)
from selftune.multitask.training import (
    MultiTaskConfig,
    check_multitask_options,
    parse_task_paths,
    run_multitask,
)
from selftune.training import resolve_config, run_single_task

logger = logging.getLogger("selftune")


def compute_teacher_predictions(
    model_dir: Path, task: TaskSpec, data_options: DataOptions, out_file: Path,
    both_orders: bool, max_seq_length: int = 128, batch_size: int = 128,
    trust_remote_code: bool = False, packing: bool = True,
) -> Path:
    """A teacher's logits over its task's training set (eval mode), keyed by example id."""
    from selftune.evaluation import check_task_matches, predict_logits
    from selftune.models.loading import load_finetuned, load_tokenizer, model_label_names

    if both_orders and task.num_texts != 2:
        raise SelftuneError(f"--both-orders: {task.name} has one sentence per example, so "
                            "there is no other order")
    if both_orders and task.name not in UNORDERED_TASKS:
        raise SelftuneError(f"--both-orders is for the tasks whose pairs have no order "
                            f"({', '.join(UNORDERED_TASKS)}: the ones --double-unordered "
                            f"swaps); a student trains on {task.name} in one order only")
    model = load_finetuned(str(model_dir), trust_remote_code)
    check_task_matches(task, model_label_names(model), model_dir)
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
    records = teacher_records(task, data_options, both_orders)
    logits = predict_logits(model, tokenizer, records, max_seq_length, batch_size,
                            packing=packing)
    write_predictions(out_file, task, records, logits, str(model_dir), max_seq_length)
    return out_file


def teacher_records(task: TaskSpec, data_options: DataOptions, both_orders: bool) -> list[Record]:
    """The training examples a teacher predicts on (the student's, with the swapped copies)."""
    records = load_multitask_data(dataclasses.replace(data_options, task=task.name)).train
    return with_swapped_pairs(records) if both_orders else records


def _stale_cache_reason(cache: Path, task: TaskSpec, records: list[Record],
                        max_seq_length: int) -> str | None:
    """Why cached predictions cannot serve this student (None: reuse them)."""
    if read_header(cache).get("max_seq_length") not in (None, max_seq_length):
        return "was made with another --max-seq-length"
    # A file from before input hashes (such as the committed caches of benchmarks/bam_teachers)
    # is reused as before whenever it covers the training ids: those teachers are kept in git
    # pruned to their predictions, so their caches cannot be made again, and the benchmark
    # grids must go on reusing them as they are. Only the ids of such a file can be checked.
    missing, changed = mismatches(read_predictions(cache, task), records)
    if missing:
        return (f"has no prediction for {len(missing)} of the {len(records)} training examples "
                "(made on other data)")
    if changed:
        return (f"was made on other texts for {len(changed)} of the {len(records)} training "
                "examples (the data changed under the same ids)")
    return None


def _cached_teacher_predictions(teacher_dir: Path, task: TaskSpec, cfg: BamConfig) -> Path:
    """Reuse the teacher's cached predictions if they were made on this student's training
    data and input length, else make them (again); returns the cache. The cache is the
    recipe's own file inside the teacher folder, so a stale one is replaced rather than
    refused."""
    both = cfg.double_unordered and task.name in UNORDERED_TASKS
    cache = teacher_predictions_file(teacher_dir, task.name, cfg)
    stale = None
    if cache.is_file():
        records = teacher_records(task, task_data_options(cfg, task.name), both)
        stale = _stale_cache_reason(cache, task, records, cfg.max_seq_length)
        if stale is None:
            return cache
    _check_can_predict(teacher_dir, cache, stale)
    if stale:
        logger.info("%s %s: made again", cache, stale)
    logger.info("Teacher predictions for %s → %s", task.name, cache)
    compute_teacher_predictions(teacher_dir, task, task_data_options(cfg, task.name), cache,
                                both, cfg.max_seq_length, cfg.per_device_eval_batch_size,
                                cfg.trust_remote_code, packing=cfg.packing)
    return cache


def teacher_predictions_file(teacher_dir: Path, task: str, cfg: BamConfig) -> Path:
    """Where the recipe caches a teacher's predictions for a student with options ``cfg``
    (a student trained on both sentence orders reads a file of its own)."""
    both = cfg.double_unordered and task in UNORDERED_TASKS
    return teacher_dir / ("train_predictions.both-orders.jsonl" if both
                          else "train_predictions.jsonl")


def prepare_teacher_predictions(cfg: BamConfig, task_name: str, teacher_dir: Path) -> Path:
    """Make the cached predictions that a student with options ``cfg`` will read from the
    trained teacher in ``teacher_dir`` (or find them still valid); the caller holds the
    folder's lock (students wait on it). `selftune bench` calls it right after a shared
    teacher's own run: git keeps teacher folders without their models, so a later session's
    students can only read predictions made while the model was there."""
    task = next(t for t in check_bam_options(cfg) if t.name == task_name)
    return _cached_teacher_predictions(teacher_dir, task, cfg)


def _check_same_options(run_dir: Path, expected, root: Path) -> None:
    """A finished stage is reused only if it was run with the options this recipe asks for."""
    saved = json.loads((run_dir / outputs.RUN_CONFIG_FILE).read_text())
    if type(expected).from_dict(saved).hash() != expected.hash():
        # --overwrite-output-dir clears the recipe's own folder only, not a shared
        # --teachers-root outside it.
        remedy = ("use another --output-dir, or --overwrite-output-dir to redo every stage"
                  if run_dir.resolve().is_relative_to(root.resolve()) else
                  f"delete {run_dir} to train it again with these options, or use another "
                  "--teachers-root")
        # Named, since some differ without the user changing them: a teacher's predictions
        # file is named by the folder the recipe was given, so a moved folder differs there.
        changed = outputs.changed_options(run_dir, expected.to_dict(),
                                          type(expected)().to_dict())
        raise SelftuneError(f"{run_dir} holds a finished run with other options "
                            f"({', '.join(changed)}); {remedy}")


@contextlib.contextmanager
def _shared_teacher_lock(teacher_dir: Path, take: bool) -> Iterator[None]:
    """Taken by the main process of a (possibly distributed) run only, its other processes
    follow it through the training's own collectives; and only for a teacher this recipe
    trains (a user's --teachers folder may sit where nothing else can be written)."""
    if not take:
        yield
        return
    with outputs.directory_lock(teacher_dir, wait=False) as lock:
        if lock is not None:
            yield
            return
    logger.info("Teacher %s is being written by another process: waiting for it", teacher_dir)
    with outputs.directory_lock(teacher_dir, wait=True):
        yield


def holds_model(teacher_dir: Path) -> bool:
    """Whether a teacher folder still holds its model (git keeps teachers without them)."""
    return (teacher_dir / "config.json").is_file()


def _check_can_predict(teacher_dir: Path, cache: Path, stale: str | None = None) -> None:
    """The teacher's predictions must be made (``stale``: why the cache cannot serve): refuse
    a teacher folder that kept no model to make them with."""
    if holds_model(teacher_dir):
        return
    problem = (f"{cache} {stale}, and {teacher_dir} no longer holds the teacher's model to "
               "make it again" if stale else f"{teacher_dir} holds a finished teacher without "
               f"its model and without {cache.name}, so its predictions cannot be computed")
    raise SelftuneError(f"{problem}; delete the folder to train the teacher again")


def single_task_options(cfg: BamConfig) -> dict[str, Any]:
    """The options of the recipe's single-task runs (teachers, --finetune-after): the
    student's, with the teachers' learning rate, epochs, batch size and layer-wise decay."""
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    options.update(learning_rate=cfg.teacher_learning_rate, num_train_epochs=cfg.teacher_epochs,
                   per_device_train_batch_size=cfg.teacher_batch_size,
                   layerwise_lr_decay=cfg.teacher_layerwise_lr_decay,
                   overwrite_output_dir=False, output_dir=None)
    # --strategy and its options are the student's: the teachers are plain single-task runs.
    defaults = TrainConfig()
    options.update({name: getattr(defaults, name) for name in ("strategy", *SD_OPTIONS)})
    return options


def teacher_config(cfg: BamConfig, task: str, teacher_dir: Path) -> TrainConfig:
    """The ``selftune train`` options of the recipe's --teachers auto teacher for ``task``."""
    return TrainConfig(**{**single_task_options(cfg), **task_train_options(cfg, task),
                          "output_dir": str(teacher_dir)})


def recipe_teachers(cfg: BamConfig) -> dict[str, TrainConfig]:
    """The ``selftune train`` options of each teacher that --teachers auto trains, by task,
    each with its folder as ``output_dir`` (for tools that plan or check the recipe's runs,
    such as an experiment grid)."""
    root = teachers_root(cfg, recipe_root(cfg))
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    return {task: teacher_config(cfg, task, root / task) for task in tasks}


def check_bam_options(cfg: BamConfig) -> list[TaskSpec]:
    """Every option of the recipe that can be checked without data or models, before hours of
    teacher training (also by `selftune bench` for each planned run); returns the tasks."""
    apply_task_list(cfg)  # --tasks-file: the tasks as read, kept in the saved options
    # Grouping is for the teachers only.
    tasks = check_multitask_options(dataclasses.replace(cfg, group_by_length=False),
                                    with_teachers=cfg.teachers != "none")
    if cfg.teachers_only and (cfg.teachers != "auto" or cfg.finetune_after):
        raise SelftuneError("--teachers-only trains the teachers of --teachers auto and stops "
                            "before the student: it takes neither other --teachers nor "
                            "--finetune-after")
    if min(cfg.teacher_learning_rate, cfg.teacher_epochs, cfg.teacher_batch_size) <= 0:
        raise SelftuneError("--teacher-learning-rate, --teacher-epochs and --teacher-batch-size "
                            "must be positive")
    if cfg.teachers not in ("auto", "none"):
        extra = sorted(set(given_teacher_dirs(cfg)) - {t.name for t in tasks})
        if extra:
            raise SelftuneError(f"--teachers gives a teacher for {', '.join(extra)}, which is "
                                f"not among --tasks ({cfg.tasks}); drop it or add the task")
    if cfg.teachers_root and "{" in cfg.teachers_root.replace("{seed}", ""):
        raise SelftuneError(f"--teachers-root {cfg.teachers_root}: only '{{seed}}' may stand in "
                            "braces")
    return tasks


def given_teacher_dirs(cfg: BamConfig) -> dict[str, Path]:
    """The teachers named by --teachers task=DIR,... ('{seed}' replaced)."""
    return parse_task_paths(cfg.teachers.replace("{seed}", str(cfg.seed)), "--teachers",
                            [entry.name for entry in task_entries(cfg)])


def teachers_root(cfg: BamConfig, root: Path) -> Path:
    """Where --teachers auto keeps its teachers: --teachers-root ('{seed}' replaced), or the
    recipe's own teachers/ folder."""
    if cfg.teachers_root:
        return Path(cfg.teachers_root.replace("{seed}", str(cfg.seed)))
    return root / outputs.BAM_TEACHERS_DIR


def recipe_root(cfg: BamConfig) -> Path:
    """The recipe's folder: --output-dir, else runs/bam/seed<seed>."""
    return Path(cfg.output_dir or Path("runs") / "bam" / f"seed{cfg.seed}")


def check_single_task_stages(cfg: BamConfig) -> None:
    """The options of the recipe's single-task runs (--teachers auto, --finetune-after),
    checked as ``selftune train`` checks them, before the first stage: the stages then run
    without checking again."""
    if cfg.teachers == "auto" or cfg.finetune_after:
        for teacher in recipe_teachers(cfg).values():
            resolve_config(teacher)


def check_teacher_models(cfg: BamConfig, tasks: list[TaskSpec]) -> None:
    """Teachers given with --teachers task=DIR must be model directories of their tasks."""
    if cfg.teachers in ("auto", "none"):
        return
    for task, path in given_teacher_dirs(cfg).items():
        if not (path / "config.json").is_file():
            raise SelftuneError(f"--teachers: the {task} teacher {path} is not a model "
                                "directory (no config.json)")
    check_given_teachers(tasks, given_teacher_dirs(cfg))


@outputs.releases_run_locks
def run_bam(cfg: BamConfig) -> dict[str, Any]:
    """The recipe: teachers → their predictions → the student → (--finetune-after) each task
    fine-tuned alone; every stage reused once finished. Returns the content of bam.json."""
    setup_logging(None)  # the stage messages below reach the console from the start
    tasks = check_bam_options(cfg)
    check_single_task_stages(cfg)
    check_teacher_models(cfg, tasks)
    root = recipe_root(cfg)
    state = process_state()
    if state.is_main_process:
        # The options `selftune bench` started this recipe with stay: they are how it tells,
        # should this run be interrupted, whether its folder holds the grid's current options.
        # --teachers-only runs, one per task, may share a root (and write only teachers).
        outputs.open_recipe_folder(root, cfg.to_dict(), cfg.overwrite_output_dir,
                                   hold=not cfg.teachers_only, keep=(outputs.BENCH_RUN_FILE,))
    state.wait_for_everyone()
    summary: dict[str, Any] = {"tasks": [t.name for t in tasks], "config_hash": cfg.hash()}
    predictions = teacher_stage(cfg, tasks, root, summary) if cfg.teachers != "none" else {}
    if cfg.teachers_only:
        # No bam.json: it describes a finished recipe, and this one stops before the student.
        return summary
    summary.update(student_stage(cfg, tasks, root, predictions))
    if cfg.finetune_after:
        summary.update(finetune_stage(cfg, tasks, root))
    if state.is_main_process:
        outputs.write_json_atomic(root / outputs.BAM_SUMMARY_FILE, summary)
    return summary


def _run_or_reuse(run_dir: Path, expected: TrainConfig, root: Path, what: str,
                  start: Callable[[TrainConfig], dict[str, Any]]) -> dict[str, Any]:
    """One stage's run: reused when finished (with these options), else trained or resumed
    by ``start``; returns its metrics.json."""
    if outputs.is_finished(run_dir):
        _check_same_options(run_dir, expected, root)
        logger.info("%s: reusing %s", what, run_dir)
        return json.loads((run_dir / outputs.METRICS_FILE).read_text())
    logger.info("%s: training in %s", what, run_dir)
    result = start(expected)
    setup_logging(None)  # the stage's run logged to its own train.log
    return result


def teacher_stage(cfg: BamConfig, tasks: list[TaskSpec], root: Path,
                  summary: dict[str, Any]) -> dict[str, Path]:
    """Each task's teacher, trained (or reused, or given), and its predictions over the
    student's training data; returns the prediction files by task."""
    state = process_state()
    given = {} if cfg.teachers == "auto" else given_teacher_dirs(cfg)
    auto_root = teachers_root(cfg, root)
    summary["teachers"] = {}
    summary["teacher_dirs"] = {}
    predictions: dict[str, Path] = {}
    for task in tasks:
        teacher_dir = given.get(task.name) or auto_root / task.name
        summary["teacher_dirs"][task.name] = str(teacher_dir)
        # A --teachers-root may be shared by BAM runs in other processes (e.g. two bench
        # workers on one seed): one of them trains a teacher, the others wait and reuse it.
        with _shared_teacher_lock(teacher_dir, state.is_main_process and task.name not in given):
            if task.name not in given:
                _run_or_reuse(teacher_dir, teacher_config(cfg, task.name, teacher_dir), root,
                              f"Teacher for {task.name}", run_single_task)
            # Under torchrun the main process writes the cache; the others then read it.
            with state.main_process_first():
                predictions[task.name] = _cached_teacher_predictions(teacher_dir, task, cfg)
        metrics_file = teacher_dir / outputs.METRICS_FILE
        if metrics_file.is_file():
            summary["teachers"][task.name] = json.loads(metrics_file.read_text())["score"]
    return predictions


def student_stage(cfg: BamConfig, tasks: list[TaskSpec], root: Path,
                  predictions: dict[str, Path]) -> dict[str, Any]:
    """The multi-task student, distilled from the teachers' predictions (if any)."""
    student_dir = root / outputs.BAM_STUDENT_DIR
    student_cfg = MultiTaskConfig(**{
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MultiTaskConfig)},
        "output_dir": str(student_dir),
        "group_by_length": False,  # the student's batches come from the task sampler
        "teacher_predictions": ",".join(f"{t}={p}" for t, p in predictions.items()) or None,
        "overwrite_output_dir": False})
    student = _run_or_reuse(student_dir, student_cfg, root, "Student",
                            lambda checked: run_multitask(checked, tasks))
    return {"student": {t: r["score"] for t, r in student["tasks"].items()},
            "student_average": student["score"]}


def finetune_stage(cfg: BamConfig, tasks: list[TaskSpec], root: Path) -> dict[str, Any]:
    """--finetune-after: each of the student's task models fine-tuned on its task alone."""
    single_task = single_task_options(cfg)
    finetuned = {}
    for task in tasks:
        out = root / outputs.BAM_FINETUNED_DIR / task.name
        finetune_cfg = TrainConfig(**{
            **single_task, **task_train_options(cfg, task.name), "output_dir": str(out),
            "model": str(root / outputs.BAM_STUDENT_DIR / "tasks" / task.name)})
        finetuned[task.name] = _run_or_reuse(out, finetune_cfg, root,
                                             f"Fine-tuning {task.name}", run_single_task)["score"]
    scores = list(finetuned.values())
    return {"finetuned": finetuned, "finetuned_average": sum(scores) / len(scores)}
