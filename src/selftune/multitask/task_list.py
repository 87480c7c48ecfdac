"""The tasks of a multi-task run or a BAM! recipe, from ``--tasks`` or a ``--tasks-file``.

A task list (YAML or JSON) names each task: a registry task by name, or the user's own
train/validation files with the columns ``selftune train`` takes::

    tasks:
      - rte                              # a registry task (data from --data-dir or the Hub)
      - name: reviews                    # your own task: a folder name of its own
        train_file: reviews/train.csv    # csv, tsv or jsonl; relative to the task list's folder
        validation_file: reviews/dev.csv
        text_columns: text               # or [premise, hypothesis] for sentence pairs
        label_column: stars              # default: label
        label_type: classification       # auto (default), classification or regression
        id_column: review_id             # default: the row number

Every mistake in the list is refused before any training. The list is read into the options
(``task_list``, kept in ``run_config.json``), so a finished stage is reused only for the same
tasks, columns and files.

Teacher predictions are cached by example id: the id column, or, without one, the row number
with the training file's content hash (``17@3fa2b9c1d0e4``), so a changed file never gets the
predictions made on its earlier version.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selftune.data.loading import DataOptions, TaskData, load_task_data
from selftune.data.tasks import TASKS, TaskSpec, get_task
from selftune.errors import SelftuneError

if TYPE_CHECKING:
    from selftune.config import MultiTaskConfig

# The keys an own task takes: its name and the options of `selftune train` for own files.
OWN_TASK_KEYS = ("name", "train_file", "validation_file", "text_columns", "label_column",
                 "label_type", "id_column")
LABEL_TYPES = ("auto", "classification", "regression")
# A task's name becomes a folder (teachers/<name>, student/tasks/<name>): letters, digits,
# '_', '-' and '.', not starting with a dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class TaskEntry:
    """One task of a list: a registry task (no files) or the user's own files."""

    name: str
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    label_type: str = "auto"
    id_column: str | None = None

    @property
    def is_registry(self) -> bool:
        return self.train_file is None

    def data_options(self, base: DataOptions) -> DataOptions:
        """``base`` (the run's data options) for this task."""
        if self.is_registry:
            return dataclasses.replace(base, task=self.name)
        return dataclasses.replace(
            base, task=self.name, train_file=self.train_file,
            validation_file=self.validation_file, text_columns=self.text_columns,
            label_column=self.label_column, label_type=self.label_type,
            id_column=self.id_column)

    def train_options(self) -> dict[str, Any]:
        """The task's options of a single-task run (``TrainConfig``): a teacher, a fine-tuning."""
        if self.is_registry:
            return {"task": self.name}
        return {"task": self.name, "train_file": self.train_file,
                "validation_file": self.validation_file,
                "text_columns": ",".join(self.text_columns), "label_column": self.label_column,
                "label_type": self.label_type, "id_column": self.id_column}


def load_task_list(path: str | Path) -> list[TaskEntry]:
    """Read and check a task list: every mistake that needs no data reading is refused here."""
    import yaml

    file = Path(path)
    where = f"--tasks-file {path}"
    if not file.is_file():
        raise SelftuneError(f"{where}: file not found")
    try:
        content = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise SelftuneError(f"{where}: cannot parse ({err})") from None
    if isinstance(content, dict):
        unknown = sorted(set(content) - {"tasks"})
        if unknown:
            raise SelftuneError(f"{where}: unknown key(s) {unknown}; the file holds 'tasks:', "
                                "a list of tasks")
        content = content.get("tasks")
    if not isinstance(content, list) or not content:
        raise SelftuneError(f"{where}: expected a list of tasks (a registry task's name, or a "
                            "mapping with name, train_file, validation_file, ...)")
    entries = [_entry(item, file.parent, f"{where}: task {i + 1}")
               for i, item in enumerate(content)]
    _check_distinct(entries, where)
    return entries


