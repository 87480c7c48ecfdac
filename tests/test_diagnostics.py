"""diagnose-cls: statistics against direct computations, and the command's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selftune.cli import main
from selftune.diagnostics import Representations, summarize


def test_summary_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    x[:, 3] = 10 + 0.1 * rng.normal(size=500)  # one large, non-centred dimension
    s = summarize(Representations("cls", x))
    np.testing.assert_allclose(s["mean"], x.mean(0))
    np.testing.assert_allclose(s["std"], x.std(0))
    assert s["largest_mean_dims"][0][0] == 3
    share = ((x ** 2).max(1) / (x ** 2).sum(1)).mean()
    assert s["top1_share"] == pytest.approx(share)
    assert s["offset_ratio"] == pytest.approx(
        np.linalg.norm(x.mean(0)) / np.linalg.norm(x, axis=1).mean())
    assert s["dims_mean_beyond_std"] == 1
    centred = summarize(Representations("cls", x - x.mean(0)))
    assert centred["offset_ratio"] < 1e-12


def test_diagnose_command_writes_tables_and_plots(tiny_model, sentiment_files, tmp_path, capsys):
    train, dev = map(str, sentiment_files)
    out = tmp_path / "diag"
    code = main(["diagnose-cls", "--train-file", train, "--validation-file", dev, "--model",
                 str(tiny_model), "--steps", "2", "--norms", "none,standardize,isobn",
                 "--batch-size", "8", "--out-dir", str(out)])
    assert code == 0
    result = json.loads((out / "diagnostics.json").read_text())
    assert [s["source"] for s in result["summaries"]] == ["cls", "pooler"]
    assert set(result["gradient_norms"]["pooler"]) == {"none", "standardize", "isobn"}
    assert all(len(v) == 2 and all(g > 0 for g in v)
               for v in result["gradient_norms"]["cls"].values())
    assert (out / "cls_stats.png").stat().st_size > 1000
    assert (out / "grad_norms.png").stat().st_size > 1000
    assert "| pooler | isobn |" in (out / "diagnostics.md").read_text()


def test_diagnose_rejects_unknown_norm(capsys):
    assert main(["diagnose-cls", "--task", "rte", "--norms", "none,whitening"]) == 2
    assert "unknown --norms" in capsys.readouterr().err


def test_every_normalization_is_measured_on_the_same_batches(tiny_model, sentiment_files,
                                                             tmp_path, monkeypatch):
    import selftune.diagnostics as diagnostics

    measured = diagnostics.gradient_norms
    seen: dict[tuple[str, str], list[list[list[int]]]] = {}

    def recording(model, batches, kind, source, *args, **kwargs):
        seen[(source, kind)] = [b["input_ids"].tolist() for b in batches]
        return measured(model, batches, kind, source, *args, **kwargs)

    monkeypatch.setattr(diagnostics, "gradient_norms", recording)
    train, dev = map(str, sentiment_files)
    # 48 examples in batches of 20: 3 batches per pass, so 4 steps start a second pass.
    assert main(["diagnose-cls", "--train-file", train, "--validation-file", dev, "--model",
                 str(tiny_model), "--steps", "4", "--norms", "none,center,batchnorm",
                 "--batch-size", "20", "--out-dir", str(tmp_path / "d")]) == 0
    assert len(seen) == 6
    first = next(iter(seen.values()))
    assert len(first) == 4
    assert all(batches == first for batches in seen.values())
