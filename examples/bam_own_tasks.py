"""BAM! on your own files: plain multi-task training ("Multi") against BAM! (the same student
distilled from single-task teachers), on three sentiment tasks given as your own csv, jsonl and
tsv files plus one registry task, then a side-by-side table of their dev scores.

    python examples/bam_own_tasks.py --data-dir ../shared/data            # one seed, ~15 min
    python examples/bam_own_tasks.py --data-dir ../shared/data --seeds 0-2 \
        --record benchmarks/bam_own_tasks.results.jsonl                   # the benchmark

It writes MR (csv), CR (jsonl, with an id column and its own column names) and MPQA (tsv) from
the raw files in --data-dir as a user's own train/dev files, with a task list naming them and the
registry task SST-2, into --work-dir; then runs ``selftune.bam`` twice per seed: once with
``teachers="none"`` (Multi) and once with ``teachers="auto"`` (BAM!: a teacher per task is
trained, its predictions cached, and the student learns from them with teacher annealing).
Everything resumes when run again. With --record, each run is appended as a line to a results
file; the table then also shows what the recorded seeds measured (mean ± std), so one seed can be
read against them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# The task list's own tasks: (name, source files in --data-dir, encoding).
OWN_TASKS = (
    ("movies", "mr/rt-polarity", "latin-1"),       # MR
    ("products", "cr/custrev", "ascii"),           # CR
    ("opinions", "mpqa/mpqa", "ascii"),            # MPQA
)
DEV_FRACTION = 0.1  # MR, CR and MPQA have no official split: a tenth of each is the dev set
REGISTRY_TASK = "sst2"
SPLIT_SEED = 0  # the train/dev split of the own files: the same for every run seed
RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "bam_own_tasks.results.jsonl"


def read_polarity_files(data_dir: Path, stem: str, encoding: str) -> list[tuple[str, int]]:
    """The sentences of ``<stem>.neg`` (label 0) and ``<stem>.pos`` (1), blank lines skipped."""
    rows = []
    for label, suffix in enumerate(("neg", "pos")):
        path = data_dir / f"{stem}.{suffix}"
        if not path.is_file():
            sys.exit(f"bam_own_tasks.py: {path} not found; --data-dir must hold mr/, cr/ and "
                     "mpqa/ (the shared benchmark data)")
        for line in path.read_text(encoding=encoding).splitlines():
            if line.strip():
                rows.append((" ".join(line.split()), label))
    return rows


def write_own_tasks(data_dir: Path, work_dir: Path) -> Path:
    """The three own tasks as a user would have them, each in another format, and the task
    list naming them with one registry task. Returns the task list's path."""
    for name, stem, encoding in OWN_TASKS:
        rows = read_polarity_files(data_dir, stem, encoding)
        random.Random(SPLIT_SEED).shuffle(rows)
        dev_size = round(len(rows) * DEV_FRACTION)
        splits = {"dev": rows[:dev_size], "train": rows[dev_size:]}
        folder = work_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, split_rows in splits.items():
            if name == "movies":  # csv, string labels
                table = io.StringIO(newline="")
                writer = csv.writer(table)
                writer.writerow(["sentence", "label"])
                writer.writerows((text, ("negative", "positive")[y]) for text, y in split_rows)
                write_if_changed(folder / f"{split}.csv", table.getvalue())
            elif name == "products":  # jsonl with an id column and its own column names
                write_if_changed(folder / f"{split}.jsonl", "".join(
                    json.dumps({"review_id": f"{split}-{i}", "review": text,
                                "sentiment": ("neg", "pos")[y]}) + "\n"
                    for i, (text, y) in enumerate(split_rows)))
            else:  # tsv: tab-separated, no quoting (the phrases hold no tabs)
                lines = ["phrase\tpolarity", *(f"{text}\t{y}" for text, y in split_rows)]
                write_if_changed(folder / f"{split}.tsv", "\n".join(lines) + "\n")
    task_list = work_dir / "tasks.yaml"
    write_if_changed(task_list, f"""\
tasks:
  - name: movies                   # MR, a csv file
    train_file: movies/train.csv
    validation_file: movies/dev.csv
    text_columns: sentence
  - name: products                 # CR, JSON Lines
    train_file: products/train.jsonl
    validation_file: products/dev.jsonl
    text_columns: review
    label_column: sentiment
    id_column: review_id
  - name: opinions                 # MPQA, tab-separated
    train_file: opinions/train.tsv
    validation_file: opinions/dev.tsv
    text_columns: phrase
    label_column: polarity
    label_type: classification
  - {REGISTRY_TASK}                 # a registry task, read from --data-dir
""")
    return task_list


