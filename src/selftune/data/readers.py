"""Readers for every data source, each returning canonical records.

A record is a dict with ``example_id`` (a string, stable across runs and machines: later stages
key teacher predictions by it), ``text_a``, ``text_b`` (pair tasks only) and ``label`` (a class
name for classification, a float for regression).

The local layout is the one of ``../shared/data`` (the GLUE ``glue_data`` folders, the IMDb
archives, MR/CR/MPQA pos/neg files). The quirks of those files are handled here: GLUE tsv files
are split on tabs with quoting off (default CSV quoting swallows lines that start with ``"``),
MRPC starts with a BOM, CoLA has no header, MR is Latin-1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError

Record = dict[str, object]

# GLUE tasks in the local layout: folder, and for headered files the (text..., label) columns.
# CoLA has no header: its columns are (source, label, original_mark, sentence).
GLUE_LAYOUT: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sst2": ("SST-2", ("sentence",), "label"),
    "mrpc": ("MRPC", ("#1 String", "#2 String"), "Quality"),
    "stsb": ("STS-B", ("sentence1", "sentence2"), "score"),
    "qqp": ("QQP", ("question1", "question2"), "is_duplicate"),
    "mnli": ("MNLI", ("sentence1", "sentence2"), "gold_label"),
    "qnli": ("QNLI", ("question", "sentence"), "label"),
    "rte": ("RTE", ("sentence1", "sentence2"), "label"),
    "wnli": ("WNLI", ("sentence1", "sentence2"), "label"),
}
GLUE_SPLIT_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}
POS_NEG_FILES = {
    "mr": ("mr", "rt-polarity.pos", "rt-polarity.neg", "latin-1"),
    "cr": ("cr", "custrev.pos", "custrev.neg", "utf-8"),
    "mpqa": ("mpqa", "mpqa.pos", "mpqa.neg", "utf-8"),
}


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    if not path.is_file():
        raise SelftuneError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        name = "utf-8" if encoding.startswith("utf-8") else encoding
        raise SelftuneError(
            f"{path}: bytes that are not valid {name} at line {line} (byte {err.start}); "
            "re-save the file as UTF-8"
        ) from None


def _stream_lines(path: Path, encoding: str, newline: str) -> Iterator[str]:
    """The lines of a text file, decoded as they are read (a file of any size costs one
    buffer), failing as :func:`_read_text` does on bytes that are not ``encoding``."""
    try:
        with open(path, encoding=encoding, newline=newline) as f:
            yield from f
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    except OSError as err:
        raise SelftuneError(f"could not read {path}: {err.strerror or err}") from None


def _decode_error(path: Path, encoding: str) -> SelftuneError:
    """The message of :func:`_read_text` for the first undecodable byte, found line by line
    (a \n byte is never part of a multi-byte character)."""
    offset = 0
    plain = encoding.removesuffix("-sig")  # a BOM is valid UTF-8: offsets stay the file's
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode(plain)
            except UnicodeDecodeError as err:
                name = "utf-8" if encoding.startswith("utf-8") else encoding
                return SelftuneError(
                    f"{path}: bytes that are not valid {name} at line {lineno} (byte "
                    f"{offset + err.start}); re-save the file as UTF-8")
            offset += len(line)
    return SelftuneError(f"{path}: bytes that are not valid {encoding}; re-save the file as UTF-8")


def _tsv_rows(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    text = _read_text(path, encoding)
    # Tab-split with quoting off, as the GLUE and HF loaders do.
    return list(csv.reader(_lines(text), delimiter="\t", quoting=csv.QUOTE_NONE))


def _lines(text: str) -> io.StringIO:
    # Not str.splitlines(): it also breaks on \x85, \x0c, \u2028..., which occur inside texts
    # (MR's Latin-1 bytes decode to \x85). Only \n, \r\n and \r end a line here.
    return io.StringIO(text, newline="")


def _check_text(value: str, where: str) -> str:
    if not value.strip():
        raise SelftuneError(f"{where}: empty text; remove the row or fill in the text")
    return value


def _label_name(task: TaskSpec, raw: str, where: str) -> str:
    """Map a raw label as written in a GLUE file to the task's class name."""
    assert task.label_names is not None
    if raw in task.label_names:
        return raw
    if raw.isdigit() and int(raw) < len(task.label_names):
        return task.label_names[int(raw)]
    raise SelftuneError(
        f"{where}: label {raw!r} is not one of {task.label_names} for task {task.name}"
    )


