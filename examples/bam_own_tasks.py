"""BAM! on your own files: plain multi-task training ("Multi") against BAM! (the same student
distilled from single-task teachers), on tasks given as your own csv, jsonl and tsv files plus one
registry task, then a side-by-side table of their dev scores.

    python examples/bam_own_tasks.py --data-dir ../shared/data            # one seed, ~12 min
    python examples/bam_own_tasks.py --data-dir ../shared/data --seeds 0-2 \
        --record benchmarks/bam_own_tasks.results.jsonl                   # the benchmark
    python examples/bam_own_tasks.py --data-dir ../shared/data --task-set mixed

It writes three tasks from the raw files in --data-dir as a user's own train/dev files, with a
task list naming them and a registry task, into --work-dir; then runs ``selftune.bam`` twice per
seed: once with ``teachers="none"`` (Multi) and once with ``teachers="auto"`` (BAM!: a teacher per
task is trained, its predictions cached, and the student learns from them with teacher
annealing). Two task sets (--task-set):

- ``sentiment`` (the default): movie reviews (MR, csv with string labels), product reviews (CR,
  JSON Lines with an id column and its own column names), opinion phrases (MPQA, tsv) and the
  registry task SST-2: four sentiment tasks that teach each other so much that single-task
  teachers fall behind the multi-task student;
- ``mixed``: news topics (AG News, csv with two text columns), CR and MPQA as above, and the
  registry task STS-B (sentence pairs, a regression): tasks that share less, with teachers
  trained longer, so that they are about as good as the multi-task student.

Everything resumes when run again. With --record, each run is appended as a line to a results
file; the table then also shows what the recorded seeds of the same task set measured
(mean ± std), so one seed can be read against them.
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
from dataclasses import dataclass
from pathlib import Path

DEV_FRACTION = 0.1  # these files have no official split: a tenth of each is the dev set
SPLIT_SEED = 0  # the train/dev split of the own files: the same for every run seed
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@dataclass(frozen=True)
class TaskSet:
    own: tuple[str, ...]  # own tasks, written from the shared data by write_own_task
    registry: str  # a registry task, read from --data-dir
    teacher_learning_rate: float
    teacher_epochs: float | None  # None: --epochs, as the student
    recorded: Path  # what the benchmark recorded for this set (BENCHMARKS.md)

    def teacher_options(self, epochs: float) -> dict[str, float]:
        """``selftune.bam``'s options for the teachers (``epochs``: the student's)."""
        return {"teacher_learning_rate": self.teacher_learning_rate,
                "teacher_epochs": self.teacher_epochs or epochs}


TASK_SETS = {
    # Teachers at the student's learning rate and for 3 epochs: at 2,000 examples a teacher
    # makes 125-190 updates, and BAM! presumes teachers about as good as the Multi student.
    "mixed": TaskSet(("news", "products", "opinions"), "stsb", 1e-4, 3.0,
                     BENCHMARKS / "bam_own_tasks_mixed.results.jsonl"),
    "sentiment": TaskSet(("movies", "products", "opinions"), "sst2", 5e-5, None,
                         BENCHMARKS / "bam_own_tasks.results.jsonl"),
}

# Each own task's entry in the task list (paths relative to the list).
TASK_LIST_ENTRIES = {
    "movies": """\
  - name: movies                   # MR, a csv file
    train_file: movies/train.csv
    validation_file: movies/dev.csv
    text_columns: sentence
""",
    "news": """\
  - name: news                     # AG News, a csv file with two text columns
    train_file: news/train.csv
    validation_file: news/dev.csv
    text_columns: title,description
    label_column: topic
""",
    "products": """\
  - name: products                 # CR, JSON Lines
    train_file: products/train.jsonl
    validation_file: products/dev.jsonl
    text_columns: review
    label_column: sentiment
    id_column: review_id
""",
    "opinions": """\
  - name: opinions                 # MPQA, tab-separated
    train_file: opinions/train.tsv
    validation_file: opinions/dev.tsv
    text_columns: phrase
    label_column: polarity
    label_type: classification