def write_if_changed(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, and only when the content differs: runs of
    other seeds started beside this one may be reading the same files."""
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as file:
        file.write(text)
    os.replace(temporary, path)


def run_pair(seed: int, task_list: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Multi and BAM! for one seed: their per-task dev scores and wall times."""
    import selftune

    options = dict(tasks_file=str(task_list), data_dir=str(args.data_dir), model=args.model,
                   seed=seed, max_train_samples=args.max_train_samples,
                   max_seq_length=args.max_seq_length, num_train_epochs=args.epochs,
                   per_device_train_batch_size=32, teacher_epochs=args.epochs)
    results = {}
    for variant, teachers in (("multi", "none"), ("bam", "auto")):
        print(f"[seed {seed}] {variant}: training ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = selftune.bam(**options, teachers=teachers,
                              output_dir=str(args.work_dir / f"{variant}-seed{seed}"))
        results[variant] = {"scores": result.metrics["student"],
                            "average": result.metrics["student_average"],
                            "wall_time_s": round(time.perf_counter() - start, 1)}
        if "teachers" in result.metrics:
            results[variant]["teacher_scores"] = result.metrics["teachers"]
    return results


def record(path: Path, seed: int, results: dict[str, dict], args: argparse.Namespace) -> None:
    """Append one line per variant (runs found finished are recorded again only if absent)."""
    recorded = load_records(path)
    with open(path, "a", encoding="utf-8") as file:
        for variant, result in results.items():
            if any(r["seed"] == seed and r["variant"] == variant for r in recorded):
                continue
            file.write(json.dumps({
                "variant": variant, "seed": seed, **result,
                "options": {"max_train_samples": args.max_train_samples,
                            "max_seq_length": args.max_seq_length, "epochs": args.epochs,
                            "model": args.model},
                "threads": os.environ.get("OMP_NUM_THREADS", "all"),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_table(runs: dict[int, dict[str, dict]], recorded: list[dict]) -> None:
    """Per task, mean ± std over the seeds just run: BAM!'s single-task teachers, Multi, BAM!
    and BAM! - Multi; then what the recorded seeds measured for BAM! - Multi."""
    tasks = list(next(iter(runs.values()))["multi"]["scores"])
    recorded_pairs = [seed for seed in _by_seed(recorded).values()
                      if {"multi", "bam"} <= set(seed)]

    def scores(rows: list[dict], task: str | None, key: str = "scores") -> list[float]:
        if task is None:
            return [statistics.mean(row[key].values()) for row in rows]
        return [row[key][task] for row in rows]

    print(f"\n{'task':9} {'teachers':>15} {'Multi':>15} {'BAM!':>15} {'BAM! - Multi':>15}"
          + (f" {'recorded':>24}" if recorded_pairs else ""))
    for task in [*tasks, None]:
        teachers = scores([r["bam"] for r in runs.values()], task, "teacher_scores")
        multi = scores([r["multi"] for r in runs.values()], task)
        bam = scores([r["bam"] for r in runs.values()], task)
        gains = [b - m for m, b in zip(multi, bam, strict=True)]
        line = (f"{task or 'average':9} {mean_std(teachers):>15} {mean_std(multi):>15} "
                f"{mean_std(bam):>15} {mean_std(gains):>15}")
        if recorded_pairs:
            past = [b - m for m, b in zip(scores([p["multi"] for p in recorded_pairs], task),
                                          scores([p["bam"] for p in recorded_pairs], task),
                                          strict=True)]
            line += f" {mean_std(past) + f' ({len(past)} seeds)':>24}"
        print(line)
    print("\n'teachers': BAM!'s single-task teachers. BAM! helps when they are about as good as "
          "Multi; when multi-task training is itself the larger gain, Multi is the better "
          "choice.")
    if recorded_pairs:
        print(f"'recorded': BAM! - Multi over the seeds in {RECORDED.name} (BENCHMARKS.md, "
              "'BAM! on your own files'); one seed of your own varies by about that std.")


def _by_seed(records: list[dict]) -> dict[int, dict[str, dict]]:
    by_seed: dict[int, dict[str, dict]] = {}
    for record in records:
        by_seed.setdefault(record["seed"], {})[record["variant"]] = record
    return by_seed


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_data = os.environ.get("SELFTUNE_DATA", "../shared/data")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data),
                        help="Folder with mr/, cr/, mpqa/ and glue/SST-2/ (the shared data).")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bam_own_tasks"),
                        help="Where the task files and the runs go.")
    parser.add_argument("--seeds", default="0", help="Seeds, e.g. 0 or 0-2 or 0,3.")
    parser.add_argument("--model", default="default", help="Model id or folder.")
    parser.add_argument("--max-train-samples", type=int, default=2000,
                        help="Training examples per task (a fixed random subset).")
    parser.add_argument("--max-seq-length", type=int, default=64,
                        help="Tokens per example (these sentences are short).")
    parser.add_argument("--epochs", type=float, default=2.0,
                        help="Epochs of the teachers and of the student.")
    parser.add_argument("--record", type=Path, default=None,
                        help="Append each run to this results file (JSON Lines).")
    args = parser.parse_args()

    from selftune.errors import SelftuneError

    args.work_dir.mkdir(parents=True, exist_ok=True)
    task_list = write_own_tasks(args.data_dir, args.work_dir)
    runs = {}
    try:
        for seed in parse_seeds(args.seeds):
            runs[seed] = run_pair(seed, task_list, args)
            if args.record:
                record(args.record, seed, runs[seed], args)
    except SelftuneError as err:
        sys.exit(f"bam_own_tasks.py: {err}")
    print_table(runs, load_records(RECORDED))


if __name__ == "__main__":
    main()
