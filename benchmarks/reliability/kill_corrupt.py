"""Kill `selftune train` at a random moment, corrupt its newest checkpoint at random, resume.

Each trial starts the same short run (a tiny random BERT, sda, 160 steps, a checkpoint every
10), SIGKILLs it at a random moment while it trains (a random part of the time between two
checkpoints after one drawn at random has begun: mid-save kills included), then damages one
file of the newest checkpoint (truncated to a random length, a few bytes flipped, or deleted;
the file and the damage drawn at random) and runs the same command again. A trial passes when
the run either

- ends identical to an uninterrupted run of the same options (dev metrics equal, every tensor
  of the student and of the sda teacher bit-identical), or
- stops with exit status 2 and one line ``selftune: error: ...`` naming the damaged file, no
  traceback, and the fix that line gives (``--no-resume``) then ends identical too.

Prints one line per trial and the count of passing trials. Everything is drawn from one
master seed (``--seed``), so a rerun draws the same kills and damages (a kill lands at the
same delay after the same checkpoint, not necessarily at the same step: the machine decides
how far the run got; a run that finished before its kill is drawn again).

    OMP_NUM_THREADS=1 python benchmarks/reliability/kill_corrupt.py --trials 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_inputs(work: Path) -> tuple[Path, Path, Path]:
    """A tiny random BERT and a small sentiment task, as the tests use (tests/conftest.py)."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_tiny_model, sentiment_rows, write_csv

    model = make_tiny_model(work / "model")
    train = write_csv(work / "train.csv", ["text", "label"], sentiment_rows(640, 0))
    dev = write_csv(work / "dev.csv", ["text", "label"], sentiment_rows(32, 1))
    return model, train, dev


def train_command(inputs: tuple[Path, Path, Path], out: Path, *extra: str) -> list[str]:
    model, train, dev = inputs
    return [sys.executable, "-m", "selftune", "train", "--train-file", str(train),
            "--validation-file", str(dev), "--model", str(model), "--output-dir", str(out),
            "--strategy", "sda", "--seed", "1", "--num-train-epochs", "2",
            "--per-device-train-batch-size", "8", "--learning-rate", "1e-3",
            "--save-steps", str(SAVE_STEPS), *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=ENV)


STEPS, SAVE_STEPS = 160, 10  # 640 examples, batches of 8, two epochs
CHECKPOINTS = STEPS // SAVE_STEPS
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def same_as_reference(out: Path, reference: Path) -> str | None:
    """None when ``out`` ended as the reference did; else what differs."""
    import torch

    if not (out / "metrics.json").is_file():
        return "no metrics.json"
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    for key in ("metrics", "teacher_metrics", "global_steps"):
        if got.get(key) != want.get(key):
            return f"{key} differ: {got.get(key)} vs {want.get(key)}"
    for part in ("", "teacher"):
        a, b = tensors(out / part), tensors(reference / part)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return f"{part or 'student'} weights differ"
    return None


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name[11:]) if checkpoint else 0


def newest_checkpoint(out: Path, holding_files: bool = False) -> Path | None:
    found = [p for p in (out / "checkpoints").glob("checkpoint-*") if p.name[11:].isdigit()
             and (not holding_files or any(f.is_file() for f in p.rglob("*")))]
    return max(found, key=lambda p: int(p.name[11:]), default=None)