# A number as a file may write it: 1, 01, +1, 1.0, 1e0.
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def label_text(label: object) -> str:
    """A class label as written in a file, numbers normalised: 1, 1.0 and 01 (from a csv, a
    tsv or a jsonl alike) are all the class "1"."""
    if isinstance(label, str) and NUMBER.fullmatch(label.strip()):
        label = float(label)
    if isinstance(label, float) and label.is_integer() and abs(label) < 2**53:
        return str(int(label))
    return str(label)


def regression_label(raw: object, where: str) -> float:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SelftuneError(
            f"{where}: label {raw!r} is not a number, but the task is a regression"
        ) from None
    if not math.isfinite(value):
        raise SelftuneError(f"{where}: label {raw!r} is not a finite number")
    return value


def read_glue_split(task: TaskSpec, data_dir: Path, split: str) -> list[Record]:
    """One split of a GLUE task from a ``glue_data``-style folder (``<data_dir>/glue/<Task>``)."""
    if split not in GLUE_SPLIT_FILES:
        raise SelftuneError(f"task {task.name} has no split {split!r}")
    folder = "CoLA" if task.name == "cola" else GLUE_LAYOUT[task.name][0]
    path = _glue_root(data_dir) / folder / GLUE_SPLIT_FILES[split]
    if not path.is_file():
        raise SelftuneError(
            f"{task.name} {split} data not found: expected {path}; point --data-dir "
            "(or $SELFTUNE_DATA) at a folder with glue/<Task>/{train,dev}.tsv, or drop it to "
            "use the Hugging Face Hub"
        )
    rows = _tsv_rows(path, "utf-8-sig")
    records: list[Record] = []
    if task.name == "cola":
        data_rows, text_idx, label_idx = rows, (3,), 1
        min_cols = 4
    else:
        if not rows:
            raise SelftuneError(f"{path}: file is empty")
        header = rows[0]
        _, text_cols, label_col = GLUE_LAYOUT[task.name]
        missing = [c for c in (*text_cols, label_col) if c not in header]
        if missing:
            raise SelftuneError(f"{path}: header lacks column(s) {missing}; found {header}")
        text_idx = tuple(header.index(c) for c in text_cols)
        label_idx = header.index(label_col)
        data_rows = rows[1:]
        min_cols = max(*text_idx, label_idx) + 1
    for i, row in enumerate(data_rows):
        where = f"{path}:{i + (1 if task.name == 'cola' else 2)}"
        if len(row) < min_cols:
            raise SelftuneError(
                f"{where}: expected {min_cols} tab-separated fields, got {len(row)}")
        record: Record = {"example_id": f"{split}-{i}"}
        for key, idx in zip(("text_a", "text_b"), text_idx, strict=False):
            record[key] = _check_text(row[idx], where)
        raw = row[label_idx]
        record["label"] = (
            regression_label(raw, where) if task.is_regression else _label_name(task, raw, where)
        )
        records.append(record)
    if not records:
        raise SelftuneError(f"{path}: no data rows")
    return records


def _glue_root(data_dir: Path) -> Path:
    # Accept both the data root (with a glue/ folder) and the glue folder itself.
    return data_dir / "glue" if (data_dir / "glue").is_dir() else data_dir


