"""A [CLS]-normalized run folder loads right with plain transformers, or refuses to load."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from selftune.cli import main
from selftune.models.heads import UNFOLDED_FILE, NormalizedPooler
from selftune.models.loading import load_finetuned
from selftune.training import train

from .conftest import write_csv
from .test_cls_norm_training import TEXTS
from .test_training import tiny_config


def predictions_of_selftune(model_dir, tmp_path) -> list[dict[str, float]]:
    texts = write_csv(tmp_path / "texts.csv", ["text"], [[t] for t in TEXTS])
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(model_dir), "--input-file", str(texts),
                 "--output-file", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return [{k.removeprefix("prob_"): v for k, v in row.items() if k.startswith("prob_")}
            for row in rows]


@pytest.mark.parametrize("kind", ["batchnorm", "standardize", "isobn"])
def test_a_folded_run_folder_gives_selftunes_outputs_in_a_plain_pipeline(
        kind, tiny_model, sentiment_files, tmp_path):
    out = tmp_path / kind
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm=kind, num_train_epochs=2))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config.get("selftune_cls_norm", "none") == "none"
    assert (out / UNFOLDED_FILE).is_file()
    # selftune itself still uses the normalizer as trained, not the folded copy.
    assert isinstance(load_finetuned(str(out)).base_model.pooler, NormalizedPooler)
    expected = predictions_of_selftune(out, tmp_path)

    classify = transformers.pipeline("text-classification", model=str(out), top_k=None)
    assert not isinstance(classify.model.base_model.pooler, NormalizedPooler)
    got = [{s["label"]: s["score"] for s in scores} for scores in classify(TEXTS)]
    for mine, theirs in zip(expected, got, strict=True):
        assert mine.keys() == theirs.keys()
        for label, prob in mine.items():
            assert theirs[label] == pytest.approx(prob, abs=1e-5)
    # The normalizer acts (the test could fail): dropping it changes the outputs.
    unfolded = load_finetuned(str(out))
    unfolded.base_model.pooler.cls_norm = torch.nn.Identity()
    tokenizer = classify.tokenizer
    with torch.no_grad():
        dropped = unfolded.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    probs = torch.tensor([[row[n] for n in unfolded.config.id2label.values()] for row in got])
    assert not torch.allclose(dropped.softmax(-1), probs, atol=1e-5)


@pytest.mark.parametrize("kind, source", [("layernorm", "auto"), ("standardize", "cls")])
def test_an_unfoldable_run_folder_refuses_plain_loading(kind, source, tiny_model,
                                                        sentiment_files, tmp_path, capsys):
    out = tmp_path / kind
    result = train(tiny_config(tiny_model, sentiment_files, out, cls_norm=kind,
                               cls_source=source, num_train_epochs=1))
    for load in (lambda: AutoModelForSequenceClassification.from_pretrained(out),
                 lambda: transformers.pipeline("text-classification", model=str(out))):
        with pytest.raises(ValueError, match="selftune predict"):
            load()
    # selftune's own commands still load it, with its normalizer.
    assert isinstance(load_finetuned(str(out)).base_model.pooler, NormalizedPooler)
    assert len(predictions_of_selftune(out, tmp_path)) == len(TEXTS)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--validation-file", str(sentiment_files[1])]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(result["score"])
    assert main(["export", str(out), str(tmp_path / "plain")]) == 2
    assert "cannot be folded" in capsys.readouterr().err


def test_export_of_a_folded_folder_is_the_same_plain_model(tiny_model, sentiment_files,
                                                            tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bn"
    train(tiny_config(tiny_model, sentiment_files, out, cls_norm="batchnorm",
                      num_train_epochs=1))
    assert main(["export", str(out), str(tmp_path / "plain")]) == 0
    exported = load_file(tmp_path / "plain" / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor)
