"""Every ``transformers.TrainingArguments`` option on selftune's command line and in ``--config``
files, handed to the ``Trainer`` as it is, beside selftune's own options.

The options are generated from the dataclass itself. Importing transformers takes seconds, and
``--help`` must not, so the fields are read from a description of them: the one committed
beside this file when it was made from the installed transformers version, else one generated
once from the installed version and kept in the user's cache. The few options selftune must
own (where a run writes, how it evaluates, checkpoints and resumes) are refused, each with its
reason and the selftune option to use instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.metadata
import json
import os
import typing
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

SPEC_FILE = Path(__file__).with_name("training_arguments.json")
DEST_PREFIX = "trainer__"  # argparse destinations of the pass-through options
SELFTUNE_FLAGS = {"debug", "config"}  # flags of selftune's own, not options of a run

# Options of TrainingArguments that selftune sets itself, and why (the same meaning under
# selftune's own name, or a behaviour the run depends on).
OWNED: dict[str, str] = {
    "output_dir": "the run folder is --output-dir; checkpoints go to its checkpoints/",
    "overwrite_output_dir": "use --overwrite-output-dir",
    "do_train": "a run always trains", "do_eval": "a run always evaluates its dev split",
    "do_predict": "use 'selftune predict'",
    "eval_strategy": "a run evaluates after every epoch (--eval-each-epoch)",
    "eval_steps": "a run evaluates after every epoch (--eval-each-epoch)",
    "save_strategy": "checkpoints are written every epoch, or every --save-steps",
    "save_total_limit": "a run keeps its newest checkpoint (and the best with "
                        "--load-best-model-at-end)",
    "resume_from_checkpoint": "an interrupted run resumes by itself (--no-resume starts over)",
    "remove_unused_columns": "selftune's collators need the columns it keeps",
    "label_names": "the label column is --label-column",
    "use_cpu": "chosen from the machine (CPU processes talk over gloo)",
    "train_sampling_strategy": "use --group-by-length",
    "warmup_steps": "use --warmup-ratio",
    "greater_is_better": "follows --metric-for-best-model (loss: lower is better)",
    "hub_strategy": "a run pushes once, when it has finished (--push-to-hub)",
    "hub_always_push": "a run pushes once, when it has finished (--push-to-hub)",
    "parallelism_config": "an object, not an option: build TrainingArguments in Python",
    "debug": "--debug shows selftune's traceback; set transformers' debug options in Python",
}


def installed_transformers_version() -> str:
    return importlib.metadata.version("transformers")


def generate_spec() -> dict[str, Any]:
    """The description of every ``TrainingArguments`` field, from the installed transformers."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = [_describe(f, hints[f.name]) for f in dataclasses.fields(TrainingArguments)
              if f.init]
    return {"transformers_version": installed_transformers_version(), "fields": fields}


def _describe(f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    args = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    choices = None
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:
        kind, choices = "str", [member.value for member in enums[0]]
    elif args == [bool]:
        kind = "bool"
    elif args in ([int], [float], [str]):
        kind = args[0].__name__
    elif any(typing.get_origin(a) is list or a is list for a in args):
        kind = "list"
    elif any(typing.get_origin(a) is dict or a is dict for a in args):
        kind = "json"  # a mapping, given as JSON text
    else:
        kind = "str"
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, enum.Enum):
        default = default.value
    if not isinstance(default, str | int | float | bool | type(None) | list):
        default = None
    return {"name": f.name, "kind": kind, "optional": optional, "default": default,
            "choices": choices, "help": " ".join(str(f.metadata.get("help", "")).split())}


def training_argument_fields() -> list[dict[str, Any]]:
    """The fields of the installed transformers' ``TrainingArguments``, without importing it
    when their description is committed or cached."""
    version = installed_transformers_version()
    committed = json.loads(SPEC_FILE.read_text())
    if committed["transformers_version"] == version:
        return committed["fields"]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selftune" / (
        f"training_arguments-{version}.json")
    try:
        return json.loads(cache.read_text())["fields"]
    except (OSError, ValueError, KeyError):
        pass
    spec = generate_spec()
    try:  # a cache that cannot be written only costs the next --help a few seconds
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(spec))
        tmp.replace(cache)
    except OSError:
        pass
    return spec["fields"]