def _entry(item: Any, base_dir: Path, where: str) -> TaskEntry:
    if isinstance(item, str):
        return TaskEntry(_registry_name(item, where))
    if not isinstance(item, dict):
        raise SelftuneError(f"{where}: expected a task name or a mapping, got {item!r}")
    unknown = sorted(set(item) - set(OWN_TASK_KEYS))
    if unknown:
        raise SelftuneError(f"{where}: unknown key(s) {unknown}; a task takes "
                            f"{', '.join(OWN_TASK_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise SelftuneError(f"{where}: give the task a name (name: ...)")
    where = f"{where} ({name})"
    if set(item) == {"name"}:
        return TaskEntry(_registry_name(name, where))
    return _own_entry(item, name, base_dir, where)


def _registry_name(name: str, where: str) -> str:
    try:
        return get_task(name).name
    except SelftuneError:
        raise SelftuneError(f"{where}: {name!r} is not a registry task ({', '.join(TASKS)}); "
                            "for your own task give name, train_file and "
                            "validation_file") from None


def _own_entry(item: dict, name: str, base_dir: Path, where: str) -> TaskEntry:
    if not SAFE_NAME.fullmatch(name):
        raise SelftuneError(f"{where}: the name becomes a folder name: use letters, digits, "
                            "'_', '-' and '.' (not first), at most 100 characters")
    if _is_registry_name(name):
        raise SelftuneError(f"{where}: {name!r} is a registry task's name; give your own task "
                            "another name")
    files = {}
    for key in ("train_file", "validation_file"):
        value = item.get(key)
        if not isinstance(value, str) or not value:
            raise SelftuneError(f"{where}: give both train_file and validation_file")
        file = Path(value).expanduser()
        file = file if file.is_absolute() else base_dir / file
        if not file.is_file():
            raise SelftuneError(f"{where}: {key} {file} not found")
        files[key] = str(file.resolve())
    label_type = item.get("label_type", "auto")
    if label_type not in LABEL_TYPES:
        raise SelftuneError(f"{where}: label_type {label_type!r} is not one of "
                            f"{', '.join(LABEL_TYPES)}")
    text_columns = _text_columns(item.get("text_columns", "text"), where)
    label_column, id_column = item.get("label_column", "label"), item.get("id_column")
    for key, value in (("label_column", label_column), ("id_column", id_column)):
        if value is not None and (not isinstance(value, str) or not value):
            raise SelftuneError(f"{where}: {key} must be a column name")
    return TaskEntry(name, files["train_file"], files["validation_file"], text_columns,
                     label_column, label_type, id_column)


def _is_registry_name(name: str) -> bool:
    try:
        get_task(name)
    except SelftuneError:
        return False
    return True


def _text_columns(value: Any, where: str) -> tuple[str, ...]:
    columns = value.split(",") if isinstance(value, str) else value
    if not isinstance(columns, list | tuple) or not all(isinstance(c, str) for c in columns):
        raise SelftuneError(f"{where}: text_columns is a column, or two for sentence pairs")
    columns = tuple(c.strip() for c in columns if c.strip())
    if not 1 <= len(columns) <= 2:
        raise SelftuneError(f"{where}: text_columns is a column, or two for sentence pairs")
    return columns


def _check_distinct(entries: list[TaskEntry], where: str) -> None:
    """One name per task (folder names: case apart), and no data given as two tasks."""
    names: dict[str, str] = {}
    for entry in entries:
        if entry.name.lower() in names:
            raise SelftuneError(f"{where}: task {entry.name!r} is named twice; give each task "
                                "once, under its own name")
        names[entry.name.lower()] = entry.name
    contents: dict[str, str] = {}
    for entry in entries:
        if entry.is_registry:
            continue
        digest = file_hash(Path(entry.train_file))
        if digest in contents:
            raise SelftuneError(f"{where}: tasks {contents[digest]!r} and {entry.name!r} train "
                                "on the same file; a task's data is given once")
        contents[digest] = entry.name


def file_hash(path: Path) -> str:
    """The first 12 hex digits of the sha256 of a file's bytes."""
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, _mtime_ns: int, _size: int) -> str:
    # Keyed by modification time and size too: an edited file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---- the task list inside the run options


