"""A grid file (YAML, TOML or JSON) read into a checked ``Grid``: tasks × variants × seeds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

# The variant of the BAM! teachers' own runs: reserved, no grid variant may take it.
TEACHER_VARIANT = "teacher"


@dataclass
class Grid:
    name: str
    tasks: list[str]
    seeds: list[int]
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"baseline": {}})
    common: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: Path | None = None
    runs_dir: Path | None = None
    # Results files of other grids whose wall times also count when a --deadline estimates a
    # run's length (e.g. an ablation grid whose runs are as long as the main grid's).
    timings_from: list[Path] = field(default_factory=list)


def parse_seeds(value: str | list | int) -> list[int]:
    """``"0-4"``, ``"0,1,2"``, ``3`` or a list of ints (or of such strings)."""
    parts = value if isinstance(value, list) else [value]
    seeds: list[int] = []
    try:
        for part in parts:
            if isinstance(part, (bool, float)):  # int() would quietly take 1.5 for 1
                raise ValueError
            if isinstance(part, int):
                seeds.append(part)
                continue
            for piece in str(part).split(","):
                piece = piece.strip()
                if "-" in piece[1:]:
                    lo, hi = (int(x) for x in piece.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    seeds.extend(range(lo, hi + 1))
                elif piece:
                    seeds.append(int(piece))
    except ValueError:
        raise SelftuneError(f"seeds: cannot read {value!r}; use e.g. 0-4, 0,1,2 or [0, 1, 2] "
                            "(whole numbers, ranges from low to high)") from None
    if not seeds:
        raise SelftuneError(f"seeds: {value!r} names no seed")
    return seeds


def parse_tasks(value: Any) -> list[str]:
    """``[rte, mrpc]`` or ``"rte,mrpc"``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise SelftuneError(f"tasks: a list of task names or a comma-separated string, not "
                            f"{value!r}")
    tasks = [t.strip() for t in items if t.strip()]
    if not tasks:
        raise SelftuneError("tasks: the grid names no task")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise SelftuneError(f"tasks: {twice} given twice; name each task once")
    return tasks


# A grid's, a variant's and a task's names become folder and file names (runs/bench/<grid>/
# <task>__<variant>__seed<k>, <grid>.results.jsonl): no path separators, no '..'.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: Any, what: str) -> None:
    # Run ids join task, variant and seed with '__': a name holding it could make two ids one.
    if (isinstance(name, str) and SAFE_NAME.fullmatch(name) and name not in (".", "..")
            and "__" not in name):
        return
    problem = "is empty" if name == "" else f"{name!r} is not a string (quote it)" \
        if not isinstance(name, str) else f"{name!r} cannot name a folder"
    raise SelftuneError(f"{what} {problem}: it names the runs' folders and results, so use "
                        "letters, digits, '-', '_' and '.' only (not '.', '..' or '__'), "
                        "e.g. lr1e-4")


# Options that 'selftune bench' sets on every run itself: a grid's value would be overridden,
# or would undo what bench does (skip finished runs, resume interrupted ones).
BENCH_CONTROLLED = {
    "output_dir": "each run goes to <runs dir>/<run id>; use --runs-dir (or runs_dir in the "
                  "grid) to put the runs elsewhere",
    "overwrite_output_dir": "it starts a run over when its options changed and never redoes a "
                            "finished one; delete a run's folder to redo it",
    "resume": "it resumes an interrupted run from its checkpoint; delete a run's folder to "
              "start it over",
    "task": "list the tasks in the grid's tasks (or --tasks)",
    "tasks": "list the tasks in the grid's tasks (or --tasks)",
    "seed": "list the seeds in the grid's seeds (or --seeds)",
}


def check_bench_options(options: dict, where: str) -> None:
    """Refuse the options that 'selftune bench' sets on each run (BENCH_CONTROLLED)."""
    for key in options:
        if key in BENCH_CONTROLLED:
            raise SelftuneError(f"{where}: {key} is set by 'selftune bench' for each run; "
                                f"{BENCH_CONTROLLED[key]}")


