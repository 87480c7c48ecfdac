"""Fixed-seed fingerprints of every training path, to show that a change of structure changes no
number: tiny runs of each strategy, of a [CLS]-normalized run and of a BAM! student, each
summarized as a hash of its saved weights and of its dev metrics.

    python benchmarks/fingerprint.py > before.txt      # on the old code
    python benchmarks/fingerprint.py > after.txt       # on the new code
    diff before.txt after.txt                          # empty: bit-identical

Extra options for every run (e.g. to switch a new default off) go in $FINGERPRINT_EXTRA:
    FINGERPRINT_EXTRA="--no-packing" python benchmarks/fingerprint.py
Takes about a minute on one core; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_tiny_model, sentiment_rows, write_csv, write_glue_folder  # noqa: E402

# Metrics that a rerun reproduces (not times, memory or versions).
STABLE_KEYS = ("metrics", "score", "history", "teacher_metrics", "teacher_average_metrics",
               "last_iterate_metrics", "vote_metrics", "tasks", "teacher_tasks", "train_loss",
               "global_steps")


def trained_state(path: Path) -> dict:
    """A saved model's tensors as trained: where a [CLS] normalizer was folded into the saved
    classifier, the classifier and normalizer as trained, from cls_norm/unfolded.safetensors,
    under the names they have in the model."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unfolded = path.parent / "cls_norm" / "unfolded.safetensors"
    if unfolded.is_file():
        pooler = next(k for k in tensors if k.endswith("pooler.dense.weight")).removesuffix(
            "dense.weight")
        for name, tensor in load_file(str(unfolded)).items():
            tensors[name if name.startswith("classifier.") else pooler + name] = tensor
    return tensors


def weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("model.safetensors")):
        tensors = trained_state(path)
        for name in sorted(tensors):
            digest.update(f"{path.relative_to(folder)}:{name}".encode())
            digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def metrics_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        stable = {k: metrics[k] for k in STABLE_KEYS if k in metrics}
        digest.update(json.dumps(stable, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def main() -> None:
    from selftune.cli import main as selftune

    extra = shlex.split(os.environ.get("FINGERPRINT_EXTRA", ""))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny")
        train = write_csv(root / "train.csv", ["text", "label"], sentiment_rows(48, 0))
        dev = write_csv(root / "dev.csv", ["text", "label"], sentiment_rows(16, 1))
        glue = write_glue_folder(root / "data")
        common = ["--model", str(model), "--train-file", str(train), "--validation-file",
                  str(dev), "--num-train-epochs", "3", "--per-device-train-batch-size", "8",
                  "--learning-rate", "3e-3", "--seed", "3", *extra]
        runs = {
            "baseline": [],
            "se": ["--strategy", "se"],
            "sda": ["--strategy", "sda"],
            "sdv": ["--strategy", "sdv", "--sd-k", "2"],
            "ema": ["--strategy", "ema"],
            "sda-interval": ["--strategy", "sda", "--snapshot-interval", "3"],
            "cls-batchnorm": ["--cls-norm", "batchnorm"],
        }
        for name, options in runs.items():
            out = root / name
            with contextlib.redirect_stdout(sys.stderr):  # stdout: the fingerprints only
                code = selftune(["train", *common, *options, "--output-dir", str(out)])
            assert code == 0, f"{name} failed"
            print(f"{name:14s} weights {weights_hash(out)} metrics {metrics_hash(out)}")
        out = root / "bam"
        with contextlib.redirect_stdout(sys.stderr):
            code = selftune(["bam", "--tasks", "rte,stsb", "--model", str(model), "--data-dir",
                             str(glue), "--output-dir", str(out), "--num-train-epochs", "1",
                             "--per-device-train-batch-size", "4", "--learning-rate", "1e-3",
                             "--teacher-epochs", "1", "--teacher-batch-size", "4", *extra])
        assert code == 0, "bam failed"
        print(f"{'bam':14s} weights {weights_hash(out)} metrics {metrics_hash(out)}")


if __name__ == "__main__":
    main()
