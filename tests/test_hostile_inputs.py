"""A catalogue of bad inputs and faults (issue 37): folders that are not the run's, a second
writer, corrupt checkpoints and models, full disks, data that cannot be meant, options out of
range. Each ends in one line ``selftune: error: ...`` with exit 2 and no traceback, or in a
correct recovery; the user's files are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from selftune import outputs
from selftune.cli import main
from selftune.integrity import MANIFEST_FILE, file_sha256

from .conftest import REPO, sentiment_rows, write_csv


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("selftune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must stay untouched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(model: Path, files: tuple[Path, Path], out: Path | str, *extra: str) -> list[str]:
    train, dev = files
    return ["train", "--train-file", str(train), "--validation-file", str(dev),
            "--model", str(model), "--output-dir", str(out), "--num-train-epochs", "1",
            "--per-device-train-batch-size", "16", "--learning-rate", "1e-2",
            "--warmup-ratio", "0", *extra]


# ---------------------------------------------------------------------------------------------
# 1. Own only what is ours

USERS_FOLDERS = {
    "checkpoints-and-readme": {"checkpoints/best.pt": b"my weights", "README.md": b"mine"},
    "train-log-and-config": {"train.log": b"my log", "config.json": b'{"mine": 1}'},
    "student-and-teachers": {"student/notes.txt": b"a", "teachers/list.txt": b"b"},
    "metrics-only": {"metrics.json": b'{"accuracy": 1}', "data.csv": b"x,y\n"},
    "finetuned-folder": {"finetuned/model.bin": b"w"},
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("content", USERS_FOLDERS.values(), ids=USERS_FOLDERS.keys())
def test_a_users_folder_with_generic_names_is_refused(capsys, tmp_path, tiny_model,
                                                      sentiment_files, content, overwrite):
    own = tmp_path / "mine"
    for name, data in content.items():
        (own / name).parent.mkdir(parents=True, exist_ok=True)
        (own / name).write_bytes(data)
    before = snapshot(own)
    extra = ["--overwrite-output-dir"] if overwrite else []
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, own, *extra))
    assert_one_line_error(code, err, "is not a selftune run folder", "selftune-run.json")
    assert snapshot(own) == before


def test_an_empty_output_dir_is_refused(capsys, tmp_path, tiny_model, sentiment_files,
                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, ""))
    assert_one_line_error(code, err, "--output-dir is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where", [".", "..", "./"])
def test_the_current_folder_or_one_holding_it_is_refused(capsys, tmp_path, tiny_model,
                                                         sentiment_files, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, where,
                                               "--overwrite-output-dir"))
    assert_one_line_error(code, err, "the current folder")
    assert work.is_dir() and (tmp_path / "train.csv").is_file()


def test_the_model_folder_is_refused(capsys, tmp_path, tiny_model, sentiment_files):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = snapshot(model)
    code, _, err = run_cli(capsys, *train_argv(model, sentiment_files, model,
                                               "--overwrite-output-dir"))
    assert_one_line_error(code, err, "is the --model directory")
    assert snapshot(model) == before


def test_a_run_folder_holding_the_model_is_refused(capsys, tmp_path, tiny_model,
                                                   sentiment_files):
    """--model runs/x/teacher --output-dir runs/x --overwrite-output-dir deleted the model."""
    run = tmp_path / "runs" / "x"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert code == 0
    shutil.copytree(tiny_model, run / "teacher")
    before = snapshot(run / "teacher")
    code, _, err = run_cli(capsys, *train_argv(run / "teacher", sentiment_files, run,
                                               "--overwrite-output-dir"))
    assert_one_line_error(code, err, "holds the --model")
    assert snapshot(run / "teacher") == before


@pytest.mark.parametrize("which", ["train", "validation"])
def test_a_folder_holding_an_input_file_is_refused(capsys, tmp_path, tiny_model, which):
    data = tmp_path / "project"
    data.mkdir()
    train = write_csv((data if which == "train" else tmp_path) / "train.csv", ["text", "label"],
                      sentiment_rows(32, 0))
    dev = write_csv(data / "dev.csv", ["text", "label"], sentiment_rows(8, 1))
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *train_argv(tiny_model, (train, dev), data,
                                               "--overwrite-output-dir"))
    assert_one_line_error(code, err, f"holds the --{which}-file")
    assert snapshot(tmp_path) == before


def test_an_empty_folder_holding_only_the_dev_file_is_refused(capsys, tmp_path, tiny_model,
                                                              sentiment_files):
    """Even where nothing else would stop it: a run folder must not hold its own input."""
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert code == 0
    dev = Path(shutil.copy(sentiment_files[1], run / "dev.csv"))
    code, _, err = run_cli(capsys, *train_argv(tiny_model, (sentiment_files[0], dev), run,
                                               "--overwrite-output-dir"))
    assert_one_line_error(code, err, "holds the --validation-file")
    assert dev.is_file()


def test_a_folder_holding_the_data_dir_is_refused(capsys, tmp_path, glue_dir, tiny_model):
    code, _, err = run_cli(capsys, "train", "--task", "rte", "--data-dir", str(glue_dir),
                           "--model", str(tiny_model), "--output-dir", str(glue_dir.parent),
                           "--overwrite-output-dir")
    assert_one_line_error(code, err, "holds the --data-dir")
    assert (glue_dir / "glue" / "RTE" / "train.tsv").is_file()


def test_an_output_dir_that_is_a_symlink_loop_is_refused(capsys, tmp_path, tiny_model,
                                                         sentiment_files):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, loop))
    assert_one_line_error(code, err, "symbolic link")


def test_an_output_dir_that_is_a_file_is_refused(capsys, tmp_path, tiny_model, sentiment_files):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, blocker))
    assert_one_line_error(code, err, "is not a folder")
    assert blocker.read_text() == "mine"


def test_the_marker_names_the_run_and_survives_a_resume(capsys, tmp_path, tiny_model,
                                                        sentiment_files):
    from selftune import __version__

    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert code == 0
    marker = json.loads((run / outputs.MARKER_FILE).read_text())
    assert len(marker["run_id"]) == 32 and marker["selftune_version"] == __version__
    assert marker["created"].startswith("20") and len(marker["data_fingerprint"]) == 16
    # The finished folder's manifest lists the weights with their hash.
    manifest = json.loads((run / MANIFEST_FILE).read_text())["files"]
    assert manifest["model.safetensors"]["sha256"] == file_sha256(run / "model.safetensors")
    assert outputs.MARKER_FILE in manifest and "metrics.json" in manifest
    # Replaced with --overwrite-output-dir: a new run, a new id.
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run,
                                             "--overwrite-output-dir"))
    assert code == 0
    assert json.loads((run / outputs.MARKER_FILE).read_text())["run_id"] != marker["run_id"]


def test_an_old_style_run_folder_is_still_ours(capsys, tmp_path, tiny_model, sentiment_files):
    """Folders of versions before the marker (run_config.json + metrics.json, as the committed
    benchmark grids' runs) are recognized: a finished one is refused as finished, replaced
    with --overwrite-output-dir."""
    run = tmp_path / "old"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert code == 0
    (run / outputs.MARKER_FILE).unlink()
    (run / MANIFEST_FILE).unlink()
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert_one_line_error(code, err, "already holds a finished run")
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run,
                                             "--overwrite-output-dir"))
    assert code == 0 and (run / outputs.MARKER_FILE).is_file()


def test_an_old_style_unfinished_run_resumes(capsys, tmp_path, tiny_model, sentiment_files):
    run = tmp_path / "old"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run,
                                             "--keep-checkpoints", "--save-steps", "1"))
    assert code == 0
    for name in (outputs.MARKER_FILE, MANIFEST_FILE, outputs.METRICS_FILE):
        (run / name).unlink()
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run,
                                             "--keep-checkpoints", "--save-steps", "1"))
    assert code == 0
    assert json.loads((run / outputs.METRICS_FILE).read_text())["resumed_from"]


def test_overwrite_deletes_a_marked_folder_but_not_its_neighbours(capsys, tmp_path, tiny_model,
                                                                  sentiment_files):
    run = tmp_path / "runs" / "a"
    neighbour = tmp_path / "runs" / "notes.txt"
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    neighbour.write_text("keep")
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run,
                                             "--overwrite-output-dir"))
    assert code == 0 and neighbour.read_text() == "keep"


USERS_FILES_IN_A_RUN = {"notes": "notes.txt", "folder": "analysis/plot.png",
                        "weights": "my-model.safetensors"}


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("name", USERS_FILES_IN_A_RUN.values(), ids=USERS_FILES_IN_A_RUN.keys())
def test_overwrite_refuses_a_run_folder_holding_a_users_file(capsys, tmp_path, tiny_model,
                                                            sentiment_files, name, finished):
    """--overwrite-output-dir deletes only what the run wrote: a file the user put into the
    run folder stops it (named), before anything is deleted; moved away, the overwrite goes.
    (Refused rather than kept: a new run beside an old run's notes would mislabel them.)"""
    run = tmp_path / "run"
    argv = train_argv(tiny_model, sentiment_files, run, "--save-steps", "1")
    assert main(argv) == 0
    if not finished:  # as if killed after its final model, before metrics.json
        for marker in (outputs.METRICS_FILE, MANIFEST_FILE):
            (run / marker).unlink()
    capsys.readouterr()
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_bytes(b"the user's own")
    before = snapshot(run)
    code, _, err = run_cli(capsys, *argv, "--overwrite-output-dir", "--no-resume")
    assert_one_line_error(code, err, name.split("/")[0], "which its run did not write")
    assert snapshot(run) == before
    top = name.split("/")[0]
    (tmp_path / "moved").mkdir()
    (run / top).rename(tmp_path / "moved" / top)
    code, _, err = run_cli(capsys, *argv, "--overwrite-output-dir", "--no-resume")
    assert code == 0, err
    assert (tmp_path / "moved" / name).read_bytes() == b"the user's own"
    assert outputs.is_finished(run) and not (run / top).exists()


def test_overwrite_refuses_a_recipe_folder_with_a_users_file_in_a_stage(capsys, tmp_path,
                                                                         glue_dir, tiny_model):
    """The same inside a recipe's stages: a note dropped into a BAM teacher's folder."""
    root = tmp_path / "bam"
    stage = root / outputs.BAM_TEACHERS_DIR / "rte"
    stage.mkdir(parents=True)
    (root / outputs.MARKER_FILE).write_text("{}")
    (stage / outputs.RUN_CONFIG_FILE).write_text("{}")
    (stage / "notes.txt").write_text("mine")
    (stage / "train_predictions.jsonl").write_text("{}\n")  # the teacher's cache: its own
    before = snapshot(root)
    code, _, err = run_cli(capsys, "bam", "--tasks", "rte,mrpc", "--teachers", "none",
                           "--data-dir", str(glue_dir), "--model", str(tiny_model),
                           "--output-dir", str(root), "--overwrite-output-dir")
    line = assert_one_line_error(code, err, "teachers/rte/notes.txt",
                                 "which its run did not write")
    assert "train_predictions" not in line
    assert {k: v for k, v in snapshot(root).items() if k != outputs.LOCK_FILE} == before


def test_the_committed_benchmark_run_folders_are_recognized():
    folders = [p.parent for p in (REPO / "benchmarks").rglob(outputs.RUN_CONFIG_FILE)]
    assert folders and all(outputs.is_run_folder(folder) for folder in folders)


@pytest.mark.parametrize("old_file", [outputs.BENCH_RUN_FILE, outputs.BAM_SUMMARY_FILE,
                                      "student/run_config.json", "teachers/rte/run_config.json"])
def test_an_old_style_recipe_folder_is_ours(tmp_path, old_file):
    root = tmp_path / "bam"
    (root / old_file).parent.mkdir(parents=True, exist_ok=True)
    (root / old_file).write_text("{}")
    (root / "student" / "checkpoints").mkdir(parents=True, exist_ok=True)
    outputs.open_recipe_folder(root, {}, overwrite=True, hold=True,
                               keep=(outputs.BENCH_RUN_FILE,))
    try:
        left = sorted(p.name for p in root.iterdir())
        kept = [outputs.BENCH_RUN_FILE] if old_file == outputs.BENCH_RUN_FILE else []
        assert left == sorted([outputs.LOCK_FILE, outputs.MARKER_FILE, *kept])
    finally:
        outputs.release_run_lock(root, outputs._HELD_LOCKS.pop(root.resolve()))


def test_export_refuses_a_non_empty_folder_and_leaves_no_partial_copy(capsys, tmp_path,
                                                                       tiny_classifier):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "export", str(tiny_classifier), str(out))
    assert_one_line_error(code, err, "not an empty folder")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    fresh = tmp_path / "fresh"
    code, _, _ = run_cli(capsys, "export", str(tiny_classifier), str(fresh))
    assert code == 0 and (fresh / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "fresh"]


# ---------------------------------------------------------------------------------------------
# 2. One writer per folder

HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on testhost, started now"); f.flush()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def held_run(tmp_path, tiny_model, sentiment_files, capsys):
    """A finished-or-not run folder whose lock another process holds (then ends)."""
    run = tmp_path / "run"
    assert main(train_argv(tiny_model, sentiment_files, run, "--num-train-epochs", "1")) == 0
    (run / outputs.METRICS_FILE).unlink()  # an unfinished run, as while it trains
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / outputs.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield run, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("extra", [[], ["--overwrite-output-dir"], ["--no-resume"]],
                         ids=["resume", "overwrite", "no-resume"])
def test_a_second_run_on_a_held_folder_stops_at_once(capsys, held_run, tiny_model,
                                                     sentiment_files, extra):
    run, pid = held_run
    before = snapshot(run)
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run, *extra))
    assert_one_line_error(code, err, "is being written by another run", f"pid {pid}",
                          "testhost")
    assert snapshot(run) == before


