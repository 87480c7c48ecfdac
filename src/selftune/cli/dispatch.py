"""The parser of every subcommand, and running one: each user mistake ends in a one-line
``selftune: error: ...`` and exit status 2, never a traceback (``--debug`` shows it). An
interrupted ``train`` resumes when the same command is run again."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from selftune import __version__
from selftune.cli import bam, diagnose, inference, tasks, train
from selftune.cli.common import HelpFormatter, load_config_file
from selftune.errors import SelftuneError


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's options; imports no torch, transformers, datasets or accelerate."""
    parser = argparse.ArgumentParser(
        prog="selftune",
        description="Fine-tune pretrained Transformer encoders (BERT and relatives) more "
                    "accurately and more stably: self-ensemble, self-distillation, BAM!, "
                    "[CLS] normalization.",
        formatter_class=HelpFormatter,
        epilog="Run 'selftune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"selftune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, inference, diagnose, tasks):
        module.register(commands)
    bam.register(commands)
    # The experiment harness (bench, report) is a layer above the library: the library never
    # imports it; only the command line offers its commands.
    from selftune_experiments import cli as experiments

    experiments.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (commands.choices.get(args.command) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        if getattr(args, "config", None):
            # Two passes: the file's values become defaults, so explicit flags still win.
            args._config_parser.set_defaults(**load_config_file(args.config, args._config_class))
            args = parser.parse_args(argv)
        return args._run(args)
    except SelftuneError as err:
        if debug:
            raise
        print(f"selftune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0  # the reader went away (e.g. '| head')
    except KeyboardInterrupt:
        print("\nselftune: interrupted; run the same command again to resume from the last "
              "checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        message = None if debug else io_failure_message(err)
        if message is None:
            raise
        print(f"selftune: error: {message}", file=sys.stderr)
        return 2


# Errors of the storage itself, by errno and as the Rust of safetensors spells them.
STORAGE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", ("No space left", "StorageFull")),
    errno.EDQUOT: ("disk quota exceeded", ("Disk quota exceeded", "QuotaExceeded")),
    errno.EROFS: ("the file system is read-only", ("Read-only file system", "ReadOnlyFilesystem")),
    errno.EIO: ("an input/output error of the storage", ("Input/output error",)),
}
RESUME_HINT = ("free disk space or choose another --output-dir, then run the same command "
               "again to resume")


def io_failure_message(err: BaseException) -> str | None:
    """The one line for a failed write or read of the storage (a full disk, a quota, a
    read-only or failing device), whichever library hit it; None for other errors."""
    text = str(err)
    for code, (what, spellings) in STORAGE_ERRORS.items():
        if getattr(err, "errno", None) == code or (
                not isinstance(err, OSError) and any(s in text for s in spellings)):
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            return f"{what}{where}; {RESUME_HINT}"
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    if isinstance(err, RuntimeError) and "PytorchStreamWriter failed" in text:
        return f"writing a checkpoint failed ({text.splitlines()[0][:200]}); {RESUME_HINT}"
    return None


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
