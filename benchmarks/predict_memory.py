"""Peak memory of `selftune predict` as the input grows: streaming keeps it flat.

For each N, writes N short rows to a temporary .csv, runs `selftune predict` on it in a child
process (the packaged default model, sentence-transformers/all-MiniLM-L6-v2, with a seeded
two-class head), and reports the child's peak RSS (getrusage of that one child, via wait4),
its wall time and rows/s, and the peak's ratio to the smallest N's:

    OMP_NUM_THREADS=1 python benchmarks/predict_memory.py --rows 10000 1000000

Nothing is downloaded (HF_HUB_OFFLINE=1). The child inherits OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a movie film plot actor story good great fine wonderful bad awful boring dull "
         "is was not very really quite and but it this that").split()


def make_classifier(folder: Path) -> Path:
    """The default model with a seeded, untrained two-class head (its predictions are
    arbitrary; only the cost is measured)."""
    import torch

    from selftune.data.tasks import custom_task
    from selftune.models.loading import load_for_training, load_tokenizer, resolve_model_path

    source = resolve_model_path(None)
    torch.manual_seed(0)
    model = load_for_training(source, custom_task("bench", 1, ("neg", "pos")))
    model.save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)
    return folder


def write_rows(path: Path, count: int) -> None:
    """``count`` short rows (3 to 8 words), the same for every run."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        for _ in range(count):
            writer.writerow([" ".join(rng.choices(WORDS, k=rng.randint(3, 8)))])


def wait_watching(child: subprocess.Popen, out: Path, rows: int, started: float,
                  every: float) -> tuple[int, Any]:
    """Wait for the child; its exit status and resource usage (wait4: of this one child, where
    RUSAGE_CHILDREN would be the maximum over every child waited for so far). With ``every``,
    a comment line every ``every`` seconds: rows written so far (to predict's temporary file
    beside ``out``) and the child's peak RSS so far (VmHWM), so that a run stopped early
    still shows how the peak grew with the rows done."""
    counted, offset, next_report = 0, 0, time.perf_counter() + every
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            return status, usage
        time.sleep(0.5)
        if every <= 0 or time.perf_counter() < next_report:
            continue
        next_report += every
        for tmp in out.parent.glob(f".{out.name}.*.tmp"):
            with open(tmp, "rb") as f:
                f.seek(offset)
                block = f.read()
            counted += block.count(b"\n")
            offset += len(block)
        status_text = Path(f"/proc/{child.pid}/status").read_text()
        peak_kb = next(int(line.split()[1]) for line in status_text.splitlines()
                       if line.startswith("VmHWM:"))
        print(f"#   {time.perf_counter() - started:7.0f} s: {counted:>9d} of {rows} rows "
              f"written, peak RSS so far {peak_kb / 1024:.1f} MB", flush=True)


def run_predict(model: Path, rows: int, workdir: Path, extra: list[str],
                report_every: float) -> dict:
    data = workdir / f"rows-{rows}.csv"
    out = workdir / f"predictions-{rows}.jsonl"
    write_rows(data, rows)
    command = [sys.executable, "-m", "selftune", "predict", str(model), "--input-file",
               str(data), "--output-file", str(out), "--quiet", *extra]
    started = time.perf_counter()
    errors_file = workdir / "stderr.txt"
    with open(errors_file, "w") as errors_out:
        child = subprocess.Popen(command, stderr=errors_out)
        status, usage = wait_watching(child, out, rows, started, report_every)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    errors = errors_file.read_text()
    if child.returncode != 0:
        raise SystemExit(f"predict on {rows} rows failed ({child.returncode}):\n{errors}")
    with open(out) as f:
        written = sum(1 for _ in f)
    if written != rows:
        raise SystemExit(f"predict wrote {written} rows for {rows}")
    data.unlink()
    out.unlink()
    # ru_maxrss is in kilobytes on Linux.
    return {"rows": rows, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall,
            "rows_per_s": rows / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000],
                        help="Input sizes, measured in this order.")
    parser.add_argument("--report-every", type=float, default=0,
                        help="Seconds between progress lines (rows done, peak so far); 0: "
                             "none.")
    parser.add_argument("--predict-args", default="",
                        help="Extra options for selftune predict (e.g. '--no-packing').")
    args = parser.parse_args()
    print(f"# selftune predict peak memory, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"python {sys.version.split()[0]}", flush=True)
    print("# rows  peak_rss_mb  wall_s  rows_per_s  peak/peak(first)", flush=True)
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        workdir = Path(tmp)
        model = make_classifier(workdir / "model")
        first = None
        for rows in args.rows:
            result = run_predict(model, rows, workdir, args.predict_args.split(),
                                 args.report_every)
            first = first or result["peak_rss_mb"]
            print(f"{rows:>9d}  {result['peak_rss_mb']:11.1f}  {result['wall_s']:7.1f}  "
                  f"{result['rows_per_s']:10.1f}  {result['peak_rss_mb'] / first:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