def read_imdb_split(data_dir: Path, split: str) -> list[Record]:
    """IMDb reviews from ``imdb/aclImdb_<split>.tar.gz``; ``<br />`` tags become spaces."""
    path = data_dir / "imdb" / f"aclImdb_{split}.tar.gz"
    if not path.is_file():
        raise SelftuneError(f"imdb {split} data not found: expected {path}")
    records: list[Record] = []
    with tarfile.open(path) as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[2] not in ("pos", "neg"):
                continue
            raw = archive.extractfile(member).read()  # type: ignore[union-attr]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SelftuneError(f"{path}:{member.name}: not valid UTF-8") from None
            stem = parts[3].removesuffix(".txt")
            records.append({
                "example_id": f"{split}-{parts[2]}-{stem}",
                "text_a": text.replace("<br />", " "),
                "label": parts[2],
            })
    if not records:
        raise SelftuneError(f"{path}: no reviews found under aclImdb/{split}/{{pos,neg}}")
    return records


def read_ag_news_split(task: TaskSpec, data_dir: Path, split: str) -> list[Record]:
    """AG News ``ag_news/<split>.csv``: quoted CSV, no header, ``class,title,description``."""
    path = data_dir / "ag_news" / f"{split}.csv"
    if not path.is_file():
        raise SelftuneError(
            f"ag_news {split} data not found: expected {path} (the shared data folder has only "
            "test.csv; use the Hub or --train-file for training data)"
        )
    assert task.label_names is not None
    records: list[Record] = []
    for i, row in enumerate(csv.reader(_lines(_read_text(path)))):
        where = f"{path}:{i + 1}"
        if len(row) != 3 or not row[0].isdigit() or not 1 <= int(row[0]) <= 4:
            raise SelftuneError(f"{where}: expected class (1-4), title, description")
        records.append({
            "example_id": f"{split}-{i}",
            "text_a": _check_text(f"{row[1]} {row[2]}", where),
            "label": task.label_names[int(row[0]) - 1],
        })
    if not records:
        raise SelftuneError(f"{path}: file is empty")
    return records


def read_pos_neg(task: TaskSpec, data_dir: Path) -> list[Record]:
    """MR/CR/MPQA: one sentence per line, the file name gives the label; blank lines skipped."""
    folder, pos_name, neg_name, encoding = POS_NEG_FILES[task.name]
    records: list[Record] = []
    for label, name in (("pos", pos_name), ("neg", neg_name)):
        path = data_dir / folder / name
        if not path.is_file():
            raise SelftuneError(f"{task.name} data not found: expected {path}")
        for lineno, line in enumerate(_read_text(path, encoding).split("\n"), start=1):
            if line.strip():
                records.append({"example_id": f"{label}-{lineno}", "text_a": line.strip(),
                                "label": label})
    return records


# ---------------------------------------------------------------------------------------------
# The user's own files


def read_user_file(
    path: Path,
    text_columns: Sequence[str],
    label_column: str | None,
    id_column: str | None = None,
) -> list[Record]:
    """A csv, tsv or jsonl file; ``label_column=None`` reads unlabelled data (for ``predict``).

    Labels are kept as written (strings or numbers); the caller decides classification or
    regression. Without ``id_column``, the example id is the row number.
    """
    return list(iter_user_records(path, text_columns, label_column, id_column))


