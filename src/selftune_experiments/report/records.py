"""Read a results file into validated run records, with every problem found tied to its line.

The results file is appended to by several processes over time, so it can hold a truncated last
line (a killed run), a hand-damaged middle line, or the same run twice (a re-run). None of these
is silently dropped: ``load_results`` returns every problem with its line number and the report
lists them at the top, because a comparison that quietly lost a seed can flip a verdict.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

SUPPORTED_SCHEMA = 1

_RUN_ID_RE = re.compile(r'"run_id"\s*:\s*"([^"\\]*)"')


@dataclass(frozen=True)
class Problem:
    """Something wrong in the results file, tied to a line when there is one.

    ``kind`` is ``"malformed"`` (not JSON: the line is not used), ``"invalid"`` (JSON, but not
    a usable run: not used), ``"duplicate"`` (an earlier line with the same ``run_id`` was
    replaced by this one) or ``"warning"`` (used, but worth a look).
    """

    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where} ({self.kind}): {self.message}"


@dataclass(frozen=True)
class RunRecord:
    """The fields of one results line that the report uses; unknown keys are ignored."""

    run_id: str
    task: str
    variant: str
    seed: int
    score: float
    metrics: Mapping[str, float]
    strategy: str | None = None
    config_hash: str | None = None
    teacher_score: float | None = None
    teacher_metrics: Mapping[str, float] | None = None
    # (epoch, dev score) pairs, in file order.
    history: tuple[tuple[float, float], ...] = ()
    wall_time_s: float | None = None
    train_examples_per_s: float | None = None
    peak_memory_mb: float | None = None
    # The setting the run was timed in (host, CPU, torch threads), used to group timings;
    # None when unknown.
    machine: str | None = None
    # Resumed from a checkpoint: its wall time covers only the last attempt.
    resumed: bool = False
    # "multitask-run" on a multi-task student's lines: timings of the whole run (every task).
    cost_scope: str | None = None
    # Line of the results file this came from (None when built from a dict in memory).
    line: int | None = None

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], line: int | None = None) -> RunRecord:
        """Validate one parsed results line; raises ``ValueError`` with the reason if unusable."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        schema = obj.get("schema", SUPPORTED_SCHEMA)
        if schema != SUPPORTED_SCHEMA:
            raise ValueError(
                f"schema {schema!r} is not supported (this selftune reads schema "
                f"{SUPPORTED_SCHEMA}); use the selftune version that wrote the file"
            )
        run_id = _req_str(obj, "run_id")
        task = _req_str(obj, "task")
        strategy = _opt_str(obj, "strategy")
        variant = _opt_str(obj, "variant") or strategy
        if variant is None:
            raise ValueError("missing 'variant' (and no 'strategy' to fall back on)")
        seed = obj.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"'seed' must be an integer, got {seed!r}")
        score = _opt_num(obj, "score")
        if score is None:
            raise ValueError("missing 'score'")
        if not math.isfinite(score):
            raise ValueError(f"'score' is {score!r} (a diverged run?); it cannot enter the stats")
        teacher_score = _opt_num(obj, "teacher_score")
        if teacher_score is not None and not math.isfinite(teacher_score):
            teacher_score = None
        teacher_metrics = obj.get("teacher_metrics")
        return cls(
            run_id=run_id,
            task=task,
            variant=variant,
            seed=seed,
            score=score,
            metrics=_metric_dict(obj.get("metrics"), "metrics"),
            strategy=strategy,
            config_hash=_opt_str(obj, "config_hash"),
            teacher_score=teacher_score,
            teacher_metrics=(
                None
                if teacher_metrics is None
                else _metric_dict(teacher_metrics, "teacher_metrics")
            ),
            history=_history(obj.get("history")),
            wall_time_s=_opt_num(obj, "wall_time_s"),
            train_examples_per_s=_opt_num(obj, "train_examples_per_s"),
            peak_memory_mb=_opt_num(obj, "peak_memory_mb"),
            machine=_machine_name(obj.get("machine")),
            resumed=bool(obj.get("resumed_from")),
            cost_scope=_opt_str(obj, "cost_scope"),
            line=line,
        )