def test_the_lock_is_released_when_a_run_fails(capsys, tmp_path, tiny_model, sentiment_files,
                                               monkeypatch):
    from selftune.trainer import SelftuneTrainer

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(SelftuneTrainer, "train", fail)
        code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert_one_line_error(code, err, "input/output error")
    assert not outputs._HELD_LOCKS
    code, _, _ = run_cli(capsys, *train_argv(tiny_model, sentiment_files, run))
    assert code == 0


def test_bench_claim_and_run_lock_do_not_deadlock(tmp_path, tiny_model, sentiment_files):
    """`selftune bench` holds its claim beside the folder and hands it to the run it starts;
    the run's own lock is inside the folder: the run goes through."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    with outputs.directory_lock(run, wait=False) as claim:
        assert claim is not None
        # As bench does: its options file first, then the run reads them from there.
        outputs.write_json_atomic(run / outputs.BENCH_RUN_FILE, {"seed": 42})
        proc = subprocess.run([sys.executable, "-m", "selftune",
                               *train_argv(tiny_model, sentiment_files, run)],
                              pass_fds=(claim.fileno(),), env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert outputs.is_finished(run)


def test_a_bam_recipe_on_a_held_folder_stops_at_once(capsys, tmp_path, glue_dir, tiny_model):
    root = tmp_path / "bam"
    root.mkdir()
    (root / "bam.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / outputs.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "bam", "--tasks", "rte,mrpc", "--teachers", "none",
                               "--data-dir", str(glue_dir), "--model", str(tiny_model),
                               "--output-dir", str(root), "--overwrite-output-dir")
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(code, err, "is being written by another run", f"pid {holder.pid}")
    assert (root / "bam.json").read_text() == "{}"


def test_a_bam_recipe_refuses_a_users_folder(capsys, tmp_path, glue_dir, tiny_model):
    root = tmp_path / "mine"
    (root / "teachers").mkdir(parents=True)
    (root / "teachers" / "list.txt").write_text("mine")
    code, _, err = run_cli(capsys, "bam", "--tasks", "rte,mrpc", "--teachers", "none",
                           "--data-dir", str(glue_dir), "--model", str(tiny_model),
                           "--output-dir", str(root))
    assert_one_line_error(code, err, "is not a selftune run folder")
    assert (root / "teachers" / "list.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 3. Integrity: corrupt checkpoints are skipped for the previous good one


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) * 3 // 4
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    path.write_bytes(b"\x80\x04garbage, not what was saved")


def _pickle_payload(path: Path) -> None:
    """A pickle that would run code when loaded without weights_only (it is never run)."""
    import torch

    torch.save({"state": print}, path)


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 64)


CORRUPTIONS = {
    "truncated-weights": ("model.safetensors", _truncate, True),
    "flipped-weights": ("model.safetensors", _flip_middle, True),
    "appended-weights": ("model.safetensors", _append, True),
    "garbled-optimizer": ("optimizer.pt", _garble, True),
    "garbled-trainer-state": ("trainer_state.json", _garble, True),
    "missing-rng-state": ("rng_state.pth", Path.unlink, True),
    "missing-optimizer": ("optimizer.pt", Path.unlink, True),
    "missing-scheduler": ("scheduler.pt", Path.unlink, True),
    # Checkpoints of earlier versions have no manifest: what can be checked still is.
    "no-manifest-truncated-weights": ("model.safetensors", _truncate, False),
    "no-manifest-garbled-weights": ("model.safetensors", _garble, False),
    "no-manifest-missing-rng-state": ("rng_state.pth", Path.unlink, False),
    "no-manifest-pickled-optimizer": ("optimizer.pt", lambda p: _pickle_payload(p), False),
    "no-manifest-truncated-optimizer": ("optimizer.pt", _truncate, False),
}
STEPS = 6  # 48 examples, batch 8, one epoch


def _interrupt_at(step: int):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Interrupt()


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tiny_model):
    """An interrupted run with two good checkpoints (steps 2 and 4), and the weights an
    uninterrupted run of the same options ends with."""
    from selftune.config import TrainConfig
    from selftune.training import train

    root = tmp_path_factory.mktemp("interrupted")
    files = (write_csv(root / "train.csv", ["text", "label"], sentiment_rows(48, 0)),
             write_csv(root / "dev.csv", ["text", "label"], sentiment_rows(16, 1)))

    def config(out: Path) -> TrainConfig:
        return TrainConfig(model=str(tiny_model), train_file=str(files[0]),
                           validation_file=str(files[1]), output_dir=str(out), seed=3,
                           num_train_epochs=1, learning_rate=1e-2,
                           per_device_train_batch_size=8, warmup_ratio=0.0, save_steps=2,
                           logging_steps=2)

    train(config(root / "reference"))
    run = root / "run"
    for step in (3, 5):
        with pytest.raises(KeyboardInterrupt):
            train(config(run), callbacks=[_interrupt_at(step)])
        if step == 3:
            shutil.copytree(run / "checkpoints" / "checkpoint-2", root / "checkpoint-2")
    shutil.copytree(root / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    reference = load_file(str(root / "reference" / "model.safetensors"))
    return run, files, reference, config


def _resume_copy(tmp_path, interrupted_run) -> tuple[Path, list[str]]:
    run, files, _, _ = interrupted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    argv = ["train", "--train-file", str(files[0]), "--validation-file", str(files[1]),
            "--model", json.loads((run / "run_config.json").read_text())["model"],
            "--output-dir", str(copy), "--seed", "3", "--num-train-epochs", "1",
            "--learning-rate", "1e-2", "--per-device-train-batch-size", "8",
            "--warmup-ratio", "0", "--save-steps", "2", "--logging-steps", "2"]
    return copy, argv


@pytest.mark.parametrize("name,corrupt,with_manifest", CORRUPTIONS.values(),
                         ids=CORRUPTIONS.keys())
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(
        capsys, tmp_path, interrupted_run, name, corrupt, with_manifest):
    run, argv = _resume_copy(tmp_path, interrupted_run)
    newest = run / "checkpoints" / "checkpoint-4"
    if not with_manifest:
        for checkpoint in (run / "checkpoints").iterdir():
            (checkpoint / MANIFEST_FILE).unlink()
    corrupt(newest / name)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    metrics = json.loads((run / outputs.METRICS_FILE).read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert "cannot be resumed from" in (run / outputs.LOG_FILE).read_text()
    weights = load_file(str(run / "model.safetensors"))
    reference = interrupted_run[2]
    assert all(bool((weights[k] == reference[k]).all()) for k in reference)


def test_the_newest_intact_checkpoint_is_used(capsys, tmp_path, interrupted_run):
    run, argv = _resume_copy(tmp_path, interrupted_run)
    code, _, _ = run_cli(capsys, *argv)
    assert code == 0
    metrics = json.loads((run / outputs.METRICS_FILE).read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4")
    weights = load_file(str(run / "model.safetensors"))
    reference = interrupted_run[2]
    assert all(bool((weights[k] == reference[k]).all()) for k in reference)


def test_no_intact_checkpoint_stops_naming_the_file(capsys, tmp_path, interrupted_run):
    run, argv = _resume_copy(tmp_path, interrupted_run)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        _truncate(run / "checkpoints" / checkpoint / "model.safetensors")
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "checkpoint-4/model.safetensors", "--no-resume")
    code, _, _ = run_cli(capsys, *argv, "--no-resume")
    assert code == 0
    weights = load_file(str(run / "model.safetensors"))
    reference = interrupted_run[2]
    assert all(bool((weights[k] == reference[k]).all()) for k in reference)


def test_a_resume_over_changed_data_is_refused(capsys, tmp_path, interrupted_run):
    """The training file was replaced with other data under the same name (here: the run's
    saved options are pointed at a new file, as the fixture's file is shared)."""
    run, argv = _resume_copy(tmp_path, interrupted_run)
    changed = write_csv(tmp_path / "train.csv", ["text", "label"], sentiment_rows(48, 7))
    saved = json.loads((run / outputs.RUN_CONFIG_FILE).read_text())
    (run / outputs.RUN_CONFIG_FILE).write_text(json.dumps({**saved, "train_file": str(changed)}))
    argv[argv.index("--train-file") + 1] = str(changed)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "other training data", "--no-resume")
    assert (run / "checkpoints" / "checkpoint-4").is_dir()
    code, _, _ = run_cli(capsys, *argv, "--no-resume")
    assert code == 0


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_garbage_objective_state_stops_naming_the_file(capsys, tmp_path, tiny_model,
                                                         sentiment_files, with_manifest):
    """sda's teacher window is state an exact resume needs: garbage there is never used."""
    from selftune.config import TrainConfig
    from selftune.trainer import OBJECTIVE_STATE_FILE
    from selftune.training import train

    run = tmp_path / "run"
    argv = train_argv(tiny_model, sentiment_files, run, "--strategy", "sda",
                      "--per-device-train-batch-size", "8", "--save-steps", "2")
    config = TrainConfig(model=str(tiny_model), train_file=str(sentiment_files[0]),
                         validation_file=str(sentiment_files[1]), output_dir=str(run),
                         num_train_epochs=1, learning_rate=1e-2, warmup_ratio=0.0,
                         per_device_train_batch_size=8, save_steps=2, strategy="sda")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[_interrupt_at(3)])
    checkpoint = run / "checkpoints" / "checkpoint-2"
    _garble(checkpoint / OBJECTIVE_STATE_FILE)
    if not with_manifest:
        (checkpoint / MANIFEST_FILE).unlink()
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, OBJECTIVE_STATE_FILE, "--no-resume")
    code, _, err = run_cli(capsys, *argv, "--no-resume")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 3b. Corrupt model folders given to train, evaluate, predict, export


