"""benchmarks/packing_accuracy.py: packed runs are paired with padded runs of the same task,
learning rate and seed, and the verdict follows the rule it states."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "packing_accuracy.py"


@pytest.fixture(scope="module")
def packing_accuracy():
    spec = importlib.util.spec_from_file_location("packing_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_line(task, seed, score, lr, packing=None, strategy="baseline", grouped=False):
    config = {"learning_rate": lr, "group_by_length": grouped}
    if packing is not None:  # runs from before packing have no key
        config["packing"] = packing
    return json.dumps({"task": task, "seed": seed, "score": score, "strategy": strategy,
                       "config": config})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_by_rate_and_seed_and_ignores_other_runs(tmp_path, packing_accuracy, capsys):
    packed = write(tmp_path / "packed.jsonl", [
        run_line("rte", s, 56.0 + s + 0.1 * (s % 2), 5e-5, packing=True) for s in range(3)
    ] + [run_line("rte", 0, 99.0, 5e-5, packing=True, strategy="sda")])
    padded = write(tmp_path / "padded.jsonl", [
        run_line("rte", s, 56.0 + s, 5e-5) for s in range(3)
    ] + [run_line("rte", s, 10.0, 1e-4) for s in range(3)]           # another rate
      + [run_line("rte", s, 10.0, 5e-5, grouped=True) for s in range(3)]  # grouped batches
      + [run_line("rte", 0, 10.0, 5e-5, packing=True)])                # a packed run
    assert packing_accuracy.main(["--packed", str(packed), "--padded", str(padded),
                                  "--seeds", "0-2"]) == 0
    out = capsys.readouterr().out
    # Differences +0.0, +0.1, +0.0: paired against the right runs (the others are far away).
    assert "+0.00 / +0.10 / +0.00" in out
    assert "| yes |" in out
    assert "Every task matches within seed noise: yes." in out


def test_a_consistent_shift_is_not_a_match(tmp_path, packing_accuracy):
    seeds = {0, 1, 2}
    padded = {("stsb", 2e-4): {0: 86.0, 1: 86.5, 2: 85.5}}
    shifted = {("stsb", 2e-4): {0: 83.0, 1: 83.4, 2: 82.6}}   # 3 points below on every seed
    (row,) = packing_accuracy.check(shifted, padded, seeds)
    assert row["comparison"].diff == pytest.approx(-3.0)
    assert not row["matches"]
    # A difference inside two seed stds, with no significant paired test, matches.
    close = {("stsb", 2e-4): {0: 86.3, 1: 86.2, 2: 85.6}}
    (row,) = packing_accuracy.check(close, padded, seeds)
    assert row["matches"]


def test_missing_seeds_are_named_not_compared(tmp_path, packing_accuracy, capsys):
    packed = write(tmp_path / "packed.jsonl",
                   [run_line("cola", s, 30.0, 1e-4, packing=True) for s in range(2)])
    padded = write(tmp_path / "padded.jsonl", [run_line("cola", s, 30.0, 1e-4) for s in range(3)])
    assert packing_accuracy.main(["--packed", str(packed), "--padded", str(padded)]) == 0
    out = capsys.readouterr().out
    assert "seeds missing: 2" in out
    assert "Every task matches" not in out