def iter_user_records(
    path: Path,
    text_columns: Sequence[str],
    label_column: str | None,
    id_column: str | None = None,
) -> Iterator[Record]:
    """The records of :func:`read_user_file`, one at a time as the file is read (``predict``
    and ``evaluate`` stream a file of any length through this). A bad row is reported when it
    is reached; the column checks are made on the first row.

    Only ``--id-column``'s ids are remembered (to refuse a duplicate); row numbers are unique.
    """
    roles = [*text_columns, *([label_column] if label_column else []),
             *([id_column] if id_column else [])]
    repeated = sorted({c for c in roles if roles.count(c) > 1})
    if repeated:
        # A label read as text leaks the answer into the input; say so before any training.
        raise SelftuneError(f"column(s) {repeated} given for more than one role: --text-columns, "
                            "--label-column and --id-column must name different columns")
    count = 0
    seen_ids: set[str] = set()
    for lineno, row in _iter_user_rows(path):
        if count == 0:
            _check_columns(path, roles, list(row.keys()))
        where = f"{path}:{lineno}"
        example_id = str(row.get(id_column)) if id_column else str(count)
        if id_column:
            if example_id in seen_ids:
                raise SelftuneError(f"{where}: duplicate example id {example_id!r} in "
                                    f"{id_column!r}")
            seen_ids.add(example_id)
        record: Record = {"example_id": example_id}
        for key, col in zip(("text_a", "text_b"), text_columns, strict=False):
            value = row.get(col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                value = ""
            if not isinstance(value, str):
                # A list, an object or a number in a JSONL text field: its str() is no text.
                raise SelftuneError(f"{where} column {col!r}: the text is a "
                                    f"{type(value).__name__}, not a string; write it as text")
            record[key] = _check_text(value, f"{where} column {col!r}")
        if label_column:
            label = row.get(label_column)
            if label is None or (isinstance(label, str) and not label.strip()):
                raise SelftuneError(f"{where}: empty label in column {label_column!r}")
            if isinstance(label, (list, dict)):
                raise SelftuneError(f"{where}: the label in column {label_column!r} is a "
                                    f"{type(label).__name__}; give one class name or number")
            record["label"] = label.strip() if isinstance(label, str) else label
        count += 1
        yield record
    if count == 0:
        raise SelftuneError(f"{path}: no data rows (the file is empty or has only a header)")


def _check_columns(path: Path, roles: list[str], columns: list[str]) -> None:
    missing = [c for c in roles if c not in columns]
    if missing:
        hint = ""
        if len(columns) == 1 and any(sep in columns[0] for sep in "\t,;"):
            hint = " (wrong delimiter? .tsv files are tab-separated, .csv comma-separated)"
        raise SelftuneError(
            f"{path}: column(s) {missing} not found; the file has {columns}{hint}. "
            "Choose columns with --text-columns/--label-column"
        )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key(s) {repeated} given more than once in one object; give every "
                         "column its own name")
    return dict(pairs)


def _iter_user_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    if not path.exists():
        raise SelftuneError(f"file not found: {path}")
    if path.is_dir():
        raise SelftuneError(f"{path} is a folder; give a .csv, .tsv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        # Lines end at \n only, as JSON Lines says (a \r is whitespace inside a line).
        for lineno, line in enumerate(_stream_lines(path, "utf-8-sig", "\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as err:
                raise SelftuneError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except ValueError as err:  # a key given twice
                raise SelftuneError(f"{path}:{lineno}: {err}") from None
            if not isinstance(obj, dict):
                raise SelftuneError(f"{path}:{lineno}: each line must be a JSON object")
            yield lineno, obj
    elif suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        # Tab-separated files are read with quoting off (as GLUE); CSV with standard quoting.
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        # newline="": \n, \r\n and \r end a line, as in _lines.
        reader = csv.reader(_stream_lines(path, "utf-8-sig", ""), delimiter=delimiter,
                            quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise SelftuneError(f"{path}:{reader.line_num}: the header names column(s) "
                                f"{repeated} more than once; give every column its own name")
        # Messages name the physical line a record starts on (a quoted field may span lines).
        start = reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise SelftuneError(
                    f"{path}:{lineno}: {len(row)} fields but the header has {len(header)}"
                )
            yield lineno, dict(zip(header, row, strict=True))
    else:
        raise SelftuneError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")


def natural_label_key(label: str) -> tuple:
    # Numeric class labels sort numerically ("2" before "10"), names alphabetically.
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)