@pytest.fixture()
def finished_run(tmp_path, tiny_model, sentiment_files, capsys) -> Path:
    run = tmp_path / "finished"
    assert main(train_argv(tiny_model, sentiment_files, run)) == 0
    capsys.readouterr()
    return run


def _use_model(command: str, model: Path, files: tuple[Path, Path], tmp_path: Path) -> list[str]:
    train, dev = map(str, files)
    return {
        "train": train_argv(model, files, tmp_path / "next"),
        "evaluate": ["evaluate", str(model), "--validation-file", dev],
        "predict": ["predict", str(model), "--input-file", dev,
                    "--output-file", str(tmp_path / "p.jsonl")],
        "export": ["export", str(model), str(tmp_path / "exported")],
    }[command]


COMMANDS = ["train", "evaluate", "predict", "export"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corrupt", [_truncate, _garble], ids=["truncated", "garbled"])
def test_a_corrupt_model_folder_is_named_with_the_file(capsys, tmp_path, finished_run,
                                                       sentiment_files, command, corrupt):
    corrupt(finished_run / "model.safetensors")
    code, _, err = run_cli(capsys, *_use_model(command, finished_run, sentiment_files, tmp_path))
    assert_one_line_error(code, err, str(finished_run / "model.safetensors"))
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_changed_weights_are_caught_by_the_manifest(capsys, tmp_path, finished_run,
                                                    sentiment_files, command):
    """A flipped byte among the weights' values still loads: only the hash can tell."""
    _flip_middle(finished_run / "model.safetensors")
    code, _, err = run_cli(capsys, *_use_model(command, finished_run, sentiment_files, tmp_path))
    assert_one_line_error(code, err, "model.safetensors is corrupt", MANIFEST_FILE)


def _with_nan_weights(source: Path, target: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("command", COMMANDS)
def test_non_finite_weights_are_refused_at_load(capsys, tmp_path, tiny_classifier,
                                                sentiment_files, command):
    model = _with_nan_weights(tiny_classifier, tmp_path / "nan-model")
    code, _, err = run_cli(capsys, *_use_model(command, model, sentiment_files, tmp_path))
    assert_one_line_error(code, err, "NaN or infinite weights")
    assert not (tmp_path / "next").exists()


def test_predictions_are_valid_json_even_when_logits_overflow(capsys, tmp_path,
                                                              tiny_classifier, sentiment_files,
                                                              monkeypatch):
    import numpy as np

    from selftune import evaluation

    def overflowing(model, tokenizer, records, *args, **kwargs):
        logits = np.zeros((len(records), 2), dtype=np.float32)
        logits[0] = [np.inf, np.inf]
        return logits

    monkeypatch.setattr(evaluation, "predict_logits", overflowing)
    out = tmp_path / "p.jsonl"
    code, _, _ = run_cli(capsys, "predict", str(tiny_classifier), "--input-file",
                         str(sentiment_files[1]), "--output-file", str(out))
    assert code == 0

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    rows = [json.loads(line, parse_constant=refuse) for line in out.read_text().splitlines()]
    probs = [key for key in rows[0] if key.startswith("prob_")]
    assert len(probs) == 2 and rows[0][probs[0]] is None and rows[1][probs[0]] == 0.5


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_label_list_that_does_not_fit_the_classifier_is_named(capsys, tmp_path,
                                                                tiny_classifier, sentiment_files,
                                                                command):
    model = tmp_path / "relabelled"
    shutil.copytree(tiny_classifier, model)
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {"0": "neg", "1": "neutral", "2": "pos"}
    config["label2id"] = {"neg": 0, "neutral": 1, "pos": 2}
    (model / "config.json").write_text(json.dumps(config))
    before = snapshot(model)
    code, _, err = run_cli(capsys, *_use_model(command, model, sentiment_files, tmp_path))
    assert_one_line_error(code, err, f"the weights in {model} do not fit its config.json",
                          "3 labels")
    assert snapshot(model) == before and not (tmp_path / "p.jsonl").exists()


def test_a_model_with_code_of_its_own_names_trust_remote_code(capsys, tmp_path, tiny_model,
                                                             sentiment_files, monkeypatch):
    """It used to blame HF_HUB_OFFLINE: the model is local; what it lacks is trust."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "mycustom"
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModel": "custom.Model"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("raise SystemExit('REMOTE CODE RAN')\n")
    code, _, err = run_cli(capsys, *_use_model("train", model, sentiment_files, tmp_path))
    line = assert_one_line_error(code, err, "needs its own code", "--trust-remote-code")
    assert "HF_HUB_OFFLINE" not in line and "REMOTE CODE RAN" not in err
    assert not (tmp_path / "next").exists()


def test_a_sentence_pair_file_given_to_a_single_text_model_is_named(capsys, tmp_path,
                                                                   tiny_classifier):
    pairs = write_csv(tmp_path / "pairs.csv", ["sentence1", "sentence2", "label"],
                      [(text, text, label) for text, label in sentiment_rows(8, 1)])
    out = tmp_path / "p.jsonl"
    code, _, err = run_cli(capsys, "predict", str(tiny_classifier), "--input-file", str(pairs),
                           "--output-file", str(out))
    assert_one_line_error(code, err, str(pairs), "sentence1", "--text-columns")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 4. Full disk and I/O errors: one line, exit 2, and the same command again finishes the run


def _oserror(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


def _torch_full(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")


def _torch_full_as_seen(*args, **kwargs):
    # What torch.save raised on a real full tmpfs (2026-12-07): no errno, no "space".
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 103360 "
                           "vs 103252") from None


def _patch_final_metrics(monkeypatch, error):
    original = outputs.write_json_atomic

    def write(path, data):
        if path.name == outputs.METRICS_FILE:
            error()
        return original(path, data)

    monkeypatch.setattr(outputs, "write_json_atomic", write)


FAULTS = {
    "marker-enospc": (lambda mp: mp.setattr(outputs, "write_json_atomic",
                                            _oserror(errno.ENOSPC)), "no space left"),
    "checkpoint-weights-safetensors": (
        lambda mp: mp.setattr("transformers.modeling_utils.safe_save_file", _safetensors_full),
        "no space left"),
    "checkpoint-optimizer-torch": (
        lambda mp: mp.setattr("transformers.trainer.torch.save", _torch_full),
        "writing a checkpoint failed"),
    "checkpoint-optimizer-torch-unexpected-pos": (
        lambda mp: mp.setattr("transformers.trainer.torch.save", _torch_full_as_seen),
        "most likely a full disk"),
    "checkpoint-manifest-edquot": (
        lambda mp: mp.setattr("selftune.integrity.write_manifest", _oserror(errno.EDQUOT)),
        "disk quota exceeded"),
    "final-metrics-enospc": (
        lambda mp: _patch_final_metrics(mp, _oserror(errno.ENOSPC)), "no space left"),
    "final-metrics-erofs": (
        lambda mp: _patch_final_metrics(mp, _oserror(errno.EROFS)), "read-only"),
    "final-metrics-eio": (
        lambda mp: _patch_final_metrics(mp, _oserror(errno.EIO)), "input/output error"),
}


@pytest.mark.parametrize("fault,message", FAULTS.values(), ids=FAULTS.keys())
def test_a_full_or_failing_disk_ends_in_one_line_and_the_run_resumes(
        capsys, tmp_path, tiny_model, sentiment_files, monkeypatch, fault, message):
    run = tmp_path / "run"
    argv = train_argv(tiny_model, sentiment_files, run, "--save-steps", "1")
    with monkeypatch.context() as patch:
        fault(patch)
        code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert not outputs._HELD_LOCKS
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert outputs.is_finished(run)


def _mount_tmpfs(folder: Path, size: str, remount: bool = False) -> bool:
    options = f"remount,size={size}" if remount else f"size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_ends_in_one_line_and_the_run_then_finishes(
        capsys, tmp_path, tiny_model, sentiment_files):
    """Not a simulation: a tmpfs of 256 KB fills up while the first checkpoint is written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        argv = train_argv(tiny_model, sentiment_files, disk / "run")
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "free disk space")
        assert _mount_tmpfs(disk, "50m", remount=True)  # space freed
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert outputs.is_finished(disk / "run")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# 5. Data that cannot be meant


def _load(train: Path, dev: Path, **options):
    from selftune.data.loading import DataOptions, load_task_data

    return load_task_data(DataOptions(train_file=str(train), validation_file=str(dev),
                                      **options))


def _expect_error(fragment: str, function, *args, **kwargs) -> str:
    from selftune.errors import SelftuneError

    with pytest.raises(SelftuneError) as info:
        function(*args, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("suffix,content", [
    (".csv", "text,text,label\na,good movie,1\nb,bad movie,0\n"),
    (".tsv", "text\ttext\tlabel\na\tgood movie\t1\nb\tbad movie\t0\n"),
    (".jsonl", '{"text": "a", "text": "good movie", "label": 1}\n'),
], ids=["csv", "tsv", "jsonl"])
def test_duplicate_column_names_are_refused(tmp_path, suffix, content):
    train = tmp_path / f"train{suffix}"
    train.write_text(content)
    _expect_error("more than once", _load, train, train)


LABELS = {"csv": ("0", "1", "0.0", "1.0", "01", "+1"), "tsv": ("0", "1", "0.0", "1.0", "01", "00"),
          "jsonl": (0, 1, 0.0, 1.0, "01", "1.0")}


@pytest.mark.parametrize("kind", LABELS)
def test_numeric_labels_are_one_class_however_written(tmp_path, kind):
    texts = [text for text, _ in sentiment_rows(12, 0)]
    labels = [LABELS[kind][i % len(LABELS[kind])] for i in range(12)]
    train = tmp_path / f"train.{kind}"
    if kind == "jsonl":
        train.write_text("".join(json.dumps({"text": t, "label": label}) + "\n"
                                 for t, label in zip(texts, labels, strict=True)))
    else:
        sep = "," if kind == "csv" else "\t"
        train.write_text(f"text{sep}label\n" + "".join(
            f"{t}{sep}{label}\n" for t, label in zip(texts, labels, strict=True)))
    data = _load(train, train)
    assert data.task.label_names == ("0", "1")
    expected = [1 if float(label) else 0 for label in labels]
    assert [r["label"] for r in data.train] == expected


@pytest.mark.parametrize("value", [["good", "movie"], {"a": "good"}, 3, True],
                         ids=["list", "object", "number", "boolean"])
def test_a_jsonl_text_that_is_not_a_string_is_refused(tmp_path, value):
    train = tmp_path / "train.jsonl"
    rows = [{"text": "a good movie", "label": 1}, {"text": value, "label": 0}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _expect_error("not a string", _load, train, train)
    assert f"{train}:2" in message


def test_a_jsonl_label_that_is_a_list_is_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"text": "a good movie", "label": 1}, {"text": "bad", "label": [0, 1]}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _expect_error(f"{train}:2", _load, train, train)


def test_csv_line_numbers_count_physical_lines(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"a review\nover three\nlines",1\n"bad movie",0\n,1\n')
    message = _expect_error("empty text", _load, train, train)
    assert f"{train}:6" in message  # the sixth line of the file, the third record


def test_csv_field_count_error_names_the_physical_line(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"two\nlines",1\n\nbad movie,0,extra\n')
    message = _expect_error("3 fields", _load, train, train)
    assert f"{train}:5" in message


def test_a_huge_label_stops_without_promising_a_checkpoint(capsys, tmp_path, tiny_model):
    """A 1e308 regression label makes the first loss infinite: the message must not say "the
    last checkpoint is kept" when none was written."""
    rows = [(text, 1e308 if i == 3 else 0.5) for i, (text, _) in enumerate(sentiment_rows(32, 0))]
    data = write_csv(tmp_path / "reg.csv", ["text", "label"], rows)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(tiny_model, (data, data), run,
                                               "--label-type", "regression", "--disable-tqdm"))
    assert_one_line_error(code, err, "the training loss became inf at step",
                          "no checkpoint was written yet")
    assert "is kept" not in err


def test_a_resume_from_an_end_of_epoch_checkpoint_keeps_the_learning_curve(capsys, tmp_path,
                                                                          tiny_model,
                                                                          sentiment_files):
    from selftune.config import TrainConfig
    from selftune.training import train

    def config(out: Path) -> TrainConfig:  # 48 examples, batch 16: 3 steps an epoch
        return TrainConfig(model=str(tiny_model), train_file=str(sentiment_files[0]),
                           validation_file=str(sentiment_files[1]), output_dir=str(out),
                           num_train_epochs=2, per_device_train_batch_size=16, save_steps=3,
                           learning_rate=1e-2)

    whole = train(config(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed"), callbacks=[_interrupt_at(4)])
    resumed = train(config(tmp_path / "resumed"))
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]]
    assert resumed["history"] == whole["history"]  # the same weights evaluated, same scores


# ---------------------------------------------------------------------------------------------
# 6. Options out of range, refused before any folder is made

BAD_OPTIONS = [
    (["--num-train-epochs", "inf"], "--num-train-epochs must be a finite number"),
    (["--num-train-epochs", "nan"], "--num-train-epochs must be a finite number"),
    (["--num-train-epochs", "0"], "--num-train-epochs must be positive"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["--learning-rate=-1e-5"], "--learning-rate must be positive"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--split-seed", "-1"], "--split-seed must be in"),
    (["--dev-fraction", "1.5"], "--dev-fraction must be between 0 and 1"),
    (["--dev-fraction", "0"], "--dev-fraction must be between 0 and 1"),
    (["--dev-fraction", "nan"], "--dev-fraction must be a finite number"),
    (["--max-train-samples", "0"], "--max-train-samples must be positive"),
    (["--max-eval-samples", "-3"], "--max-eval-samples must be positive"),
    (["--sd-lambda", "inf"], "--sd-lambda must be a finite number"),
    (["--seed", "-1"], "--seed must be in"),
    (["--num-train-epochs=-1"], "--num-train-epochs must be positive"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be positive"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be positive"),
    (["--save-steps=-2"], "--save-steps must be positive"),
    (["--max-seq-length", "0"], "--max-seq-length must be at least"),
    (["--warmup-ratio=-0.1"], "--warmup-ratio must be in [0, 1)"),
    (["--sd-lambda=-1"], "--sd-lambda must be non-negative"),
    (["--max-grad-norm=-1"], "--max-grad-norm must be non-negative"),
]


@pytest.mark.parametrize("option,message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_options_out_of_range_are_refused_before_any_folder(capsys, tmp_path, tiny_model,
                                                            sentiment_files, option, message):
    out = tmp_path / "runs" / "x"
    code, _, err = run_cli(capsys, *train_argv(tiny_model, sentiment_files, out, *option))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "runs").exists()


def test_bam_options_out_of_range_are_refused_before_any_folder(capsys, tmp_path, glue_dir):
    out = tmp_path / "bam"
    code, _, err = run_cli(capsys, "bam", "--tasks", "rte,mrpc", "--data-dir", str(glue_dir),
                           "--teacher-epochs", "inf", "--output-dir", str(out))
    assert_one_line_error(code, err, "--teacher-epochs must be a finite number")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 7. Under torchrun: one line from the first process, exit status 2 on every process

_ports = iter(range(31000 + os.getpid() % 500, 65000))


def torchrun(argv: list[str], log_dir: Path, timeout: int = 300) -> tuple[str, list[str]]:
    """Run ``selftune`` under ``torchrun --nproc-per-node 2``: the launcher's own output, and
    each process's stderr (0, 1), kept apart by torchrun's --redirects."""
    import re
    import signal

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(next(_ports)), "--log-dir", str(log_dir), "--redirects", "3",
         "-m", "selftune", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        launcher, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: kill the launcher and every process it started
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"hung for {timeout} s: {proc.communicate()[0][-3000:]}") from None
    exit_codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", launcher)]
    assert sorted(exit_codes) == [2, 2], launcher[-3000:]  # each process exited with 2
    stderr = [(next(log_dir.rglob(f"attempt_0/{rank}/stderr.log"))).read_text()
              for rank in (0, 1)]
    return launcher, stderr


def _users_folder(tmp_path: Path) -> Path:
    own = tmp_path / "mine"
    (own / "checkpoints").mkdir(parents=True)
    (own / "checkpoints" / "best.pt").write_bytes(b"my weights")
    return own


TORCHRUN_ERRORS = {
    "bad-option-value": (["--num-train-epochs", "inf"], "--num-train-epochs must be a finite"),
    "missing-file": (["--train-file", "no-such.csv"], "no-such.csv"),
    "refused-folder": (["--output-dir", "{mine}"], "is not a selftune run folder"),
    # argparse's: its usage line (pointing at --help), then the error.
    "not-a-number": (["--learning-rate", "fast"], "invalid float value: 'fast'"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("extra,message", TORCHRUN_ERRORS.values(), ids=TORCHRUN_ERRORS.keys())
def test_a_user_error_under_torchrun_is_one_line_and_exit_2_on_every_process(
        tmp_path, tiny_model, sentiment_files, extra, message):
    own = _users_folder(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    argv = train_argv(tiny_model, sentiment_files, out,
                      *[value.format(mine=own) for value in extra])
    launcher, (first, second) = torchrun(argv, tmp_path / "logs")
    assert second == "", second  # the other process is silent
    assert "Traceback" not in first
    if "invalid" not in message:
        assert first.startswith("selftune: error: ") and message in first, first
        assert first.strip().count("\n") == 0, first
    else:
        assert first.startswith("usage: selftune train [options]; see") and message in first
        assert first.strip().count("\n") == 1, first
    assert not out.exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("logs/")} == before
