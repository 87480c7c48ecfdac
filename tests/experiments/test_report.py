"""Tests for selftune_experiments.report on small hand-made results files.

Numbers in the tables are checked against values computed here directly with numpy/scipy, so a
wrong mean, std, pairing or p-value in the report fails a test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from selftune.errors import SelftuneError
from selftune_experiments.report import RunRecord, build_report, load_results, write_report
from selftune_experiments.stats import holm_adjust

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = [0, 1, 2, 3, 4]

# Hand-made per-seed scores (percent). "gain" is baseline + ~5 on every seed; "noisy" is
# baseline + 0.1 on average, but swinging ±6 from seed to seed.
RTE_BASE = [60.3, 62.1, 58.8, 61.4, 59.7]
RTE_GAIN = [65.5, 67.0, 63.9, 66.2, 64.9]
RTE_NOISY = [66.4, 56.0, 64.8, 55.5, 65.8]
# mrpc: two metrics; score is their mean.
MRPC_BASE = [(80.1, 86.0), (81.5, 87.2), (79.0, 85.1), (82.2, 87.9), (80.8, 86.4)]
MRPC_GAIN = [(83.0, 88.1), (84.2, 89.0), (82.1, 87.6), (84.9, 89.8), (83.5, 88.7)]
# stsb: a regression task (pearson, spearman); "sda" has no stsb runs at all.
STSB_BASE = [(84.1, 84.6), (85.0, 85.2), (83.7, 84.0), (84.6, 85.1), (84.9, 85.3)]
STSB_GAIN = [(85.2, 85.5), (86.1, 86.0), (84.5, 84.9), (85.7, 86.2), (85.8, 86.1)]


def run(
    task: str,
    variant: str,
    seed: int,
    metrics: dict[str, float],
    *,
    history: bool = True,
    teacher: float | None = None,
    wall: float = 100.0,
    machine: str | dict[str, Any] = "box-a",
    **extra: Any,
) -> dict[str, Any]:
    """One results line as the runner writes it (with keys the report must ignore)."""
    score = float(np.mean(list(metrics.values())))
    rec = {
        "schema": 1,
        "run_id": f"{task}__{variant}__seed{seed}",
        "config_hash": f"hash-{task}-{variant}",
        "task": task,
        "strategy": variant,
        "variant": variant,
        "seed": seed,
        "config": {"lr": 2e-5, "nested": {"a": [1, 2]}},
        "metrics": metrics,
        "score": score,
        "teacher_metrics": None if teacher is None else {"accuracy": teacher},
        "teacher_score": teacher,
        "history": (
            [{"epoch": e, "metrics": {}, "score": score - 3.0 + e} for e in (1.0, 2.0, 3.0)]
            if history
            else []
        ),
        "wall_time_s": wall,
        "train_examples_per_s": 2500.0 / wall,
        "peak_memory_mb": 1800.0,
        "versions": {"torch": "2.13.0"},
        "machine": machine if isinstance(machine, dict) else {"hostname": machine, "cpu": "x"},
        "finished_at": "2026-11-22T05:00:00+00:00",
        "some_future_key": {"ignored": True},
    }
    rec.update(extra)
    return rec


def write_lines(path: Path, items: list[dict[str, Any] | str]) -> Path:
    path.write_text(
        "\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n",
        encoding="utf-8",
    )
    return path


def grid_lines() -> list[dict[str, Any] | str]:
    """The main fixture: 4 tasks, 5 variants, with all the awkward cases mixed in."""
    items: list[dict[str, Any] | str] = []
    for i, s in enumerate(SEEDS):
        items.append(run("rte", "baseline", s, {"accuracy": RTE_BASE[i]}, wall=100.0 + i))
        items.append(
            run("rte", "gain", s, {"accuracy": RTE_GAIN[i]}, wall=150.0 + i,
                teacher=RTE_GAIN[i] + 1.0 + 0.1 * i)
        )
        items.append(run("rte", "noisy", s, {"accuracy": RTE_NOISY[i]}))
        a, f = MRPC_BASE[i]
        items.append(run("mrpc", "baseline", s, {"accuracy": a, "f1": f}))
        a, f = MRPC_GAIN[i]
        items.append(run("mrpc", "gain", s, {"accuracy": a, "f1": f}))
        items.append(run("mrpc", "sda", s, {"accuracy": a - 0.5, "f1": f - 0.5}))
        p, sp = STSB_BASE[i]
        items.append(run("stsb", "baseline", s, {"pearson": p, "spearman": sp}))
        p, sp = STSB_GAIN[i]
        items.append(run("stsb", "gain", s, {"pearson": p, "spearman": sp}))
    # One-seed variant.
    items.append(run("rte", "single", 0, {"accuracy": 61.0}))
    # cola has no baseline runs at all.
    items.append(run("cola", "gain", 0, {"matthews_correlation": 30.0}))
    items.append(run("cola", "gain", 1, {"matthews_correlation": 34.0}))
    # A corrupted middle line (line 12 of the file, counting from 1).
    items.insert(11, '{"schema": 1, "run_id": "rte__sda__seed0", "task": "rte" "oops"}')
    # A duplicated run_id: the first copy has a wrong score that must NOT be used.
    items.insert(2, run("rte", "baseline", 1, {"accuracy": 0.0}))
    # A truncated last line, as left by a killed process.
    items.append('{"schema": 1, "run_id": "rte__gain__seed9", "task": "rte", "metr')
    return items


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "results.jsonl", grid_lines())


def table(markdown: str, heading: str, section: str | None = None) -> list[dict[str, str]]:
    """The first Markdown table after ``heading`` (within ``section`` if given), as dicts."""
    text = markdown
    if section is not None:
        text = text[text.index(section):]
    lines = text[text.index(heading + "\n"):].splitlines()
    rows = []
    started = False
    for line in lines[1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif started:
            break
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r, strict=True)) for r in body]


def by_variant(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["variant"]: r for r in rows}


def mean_std(cell: str) -> tuple[float, float | None]:
    m = re.fullmatch(r"(-?\d+\.\d\d) ± (n/a|\d+\.\d\d)", cell)
    assert m, f"not a 'mean ± std' cell: {cell!r}"
    return float(m.group(1)), None if m.group(2) == "n/a" else float(m.group(2))


def assert_mean_std(cell: str, values: list[float]) -> None:
    mean, std = mean_std(cell)
    assert mean == pytest.approx(np.mean(values), abs=0.006)
    if len(values) == 1:
        assert std is None
    else:
        assert std == pytest.approx(np.std(values, ddof=1), abs=0.006)


def assert_p(cell: str, expected: float) -> None:
    """The cell shows ``expected`` with 3 significant digits."""
    assert re.fullmatch(r"\d\.\d\d(e-\d+)?|0\.0*[1-9]\d\d", cell), f"not 3 sig. digits: {cell!r}"
    assert float(cell) == pytest.approx(expected, rel=6e-3)


# ------------------------------------------------------------------------------------ loading


def test_load_results_reports_every_problem(results_file: Path) -> None:
    records, problems = load_results(results_file)
    by_line = {p.line: p for p in problems}
    n_lines = len(results_file.read_text().splitlines())
    # Middle line: inserted at index 11, then shifted by the duplicate inserted at index 2.
    assert by_line[13].kind == "malformed"
    assert "not valid JSON" in by_line[13].message and "rte__sda__seed0" in by_line[13].message
    assert by_line[n_lines].kind == "malformed"
    assert "last line" in by_line[n_lines].message and "truncated" in by_line[n_lines].message
    dup = [p for p in problems if p.kind == "duplicate"]
    assert len(dup) == 1 and "rte__baseline__seed1" in dup[0].message
    assert "line 3" in dup[0].message  # where the overridden copy was
    # 40 grid runs + single + 2 cola + duplicate copy (overridden) - nothing else.
    assert len(records) == 43
    assert len({r.run_id for r in records}) == 43
    kept = next(r for r in records if r.run_id == "rte__baseline__seed1")
    assert kept.score == pytest.approx(RTE_BASE[1])


def test_invalid_record_and_blank_lines(tmp_path: Path) -> None:
    bad = run("rte", "baseline", 1, {"accuracy": 60.0})
    del bad["score"]
    path = write_lines(
        tmp_path / "r.jsonl",
        [run("rte", "baseline", 0, {"accuracy": 60.0}), "", "   ", bad, "[1, 2]",
         run("rte", "baseline", 2, {"accuracy": 61.0})],
    )
    records, problems = load_results(path)
    assert [r.seed for r in records] == [0, 2]
    assert [(p.line, p.kind) for p in problems] == [(4, "invalid"), (5, "invalid")]
    assert "score" in problems[0].message and "rte__baseline__seed1" in problems[0].message


def test_nan_score_is_reported_not_used(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    good = json.dumps(run("rte", "baseline", 0, {"accuracy": 60.0}))
    path.write_text(good + "\n" + good.replace('"seed": 0', '"seed": 1').replace(
        '"score": 60.0', '"score": NaN').replace("seed0", "seed1") + "\n")
    records, problems = load_results(path)
    assert len(records) == 1
    assert problems[0].line == 2 and "score" in problems[0].message


def test_missing_empty_and_garbage_files_raise(tmp_path: Path) -> None:
    with pytest.raises(SelftuneError, match="not found"):
        load_results(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SelftuneError, match="no usable runs"):
        load_results(tmp_path / "empty.jsonl")
    (tmp_path / "junk.jsonl").write_text("not json\n{\n")
    with pytest.raises(SelftuneError, match="line 1"):
        load_results(tmp_path / "junk.jsonl")
    with pytest.raises(SelftuneError, match="folder"):
        load_results(tmp_path)


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SelftuneError) as exc:
        load_results(tmp_path / "nope.jsonl")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------- report


@pytest.fixture
def report(results_file: Path, tmp_path: Path) -> str:
    return write_report(results_file, tmp_path / "out", baseline="baseline")


def test_header_counts_runs_and_lists_problems(report: str, results_file: Path) -> None:
    n_lines = len(results_file.read_text().splitlines())
    assert "- Runs: 43 " in report
    assert "Problems in the results file (3)" in report
    assert "line 13 (malformed)" in report
    assert f"line {n_lines} (malformed): last line" in report
    assert "(duplicate): run_id 'rte__baseline__seed1'" in report
    # Problems come before the tables, so nobody reads a table without seeing them.
    assert report.index("Problems in the results file") < report.index("## Scores per task")


def test_rte_table_matches_numpy_and_scipy(report: str) -> None:
    rows = by_variant(table(report, "### rte"))
    assert list(rows) == ["baseline", "gain", "noisy", "sda", "single"]
    assert rows["baseline"]["seeds"] == "5"
    assert_mean_std(rows["baseline"]["accuracy"], RTE_BASE)
    assert_mean_std(rows["baseline"]["score"], RTE_BASE)  # duplicate: the later copy is used
    assert rows["baseline"]["verdict"] == "baseline"

    gain = rows["gain"]
    d = np.array(RTE_GAIN) - np.array(RTE_BASE)
    assert_mean_std(gain["score"], RTE_GAIN)
    delta, dstd = mean_std(gain["Δ score"].lstrip("+"))
    assert delta == pytest.approx(d.mean(), abs=0.006)
    assert dstd == pytest.approx(d.std(ddof=1), abs=0.006)
    assert gain["pairs"] == "5"
    assert_p(gain["t-test p"], sps.ttest_rel(RTE_GAIN, RTE_BASE).pvalue)
    assert_p(gain["Wilcoxon p"], sps.wilcoxon(d).pvalue)
    assert_p(gain["Mann-Whitney p"],
             sps.mannwhitneyu(RTE_GAIN, RTE_BASE, alternative="two-sided").pvalue)
    assert gain["verdict"] == "better"

    noisy = rows["noisy"]
    p_noisy = sps.ttest_rel(RTE_NOISY, RTE_BASE).pvalue
    assert p_noisy > 0.05  # the fixture really is inside the noise
    assert_p(noisy["t-test p"], p_noisy)
    assert noisy["verdict"].startswith("within noise (p=")
    assert float(noisy["verdict"][len("within noise (p="):-1]) == pytest.approx(p_noisy, rel=6e-3)


def test_one_seed_and_missing_cell_render(report: str) -> None:
    rte = by_variant(table(report, "### rte"))
    single = rte["single"]
    assert single["seeds"] == "1"
    assert single["score"] == "61.00 ± n/a"
    assert single["t-test p"] == "–"
    assert "not enough seeds" in single["verdict"]
    assert rte["sda"]["seeds"] == "0" and rte["sda"]["verdict"] == "no runs"
    stsb = by_variant(table(report, "### stsb"))
    assert stsb["sda"]["seeds"] == "0" and stsb["sda"]["score"] == "–"


def test_stability_table_shows_spread_and_worst_seed(report: str) -> None:
    rows = [r for r in table(report, "## Stability across seeds") if r["task"] == "rte"]
    rte = by_variant(rows)
    assert list(rte) == ["baseline", "gain", "noisy", "single"]   # no row without runs
    noisy = rte["noisy"]
    worst = int(np.argmin(RTE_NOISY))
    best = int(np.argmax(RTE_NOISY))
    assert float(noisy["std"]) == pytest.approx(np.std(RTE_NOISY, ddof=1), abs=0.006)
    assert noisy["worst (seed)"] == f"{RTE_NOISY[worst]:.2f} ({SEEDS[worst]})"
    assert noisy["best (seed)"] == f"{RTE_NOISY[best]:.2f} ({SEEDS[best]})"
    assert float(noisy["range"]) == pytest.approx(max(RTE_NOISY) - min(RTE_NOISY), abs=0.006)
    # Its mean is the baseline's, but its worst seed is 3.3 points below the baseline's worst.
    assert float(noisy["worst − baseline's worst"]) == pytest.approx(
        min(RTE_NOISY) - min(RTE_BASE), abs=0.006)
    assert float(rte["gain"]["worst − baseline's worst"]) == pytest.approx(
        min(RTE_GAIN) - min(RTE_BASE), abs=0.006)
    assert rte["baseline"]["worst − baseline's worst"] == "–"
    assert rte["single"]["std"] == "–" and rte["single"]["range"] == "0.00"
    # cola has no baseline: the column is a dash, not a number against nothing.
    cola = [r for r in table(report, "## Stability across seeds") if r["task"] == "cola"]
    assert [r["worst − baseline's worst"] for r in cola] == ["–"]


def test_multi_metric_and_regression_tables(report: str) -> None:
    mrpc = by_variant(table(report, "### mrpc"))
    assert_mean_std(mrpc["gain"]["accuracy"], [a for a, _ in MRPC_GAIN])
    assert_mean_std(mrpc["gain"]["f1"], [f for _, f in MRPC_GAIN])
    assert_mean_std(mrpc["gain"]["score"], [(a + f) / 2 for a, f in MRPC_GAIN])

    rows = table(report, "### stsb")
    assert list(rows[0])[:5] == ["variant", "seeds", "pearson", "spearman", "score"]
    stsb = by_variant(rows)
    assert_mean_std(stsb["baseline"]["pearson"], [p for p, _ in STSB_BASE])
    assert_mean_std(stsb["baseline"]["spearman"], [s for _, s in STSB_BASE])
    base = [(p + s) / 2 for p, s in STSB_BASE]
    gain = [(p + s) / 2 for p, s in STSB_GAIN]
    assert_p(stsb["gain"]["t-test p"], sps.ttest_rel(gain, base).pvalue)


def test_task_without_baseline_has_a_note_and_no_comparison(report: str) -> None:
    cola_part = report[report.index("### cola"):]
    assert "Baseline `baseline` has no runs on cola" in cola_part.split("###")[1]
    cola = by_variant(table(report, "### cola"))
    assert "Δ score" not in cola["gain"] and "verdict" not in cola["gain"]
    assert_mean_std(cola["gain"]["matthews_correlation"], [30.0, 34.0])


def test_mean_across_tasks(report: str) -> None:
    rows = by_variant(table(report, "## Mean across tasks"))
    task_means = {
        "rte": np.mean(RTE_GAIN),
        "mrpc": np.mean([(a + f) / 2 for a, f in MRPC_GAIN]),
        "stsb": np.mean([(p + s) / 2 for p, s in STSB_GAIN]),
        "cola": 32.0,
    }
    assert rows["gain"]["tasks"] == "4/4"
    assert float(rows["gain"]["mean score"]) == pytest.approx(
        np.mean(list(task_means.values())), abs=0.006
    )
    base_means = {
        "rte": np.mean(RTE_BASE),
        "mrpc": np.mean([(a + f) / 2 for a, f in MRPC_BASE]),
        "stsb": np.mean([(p + s) / 2 for p, s in STSB_BASE]),
    }
    assert rows["baseline"]["tasks"].startswith("3/4 †") and "cola" in rows["baseline"]["tasks"]
    assert float(rows["baseline"]["mean score"]) == pytest.approx(
        np.mean(list(base_means.values())), abs=0.006
    )
    # Δ vs baseline only over the 3 tasks both have.
    shared_delta = np.mean([task_means[t] - base_means[t] for t in base_means])
    cell = rows["gain"]["Δ vs baseline (shared tasks)"]
    m = re.fullmatch(r"([+-]\d+\.\d\d) \(3 task\(s\)\)", cell)
    assert m and float(m.group(1)) == pytest.approx(shared_delta, abs=0.006)
    assert rows["sda"]["tasks"] == "1/4 † (missing: rte, stsb, cola)"

    # The test of that Δ: per seed, the average over the 3 shared tasks, paired by seed.
    def seed_averages(rte: list[float], mrpc: list[tuple[float, float]],
                      stsb: list[tuple[float, float]]) -> np.ndarray:
        return np.array([np.mean([r, np.mean(m), np.mean(st)])
                         for r, m, st in zip(rte, mrpc, stsb, strict=True)])

    gain_avg = seed_averages(RTE_GAIN, MRPC_GAIN, STSB_GAIN)
    base_avg = seed_averages(RTE_BASE, MRPC_BASE, STSB_BASE)
    gain = rows["gain"]
    assert gain["seeds on all shared tasks"] == "5"
    delta, dstd = mean_std(gain["Δ of per-seed averages"].lstrip("+"))
    assert delta == pytest.approx((gain_avg - base_avg).mean(), abs=0.006)
    assert dstd == pytest.approx((gain_avg - base_avg).std(ddof=1), abs=0.006)
    assert_p(gain["t-test p"], sps.ttest_rel(gain_avg, base_avg).pvalue)
    assert_p(gain["Mann-Whitney p"],
             sps.mannwhitneyu(gain_avg, base_avg, alternative="two-sided").pvalue)
    assert gain["verdict"] == "better"
    # sda ran MRPC only; its per-seed averages are its MRPC scores.
    sda_mrpc = np.array([np.mean(m) - 0.5 for m in MRPC_GAIN])
    base_mrpc = np.array([np.mean(m) for m in MRPC_BASE])
    assert_p(rows["sda"]["t-test p"], sps.ttest_rel(sda_mrpc, base_mrpc).pvalue)
    assert rows["baseline"]["verdict"] == "baseline"


def test_teacher_table(report: str) -> None:
    rows = by_variant(table(report, "### rte", section="## Teacher vs student"))
    assert list(rows) == ["gain"]
    teacher = [g + 1.0 + 0.1 * i for i, g in enumerate(RTE_GAIN)]
    assert_mean_std(rows["gain"]["student score"], RTE_GAIN)
    assert_mean_std(rows["gain"]["teacher score"], teacher)
    d = np.array(teacher) - np.array(RTE_GAIN)
    delta, dstd = mean_std(rows["gain"]["Δ (teacher − student)"].lstrip("+"))
    assert delta == pytest.approx(d.mean(), abs=0.006)
    assert dstd == pytest.approx(d.std(ddof=1), abs=0.006)
    assert_p(rows["gain"]["t-test p"], sps.ttest_rel(teacher, RTE_GAIN).pvalue)
    assert rows["gain"]["verdict"] == "teacher better"


def test_cost_table(report: str) -> None:
    rows = [r for r in table(report, "## Cost") if r["task"] == "rte"]
    cost = by_variant(rows)
    base_wall = np.mean([100.0 + i for i in SEEDS])
    gain_wall = np.mean([150.0 + i for i in SEEDS])
    assert float(cost["gain"]["wall time (s)"]) == pytest.approx(gain_wall, abs=0.06)
    assert float(cost["gain"]["wall time ÷ baseline"]) == pytest.approx(
        gain_wall / base_wall, abs=0.006
    )
    assert float(cost["gain"]["train examples/s"]) == pytest.approx(
        np.mean([2500.0 / (150.0 + i) for i in SEEDS]), abs=0.06
    )
    assert cost["baseline"]["wall time ÷ baseline"] == "1.00"
    assert "only comparable between runs timed in the same setting" in report
    assert "Setting: `box-a, x`" in report and "setting" not in rows[0]


def test_timings_are_compared_only_within_one_setting(tmp_path: Path) -> None:
    """Another host, another CPU behind the same hostname, or another thread count is another
    setting: a variant is timed against the baseline's runs of its own setting only."""
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}, wall=100.0) for s in SEEDS]
    one_thread = {"hostname": "box-a", "cpu": "x", "torch_threads": 1}
    items += [run("rte", "baseline", s, {"accuracy": 60.0}, wall=180.0, machine=one_thread)
              for s in (5, 6)]
    for s in SEEDS:
        items.append(run("rte", "gain", s, {"accuracy": RTE_GAIN[s]}, wall=120.0))
        other = ({"hostname": "box-b"}, {"hostname": "box-a", "cpu": "y"}, one_thread)[s % 3]
        items.append(run("rte", "gain-elsewhere", s, {"accuracy": RTE_GAIN[s]}, wall=500.0,
                         machine=other))
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    assert "timed in 4 settings" in md and "`box-a, x, 1 thread` (3 runs)" in md
    rows = table(md, "## Cost")
    ratio = {(r["variant"], r["setting"]): r["wall time ÷ baseline"] for r in rows}
    assert ratio[("gain", "`box-a, x`")] == "1.20"
    assert ratio[("gain-elsewhere", "`box-a, x, 1 thread`")] == f"{500.0 / 180.0:.2f}"
    assert ratio[("gain-elsewhere", "`box-b`")] == "–"  # no baseline timed there
    assert ratio[("gain-elsewhere", "`box-a, y`")] == "–"


