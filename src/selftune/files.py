"""Files written so that a crash never leaves half of one: a temporary name in the same
folder, flushed, then renamed over the final name. The lowest layer of the run folder: both
the folder logic (outputs.py) and the manifests (integrity.py) write through it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# The lock file held inside a run folder for the life of a run (outputs.py).
LOCK_FILE = ".selftune-run.lock"


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
