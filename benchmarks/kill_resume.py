"""Kill `selftune train` with SIGKILL at random moments, resume it, compare with a clean run.

Each trial starts the run, kills it after a random delay, restarts the same command (which
resumes from the last checkpoint) until it finishes, then compares the final dev metrics and
the logits of the saved model (and teacher) with an uninterrupted run. Prints one line per trial
and the count of trials that match (metrics equal, logits within --atol).

    python benchmarks/kill_resume.py --task rte --data-dir ../shared/data --strategy sda \
        --max-train-samples 512 --save-steps 4 --trials 10 --work-dir runs/kill_resume
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def train_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "selftune", "train", "--task", args.task,
            "--data-dir", args.data_dir, "--model", args.model, "--strategy", args.strategy,
            "--seed", str(args.seed), "--num-train-epochs", str(args.epochs),
            "--max-train-samples", str(args.max_train_samples),
            "--max-eval-samples", str(args.max_eval_samples),
            "--per-device-train-batch-size", str(args.batch_size),
            "--save-steps", str(args.save_steps), "--output-dir", str(out)]


def logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer

    from selftune.models.loading import load_finetuned

    model = load_finetuned(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")).logits.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--strategy", default="baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-train-samples", type=int, default=512)
    parser.add_argument("--max-eval-samples", type=int, default=64)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--min-delay", type=float, default=10.0,
                        help="Earliest kill, seconds after the start (model loading included).")
    parser.add_argument("--max-delay", type=float,
                        help="Latest kill (default: 90%% of the uninterrupted run's duration, so "
                             "every trial is killed while training).")
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--work-dir", default="runs/kill_resume")
    args = parser.parse_args()

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(args.seed)
    reference = work / "reference"
    reference_started = time.time()
    subprocess.run(train_command(args, reference), check=True, capture_output=True)
    max_delay = args.max_delay or 0.9 * (time.time() - reference_started)
    print(f"uninterrupted run: {time.time() - reference_started:.1f}s; kills drawn from "
          f"[{args.min_delay:.0f}s, {max_delay:.0f}s]", flush=True)
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    texts = ["A man is playing a guitar.", "The cat sat on the mat.", "Nobody came.",
             "It rained all day in the city."]
    parts = [""] + (["teacher"] if (reference / "teacher").is_dir() else [])
    ref_logits = {p: logits(reference / p, texts) for p in parts}

    matches = 0
    for trial in range(1, args.trials + 1):
        out = work / f"trial-{trial}"
        delay = rng.uniform(args.min_delay, max_delay)
        proc = subprocess.Popen(train_command(args, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) \
            if (out / "checkpoints").is_dir() else []
        restarts = 0
        while not (out / "metrics.json").is_file() and restarts < 3:
            subprocess.run(train_command(args, out), check=False, capture_output=True)
            restarts += 1
        if not (out / "metrics.json").is_file():
            print(f"trial {trial}: did not finish after {restarts} restarts")
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        diffs = {p: float(np.abs(logits(out / p, texts) - ref_logits[p]).max()) for p in parts}
        ok = metrics["metrics"] == ref_metrics["metrics"] and \
            metrics.get("teacher_metrics") == ref_metrics.get("teacher_metrics") and \
            all(d <= args.atol for d in diffs.values())
        matches += ok
        shown = ", ".join(f"{p or 'student'} {d:.2e}" for p, d in diffs.items())
        state = "killed" if killed else "had finished"
        print(f"trial {trial}: {state} after {delay:.1f}s (checkpoints then: "
              f"{checkpoints or 'none'}), resumed from {metrics.get('resumed_from')}; "
              f"max |Δlogit| {shown}: {'MATCH' if ok else 'DIFFERENT'}", flush=True)
    print(f"{matches}/{args.trials} interrupted runs ended identical to the uninterrupted run")


if __name__ == "__main__":
    main()