def _req_str(obj: Mapping[str, Any], key: str) -> str:
    value = _opt_str(obj, key)
    if value is None:
        raise ValueError(f"missing '{key}'")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_num(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_num(value):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    return float(value)


def _metric_dict(value: Any, key: str) -> dict[str, float]:
    """Metric name -> value; a non-finite metric (e.g. Pearson of constant output) stays nan."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"'{key}' must be an object of metric name -> number")
    out: dict[str, float] = {}
    for name, v in value.items():
        if v is None:
            out[str(name)] = math.nan
        elif _is_num(v):
            out[str(name)] = float(v)
        else:
            raise ValueError(f"'{key}.{name}' must be a number, got {v!r}")
    return out


def _history(value: Any) -> tuple[tuple[float, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("'history' must be a list of {epoch, score} objects")
    points = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ValueError(f"'history[{i}]' must be an object")
        epoch, score = entry.get("epoch"), entry.get("score")
        if not (_is_num(epoch) and _is_num(score)):
            raise ValueError(f"'history[{i}]' needs numeric 'epoch' and 'score'")
        if math.isfinite(score):
            points.append((float(epoch), float(score)))
    return tuple(points)


def _machine_name(machine: Any) -> str | None:
    """Name the timing setting: hostname, CPU model and torch threads, as far as recorded (one
    hostname can stand for several machines, and a process at one thread runs at about half
    the speed of one at two); a machine dict with none of them is named by a hash of its
    content."""
    if machine is None:
        return None
    if isinstance(machine, Mapping):
        parts = [machine[key] for key in ("hostname", "cpu")
                 if isinstance(machine.get(key), str) and machine[key]]
        threads = machine.get("torch_threads")
        if isinstance(threads, int) and not isinstance(threads, bool):
            parts.append(f"{threads} thread" + ("" if threads == 1 else "s"))
        if parts:
            return ", ".join(parts)
        if not machine:
            return None
        blob = json.dumps(machine, sort_keys=True, default=str).encode()
        return "machine-" + hashlib.sha1(blob).hexdigest()[:8]
    return str(machine)


def dedupe(records: Iterable[RunRecord]) -> tuple[list[RunRecord], list[Problem]]:
    """Keep the last record of each run_id: a re-run is appended after the run it replaces."""
    by_id: dict[str, RunRecord] = {}
    problems: list[Problem] = []
    for rec in records:
        previous = by_id.pop(rec.run_id, None)
        # The same run recorded twice (e.g. BAM! teachers shared by two grids' results files)
        # is no conflict.
        same_run = previous is not None and previous.config_hash == rec.config_hash and \
            previous.score == rec.score and previous.metrics == rec.metrics
        if previous is not None and not same_run:
            where = f"line {previous.line}" if previous.line is not None else "an earlier record"
            problems.append(
                Problem(
                    rec.line,
                    "duplicate",
                    f"run_id '{rec.run_id}' already appeared on {where}; keeping this later "
                    "one (delete the line you do not want to silence this)",
                )
            )
        by_id[rec.run_id] = rec
    return list(by_id.values()), problems


def load_results(path: Path | str) -> tuple[list[RunRecord], list[Problem]]:
    """Read a results file; return the usable runs and every problem found, by line.

    Blank lines are skipped. A line that is not JSON, or is JSON but not a usable run, is left
    out and reported (the last line gets its own message, since a truncated last line is what
    a killed process leaves behind). If a run_id appears twice the last one wins, reported as a
    duplicate. Raises ``SelftuneError`` if the file is missing or holds no usable run.
    """
    path = Path(path)
    if path.is_dir():
        raise SelftuneError(f"{path} is a folder; pass the results .jsonl file inside it")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SelftuneError(
            f"results file not found: {path}; check the path or run the benchmark first"
        ) from None
    except OSError as exc:
        raise SelftuneError(f"cannot read results file {path}: {exc.strerror}") from None

    lines = raw.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    parsed: list[RunRecord] = []
    problems: list[Problem] = []
    for i, blob in enumerate(lines):
        if not blob.strip():
            continue
        lineno = i + 1
        try:
            obj = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(Problem(lineno, "malformed", _malformed_message(blob, exc, i == last)))
            continue
        try:
            parsed.append(RunRecord.from_dict(obj, line=lineno))
        except ValueError as exc:
            has_id = isinstance(obj, dict) and "run_id" in obj
            run = f" (run_id '{obj['run_id']}')" if has_id else ""
            problems.append(
                Problem(lineno, "invalid", f"not a usable run{run}: {exc}; the line is left out")
            )
    records, dup_problems = dedupe(parsed)
    problems.extend(dup_problems)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    if not records:
        detail = f"; first problem: {problems[0]}" if problems else " (the file is empty)"
        raise SelftuneError(
            f"no usable runs in {path}{detail}; check that this is a selftune results file"
        )
    return records, problems


def _malformed_message(blob: bytes, exc: Exception, is_last: bool) -> str:
    match = _RUN_ID_RE.search(blob.decode("utf-8", errors="replace"))
    run = f" (run_id '{match.group(1)}')" if match else ""
    if isinstance(exc, json.JSONDecodeError):
        at = "" if exc.msg.endswith(" at") else " at"
        reason = f"{exc.msg}{at} column {exc.colno}"
    else:
        reason = "not UTF-8 text"
    if is_last:
        return (
            f"last line is not valid JSON{run}: {reason}; probably truncated by a killed "
            "process: delete the line (`selftune bench` then records that run again from its "
            "run folder, if that is still there, without training it again)"
        )
    return f"not valid JSON{run}: {reason}; the line is left out: fix or delete it"
