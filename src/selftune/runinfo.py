"""What a result needs to be reproducible and comparable: package versions, machine, memory."""

from __future__ import annotations

import functools
import os
import platform
import resource
import socket
import sys
from datetime import UTC, datetime
from importlib import metadata


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory if larger."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    peak = rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20
    import torch

    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return peak


@functools.cache  # read once per process: the deadline asks for it per planned run
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    versions = {}
    for package in ("selftune", "torch", "transformers", "datasets", "accelerate", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    return {
        "versions": {"python": platform.python_version(), **versions},
        "machine": {
            "hostname": socket.gethostname(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
