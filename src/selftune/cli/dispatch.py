"""The parser of every subcommand, and running one: each user mistake ends in a one-line
``selftune: error: ...`` and exit status 2, never a traceback (``--debug`` shows it). An
interrupted ``train`` resumes when the same command is run again. Under ``torchrun`` (several
processes) only the first process prints the line, and every process exits with status 2."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from selftune import __version__
from selftune.cli import bam, diagnose, inference, tasks, train
from selftune.cli.common import HelpFormatter, load_config_file
from selftune.errors import SelftuneError


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors point at ``--help`` instead of printing the
    whole usage (``train``'s runs to ninety lines, which bury the one that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.prog} [options]; see '{self.prog} --help'\n"
                     f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's options; imports no torch, transformers, datasets or accelerate."""
    parser = Parser(
        prog="selftune",
        description="Fine-tune pretrained Transformer encoders (BERT and relatives) with "
                    "self-ensemble, self-distillation, BAM! or [CLS] normalization, or plainly; "
                    "BENCHMARKS.md measures where each helps.",
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
    rank, world_size = process_rank()
    try:
        # The other processes of a torchrun job stay silent: the first one speaks for all.
        with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
            parser = build_parser()
            args, unknown = parser.parse_known_args(argv)
            if unknown:  # the subcommand's usage, not the top level's
                commands = next(a for a in parser._actions
                                if isinstance(a, argparse._SubParsersAction))
                (commands.choices.get(args.command) or parser).error(
                    f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as stop:
        if world_size > 1 and stop.code == 2:
            exit_together(world_size)
        raise
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
        return user_error(str(err))
    except BrokenPipeError:
        return 0  # the reader went away (e.g. '| head')
    except KeyboardInterrupt:
        hint = INTERRUPTED_HINT.get(args.command, TRAINING_INTERRUPTED_HINT)
        print(f"\nselftune: interrupted; {hint}", file=sys.stderr)
        return 130
    except Exception as err:
        message = None if debug else io_failure_message(err)
        if message is None:
            if world_size > 1 and not debug and another_process_failed(world_size):
                # Its peer stopped on a user error (said once, by the first process): a lost
                # connection here is the consequence, not news.
                return user_error(None)
            raise
        return user_error(message)


TRAINING_INTERRUPTED_HINT = "run the same command again to resume from the last checkpoint"
# Commands that train resume; these others leave nothing half-done to resume from.
INTERRUPTED_HINT = {
    "predict": "no output file was written (run the command again)",
    "evaluate": "nothing was written (run the command again)",
    "export": "nothing was written under the output folder's name (run the command again)",
    "ensemble": "run the command again (the run folder is unchanged)",
    "tasks": "nothing was written",
    "diagnose-cls": "run the command again",
    "teacher-predictions": "run the command again",
    "report": "run the command again",
}


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun, accelerate launch); 0, 1
    when it runs alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def user_error(message: str | None) -> int:
    """Print the one line (from the first process only), and end every process together."""
    rank, world_size = process_rank()
    if message and rank == 0:
        print(f"selftune: error: {message}", file=sys.stderr)
    if world_size > 1:
        exit_together(world_size, None if rank == 0 else message)
    return 2


# How long a process that stopped on a user error waits for the others to stop too (they
# see the same options and files, so the same error, unless some are still starting).
EXIT_TOGETHER_TIMEOUT_S = 60.0
USER_ERROR_KEY = "selftune/user-error"


def _store(world_size: int):
    """The key-value store the processes of this job share (torchrun's agent's, or the
    process group's), or None when there is none to reach."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), world_size,
                         is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
                         and process_rank()[0] == 0, multi_tenant=True,
                         timeout=datetime.timedelta(seconds=10))


def _error_key() -> str:
    # A key of this attempt of this job: a restarted worker group starts from zero.
    return (f"{USER_ERROR_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def another_process_failed(world_size: int) -> bool:
    """Whether another process of the job has stopped on a user error."""
    try:
        store = _store(world_size)
        return bool(store and store.add(_error_key(), 0) > 0)
    except Exception:  # no store to ask: then nothing is known
        return False


def exit_together(world_size: int, unsaid: str | None = None) -> None:
    """End this process with status 2 once every process of the job has stopped on the user
    error (or after a timeout): the launcher then reports each of them with status 2, rather
    than killing the slower ones (SIGTERM) when the first exits. ``unsaid``: this process's
    message, printed only if the first process did not stop too (so never said it). Never
    returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The launcher stops the others with SIGTERM once one has exited: they exit as planned.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
    everyone = False
    with contextlib.suppress(Exception):  # no store: exit alone
        store = _store(world_size)
        if store is not None:
            store.add(_error_key(), 1)
            deadline = time.monotonic() + EXIT_TOGETHER_TIMEOUT_S
            while not everyone and time.monotonic() < deadline:
                everyone = store.add(_error_key(), 0) >= world_size
                time.sleep(0.05)
    if unsaid and not everyone:
        print(f"selftune: error: (process {process_rank()[0]}) {unsaid}", file=sys.stderr,
              flush=True)
    os._exit(2)


# Errors of the storage itself, by errno and as the Rust of safetensors spells them.
STORAGE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", ("No space left", "StorageFull")),
    errno.EDQUOT: ("disk quota exceeded", ("Disk quota exceeded", "QuotaExceeded")),
    errno.EROFS: ("the file system is read-only", ("Read-only file system", "ReadOnlyFilesystem")),
    errno.EIO: ("an input/output error of the storage", ("Input/output error",)),
}
# How torch.save's zip writer fails when the disk fills up under it.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "iostream error", "inline_container.cc",
                        "unexpected pos")
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
    if isinstance(err, RuntimeError) and any(s in text for s in TORCH_WRITE_FAILURES):
        # torch.save reports a full disk (seen on a real full tmpfs) without an errno.
        return (f"writing a checkpoint failed, most likely a full disk or quota "
                f"({text.splitlines()[0][:160]}); {RESUME_HINT}")
    return None


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