def check_grid(grid: Grid) -> None:
    """The grid's names (safe folder names) and options (none that bench sets itself)."""
    check_name(grid.name, "grid name (the grid's name, or --name)")
    for task in grid.tasks:
        check_name(task, "task")
    for variant in grid.variants:
        check_name(variant, "variant name")
        if variant == TEACHER_VARIANT:
            raise SelftuneError(f"variant name {variant!r} is taken by the BAM! teachers' own "
                                "runs; choose another name")
    check_bench_options(grid.common, "the grid's common options (or --set)")
    for task, options in grid.task_options.items():
        check_bench_options(options, f"task_options of {task}")
    for variant, options in grid.variants.items():
        check_bench_options(options or {}, f"grid variant {variant!r}")


PATHS_RELATIVE_TO_GRID = ("data_dir", "teachers_root")


def load_grid(path: Path) -> Grid:
    raw = _read_grid_file(path)
    variants = raw.get("variants") or {"baseline": {}}
    if not isinstance(variants, dict):
        raise SelftuneError(f"{path}: 'variants' maps a name to its options")
    tasks = parse_tasks(raw["tasks"])
    task_options = _task_options(path, raw.get("task_options") or {}, tasks)
    return Grid(
        name=str(raw.get("name", path.stem)),
        tasks=tasks,
        seeds=parse_seeds(raw["seeds"]),
        variants={name: _with_paths_resolved(path, options)
                  for name, options in variants.items()},
        common=_with_paths_resolved(path, raw.get("common")),
        task_options={task: _with_paths_resolved(path, options)
                      for task, options in task_options.items()},
        results=_grid_path(path, raw.get("results"), "results")
        or path.with_name(f"{path.stem}.results.jsonl"),
        runs_dir=_grid_path(path, raw.get("runs_dir"), "runs_dir"),
        timings_from=[_grid_path(path, p, "timings_from")
                      for p in _as_list(raw.get("timings_from"))],
    )


GRID_KEYS = {"name", "tasks", "seeds", "variants", "common", "task_options", "results",
             "runs_dir", "timings_from"}


def _read_grid_file(path: Path) -> dict:
    """The grid file's mapping (YAML, TOML or JSON; a key given twice refused), its keys
    checked."""
    if not path.is_file():
        raise SelftuneError(f"grid file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = _yaml_load_unique_keys(text)
        elif path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)  # refuses a key given twice by itself
        else:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise SelftuneError(f"{path}: {err}; the second would silently replace the first") \
            from None
    except Exception as err:
        raise SelftuneError(f"{path}: cannot parse the grid ({err})") from None
    if not isinstance(raw, dict):
        raise SelftuneError(f"{path}: a grid is a mapping with tasks, seeds and variants")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise SelftuneError(f"{path}: unknown grid key(s) {unknown}; known: {sorted(GRID_KEYS)}")
    for key in ("tasks", "seeds"):
        if key not in raw:
            raise SelftuneError(f"{path}: the grid needs '{key}'")
    return raw


def _grid_path(grid: Path, value: str | None, key: str = "a path") -> Path | None:
    """A path given in the grid file, relative to the file's folder."""
    if value is not None and not isinstance(value, str):
        raise SelftuneError(f"{grid}: {key} is a path, not {value!r}")
    return None if value is None else (grid.parent / value).resolve()


def _with_paths_resolved(grid: Path, options: dict | None) -> dict:
    if options is not None and not isinstance(options, dict):
        raise SelftuneError(f"{grid}: options are a mapping of option names to values, "
                            f"not {options!r}")
    options = dict(options or {})
    for key in PATHS_RELATIVE_TO_GRID:
        if isinstance(options.get(key), str):
            options[key] = str(_grid_path(grid, options[key]))
    return options


def _task_options(grid: Path, task_options: Any, tasks: list[str]) -> dict:
    if not isinstance(task_options, dict):
        raise SelftuneError(f"{grid}: 'task_options' maps a task to its options")
    strays = sorted(set(task_options) - set(tasks))
    if strays:  # e.g. a misspelt task: its options would silently apply to nothing
        raise SelftuneError(f"{grid}: task_options for {strays}, which are not among the "
                            f"tasks {tasks}")
    return task_options


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (json keeps the last)."""
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise _DuplicateKey(f"{twice!r} is given twice")
    return dict(pairs)


def _yaml_load_unique_keys(text: str) -> Any:
    """yaml.safe_load, refusing a mapping key given twice (e.g. two variants of one name),
    which PyYAML would silently resolve to the last."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<: *defaults' keys may be overridden on purpose
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key]} "
                                                f"and {line})")
                        seen[key] = line
                    except TypeError:
                        continue  # an unhashable key: the loader names it
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]
