"""End to end on the packaged default model and real RTE: a few steps, then a plain reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selftune.cli import main

from .conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "glue" / "RTE").is_dir(),
                                reason=f"real RTE data not found under {SHARED_DATA}")


def test_default_model_on_real_rte(tmp_path, capsys):
    out = tmp_path / "rte"
    code = main(["train", "--task", "rte", "--data-dir", str(SHARED_DATA),
                 "--max-train-samples", "64", "--max-eval-samples", "32",
                 "--num-train-epochs", "1", "--per-device-train-batch-size", "16",
                 "--output-dir", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["accuracy"] == metrics["metrics"]["accuracy"]
    assert metrics["global_steps"] == 4 and metrics["num_eval_examples"] == 32

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = tokenizer(["A man is playing a guitar."], ["Someone plays music."],
                      return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 2)

    code = main(["evaluate", str(out), "--task", "rte", "--data-dir", str(SHARED_DATA),
                 "--max-eval-samples", "32"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out)
    # The same fixed 32-example dev subset: the saved model reproduces the reported accuracy.
    assert evaluated["metrics"]["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