def test_resumed_runs_are_left_out_of_the_timings(tmp_path: Path) -> None:
    items = [run("rte", v, s, {"accuracy": 60.0 + s}, wall=100.0 if v == "baseline" else 150.0)
             for v in ("baseline", "x") for s in SEEDS]
    items[-1].update(wall_time_s=20.0, resumed_from="runs/x/checkpoints/checkpoint-9")
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    cost = by_variant(table(md, "## Cost"))
    assert cost["x"]["runs"] == "4" and cost["x"]["wall time ÷ baseline"] == "1.50"
    assert "1 run resumed from a checkpoint" in md


def test_pngs_are_written(report: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name in ("report.md", "scores.png", "learning_curves.png"):
        assert (out / name).stat().st_size > 0
    for name in ("scores.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "report.md").read_text(encoding="utf-8") == report
    assert "![scores per seed](scores.png)" in report
    assert "learning_curves.png" in report


def test_no_history_no_learning_curves(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "learning_curves.png").write_bytes(b"stale")
    items = [run("rte", v, s, {"accuracy": 60.0 + s + (v == "x")}, history=False)
             for v in ("baseline", "x") for s in SEEDS]
    items[0].pop("history")  # a missing history key is the same as an empty one
    md = write_report(write_lines(tmp_path / "r.jsonl", items), out, "baseline")
    assert (out / "scores.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "learning_curves.png").exists()
    assert "learning_curves" not in md
    assert "Problems in the results file: none" in md


def test_no_baseline_named(results_file: Path, tmp_path: Path) -> None:
    md = write_report(results_file, tmp_path / "nb", baseline=None)
    rte = by_variant(table(md, "### rte"))
    assert "Δ score" not in rte["gain"] and "verdict" not in rte["gain"]
    assert_mean_std(rte["gain"]["score"], RTE_GAIN)
    assert "none named" in md
    assert "wall time ÷ baseline" in md  # column present, but empty
    assert by_variant(table(md, "## Cost"))["gain"]["wall time ÷ baseline"] == "–"


def test_unknown_baseline_raises(results_file: Path, tmp_path: Path) -> None:
    with pytest.raises(SelftuneError, match="'basline' is not in the results.*gain"):
        write_report(results_file, tmp_path / "x", baseline="basline")


def test_a_verdict_from_two_pairs_says_it_is_provisional(tmp_path: Path) -> None:
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    items += [run("rte", "gain", s, {"accuracy": RTE_BASE[s] + 3.0 + 0.1 * s}) for s in (0, 1)]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    gain = by_variant(table(md, "### rte"))["gain"]
    assert sps.ttest_rel([63.3, 65.2], RTE_BASE[:2]).pvalue < 0.05
    assert gain["pairs"] == "2"
    assert gain["verdict"] == "better (2 pairs: provisional)"


def test_the_same_gain_on_every_seed_is_judged_by_the_exact_wilcoxon(tmp_path: Path) -> None:
    """One RTE example (100/277 points) better on each of five seeds: t = ∞, p = 2/2^5."""
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    items += [run("rte", "step", s, {"accuracy": RTE_BASE[s] + 100 / 277}) for s in SEEDS]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    step = by_variant(table(md, "### rte"))["step"]
    assert len(SEEDS) == 5 and step["t-test p"] == "–"
    assert step["verdict"] == "within noise (p=0.0625) (equal differences: exact Wilcoxon)"


def test_unpaired_comparison_shows_mann_whitney(tmp_path: Path) -> None:
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    items += [run("rte", "gain", s + 10, {"accuracy": RTE_GAIN[s]}) for s in SEEDS]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    gain = by_variant(table(md, "### rte"))["gain"]
    expected = sps.mannwhitneyu(RTE_GAIN, RTE_BASE, alternative="two-sided").pvalue
    assert_p(gain["Mann-Whitney p"], expected)
    assert gain["t-test p"] == "–" and gain["pairs"] == "–"
    assert float(gain["Δ score"]) == pytest.approx(
        np.mean(RTE_GAIN) - np.mean(RTE_BASE), abs=0.006
    )
    assert gain["verdict"] == ("better" if expected < 0.05 else "within noise (p=" + gain[
        "Mann-Whitney p"] + ")")


def test_default_out_dir_and_in_memory_records(results_file: Path, tmp_path: Path) -> None:
    md = write_report(results_file, baseline="baseline")
    assert (results_file.parent / "report" / "report.md").read_text(encoding="utf-8") == md
    # build_report also takes plain results-line dicts.
    dicts = [run("stsb", "baseline", s, {"pearson": p, "spearman": q})
             for s, (p, q) in enumerate(STSB_BASE)]
    md2 = build_report(dicts, "baseline", tmp_path / "mem")
    assert_mean_std(by_variant(table(md2, "### stsb"))["baseline"]["pearson"],
                    [p for p, _ in STSB_BASE])
    assert isinstance(RunRecord.from_dict(dicts[0]).metrics["spearman"], float)


def test_mixed_configurations_are_warned(tmp_path: Path) -> None:
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    items[-1]["config_hash"] = "changed"
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", None)
    assert "rte/baseline mixes runs of 2 different configurations" in md


def test_p_value_formatting_three_significant_digits(tmp_path: Path) -> None:
    # A gain of exactly +3 with a tiny jitter gives a very small p: shown in scientific form.
    items = [run("rte", "baseline", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    items += [run("rte", "big", s, {"accuracy": RTE_BASE[s] + 3.0 + 0.01 * s}) for s in SEEDS]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    cell = by_variant(table(md, "### rte"))["big"]["t-test p"]
    expected = sps.ttest_rel([b + 3.0 + 0.01 * s for s, b in enumerate(RTE_BASE)], RTE_BASE).pvalue
    assert expected < 1e-4 and "e-" in cell
    assert_p(cell, expected)
    assert math.isclose(float(cell), float(f"{expected:.3g}"))


def test_every_table_row_has_as_many_cells_as_its_header(report: str, tmp_path: Path) -> None:
    no_base = write_report(tmp_path / "results.jsonl", tmp_path / "nb", baseline=None)
    for md in (report, no_base):
        widths: list[int] = []
        for line in md.splitlines() + [""]:
            if line.startswith("|"):
                widths.append(len(line.strip().strip("|").split(" | ")))
            elif widths:
                assert len(set(widths)) == 1, widths
                widths = []


def test_several_results_files_are_one_set_of_runs(tmp_path: Path) -> None:
    base = write_lines(tmp_path / "base.jsonl",
                       [run("rte", "baseline", s, {"accuracy": 50.0 + s}) for s in range(3)])
    other = write_lines(tmp_path / "sda.jsonl",
                        [*(run("rte", "sda", s, {"accuracy": 53.0 + s}) for s in range(3)),
                         "{broken"])
    markdown = write_report([base, other], tmp_path / "out", "baseline")
    rows = by_variant(table(markdown, "rte"))
    assert rows["sda"]["Δ score"].startswith("+3.00")
    assert "sda.jsonl" in markdown  # a problem names the file it comes from


def test_tasks_and_variants_can_be_selected(results_file: Path, tmp_path: Path) -> None:
    md = write_report(results_file, tmp_path / "sel", "baseline", tasks=["rte", "mrpc"],
                      variants=["gain"])
    assert "### rte" in md and "### mrpc" in md and "### stsb" not in md
    assert set(by_variant(table(md, "### rte"))) == {"baseline", "gain"}  # baseline kept
    across = by_variant(table(md, "## Mean across tasks"))
    assert across["gain"]["tasks"] == "2/2"  # the mean covers the selected tasks only
    with pytest.raises(SelftuneError, match="no runs with task qnli.*tasks found: cola, mrpc"):
        write_report(results_file, tmp_path / "x", "baseline", tasks=["qnli"])


def test_the_across_task_test_pairs_only_seeds_with_every_shared_task(tmp_path: Path) -> None:
    base = {"rte": [60.0, 61.0, 59.0, 62.0, 60.5], "cola": [30.0, 31.0, 29.0, 32.0, 30.5]}
    gain = {"rte": [62.0, 62.5, 61.5, 63.0, 62.0], "cola": [31.0, 33.0, 30.0, 34.5, 31.5]}
    items = [run(t, "baseline", s, {"accuracy": v[s]}) for t, v in base.items() for s in SEEDS]
    # gain has no cola run for seed 2: seed 2 must not enter the per-seed averages.
    items += [run(t, "gain", s, {"accuracy": v[s]}) for t, v in gain.items() for s in SEEDS
              if (t, s) != ("cola", 2)]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")
    row = by_variant(table(md, "## Mean across tasks"))["gain"]
    seeds = [0, 1, 3, 4]
    base_avg = [np.mean([base["rte"][s], base["cola"][s]]) for s in seeds]
    gain_avg = [np.mean([gain["rte"][s], gain["cola"][s]]) for s in seeds]
    assert row["seeds on all shared tasks"] == "4"
    assert_p(row["t-test p"], sps.ttest_rel(gain_avg, base_avg).pvalue)
    delta, _ = mean_std(row["Δ of per-seed averages"].lstrip("+"))
    assert delta == pytest.approx(np.mean(np.subtract(gain_avg, base_avg)), abs=0.006)


def test_a_run_recorded_in_two_files_is_no_conflict(tmp_path: Path) -> None:
    """BAM! teachers shared by two grids appear in both results files: the same run."""
    teacher = [run("rte", "teacher", s, {"accuracy": RTE_BASE[s]}) for s in SEEDS]
    first = write_lines(tmp_path / "a.jsonl", teacher + [
        run("rte", "bam", s, {"accuracy": RTE_GAIN[s]}) for s in SEEDS])
    second = write_lines(tmp_path / "b.jsonl", teacher + [
        run("rte", "lambda-0", s, {"accuracy": RTE_NOISY[s]}) for s in SEEDS])
    md = write_report([first, second], tmp_path / "o", "bam")
    assert "Problems in the results file: none" in md
    changed = write_lines(tmp_path / "c.jsonl", [
        run("rte", "teacher", 0, {"accuracy": 10.0})])
    md = write_report([first, changed], tmp_path / "o2", "bam")
    assert "(duplicate): run_id 'rte__teacher__seed0'" in md


def test_holm_p_adjusts_over_every_task_and_variant_and_qualifies_the_verdict(
        tmp_path: Path) -> None:
    """Twelve comparisons (three variants on four tasks): a gain with t-test p ≈ 0.03 is
    "better" on its own but not after adjusting for the other eleven tests."""
    rng = np.random.default_rng(3)
    tasks = ["rte", "mrpc", "stsb", "cola"]
    base = {t: 60 + rng.normal(0, 1, len(SEEDS)) for t in tasks}
    other = {(t, v): base[t] + rng.normal(0, 1, len(SEEDS)) for t in tasks for v in ("a", "b")}
    # "c": a gain on rte only (p ≈ 0.03), noise elsewhere.
    other.update({(t, "c"): base[t] + rng.normal(0, 1, len(SEEDS)) for t in tasks})
    other[("rte", "c")] = base["rte"] + np.array([0.3, 1.6, 0.5, 1.3, 2.2])
    items = [run(t, "baseline", s, {"m": base[t][s]}) for t in tasks for s in SEEDS]
    items += [run(t, v, s, {"m": scores[s]}) for (t, v), scores in other.items() for s in SEEDS]
    md = write_report(write_lines(tmp_path / "r.jsonl", items), tmp_path / "o", "baseline")

    keys = sorted(other)
    raw = [sps.ttest_rel(other[k], base[k[0]]).pvalue for k in keys]
    expected = dict(zip(keys, holm_adjust(raw), strict=True))
    for t in tasks:
        rows = by_variant(table(md, f"### {t}"))
        assert rows["baseline"]["Holm p"] == "–"
        for v in ("a", "b", "c"):
            assert_p(rows[v]["Holm p"], expected[(t, v)])
    rte_c = by_variant(table(md, "### rte"))["c"]
    p_raw = sps.ttest_rel(other[("rte", "c")], base["rte"]).pvalue
    assert p_raw < 0.05 <= expected[("rte", "c")]  # the fixture does what it says
    assert rte_c["verdict"] == f"better (not after Holm: p={rte_c['Holm p']})"
    assert "- Multiple tests:" in md

    # The mean across tasks is its own family: the three variants' tests of the 4-task mean.
    across = by_variant(table(md, "## Mean across tasks"))
    means = {v: np.mean([other[(t, v)] for t in tasks], axis=0) for v in ("a", "b", "c")}
    base_mean = np.mean([base[t] for t in tasks], axis=0)
    across_expected = holm_adjust([sps.ttest_rel(means[v], base_mean).pvalue
                                   for v in ("a", "b", "c")])
    for v, p_adj in zip(("a", "b", "c"), across_expected, strict=True):
        assert_p(across[v]["Holm p"], p_adj)
