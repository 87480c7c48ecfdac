"""Evaluate a saved model on a task's dev split, and predict labels for a file."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selftune.data.features import tokenize_records
from selftune.data.loading import DataOptions, load_task_data, parse_text_columns
from selftune.data.readers import Record, iter_user_records, label_text, regression_label
from selftune.data.tasks import TASKS, TaskSpec, custom_task
from selftune.errors import SelftuneError
from selftune.integrity import finite_or_none
from selftune.metrics import metrics_from_predictions, predictions_from_logits
from selftune.models.loading import (
    check_sequence_length,
    load_finetuned,
    load_tokenizer,
    model_label_names,
)
from selftune.models.packed import enable_packing, packing_collator

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("selftune")


def predict_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record],
    max_seq_length: int,
    batch_size: int, with_labels: bool = False, packing: bool = True, progress: bool = True,
) -> np.ndarray:
    """Logits for ``records`` in eval mode, in batches with dynamic padding (or packed, see
    ``selftune.models.packed``). ``progress=False``: no progress bars (the caller streams
    chunks and shows its own)."""
    check_sequence_length(max_seq_length, model)
    enable_packing(model, packing)
    dataset = tokenize_records(records, tokenizer, max_seq_length, with_labels=with_labels,
                               progress=progress)
    return dataset_logits(model, tokenizer, dataset, batch_size, packing, progress=progress)


def dataset_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   dataset: datasets.Dataset, batch_size: int, packing: bool = True,
                   progress: bool = True) -> np.ndarray:
    """Logits for an already tokenized dataset (eval mode, no_grad, dynamic padding; packed
    rows if ``packing`` and the model's packing is enabled).

    A plain loop on purpose: inside a ``torchrun`` job a ``Trainer`` would shard and gather the
    predictions across processes, but these are one process's own (e.g. the main process
    caching a teacher's predictions while the others wait).
    """
    collate = packing_collator(model, tokenizer, packing=packing)
    columns = [c for c in dataset.column_names if c in tokenizer.model_input_names]
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size,
                        collate_fn=collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="Predicting",
                          disable=not progress or len(dataset) < 2000):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            outputs.append(logits.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs).astype(np.float64)


def check_task_matches(task: TaskSpec, labels: tuple[str, ...] | None,
                       model_dir: Path | str) -> None:
    """Refuse a model whose outputs are not the task's: kind, number and order of classes."""
    if (labels is None) != task.is_regression:
        kind = "a regression" if labels is None else "a classifier"
        raise SelftuneError(f"{model_dir} is {kind} but task {task.name} is not")
    if labels is not None and task.label_names is not None and len(labels) != task.num_labels:
        raise SelftuneError(f"{model_dir} predicts {len(labels)} classes {list(labels)}, task "
                            f"{task.name} has {task.num_labels} {list(task.label_names)}")
    check_label_order(model_dir, task, labels)


def check_label_order(model_dir: Path | str, task: TaskSpec,
                      labels: tuple[str, ...] | None) -> None:
    """A model trained elsewhere may order the task's classes differently (MNLI checkpoints
    often do): its predictions (a teacher's soft targets, or what `evaluate` scores) would
    then be silently permuted, so the task's own names in another order are refused, and so
    are the classes of another registry task (an RTE model scored on MRPC). Other names
    (LABEL_0..., or a sentiment model's negative/positive used on IMDb's neg/pos) say nothing
    about the order: they are taken in the task's, with a warning."""
    if labels is None or task.label_names is None:
        return
    ours, theirs = _class_names(task.label_names), _class_names(labels)
    if theirs == ours:
        return
    if sorted(theirs) == sorted(ours):
        raise SelftuneError(
            f"{model_dir} orders its classes {list(labels)}, {task.name} orders them "
            f"{list(task.label_names)}; its predictions would be permuted. Re-export the "
            "model with the task's label order")
    other_tasks = [t.name for t in TASKS.values() if t.label_names is not None
                   and sorted(_class_names(t.label_names)) == sorted(theirs)]
    if other_tasks:
        raise SelftuneError(
            f"{model_dir} predicts the classes of {'/'.join(other_tasks)} {list(labels)}, not "
            f"those of {task.name} {list(task.label_names)}: a model of another task")
    logger.warning("%s names its classes %s; taken to be %s, in that order", model_dir,
                   list(labels), list(task.label_names))


# Spellings of one class across tasks and checkpoints.
CLASS_SYNONYMS = {"negative": "neg", "positive": "pos"}


def _class_names(names: tuple[str, ...]) -> list[str]:
    return [CLASS_SYNONYMS.get(n.lower(), n.lower()) for n in names]


def evaluate_model(
    model_dir: str, opts: DataOptions, eval_split: str | None, max_seq_length: int,
    batch_size: int, trust_remote_code: bool = False, packing: bool = True,
    logits_fn: Callable | None = None, *, chunk_rows: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Metrics (percent) of a saved model on a registry task's dev split or a labelled file.

    ``logits_fn(model, tokenizer, records, max_seq_length, batch_size)`` replaces
    :func:`predict_logits` (e.g. to score an output vote of several states of the model).

    A labelled file is streamed in chunks (see :func:`prediction_chunks`): what is kept of each
    row is its prediction (a class id or a score) and its label, two numbers, as the metrics
    (MCC, F1, correlations) need them all at once."""
    model = load_finetuned(model_dir, trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    labels = model_label_names(model)
    records: Iterable[Record]
    if opts.validation_file and not opts.train_file:
        task = custom_task(opts.task or "custom", len(opts.text_columns), labels)
        check_text_count(model_dir, len(opts.text_columns),
                         f"--text-columns {','.join(opts.text_columns)}")
        records = _labelled_records(Path(opts.validation_file), opts, labels)
        if opts.max_eval_samples is not None:
            records = _fixed_subset(
                lambda: _labelled_records(Path(opts.validation_file), opts, labels),
                opts.max_eval_samples, opts.split_seed)
        split = "validation"
    else:
        data = load_task_data(opts, include_train=False)
        task = data.task
        check_task_matches(task, labels, model_dir)
        split = eval_split or next(iter(data.eval_splits))
        if split not in data.eval_splits:
            raise SelftuneError(f"task {task.name} has no split {split!r}; choose one of "
                                f"{list(data.eval_splits)}")
        check_text_count(model_dir, task.num_texts, f"task {task.name}")
        records = data.eval_splits[split]
    check_sequence_length(max_seq_length, model)
    packing = enable_packing(model, packing)  # once: it says why not, if not
    predictions, gold = [], []
    for chunk, logits in prediction_chunks(model, tokenizer, records, max_seq_length,
                                           batch_size, packing, logits_fn, chunk_rows,
                                           progress, "Evaluating"):
        predictions.append(predictions_from_logits(task, logits))
        gold.append(np.array([r["label"] for r in chunk]))
    metrics = metrics_from_predictions(task, np.concatenate(predictions), np.concatenate(gold))
    score = metrics.pop("score")
    return {"task": task.name, "eval_split": split, "model_dir": model_dir,
            "num_examples": sum(len(g) for g in gold), "metrics": metrics, "score": score}


def _labelled_records(path: Path, opts: DataOptions,
                      labels: tuple[str, ...] | None) -> Iterator[Record]:
    for r in iter_user_records(path, opts.text_columns, opts.label_column, opts.id_column):
        where = f"{path} example {r['example_id']}"
        if labels is None:
            r["label"] = regression_label(r["label"], where)
        else:
            raw = label_text(r["label"])
            if raw in labels:
                r["label"] = labels.index(raw)
            elif raw.isdigit() and int(raw) < len(labels):
                r["label"] = int(raw)
            else:
                raise SelftuneError(f"{where}: label {raw!r} is not one of the model's labels "
                                    f"{list(labels)}")
        yield r


def _fixed_subset(read: Callable[[], Iterable[Record]], size: int,
                  seed: int) -> Iterator[Record]:
    """The rows of a registry task's ``--max-eval-samples`` subset (``loading._subsample``:
    the same seeded draw of row numbers, in file order), from a file read twice: once to
    count its rows, once to take them."""
    import random

    total = sum(1 for _ in read())
    if size >= total:
        yield from read()
        return
    chosen = set(random.Random(seed).sample(range(total), size))
    yield from (record for i, record in enumerate(read()) if i in chosen)


# Rows tokenized and run at a time by predict and evaluate, rounded to whole batches: the
# memory of a stream is this many rows' tokens and logits, whatever the file's length.
CHUNK_ROWS = 4096


def prediction_chunks(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Iterable[Record],
    max_seq_length: int, batch_size: int, packing: bool, logits_fn: Callable | None = None,
    chunk_rows: int | None = None, progress: bool = True, desc: str = "Predicting",
) -> Iterator[tuple[list[Record], np.ndarray]]:
    """``(rows, their logits)`` chunk by chunk, reading ``records`` (a list or a stream) only as
    far as the chunk. A chunk is a whole number of batches, so every batch (and so every
    logit, padded or packed) is the one a single pass over all rows would have made. One
    progress bar (stderr) for the stream; it appears only if the stream takes a while."""
    size = chunk_rows_for(batch_size, chunk_rows)
    iterator = iter(records)
    with tqdm(desc=desc, unit=" rows", delay=2, disable=not progress) as bar:
        while chunk := list(itertools.islice(iterator, size)):
            if logits_fn is not None:
                logits = logits_fn(model, tokenizer, chunk, max_seq_length, batch_size)
            else:
                logits = predict_logits(model, tokenizer, chunk, max_seq_length, batch_size,
                                        packing=packing, progress=False)
            yield chunk, logits
            bar.update(len(chunk))


def chunk_rows_for(batch_size: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk: ``chunk_rows`` (default :data:`CHUNK_ROWS`) rounded up to whole
    batches."""
    wanted = CHUNK_ROWS if chunk_rows is None else chunk_rows
    return max(1, -(-wanted // batch_size)) * batch_size


# ---- does the input have the texts the model was trained on?

# config.json key of an exported model (which carries no run_config.json): 1 text, or 2.
NUM_TEXTS_KEY = "selftune_num_texts"


def trained_num_texts(model_dir: str | Path) -> int | None:
    """How many texts a row held in the model's training (1, or 2 for sentence pairs), as
    its folder records it: ``config.json``'s ``selftune_num_texts`` (an exported model), the
    run's ``run_config.json`` (its task, or its --text-columns), a multi-task run's
    ``tasks/<task>`` folder, an ensemble's source run. None when the folder does not say (a
    Hub model, a folder from elsewhere, a Hub dataset run)."""
    from selftune.outputs import METRICS_FILE, RUN_CONFIG_FILE

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        return None
    recorded = _json_object(path / "config.json").get(NUM_TEXTS_KEY)
    if recorded in (1, 2):
        return recorded
    if (path / RUN_CONFIG_FILE).is_file():
        return _num_texts_of_run(_json_object(path / RUN_CONFIG_FILE))
    if path.parent.name == "tasks" and path.name in TASKS:  # a multi-task run's task model
        return TASKS[path.name].num_texts
    source = _json_object(path / METRICS_FILE).get("source_run")  # an ensemble
    if isinstance(source, str) and (Path(source) / RUN_CONFIG_FILE).is_file():
        return _num_texts_of_run(_json_object(Path(source) / RUN_CONFIG_FILE))
    return None


def _num_texts_of_run(run: dict[str, Any]) -> int | None:
    if run.get("train_file"):
        try:
            return len(parse_text_columns(str(run.get("text_columns") or "text")))
        except SelftuneError:
            return None
    if run.get("dataset_name") or run.get("task") not in TASKS:
        return None
    return TASKS[run["task"]].num_texts


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_text_count(model_dir: str, given: int, source: str) -> None:
    """Name a pair/single mismatch between a model and its input. A pair model given one text
    a row is refused: it was only ever trained to compare two, so its outputs would mean
    nothing (an entailment with no hypothesis). A single-text model given pairs is warned
    about: it reads the second text as a second segment it never trained on, which may be
    meant (a title and a body) but is off the model's training."""
    trained = trained_num_texts(model_dir)
    if trained is None or trained == given:
        return
    if trained == 2:
        raise SelftuneError(
            f"{model_dir} was trained on sentence pairs, but {source} gives one text a row: "
            "its predictions would mean nothing; give the pair's two columns as "
            "--text-columns A,B")
    logger.warning("%s was trained on single texts, but %s gives a sentence pair a row: the "
                   "second text is read as a segment the model never saw in training, so its "
                   "predictions may be off (give one text column to use the first alone)",
                   model_dir, source)


def predict_file(
    model_dir: str, input_file: str, output_file: str, text_columns: tuple[str, ...],
    id_column: str | None, max_seq_length: int, batch_size: int,
    trust_remote_code: bool = False, packing: bool = True, *, chunk_rows: int | None = None,
    progress: bool = True,
) -> int:
    """Write predicted labels (and class probabilities) for every row of ``input_file``.

    The output format follows the output file's extension: .jsonl, .csv or .tsv. The file is
    streamed: read, tokenized, run and written ``chunk_rows`` rows at a time (memory does not
    grow with its length), into a temporary file beside the output that is renamed to it once
    every row is written; an error or an interruption removes it.
    """
    out_path = Path(output_file)
    if out_path.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise SelftuneError(f"--output-file must end in .jsonl, .csv or .tsv: {output_file}")
    check_output_file(out_path)
    if out_path.resolve() == Path(input_file).resolve():
        raise SelftuneError(f"--output-file {output_file} is the --input-file: the predictions "
                            "would replace your data; choose another file")
    model = load_finetuned(model_dir, trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    labels = model_label_names(model)
    check_text_count(model_dir, len(text_columns), f"--text-columns {','.join(text_columns)}")
    check_sequence_length(max_seq_length, model)
    packing = enable_packing(model, packing)  # once: it says why not, if not
    records = iter_user_records(Path(input_file), text_columns, None, id_column)
    count = 0
    with _rows_file(out_path) as (write_row, flush):
        for chunk, logits in prediction_chunks(model, tokenizer, records, max_seq_length,
                                               batch_size, packing, chunk_rows=chunk_rows,
                                               progress=progress):
            for record, row_logits in zip(chunk, logits, strict=True):
                write_row(_prediction_row(record, row_logits, labels))
            flush()  # the chunk's rows are in the (temporary) file now
            count += len(chunk)
    return count


def _prediction_row(record: Record, row_logits: np.ndarray,
                    labels: tuple[str, ...] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"example_id": record["example_id"]}
    if labels is None:
        row["prediction"] = float(row_logits[0])
    else:
        probs = torch.softmax(torch.from_numpy(row_logits), dim=-1).numpy()
        row["label"] = labels[int(probs.argmax())]
        row.update({f"prob_{name}": float(p) for name, p in zip(labels, probs, strict=True)})
    return row


def check_output_file(path: Path) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if path.is_dir():
        raise SelftuneError(f"--output-file {path} is a folder; give a file name")


@contextlib.contextmanager
def _rows_file(path: Path) -> Iterator[tuple[Callable[[dict[str, Any]], None],
                                             Callable[[], None]]]:
    """A row writer (.jsonl, .csv or .tsv by the extension) and its flush, into a temporary
    file beside ``path`` (whose rows can be watched growing), renamed to ``path`` at the
    end: never a half-written file under the final name. On any error, KeyboardInterrupt and
    SIGTERM included, the temporary file is removed (only a SIGKILL can leave one, hidden;
    never ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id makes the name this run's own: two predicts to one file never share it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = open(tmp, "x", newline="")
    try:
        with f, _sigterm_interrupts():
            yield _row_writer(f, path.suffix.lower()), f.flush
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's or ``kill``'s stop) raises KeyboardInterrupt for the block, so
    that it is cleaned up as a Ctrl-C is; as before after it. Only the main thread may set a
    handler: elsewhere SIGTERM keeps its default."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _row_writer(f: IO[str], suffix: str) -> Callable[[dict[str, Any]], None]:
    if suffix == ".jsonl":
        def write_json(row: dict[str, Any]) -> None:
            # NaN/infinity are not JSON: such a value (an overflow) is written as null.
            f.write(json.dumps({k: finite_or_none(v) if isinstance(v, float) else v
                                for k, v in row.items()}) + "\n")
        return write_json
    delimiter = "\t" if suffix == ".tsv" else ","
    writer: csv.DictWriter | None = None

    def write_csv(row: dict[str, Any]) -> None:
        nonlocal writer
        if writer is None:  # the columns are the first row's, as every row's
            writer = csv.DictWriter(f, fieldnames=list(row), delimiter=delimiter)
            writer.writeheader()
        writer.writerow(row)
    return write_csv
