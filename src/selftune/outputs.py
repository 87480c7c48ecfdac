"""The run directory: what a finished run looks like, atomic writes, refusing to clobber.

Layout of ``--output-dir``::

    config.json, model.safetensors, tokenizer files   the final model (a standard HF directory)
    run_config.json                                   the resolved options of the run
    train.log                                         human-readable log
    selftune-run.json                                 the marker, written first: the run's id,
                                                      the selftune version, the creation time and
                                                      a fingerprint of the training data
    .selftune-run.lock                                held (flock) by the run writing the folder
    checkpoints/checkpoint-N/                         Trainer checkpoints while the run is going,
                                                      each with a selftune-manifest.json (sha256)
    metrics.json                                      its presence means "finished"
    selftune-manifest.json                            written last: every file with its sha256

A folder is the run's only if it carries the marker (or, written before markers existed, a
run_config.json, bam.json or bench_run.json): selftune writes into no other non-empty folder and
deletes nothing in one.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from selftune.config import NOT_HASHED
from selftune.errors import SelftuneError
from selftune.files import LOCK_FILE, write_json_atomic  # noqa: F401 (re-exported)
from selftune.integrity import MANIFEST_FILE, read_manifest

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
# What marks a folder as a run's: written first, before anything else of the run.
MARKER_FILE = "selftune-run.json"
# Held with flock by the one process writing the folder; holds that process's pid, host, start.
# Files only selftune writes, by which run folders of versions before the marker are still
# recognized (the committed benchmark grids' folders, an old run to resume or reuse). Generic
# names (checkpoints/, train.log, student/, teachers/) prove nothing and are not among them.
LEGACY_MARKERS = (RUN_CONFIG_FILE, BAM_SUMMARY_FILE, BENCH_RUN_FILE,
                  f"{BAM_STUDENT_DIR}/{RUN_CONFIG_FILE}")


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
    """The newest complete checkpoint (cheap: for planning; a resume verifies its files with
    ``checkpoint_to_resume``)."""
    return newest_complete_checkpoint(output_dir / CHECKPOINTS)


def checkpoint_to_resume(output_dir: Path, is_main_process: bool = True) -> Path | None:
    """The newest intact checkpoint; the main process first sets corrupt newer ones aside
    (saying so in the log), or stops when none is intact (see ``selftune.integrity``)."""
    if not is_main_process:  # the main process has set the corrupt ones aside already
        return last_checkpoint(output_dir)
    from selftune.integrity import newest_good_checkpoint

    return newest_good_checkpoint(output_dir / CHECKPOINTS)


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
    check_output_location(output_dir, config)
    check_selftune_folder(output_dir, "delete it" if overwrite else "write the run into it")
    check_not_locked(output_dir)
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


def check_output_location(output_dir: Path, config: dict[str, Any]) -> None:
    """Refuse an output folder that is not a folder, or that holds the current folder, the
    model the run starts from or one of its input files (--overwrite-output-dir would delete
    them; a run would write over them)."""
    if str(config.get("output_dir", "x")).strip() == "":
        raise SelftuneError("--output-dir is empty; name a folder for the run")
    if output_dir.is_symlink() and not output_dir.exists():
        raise SelftuneError(f"--output-dir {output_dir} is a broken symbolic link or a link "
                            "loop; choose another folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise SelftuneError(f"--output-dir {output_dir} exists and is not a folder")
    out = output_dir.expanduser().resolve()
    if _inside(Path.cwd().resolve(), out):
        raise SelftuneError(f"--output-dir {output_dir} is the current folder or holds it; "
                            "choose a folder of its own for the run (e.g. runs/NAME)")
    for name, value in _input_paths(config):
        path = Path(value).expanduser().resolve()
        if path == out and name == "model":
            raise SelftuneError(f"--output-dir {output_dir} is the --model directory: the run "
                                "would replace the model it starts from; choose another folder")
        if _inside(path, out):
            flag = "--" + name.replace("_", "-")
            raise SelftuneError(f"--output-dir {output_dir} holds the {flag} {value}, which "
                                "the run could overwrite or delete; choose another folder")


# Options naming what a run reads: none of them may lie inside its output folder.
INPUT_OPTIONS = ("model", "train_file", "validation_file", "data_dir")


def _input_paths(config: dict[str, Any]) -> list[tuple[str, str]]:
    paths = [(name, config[name]) for name in INPUT_OPTIONS
             if isinstance(config.get(name), str) and config[name]
             and (name != "model" or Path(config[name]).expanduser().exists())]
    teacher_files = config.get("teacher_predictions")
    if isinstance(teacher_files, str) and teacher_files:
        paths += [("teacher_predictions", item.split("=", 1)[-1])
                  for item in teacher_files.split(",") if item.strip()]
    return paths


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def is_run_folder(folder: Path) -> bool:
    """Whether selftune made ``folder`` for a run: it carries the marker, or (a folder of a
    version before markers) one of the files only selftune writes."""
    return (folder / MARKER_FILE).is_file() or any(
        (folder / name).is_file() for name in LEGACY_MARKERS) or any(
        folder.glob(f"{BAM_TEACHERS_DIR}/*/{RUN_CONFIG_FILE}"))


def read_marker(folder: Path) -> dict[str, Any]:
    """The folder's marker ({} when it has none or it cannot be read)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def write_marker(folder: Path, fingerprint: str | None) -> None:
    """Mark ``folder`` as a run's (first thing written into it); a resumed run keeps its id."""
    from selftune import __version__

    marker = read_marker(folder)
    if not marker.get("run_id"):
        marker = {"run_id": uuid.uuid4().hex, "selftune_version": __version__,
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if fingerprint:
        marker["data_fingerprint"] = fingerprint
    write_json_atomic(folder / MARKER_FILE, marker)


def check_same_data(folder: Path, fingerprint: str | None) -> None:
    """Refuse to resume a run whose training data changed since it started: the resumed half
    would train on other examples than the first."""
    saved = read_marker(folder).get("data_fingerprint")
    if fingerprint and saved and saved != fingerprint:
        raise SelftuneError(
            f"{folder} holds an unfinished run started on other training data (its fingerprint "
            f"in {MARKER_FILE} differs); run again with --no-resume to start over on this data")


def check_not_locked(output_dir: Path) -> None:
    """Stop at once when another process is writing ``output_dir``. (A shared lock, taken and
    dropped: the processes of one torchrun job, all checking at once, never stop each other.)"""
    if not (output_dir / LOCK_FILE).is_file() or output_dir.resolve() in _HELD_LOCKS:
        return
    with open(output_dir / LOCK_FILE) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "another process"
            raise SelftuneError(f"{output_dir} is being written by another run ({holder}); "
                                "wait for it to end or choose another --output-dir") from None


def acquire_run_lock(output_dir: Path) -> IO:
    """Take the folder's exclusive lock, or raise naming the process that holds it. The lock
    lives as long as the returned file is open (and dies with the process)."""
    lock = open(output_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SelftuneError(f"{output_dir} is being written by another run ({holder}); wait "
                            "for it to end or choose another --output-dir") from None
    lock.seek(0)
    lock.truncate()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    lock.flush()
    return lock


def release_run_lock(output_dir: Path, lock: IO) -> None:
    with contextlib.suppress(OSError):
        lock.seek(0)
        lock.truncate()
    lock.close()


# The run locks this process holds, by folder: released when the function that took them
# (lifecycle.run, for every single- and multi-task run, and run_bam, decorated with
# ``releases_run_locks``) returns or raises.
_HELD_LOCKS: dict[Path, IO] = {}


def hold_run_lock(output_dir: Path) -> None:
    key = output_dir.resolve()
    if key not in _HELD_LOCKS:
        _HELD_LOCKS[key] = acquire_run_lock(output_dir)


def releases_run_locks(function: Callable) -> Callable:
    """Release the run locks ``function`` took, however it ends (an in-process caller, a
    test or a notebook, may start another run on the same folder next)."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD_LOCKS)
        try:
            return function(*args, **kwargs)
        finally:
            for key in set(_HELD_LOCKS) - before:
                release_run_lock(key, _HELD_LOCKS.pop(key))
    return wrapper


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
    """Delete a run folder's content for --overwrite-output-dir, but only of a folder selftune
    made for a run (or an empty one): pointed by mistake at a folder of the user's own (".",
    a home folder, a dataset), the option must not wipe it. Only what the run wrote goes: a
    file the user put into the run folder makes the overwrite stop, naming it, before anything
    is deleted. Entries named in ``keep`` stay, and so does the lock file and (when held, or
    kept) the folder itself."""
    if not output_dir.exists():
        return
    check_selftune_folder(output_dir, "delete it")
    check_only_run_files(output_dir, keep)
    keep = (*keep, LOCK_FILE)
    if not any((output_dir / name).exists() for name in keep):
        shutil.rmtree(output_dir)
        return
    for entry in output_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# What a run writes at the top of its folder besides the files its final manifest lists: the
# folder's bookkeeping, its work in progress (checkpoints), and the parts of a recipe.
RUN_ENTRIES = frozenset({
    MARKER_FILE, LOCK_FILE, MANIFEST_FILE, RUN_CONFIG_FILE, LOG_FILE, METRICS_FILE,
    CHECKPOINTS, BENCH_RUN_FILE, BAM_SUMMARY_FILE, BAM_STUDENT_DIR, BAM_TEACHERS_DIR,
    BAM_FINETUNED_DIR})
# What an unfinished run (no manifest yet) may also have written: the files of a saved model
# folder (transformers' save_pretrained, the tokenizer, the model card, the Trainer's results),
# the sda teacher and a multi-task student's per-task models.
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "model*.safetensors",
                      "model.safetensors.index.json", "cls_stats.safetensors",
                      "snapshots.safetensors", "cls_norm", "tokenizer*", "special_tokens_map.json",
                      "vocab.*", "merges.txt", "added_tokens.json", "*.model",
                      "chat_template.jinja", "README.md", "*_results.json", "trainer_state.json",
                      "training_args.bin", "teacher", "tasks", "diagnostics.json")


# Written into a finished run's folder after its manifest: a teacher's cached predictions for
# its BAM! students (by `selftune bam` and `selftune bench`).
WRITTEN_AFTER_THE_RUN = ("train_predictions*.jsonl",)


def foreign_entries(folder: Path) -> list[str]:
    """The entries at the top of run folder ``folder`` its run did not write (a file the user
    put there): by its manifest when the run finished; by the names runs write otherwise.
    Folders of runs inside it (a recipe's stages) are looked into the same way."""
    try:
        listed = read_manifest(folder)
    except (OSError, ValueError):
        listed = None
    ours = {name.split("/", 1)[0] for name in listed} if listed is not None else set()
    foreign = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        temporary = name.startswith(".") and name.endswith(".tmp")
        if name in RUN_ENTRIES or name in ours or temporary:
            if entry.is_dir() and name in (BAM_TEACHERS_DIR, BAM_FINETUNED_DIR):
                foreign += [f"{name}/{stage.name}/{inner}" for stage in sorted(entry.iterdir())
                            if stage.is_dir() and is_run_folder(stage)
                            for inner in foreign_entries(stage)]
                foreign += [f"{name}/{stage.name}" for stage in sorted(entry.iterdir())
                            if not (stage.is_dir() or stage.name.startswith("."))]
            elif entry.is_dir() and name == BAM_STUDENT_DIR and is_run_folder(entry):
                foreign += [f"{name}/{inner}" for inner in foreign_entries(entry)]
            continue
        if any(fnmatch.fnmatch(name, pattern) for pattern in WRITTEN_AFTER_THE_RUN) or (
                listed is None and any(fnmatch.fnmatch(name, pattern)
                                       for pattern in MODEL_FOLDER_FILES)):
            continue
        foreign.append(name)
    return foreign


def check_only_run_files(output_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Refuse to delete a run folder holding something its run did not write."""
    foreign = [name for name in foreign_entries(output_dir) if name not in keep]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise SelftuneError(
            f"--output-dir {output_dir} holds {shown}, which its run did not write; "
            "--overwrite-output-dir deletes only a run's own files: move them elsewhere first")


def check_selftune_folder(output_dir: Path, action: str) -> None:
    """Refuse a non-empty folder selftune did not make for a run: pointed by mistake at a
    folder of the user's own (".", a home folder, the pretrained model's), a run would mix its
    files with the user's or replace them (a model directory's config.json and weights)."""
    if not output_dir.is_dir() or is_run_folder(output_dir):
        return
    if any(entry.name != LOCK_FILE for entry in output_dir.iterdir()):
        raise SelftuneError(
            f"--output-dir {output_dir} is not a selftune run folder (it has no {MARKER_FILE}) "
            f"and is not empty; refusing to {action}. Choose a new or empty --output-dir")


def prepare_output_dir(
    output_dir: Path, config: dict[str, Any], overwrite: bool, resume: bool,
    defaults: dict[str, Any] | None = None, fingerprint: str | None = None,
) -> Path | None:
    """Make the folder ready and hold its lock (until the decorated run function ends); mark
    it as the run's; return the checkpoint to resume from, if any."""
    check_output_location(output_dir, config)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SelftuneError(f"cannot write to --output-dir {output_dir}: {err.strerror}") from None
    hold_run_lock(output_dir)
    # Checked again under the lock: another run may have finished (or started) meanwhile.
    check_output_dir(output_dir, config, overwrite, resume, defaults)
    # --overwrite-output-dir replaces what cannot be resumed; an interrupted run of these same
    # options is resumed all the same, so rerunning a command after a crash loses nothing.
    if overwrite and (not resume or is_finished(output_dir)
                      or not _resumable(output_dir, config, defaults)
                      or not _same_data(output_dir, fingerprint)):
        remove_run_dir(output_dir)
    if resume:
        check_same_data(output_dir, fingerprint)
    elif (output_dir / CHECKPOINTS).exists():
        shutil.rmtree(output_dir / CHECKPOINTS)
    write_marker(output_dir, fingerprint)
    return last_checkpoint(output_dir) if resume else None


def open_recipe_folder(root: Path, config: dict[str, Any], overwrite: bool, hold: bool,
                       keep: tuple[str, ...] = ()) -> None:
    """The folder of a recipe of several runs (``selftune bam``): refused unless it is ours
    or empty; with ``hold``, locked for the recipe's life and marked; emptied (but ``keep``)
    with --overwrite-output-dir."""
    check_output_location(root, config)
    check_selftune_folder(root, "delete it" if overwrite else "write the recipe into it")
    if hold:
        root.mkdir(parents=True, exist_ok=True)
        hold_run_lock(root)
    if overwrite:
        remove_run_dir(root, keep)
    if hold:
        write_marker(root, None)


def _same_data(output_dir: Path, fingerprint: str | None) -> bool:
    try:
        check_same_data(output_dir, fingerprint)
    except SelftuneError:
        return False
    return True
