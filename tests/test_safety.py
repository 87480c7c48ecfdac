"""Safe loading: no pickle loads in our code, no remote code unless asked, safetensors only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "selftune"


def calls_in_source() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                calls.append((f"{path.name}:{node.lineno}", node))
    return calls


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_pickle_loads_in_our_code():
    unsafe = []
    for where, call in calls_in_source():
        name = dotted(call.func)
        if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load"):
            unsafe.append((where, name))
        if name == "torch.load":
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                    and weights_only[0].value.value is True):
                unsafe.append((where, name))
    assert not unsafe, unsafe


def test_trust_remote_code_is_never_hard_coded_on():
    forced = [where for where, call in calls_in_source() for k in call.keywords
              if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
              and k.value.value is True]
    assert not forced, forced


@pytest.fixture()
def model_with_remote_code(tiny_model, tmp_path) -> Path:
    """A model directory whose config points at custom code that would stop the process."""
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_model.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config",
                          "AutoModelForSequenceClassification": "custom.Model"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("raise SystemExit('REMOTE CODE RAN')\n")
    return model


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_runs_only_when_asked(trust, model_with_remote_code, sentiment_files,
                                          tmp_path):
    train, dev = map(str, sentiment_files)
    command = [sys.executable, "-m", "selftune", "train", "--train-file", train,
               "--validation-file", dev, "--model", str(model_with_remote_code),
               "--num-train-epochs", "1", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(command + (["--trust-remote-code"] if trust else []),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert ("REMOTE CODE RAN" in proc.stderr) == trust
    assert (proc.returncode == 0) == (not trust), proc.stderr[-2000:]


def test_saved_model_directories_hold_no_pickle(tiny_model, sentiment_files, tmp_path):
    from selftune.config import TrainConfig
    from selftune.training import train

    train_file, dev_file = sentiment_files
    out = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model), train_file=str(train_file),
                      validation_file=str(dev_file), output_dir=str(out), strategy="sda",
                      num_train_epochs=1))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "teacher/model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
