"""Integrity of what selftune writes: manifests of checkpoints and finished run folders, the
checks a resume and a model load make, and finite weights.

Every checkpoint and every finished run folder gets a ``selftune-manifest.json``, written last,
listing each of its files with its size and sha256. A resume takes the newest checkpoint whose
files all match it (and that holds every state an exact resume needs); a corrupt or incomplete
newer one is set aside as ``corrupt-checkpoint-N`` and the log says so. With no good checkpoint
left the run stops with one line naming the bad file: the fix, ``--no-resume``, starts over
(so nothing the user may want to inspect is deleted without being asked). A checkpoint left
half-written by a kill (no ``trainer_state.json`` yet) is not corrupt, only unfinished: it is
ignored, as before.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError
from selftune.files import LOCK_FILE, write_json_atomic

logger = logging.getLogger("selftune")

MANIFEST_FILE = "selftune-manifest.json"
TRAINER_STATE = "trainer_state.json"
# What an exact resume needs besides the weights: optimizer, schedule, data order and dropout
# (rng), and the Trainer's own step count. (rng_state.pth, or rng_state_<rank>.pth under
# torchrun.)
RESUME_STATE = ("optimizer.pt", "scheduler.pt", TRAINER_STATE)
CORRUPT_PREFIX = "corrupt-"
# Written by the other processes of a torchrun run, maybe while the main one lists the
# checkpoint: a manifest would catch them half-written.
OTHER_PROCESSES_FILES = "rng_state_*.pth"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, skip: tuple[str, ...] = ()) -> None:
    """List every file under ``folder`` (but the top-level entries in ``skip``) with its size
    and sha256, in ``folder/selftune-manifest.json``, written atomically and last."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (not path.is_file() or relative.parts[0] in (*skip, MANIFEST_FILE, LOCK_FILE)
                or path.name.startswith(".") and path.name.endswith(".tmp")
                or fnmatch.fnmatch(path.name, OTHER_PROCESSES_FILES)):
            continue
        files[relative.as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_json_atomic(folder / MANIFEST_FILE, {"files": files})


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files a folder's manifest lists (None without a manifest; a manifest that cannot
    be read is reported as a problem by ``manifest_problem``)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError("no 'files' mapping")
    return files


def manifest_problem(folder: Path, missing_ok: bool = False,
                     suffix: str = "") -> str | None:
    """What is wrong with ``folder``'s files by its manifest (None: all match, or no
    manifest). ``missing_ok``: a listed file deleted since (a pruned folder) is no problem;
    ``suffix``: check only the files whose names end so."""
    try:
        files = read_manifest(folder)
    except (OSError, ValueError) as err:
        return f"{folder / MANIFEST_FILE} cannot be read ({err})"
    for name, entry in (files or {}).items():
        if not name.endswith(suffix):
            continue
        path = folder / name
        if not path.is_file():
            if missing_ok:
                continue
            return f"{path} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{path} is truncated or changed (size differs from {MANIFEST_FILE})"
        if file_sha256(path) != entry.get("sha256"):
            return f"{path} is corrupt (its sha256 differs from {MANIFEST_FILE})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file opens: a truncated file or a garbled header does not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError, OSError: the library's own report
        return f"{path} is truncated or not a safetensors file ({str(err).splitlines()[0]})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from exactly (None: it can)."""
    problem = manifest_problem(checkpoint)
    if problem:
        return problem
    for name in RESUME_STATE:
        if not (checkpoint / name).is_file():
            return f"{checkpoint / name} is missing"
    if not any(checkpoint.glob("rng_state*.pth")):
        return f"{checkpoint / 'rng_state.pth'} is missing (the resume would not be exact)"
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        return f"{checkpoint / TRAINER_STATE} cannot be read ({err})"
    for weights in sorted(checkpoint.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return problem
    if not any(checkpoint.glob("model*.safetensors")):
        return f"{checkpoint / 'model.safetensors'} is missing"
    if not (checkpoint / MANIFEST_FILE).is_file():  # an older checkpoint: no hash to compare
        return optimizer_problem(checkpoint / "optimizer.pt")
    return None


def optimizer_problem(path: Path) -> str | None:
    """Whether the optimizer state loads as plain tensors (as the Trainer will load it): a
    truncated file, or a pickle payload, does not."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (a truncated zip), EOFError
        return f"{path} cannot be loaded safely ({str(err).splitlines()[0][:120]})"
    return None


def _started(checkpoint: Path) -> bool:
    """Whether a checkpoint got as far as its trainer state (else: a kill mid-save)."""
    return (checkpoint / MANIFEST_FILE).is_file() or (checkpoint / TRAINER_STATE).is_file()


def newest_good_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``folder`` fit for an exact resume. Newer ones that are
    corrupt are set aside (renamed ``corrupt-checkpoint-N``) with a warning; when corrupt ones
    are all there is, stop naming the bad file."""
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("checkpoint-*")
                         if p.name.split("-")[-1].isdigit() and _started(p)),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    first_problem = None
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        first_problem = first_problem or problem
        aside = checkpoint.with_name(CORRUPT_PREFIX + checkpoint.name)
        logger.warning("Checkpoint %s cannot be resumed from: %s; set aside as %s", checkpoint,
                       problem, aside.name)
        checkpoint.rename(aside)
    if first_problem:
        raise SelftuneError(f"no intact checkpoint to resume from: {first_problem}; run again "
                            "with --no-resume to start over")
    return None


def check_model_files(path: Path) -> None:
    """Refuse a local model folder whose weights are corrupt: by its manifest when it has one
    (a folder written by selftune), and every safetensors file must open. (Only the weights
    are compared: a user may well edit config.json, e.g. its label names.)"""
    problem = manifest_problem(path, missing_ok=True, suffix=".safetensors")
    for weights in sorted(path.glob("*.safetensors")):
        problem = problem or safetensors_problem(weights)
    if problem:
        raise SelftuneError(f"{problem}; the model in {path} cannot be used: restore the file "
                            "or train the model again")


def check_finite_weights(model: Any, where: str) -> None:
    """Refuse weights holding NaN or infinity: every prediction of such a model is NaN."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SelftuneError(f"the model in {where} has NaN or infinite weights ({name}); "
                                "it cannot predict: train it again (a lower --learning-rate "
                                "or --nan-policy skip may help)")


def finite_or_none(value: float) -> float | None:
    """A probability or score as written to JSON: NaN and infinity (not JSON) become null."""
    return value if math.isfinite(value) else None