""",
}


def missing_data(path: Path) -> None:
    sys.exit(f"bam_own_tasks.py: {path} not found; --data-dir must hold ag_news/, mr/, cr/ and "
             "mpqa/ (the shared benchmark data)")


def read_polarity_files(data_dir: Path, stem: str, encoding: str) -> list[tuple[str, int]]:
    """The sentences of ``<stem>.neg`` (label 0) and ``<stem>.pos`` (1), blank lines skipped."""
    rows = []
    for label, suffix in enumerate(("neg", "pos")):
        path = data_dir / f"{stem}.{suffix}"
        if not path.is_file():
            missing_data(path)
        for line in path.read_text(encoding=encoding).splitlines():
            if line.strip():
                rows.append((" ".join(line.split()), label))
    return rows


def read_news(data_dir: Path) -> list[tuple[str, str, str]]:
    """AG News (its official test split, the only one in the shared data): (title,
    description, topic) rows. A backslash in its text stands for a line break."""
    path = data_dir / "ag_news" / "test.csv"
    if not path.is_file():
        missing_data(path)
    topics = ("World", "Sports", "Business", "Sci/Tech")  # ag_news/classes.txt, classes 1-4
    with open(path, encoding="utf-8", newline="") as file:
        return [(title.replace("\\", " "), text.replace("\\", " "), topics[int(topic) - 1])
                for topic, title, text in csv.reader(file)]


def split_rows(rows: list) -> dict[str, list]:
    rows = list(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    dev_size = round(len(rows) * DEV_FRACTION)
    return {"dev": rows[:dev_size], "train": rows[dev_size:]}


def csv_text(header: list[str], rows: list) -> str:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows(rows)
    return table.getvalue()


def write_own_task(name: str, data_dir: Path, folder: Path) -> None:
    """One own task as a user would have it, each in another format."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "news":  # csv, two text columns, string labels
        for split, rows in split_rows(read_news(data_dir)).items():
            write_if_changed(folder / f"{split}.csv",
                             csv_text(["title", "description", "topic"], rows))
    elif name == "movies":  # csv, string labels
        rows = read_polarity_files(data_dir, "mr/rt-polarity", "latin-1")
        for split, part in split_rows(rows).items():
            write_if_changed(folder / f"{split}.csv", csv_text(
                ["sentence", "label"], [(text, ("negative", "positive")[y]) for text, y in part]))
    elif name == "products":  # jsonl with an id column and its own column names
        rows = read_polarity_files(data_dir, "cr/custrev", "ascii")
        for split, part in split_rows(rows).items():
            write_if_changed(folder / f"{split}.jsonl", "".join(
                json.dumps({"review_id": f"{split}-{i}", "review": text,
                            "sentiment": ("neg", "pos")[y]}) + "\n"
                for i, (text, y) in enumerate(part)))
    else:  # opinions, tsv: tab-separated, no quoting (the phrases hold no tabs)
        rows = read_polarity_files(data_dir, "mpqa/mpqa", "ascii")
        for split, part in split_rows(rows).items():
            lines = ["phrase\tpolarity", *(f"{text}\t{y}" for text, y in part)]
            write_if_changed(folder / f"{split}.tsv", "\n".join(lines) + "\n")


def write_own_tasks(task_set: TaskSet, data_dir: Path, work_dir: Path) -> Path:
    """The set's own tasks and the task list naming them with its registry task. Returns the
    task list's path."""
    for name in task_set.own:
        write_own_task(name, data_dir, work_dir / name)
    task_list = work_dir / "tasks.yaml"
    write_if_changed(task_list, "tasks:\n" + "".join(TASK_LIST_ENTRIES[name]
                                                     for name in task_set.own)
                     + f"  - {task_set.registry}                 # a registry task\n")
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
                   per_device_train_batch_size=32,
                   **TASK_SETS[args.task_set].teacher_options(args.epochs))
    results = {}
    for variant, teachers in (("multi", "none"), ("bam", "auto")):
        print(f"[seed {seed}] {variant}: training ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = selftune.bam(**options, teachers=teachers,
                              output_dir=str(task_list.parent / f"{variant}-seed{seed}"))
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
                "options": {"task_set": args.task_set,
                            "max_train_samples": args.max_train_samples,
                            "max_seq_length": args.max_seq_length, "epochs": args.epochs,
                            **TASK_SETS[args.task_set].teacher_options(args.epochs),
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


def print_table(runs: dict[int, dict[str, dict]], recorded_path: Path) -> None:
    """Per task, mean ± std over the seeds just run: BAM!'s single-task teachers, Multi, BAM!
    and BAM! - Multi; then what the recorded seeds measured for BAM! - Multi."""
    tasks = list(next(iter(runs.values()))["multi"]["scores"])
    recorded_pairs = [seed for seed in _by_seed(load_records(recorded_path)).values()
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
    print("\n'teachers': BAM!'s single-task teachers. On small tasks of one's own (2,000 examples "
          "each) BAM! has not beaten Multi in our measurements, whether its teachers were below "
          "Multi (--task-set sentiment) or level with it (mixed); its measured gain is on four "
          "GLUE tasks at full size (BENCHMARKS.md, 'BAM!').")
    if recorded_pairs:
        print(f"'recorded': BAM! - Multi over the seeds in {recorded_path.name} (BENCHMARKS.md, "
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
                        help="Folder with ag_news/, mr/, cr/, mpqa/ and glue/ (the shared data).")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bam_own_tasks"),
                        help="Where the task files and the runs go (in a folder per task set).")
    parser.add_argument("--task-set", choices=sorted(TASK_SETS), default="sentiment",
                        help="sentiment: movie reviews, product reviews, opinion phrases and "
                             "SST-2; mixed: news topics, product reviews, opinion phrases and "
                             "STS-B, with teachers trained longer (see the module docstring).")
    parser.add_argument("--seeds", default="0", help="Seeds, e.g. 0 or 0-2 or 0,3.")
    parser.add_argument("--model", default="default", help="Model id or folder.")
    parser.add_argument("--max-train-samples", type=int, default=2000,
                        help="Training examples per task (a fixed random subset).")
    parser.add_argument("--max-seq-length", type=int, default=64,
                        help="Tokens per example (these sentences are short).")
    parser.add_argument("--epochs", type=float, default=2.0,
                        help="Epochs of the student (and of the teachers in the sentiment set; "
                             "the mixed set's teachers train for 3).")
    parser.add_argument("--record", type=Path, default=None,
                        help="Append each run to this results file (JSON Lines).")
    args = parser.parse_args()

    from selftune.errors import SelftuneError

    task_set = TASK_SETS[args.task_set]
    task_list = write_own_tasks(task_set, args.data_dir, args.work_dir / args.task_set)
    runs = {}
    try:
        for seed in parse_seeds(args.seeds):
            runs[seed] = run_pair(seed, task_list, args)
            if args.record:
                record(args.record, seed, runs[seed], args)
    except SelftuneError as err:
        sys.exit(f"bam_own_tasks.py: {err}")
    print_table(runs, task_set.recorded)


if __name__ == "__main__":
    main()
