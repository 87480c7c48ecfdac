"""selftune against the run_glue-style peer, side by side: the same examples, alternating runs.

For each task and repeat, runs `selftune train` and `benchmarks/peer_run_glue.py` (a plain
`Trainer`, every batch padded to 128) one after the other, the order alternating between
repeats, on the same fixed subset and number of epochs, and prints the median training time
(evaluation excluded), wall time (loading and tokenization included), examples/s and peak memory
of each, and their ratio. Finished runs are kept in --work-dir and skipped on a restart. Run it
alone on the machine.

    python benchmarks/peer_timing.py --tasks rte,mrpc,stsb,cola,sst2 --data-dir ../shared/data \
        --max-train-samples 1000 --epochs 1 --repeats 3 --selftune-args=--group-by-length
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def command(runner: str, task: str, out: Path, args: argparse.Namespace) -> list[str]:
    if runner == "selftune":
        return [sys.executable, "-m", "selftune", "train", "--task", task, "--data-dir",
                args.data_dir, "--seed", "0", "--max-train-samples",
                str(args.max_train_samples), "--num-train-epochs", str(args.epochs),
                "--output-dir", str(out), "--overwrite-output-dir", *args.selftune_args.split()]
    return [sys.executable, str(HERE / "peer_run_glue.py"), "--task", task, "--data-dir",
            args.data_dir, "--seed", "0", "--max-train-samples", str(args.max_train_samples),
            "--epochs", str(args.epochs), "--output-dir", str(out), "--save-steps", "0"]


def measure(runner: str, task: str, repeat: int, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / task / f"{runner}-{repeat}"
    if not (out / "metrics.json").is_file():
        subprocess.run(command(runner, task, out, args), check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads((out / "metrics.json").read_text())
    return {"train_s": result["train_time_s"], "wall_s": result["wall_time_s"],
            "examples_per_s": result["train_examples_per_s"],
            "peak_mb": result["peak_memory_mb"], "score": result["score"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="runs/peer_timing")
    parser.add_argument("--selftune-args", default="",
                        help="Extra options of the selftune runs, given with '=': "
                             "--selftune-args=--group-by-length.")
    args = parser.parse_args()

    print(f"{args.max_train_samples} training examples, {args.epochs:g} epoch(s), batch 32, "
          f"seed 0; medians over {args.repeats} alternating repeats; selftune options: "
          f"{args.selftune_args or 'defaults'}\n")
    print("| task | selftune train (s) | peer train (s) | train-time ratio | selftune wall (s) "
          "| peer wall (s) | wall ratio | examples/s selftune / peer | peak MB selftune / peer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for task in args.tasks.split(","):
        runs: dict[str, list[dict]] = {"selftune": [], "peer": []}
        for repeat in range(args.repeats):
            order = ("selftune", "peer") if repeat % 2 == 0 else ("peer", "selftune")
            for runner in order:
                runs[runner].append(measure(runner, task, repeat, args))

        def median(runner: str, key: str, runs: dict[str, list[dict]] = runs) -> float:
            return statistics.median(r[key] for r in runs[runner])

        ours, peer = "selftune", "peer"
        print(f"| {task} | {median(ours, 'train_s'):.1f} | {median(peer, 'train_s'):.1f} | "
              f"{median(ours, 'train_s') / median(peer, 'train_s'):.2f} | "
              f"{median(ours, 'wall_s'):.1f} | {median(peer, 'wall_s'):.1f} | "
              f"{median(ours, 'wall_s') / median(peer, 'wall_s'):.2f} | "
              f"{median(ours, 'examples_per_s'):.1f} / {median(peer, 'examples_per_s'):.1f} | "
              f"{median(ours, 'peak_mb'):.0f} / {median(peer, 'peak_mb'):.0f} |", flush=True)


if __name__ == "__main__":
    main()