def apply_task_list(cfg: MultiTaskConfig) -> None:
    """With --tasks-file: read it into the options (``tasks``: its names; ``task_list``: the
    tasks as read, so the saved options tell whether a finished stage ran on them)."""
    from selftune.config import MultiTaskConfig

    if not cfg.tasks_file:
        if cfg.task_list:
            raise SelftuneError("task_list is filled in from --tasks-file; give --tasks-file")
        return
    entries = load_task_list(cfg.tasks_file)
    names = ",".join(e.name for e in entries)
    # Options read before (the list may have changed since) keep the names they read.
    read_before = ",".join(t["name"] for t in json.loads(cfg.task_list or "[]"))
    if cfg.tasks not in (MultiTaskConfig.tasks, names, read_before):
        raise SelftuneError("give the tasks with --tasks or with --tasks-file, not both")
    cfg.tasks = names
    cfg.task_list = json.dumps([dataclasses.asdict(e) for e in entries])


def task_entries(cfg: MultiTaskConfig) -> list[TaskEntry]:
    """The run's tasks: those of --tasks-file, else the registry tasks of --tasks."""
    if cfg.tasks_file:
        return load_task_list(cfg.tasks_file)
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    unknown = [name for name in names if not _is_registry_name(name)]
    if unknown:
        # get_task's own hint (--train-file) is for single-task runs.
        raise SelftuneError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(TASKS)}; "
                            "your own files are listed in a --tasks-file (README: 'Your own "
                            "tasks in BAM!')")
    return [TaskEntry(get_task(name).name) for name in names]


def task_data_options(cfg: MultiTaskConfig, task: str) -> DataOptions:
    """The data options of one of the run's tasks."""
    entry = next(e for e in task_entries(cfg) if e.name == task)
    return entry.data_options(cfg.data_options())


def task_train_options(cfg: MultiTaskConfig, task: str) -> dict[str, Any]:
    """The task's options of the recipe's single-task runs (teachers, --finetune-after)."""
    return next(e for e in task_entries(cfg) if e.name == task).train_options()


def resolve_tasks(cfg: MultiTaskConfig) -> list[TaskSpec]:
    """The run's tasks; own files are read here (columns, labels), before any training."""
    specs = []
    for entry in task_entries(cfg):
        if entry.is_registry:
            specs.append(get_task(entry.name))
            continue
        try:
            specs.append(load_task_data(entry.data_options(cfg.data_options())).task)
        except SelftuneError as err:
            raise SelftuneError(f"--tasks-file {cfg.tasks_file}: task {entry.name}: "
                                f"{err}") from None
    return specs


def task_name(given: str, names: list[str] | None) -> str:
    """A task named in a task=PATH option: one of the run's own tasks, or a registry task."""
    if names and given in names:
        return given
    return get_task(given).name


def load_multitask_data(options: DataOptions) -> TaskData:
    """A task's data for the multi-task stages: as ``load_task_data``, with the ids of an own
    file without an id column made of the row number and the file's hash (the key of the
    teacher predictions: a changed file is never served those of its earlier version)."""
    data = load_task_data(options)
    if options.train_file and not options.id_column:
        digest = file_hash(Path(options.train_file))
        data.train = [{**r, "example_id": f"{r['example_id']}@{digest}"} for r in data.train]
    return data


def check_given_teachers(tasks: list[TaskSpec], teacher_dirs: dict[str, Path]) -> None:
    """A given teacher must predict what its task is (a regression teacher for a regression
    task, the same classes for a classification task): checked on its config, before any
    teacher is trained."""
    from transformers import AutoConfig

    from selftune.evaluation import check_task_matches

    by_name = {t.name: t for t in tasks}
    for name, path in teacher_dirs.items():
        config = AutoConfig.from_pretrained(path)
        regression = config.problem_type == "regression" or config.num_labels == 1
        labels = None if regression else tuple(config.id2label[i]
                                               for i in range(config.num_labels))
        try:
            check_task_matches(by_name[name], labels, path)
        except SelftuneError as err:
            raise SelftuneError(f"--teachers: {err}") from None