def passthrough_fields(own_options: set[str]) -> dict[str, dict[str, Any]]:
    """The fields handed to the Trainer as given: all but the owned ones and those that are
    selftune options of the same name and meaning (--learning-rate...)."""
    return {f["name"]: f for f in training_argument_fields()
            if f["name"] not in OWNED and f["name"] not in own_options}


def parse_value(spec: dict[str, Any], value: Any) -> Any:
    """A value of a pass-through option, from the command line (text) or a config file."""
    kind, name = spec["kind"], spec["name"]
    if value is None and spec["optional"]:
        return None
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if kind in ("int", "float"):
            number = float(value)
            if kind == "int" and not number.is_integer():
                raise ValueError
            return int(number) if kind == "int" else number
        if kind == "list":
            return [str(v) for v in value] if isinstance(value, list) else str(value).split(",")
        if kind == "json":
            return json.loads(value) if isinstance(value, str) else dict(value)
        text = str(value)
    except (TypeError, ValueError):
        raise SelftuneError(f"option {name!r}: {value!r} is not a valid {kind}") from None
    if spec["choices"] and text not in spec["choices"]:
        raise SelftuneError(f"option {name!r}: {text!r} is not one of "
                            f"{', '.join(map(str, spec['choices']))}")
    return text


def split_trainer_options(values: dict[str, Any], own_options: set[str]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config file's options into selftune's and the Trainer's (checked); an owned
    option is refused with its reason."""
    fields = passthrough_fields(own_options)
    ours, trainer = {}, {}
    for name, value in values.items():
        if name in own_options:
            ours[name] = value
        elif name in OWNED:
            raise SelftuneError(f"option {name!r} is selftune's to set: {OWNED[name]}")
        if name in fields:
            trainer[name] = parse_value(fields[name], value)
        else:
            ours[name] = value
    return ours, trainer


class _Refused(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is selftune's to set: {OWNED[self.dest]}")


def add_trainer_arguments(parser: argparse.ArgumentParser, own_options: set[str]) -> None:
    """One option per pass-through field, in both spellings, in a group of its own; owned
    fields are accepted only to be refused with their reason."""
    group = parser.add_argument_group(
        "transformers.TrainingArguments (handed to the Trainer as given; see its documentation)")
    for name, spec in passthrough_fields(own_options).items():
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        common = {"dest": DEST_PREFIX + name, "default": argparse.SUPPRESS,
                  "help": _short_help(spec)}
        if spec["kind"] == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(*flags, type=lambda text, s=spec: _cli_value(s, text),
                               metavar=spec["kind"].upper(), **common)
    for name in OWNED:
        if name not in own_options and name not in SELFTUNE_FLAGS:
            flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
            group.add_argument(*flags, dest=name, nargs="?", action=_Refused,
                               help=argparse.SUPPRESS)


def _cli_value(spec: dict[str, Any], text: str) -> Any:
    try:
        return parse_value(spec, text)
    except SelftuneError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _short_help(spec: dict[str, Any]) -> str:
    text = spec["help"]
    first = text.split(". ")[0].rstrip(".")
    default = "" if spec["default"] in (None, "") else f" (default: {spec['default']})"
    return (first[:160] + ("..." if len(first) > 160 else "")) + default


def trainer_options_from_namespace(namespace: argparse.Namespace) -> dict[str, Any]:
    """The pass-through options given on the command line."""
    return {key.removeprefix(DEST_PREFIX): value for key, value in vars(namespace).items()
            if key.startswith(DEST_PREFIX)}


if __name__ == "__main__":  # regenerate the committed description
    SPEC_FILE.write_text(json.dumps(generate_spec(), indent=1) + "\n")
    print(f"wrote {SPEC_FILE}")