def damage(checkpoint: Path, rng: random.Random) -> tuple[Path, str]:
    """Truncate, flip bytes in or delete one file of ``checkpoint``, drawn at random: the
    file, and what was done to it."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    target = rng.choice(files)
    kind = rng.choice(["truncate", "flip", "delete"])
    data = bytearray(target.read_bytes())
    if kind == "truncate":
        size = rng.randrange(len(data)) if data else 0
        target.write_bytes(bytes(data[:size]))
        done = f"truncated {target.name} from {len(data)} to {size} bytes"
    elif kind == "flip" and data:
        offsets = sorted(rng.sample(range(len(data)), min(len(data), rng.randint(1, 8))))
        for offset in offsets:
            data[offset] ^= rng.randint(1, 255)
        target.write_bytes(bytes(data))
        done = f"flipped {len(offsets)} byte(s) of {target.name} ({len(data)} bytes)"
    else:
        target.unlink()
        done = f"deleted {target.name}"
    return target, f"{checkpoint.name}: {done}"


def one_line_error(proc: subprocess.CompletedProcess, names: str) -> str | None:
    """None when ``proc`` stopped as a user error should, naming ``names``; else what's wrong."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("selftune: error:")]
    if proc.returncode != 2:
        return f"exit {proc.returncode}: {proc.stderr[-500:]}"
    if "Traceback" in proc.stderr or len(lines) != 1:
        return f"not one line: {proc.stderr[-500:]}"
    if names not in lines[0]:
        return f"does not name {names}: {lines[0]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="The master seed of every draw.")
    parser.add_argument("--work-dir", default="runs/kill_corrupt")
    args = parser.parse_args()

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    inputs = make_inputs(work)
    reference = work / "reference"
    started = time.time()
    child = subprocess.Popen(train_command(inputs, reference), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    while child.poll() is None and newest_checkpoint(reference) is None:
        time.sleep(0.05)
    first_checkpoint = time.time()
    while child.poll() is None and not (reference / "metrics.json").is_file():
        time.sleep(0.05)
    _, stderr = child.communicate()
    assert child.returncode == 0, stderr[-2000:]
    # The time between two checkpoints, roughly (the first checkpoint to the end is
    # CHECKPOINTS of them: the others, then the last steps and the final evaluation).
    interval = (time.time() - first_checkpoint) / CHECKPOINTS
    print(f"uninterrupted run: {time.time() - started:.1f}s, "
          f"{json.loads((reference / 'metrics.json').read_text())['global_steps']} steps, "
          f"a checkpoint every {SAVE_STEPS} steps (~{interval:.2f}s apart)", flush=True)

    passed = 0
    for trial in range(1, args.trials + 1):
        out = work / f"trial-{trial}"
        for _attempt in range(3):  # a run that finished before its kill is drawn again
            shutil.rmtree(out, ignore_errors=True)
            # A random moment while training: after a checkpoint drawn at random has begun,
            # a random part of the time to the next one (a kill mid-save included).
            after = SAVE_STEPS * rng.randint(1, CHECKPOINTS - 1)
            delay = rng.uniform(0.0, interval)
            child = subprocess.Popen(train_command(inputs, out), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=ENV)
            while child.poll() is None and step_of(newest_checkpoint(out)) < after:
                time.sleep(0.02)
            time.sleep(delay)
            killed = child.poll() is None and not (out / "metrics.json").is_file()
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()
            if killed:
                break
        if not killed:
            print(f"trial {trial}: the run finished before every kill drawn: FAIL", flush=True)
            continue
        # (A kill right after a checkpoint's folder was made leaves it empty: the newest one
        # holding a file is damaged then.)
        checkpoint = newest_checkpoint(out, holding_files=True)
        target, damaged = damage(checkpoint, rng) if checkpoint else (None, "nothing to damage")
        resumed = run(train_command(inputs, out))
        if resumed.returncode == 0:
            problem = same_as_reference(out, reference)
            metrics = json.loads((out / "metrics.json").read_text())
            how = (f"resumed from {Path(metrics['resumed_from']).name}" if metrics["resumed_from"]
                   else "started over (no complete checkpoint)")
        else:
            problem = one_line_error(resumed, target.relative_to(out).as_posix()) if target \
                else f"exit {resumed.returncode}"
            error = resumed.stderr.strip().splitlines()[-1] if resumed.stderr.strip() else ""
            how = f"stopped: {error!r}"
            if problem is None:
                fixed = run(train_command(inputs, out, "--no-resume"))
                problem = (same_as_reference(out, reference) if fixed.returncode == 0
                           else f"--no-resume failed: {fixed.stderr[-500:]}")
                how += "; with --no-resume"
        passed += problem is None
        print(f"trial {trial}: killed {delay:.2f}s after checkpoint-{after} began; {damaged}; "
              f"{how}: {'PASS' if problem is None else 'FAIL (' + problem + ')'}", flush=True)
    print(f"{passed}/{args.trials} trials ended identical to the uninterrupted run or stopped "
          "with one line naming the damaged file (and then ended identical with its fix)")


if __name__ == "__main__":
    main()
