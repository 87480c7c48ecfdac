"""The run folder's guards: what --overwrite-output-dir may delete, and what it keeps."""

from __future__ import annotations

import pytest

from selftune.errors import SelftuneError
from selftune.outputs import BENCH_RUN_FILE, remove_run_dir


def test_overwrite_keeps_the_options_bench_started_the_run_with(tmp_path):
    """A BAM! recipe redone with --overwrite-output-dir keeps bench_run.json: without it,
    bench could no longer tell an interrupted run of stale options from a current one."""
    run = tmp_path / "bam"
    (run / "student" / "checkpoints").mkdir(parents=True)
    (run / "bam.json").write_text("{}")
    (run / BENCH_RUN_FILE).write_text('{"seed": 0}')
    remove_run_dir(run, keep=(BENCH_RUN_FILE,))
    assert [p.name for p in run.iterdir()] == [BENCH_RUN_FILE]
    assert (run / BENCH_RUN_FILE).read_text() == '{"seed": 0}'
    remove_run_dir(run)
    assert not run.exists()


def test_a_folder_selftune_did_not_write_is_never_deleted(tmp_path):
    own = tmp_path / "thesis"
    own.mkdir()
    (own / "chapter1.tex").write_text("keep me")
    for keep in ((), (BENCH_RUN_FILE,)):
        with pytest.raises(SelftuneError, match="not a selftune run folder"):
            remove_run_dir(own, keep=keep)
    assert (own / "chapter1.tex").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_run_dir(empty)
    assert not empty.exists()
