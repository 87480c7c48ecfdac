"""What every subcommand shares: the help layout, --debug/--quiet, --config files, and the
final JSON on stdout.

Importing this module (and building any subcommand's options) loads no torch, transformers,
datasets or accelerate: `selftune --help` answers at once; heavy imports happen when a command
runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

# argparse's "the object add_subparsers returns" has no public name.
Commands = Any

GROUP_TITLES = {
    "data": "data (a registry task, a local folder, the Hub, or your own files)",
    "model": "model",
    "training": "training (defaults follow run_glue.py / the BERT recipe)",
    "self-distillation": "self-ensemble and self-distillation (--strategy se, sda, sdv, ema; "
                         "Xu et al. 2020)",
    "output": "output and resuming",
}

MODEL_DIR_HELP = ("A model directory written by 'selftune train', or any sequence classifier "
                  "(a local directory or a Hub id).")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)


def add_common(parser: argparse.ArgumentParser, quiet: bool = False) -> None:
    """--debug; and --quiet for a command whose result is JSON on stdout."""
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback when something goes wrong.")
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="Print nothing on stdout (the result is still written to the "
                                 "output folder or file; logs still go to stderr).")


def print_result(args: argparse.Namespace, result: Any, indent: int | None = None) -> None:
    """The command's final JSON, the only thing it prints on stdout (nothing with --quiet)."""
    if not getattr(args, "quiet", False):
        print(json.dumps(result, indent=indent), flush=True)


def add_config_option(parser: argparse.ArgumentParser, config_class: type) -> None:
    """``--config FILE``: option values from a file, overridden by flags on the command line."""
    parser.add_argument("--config", metavar="FILE",
                        help="Read options from a JSON or YAML file (keys are option names with "
                             "underscores, as in run_config.json); flags given on the command "
                             "line win over the file.")
    parser.set_defaults(_config_parser=parser, _config_class=config_class)


def load_config_file(path: str, config_class: type) -> dict:
    """The option values of a --config file, checked as flags are (names, types, choices)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SelftuneError(f"--config file not found: {path}")
    try:
        values = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise SelftuneError(f"--config {path}: cannot parse ({err})") from None
    if not isinstance(values, dict):
        raise SelftuneError(f"--config {path}: expected a mapping of option names to values")
    checked = config_class.from_dict(values)  # names, types and choices, before anything runs
    defaults = {name: getattr(checked, name) for name in values if hasattr(checked, name)}
    if getattr(checked, "trainer_options", None):  # TrainingArguments options of the file
        defaults["trainer_options"] = checked.trainer_options
    return defaults
