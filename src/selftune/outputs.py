"""The run directory: what a finished run looks like, atomic writes, refusing to clobber.

Layout of ``--output-dir``::

    config.json, model.safetensors, tokenizer files   the final model (a standard HF directory)
    run_config.json                                   the resolved options of the run
    train.log                                         human-readable log
    checkpoints/checkpoint-N/                         Trainer checkpoints while the run is going
    metrics.json                                      written last: its presence means "finished"
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from selftune.config import NOT_HASHED
from selftune.errors import SelftuneError

METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
LOG_FILE = "train.log"
CHECKPOINTS = "checkpoints"
# Inside a `selftune bam` folder: the multi-task student's run folder, the teachers, the
# students fine-tuned per task afterwards, and the summary of every stage.
BAM_STUDENT_DIR = "student"
BAM_TEACHERS_DIR = "teachers"
BAM_FINETUNED_DIR = "finetuned"
BAM_SUMMARY_FILE = "bam.json"
# The options `selftune bench` starts a run with, in the run's folder.
BENCH_RUN_FILE = "bench_run.json"
# What marks a folder as written by selftune, so that --overwrite-output-dir may delete it.
RUN_MARKERS = (METRICS_FILE, RUN_CONFIG_FILE, LOG_FILE, CHECKPOINTS, BAM_STUDENT_DIR,
               BAM_TEACHERS_DIR, BAM_FINETUNED_DIR, BAM_SUMMARY_FILE, BENCH_RUN_FILE)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def directory_lock(output_dir: Path, wait: bool) -> Iterator[IO | None]:
    """Hold an exclusive advisory lock on a run directory, so that two independent processes
    never write one run. Yields the open lock file once held (pass its descriptor to a child
    process, ``pass_fds``, to keep the run locked for as long as the child lives); with
    ``wait=False`` yields None at once if another process holds it. The lock file sits beside
    (not inside) the directory, which may have to be replaced, and the lock dies with the last
    process holding it."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.parent / f".{output_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield lock  # closing the file releases the lock


def is_finished(output_dir: Path) -> bool:
    return (output_dir / METRICS_FILE).is_file()


def last_checkpoint(output_dir: Path) -> Path | None:
    return newest_complete_checkpoint(output_dir / CHECKPOINTS)


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``folder`` that was written completely."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and _complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last, but not atomically: it must also parse."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def check_output_dir(
    output_dir: Path, config: dict[str, Any], overwrite: bool, resume: bool,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuse, before any work, an output folder this run must not touch.

    A finished run is refused unless ``overwrite``. An unfinished run with other options is
    refused too: resuming it under a second configuration would make its results meaningless.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise SelftuneError(f"--output-dir {output_dir} exists and is not a folder")
    model = config.get("model")
    if isinstance(model, str) and Path(model).expanduser().resolve() == output_dir.resolve():
        raise SelftuneError(f"--output-dir {output_dir} is the --model directory: the run "
                            "would replace the model it starts from; choose another folder")
    check_selftune_folder(output_dir, "delete it" if overwrite else "write the run into it")
    if overwrite:
        return
    if is_finished(output_dir):
        raise SelftuneError(
            f"{output_dir} already holds a finished run ({METRICS_FILE}); choose another "
            "--output-dir or pass --overwrite-output-dir to replace it")
    changed = changed_options(output_dir, config, defaults) if resume else []
    if changed:
        raise SelftuneError(
            f"{output_dir} holds an unfinished run with other options ({', '.join(changed)}); "
            "use the same options to resume it, or --overwrite-output-dir to start over")


def changed_options(
    output_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None,
) -> list[str]:
    """The options in which ``config`` differs from the run saved in ``output_dir`` (none when
    no run is saved there). An option the saved configuration lacks (added to selftune since
    the run started) counts as its value in ``defaults``, which keeps the old behaviour."""
    saved_config = output_dir / RUN_CONFIG_FILE
    if not saved_config.is_file():
        return []
    try:
        saved = json.loads(saved_config.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise SelftuneError(
            f"{saved_config} is unreadable ({err}), so this unfinished run cannot be checked "
            "for resuming; --overwrite-output-dir starts it over") from None
    previous = {**(defaults or {}), **saved}
    return sorted(k for k in set(previous) | set(config)
                  if k not in NOT_COMPARED_ON_RESUME
                  and not _same_option(k, previous.get(k), config.get(k)))


# What a resumed run may change: the options that do not change what it computes (those the
# results' config hash leaves out, as `selftune bench` compares runs by it), but its seed.
# (The folder is the one given, however spelled; where the data sits may move.)
NOT_COMPARED_ON_RESUME = NOT_HASHED - {"seed"}
# Options naming files or folders: `train.csv` and `/home/me/train.csv` are one file.
PATH_OPTIONS = frozenset({"model", "data_dir", "train_file", "validation_file"})


def _same_option(name: str, saved: Any, given: Any) -> bool:
    if saved == given:
        return True
    if name in PATH_OPTIONS and isinstance(saved, str) and isinstance(given, str):
        return Path(saved).expanduser().resolve() == Path(given).expanduser().resolve()
    return False


def _resumable(output_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None) -> bool:
    try:
        return not changed_options(output_dir, config, defaults)
    except SelftuneError:  # an unreadable run_config.json: nothing to resume
        return False


def remove_run_dir(output_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete a run folder for --overwrite-output-dir, but only one selftune wrote (or an empty
    one): pointed by mistake at a folder of the user's own (".", a home folder, a dataset),
    the option must not wipe it. Entries named in ``keep`` stay."""
    if not output_dir.exists():
        return
    check_selftune_folder(output_dir, "delete it")
    if not keep:
        shutil.rmtree(output_dir)
        return
    for entry in output_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_selftune_folder(output_dir: Path, action: str) -> None:
    """Refuse a non-empty folder selftune did not write: pointed by mistake at a folder of the
    user's own (".", a home folder, the pretrained model's), a run would mix its files with the
    user's or replace them (a model directory's config.json and weights)."""
    if (output_dir.is_dir() and any(output_dir.iterdir())
            and not any((output_dir / m).exists() for m in RUN_MARKERS)):
        raise SelftuneError(
            f"--output-dir {output_dir} is not a selftune run folder (none of "
            f"{', '.join(RUN_MARKERS)} in it) and is not empty; refusing to {action}. "
            "Choose a new or empty --output-dir")


def prepare_output_dir(
    output_dir: Path, config: dict[str, Any], overwrite: bool, resume: bool,
    defaults: dict[str, Any] | None = None,
) -> Path | None:
    """Make the folder ready; return the checkpoint to resume from, if any."""
    check_output_dir(output_dir, config, overwrite, resume, defaults)
    # --overwrite-output-dir replaces what cannot be resumed; an interrupted run of these same
    # options is resumed all the same, so rerunning a command after a crash loses nothing.
    if overwrite and (not resume or is_finished(output_dir)
                      or not _resumable(output_dir, config, defaults)):
        remove_run_dir(output_dir)
    checkpoint = last_checkpoint(output_dir) if resume else None
    if not resume and (output_dir / CHECKPOINTS).exists():
        shutil.rmtree(output_dir / CHECKPOINTS)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SelftuneError(f"cannot write to --output-dir {output_dir}: {err.strerror}") from None
    return checkpoint
