"""One process against two (torchrun, gloo) with the same global batch, on a real task.

Runs `selftune train` once with `--per-device-train-batch-size B` in one process and once with
B/2 in each of two processes, for each strategy, and prints the optimizer steps, the dev metrics
and the largest difference between the two final models' dev logits. Dropout draws different
masks when the batch is split, so the two runs agree within seed noise, not to rounding (the
test suite checks rounding-level agreement on a model without dropout).

    python benchmarks/two_processes.py --task rte --data-dir ../shared/data \
        --strategies baseline,sda --max-train-samples 512 --work-dir runs/two_processes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def run(args: argparse.Namespace, strategy: str, processes: int, out: Path) -> dict:
    if not (out / "metrics.json").is_file():
        launcher = [sys.executable, "-m", "selftune"] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-port", "29611", "-m", "selftune"]
        command = launcher + [
            "train", "--task", args.task, "--data-dir", args.data_dir, "--strategy", strategy,
            "--seed", "0", "--max-train-samples", str(args.max_train_samples),
            "--num-train-epochs", str(args.epochs),
            "--per-device-train-batch-size", str(args.batch_size // processes),
            "--output-dir", str(out), "--overwrite-output-dir"]
        # torchrun gives each of the two processes one thread (OMP_NUM_THREADS=1).
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env, capture_output=True)
    return json.loads((out / "metrics.json").read_text())


def dev_logits(model_dir: Path, task: str, data_dir: str) -> np.ndarray:
    from selftune.data.loading import DataOptions, load_task_data
    from selftune.evaluation import predict_logits
    from selftune.models.loading import load_finetuned, load_tokenizer

    data = load_task_data(DataOptions(task=task, data_dir=data_dir), include_train=False)
    records = next(iter(data.eval_splits.values()))
    return predict_logits(load_finetuned(str(model_dir)), load_tokenizer(str(model_dir)),
                          records, 128, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--strategies", default="baseline,sda")
    parser.add_argument("--max-train-samples", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="The global batch.")
    parser.add_argument("--work-dir", default="runs/two_processes")
    args = parser.parse_args()

    print("| strategy | processes × batch | optimizer steps | dev metrics | wall time (s) | "
          "max abs Δ dev logit |\n|---|---|---:|---|---:|---:|")
    for strategy in args.strategies.split(","):
        one_dir = Path(args.work_dir) / f"{strategy}-1proc"
        two_dir = Path(args.work_dir) / f"{strategy}-2proc"
        one, two = run(args, strategy, 1, one_dir), run(args, strategy, 2, two_dir)
        diff = float(np.abs(dev_logits(one_dir, args.task, args.data_dir)
                            - dev_logits(two_dir, args.task, args.data_dir)).max())
        for label, result in ((f"1 × {args.batch_size}", one),
                              (f"2 × {args.batch_size // 2}", two)):
            metrics = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
            shown = f"{diff:.3g}" if result is two else "–"
            print(f"| {strategy} | {label} | {result['global_steps']} | {metrics} | "
                  f"{result['wall_time_s']:.0f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
