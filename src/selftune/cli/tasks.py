"""``selftune tasks``: the task registry."""

from __future__ import annotations

import argparse
import textwrap

from selftune.cli.common import Commands, HelpFormatter, add_common
from selftune.data.tasks import TASKS


def register(commands: Commands) -> None:
    tasks = commands.add_parser("tasks", help="List the tasks of the registry.",
                                formatter_class=HelpFormatter)
    add_common(tasks)
    tasks.set_defaults(_run=run_tasks)


def run_tasks(args: argparse.Namespace) -> int:
    for task in TASKS.values():
        labels = "regression" if task.is_regression else "/".join(task.label_names or ())
        print(f"{task.name:8s} {task.description}")
        print(textwrap.indent(f"labels: {labels}; metrics: {', '.join(task.metrics)}; "
                              f"eval split: {task.eval_splits[0]}", " " * 9))
    return 0
