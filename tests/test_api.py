"""The Python API (selftune.train, selftune.bam, the lazily exported names) and docs/api.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import selftune
from selftune.errors import SelftuneError

from .conftest import REPO

DOCS = REPO / "docs" / "api.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_the_examples_of_docs_api_run(tiny_model, tmp_path, monkeypatch, capsys):
    """Every python block of docs/api.md, in order, in one namespace (as a reader would paste
    them), on a tiny model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFTUNE_EXAMPLE_MODEL", str(tiny_model))
    blocks = python_blocks(DOCS.read_text())
    assert len(blocks) >= 5
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOCS}:block{index + 1}", "exec"), namespace)
    result, recipe = namespace["result"], namespace["recipe"]
    assert result.model_dir == result.output_dir == Path("runs/reviews-sda")
    assert result.teacher_dir == Path("runs/reviews-sda/teacher")
    assert result.metrics == json.loads((result.output_dir / "metrics.json").read_text())
    assert recipe.metrics == json.loads(Path("runs/bam-mine/bam.json").read_text())
    assert set(recipe.task_dirs) == set(recipe.finetuned_dirs) == {"reviews", "pairs"}
    assert all((path / "config.json").is_file() for path in [
        *recipe.task_dirs.values(), *recipe.teacher_dirs.values(),
        *recipe.finetuned_dirs.values()])
    assert recipe.score == recipe.metrics["finetuned_average"]
    printed = capsys.readouterr().out
    assert "is not a valid float" in printed and "tensor([[2., 2., 2., 2.]]" in printed


def test_bam_result_without_teachers(tiny_model, sentiment_files, tmp_path):
    import yaml

    train, dev = sentiment_files
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump({"tasks": [
        {"name": "a", "train_file": str(train), "validation_file": str(dev)}]}))
    recipe = selftune.bam(tasks_file=str(tasks_file), teachers="none", model=str(tiny_model),
                          output_dir=str(tmp_path / "multi"), num_train_epochs=1)
    assert recipe.teacher_dirs == {} and recipe.teacher_dir is None
    assert recipe.model_dir == tmp_path / "multi" / "student"
    assert recipe.task_dirs == {"a": tmp_path / "multi" / "student" / "tasks" / "a"}
    assert recipe.score == recipe.metrics["student_average"]


@pytest.mark.parametrize("call, options, message", [
    ("train", {"learning_rat": 1e-4}, r"unknown option\(s\) \['learning_rat'\]"),
    ("train", {"strategy": "best"}, "'best' is not one of baseline"),
    ("train", {"task": "rte", "learning_rate": -1.0}, "--learning-rate must be positive"),
    ("bam", {"text_columns": "a,b"}, r"unknown option\(s\) \['text_columns'\] for a BAM!"),
    ("bam", {"tasks": "rte", "teachers_only": True, "teachers": "none"},
     "--teachers-only trains the teachers"),
])
def test_options_are_checked_as_on_the_command_line(call, options, message, tmp_path):
    with pytest.raises(SelftuneError, match=message):
        getattr(selftune, call)(output_dir=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()


def test_import_selftune_stays_light_and_names_load_on_use():
    code = ("import sys, selftune; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'transformers' not in sys.modules; "
            "print(selftune.SnapshotWindow.__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["selftune.teachers", "True"]


def test_every_public_name_is_documented():
    for name in selftune.__all__[1:]:
        assert getattr(selftune, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        selftune.nope  # noqa: B018
    from selftune.api import bam

    assert selftune.bam is bam  # the recipe's module is selftune.recipes.bam
    assert selftune.MultiTaskModel.__name__ == "MultiTaskModel"
