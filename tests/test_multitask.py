"""Multi-task training and BAM! on tiny models: routing, annealing, export, resume, pipeline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selftune.data.tasks import get_task
from selftune.errors import SelftuneError
from selftune.multitask.data import build_train_set, with_swapped_pairs
from selftune.multitask.model import build_multitask_model
from selftune.multitask.objective import TeacherAnnealing
from selftune.multitask.training import MultiTaskConfig, train_multitask
from selftune.outputs import directory_lock
from selftune.recipes.bam import BamConfig, run_bam
from selftune.training import train

from .test_training import StopAfterFirstSave, tiny_config

TASKS = [get_task("rte"), get_task("stsb"), get_task("cola")]


@pytest.fixture()
def mt_model(tiny_model):
    return build_multitask_model(str(tiny_model), TASKS)


def batch(n: int = 6):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, 20, (n, 7)),
            "attention_mask": torch.ones(n, 7, dtype=torch.long),
            "task_ids": torch.tensor([0, 1, 2, 0, 1, 2][:n]),
            "labels": torch.tensor([1.0, 0.4, 0.0, 0.0, 0.9, 1.0][:n]),
            "teacher_logits": torch.tensor([[0.3, -0.2], [0.6, 0.0], [1.0, 2.0],
                                            [-1.0, 0.5], [0.1, 0.0], [0.0, 0.0]][:n])}


def test_each_example_goes_to_its_own_head(mt_model):
    mt_model.eval()
    inputs = batch()
    logits = mt_model(task_ids=inputs["task_ids"], input_ids=inputs["input_ids"],
                      attention_mask=inputs["attention_mask"]).logits
    for index, task in enumerate(TASKS):
        rows = (inputs["task_ids"] == index).nonzero(as_tuple=True)[0]
        direct = mt_model.heads[task.name](input_ids=inputs["input_ids"][rows],
                                           attention_mask=inputs["attention_mask"][rows]).logits
        torch.testing.assert_close(logits[rows, : task.num_labels], direct)
    assert mt_model.encoder is mt_model.heads["rte"].bert is mt_model.heads["cola"].bert
    names = [n for n, _ in mt_model.named_parameters()]
    assert sum(n.startswith("encoder.embeddings.word_embeddings") for n in names) == 1


def test_each_task_runs_on_its_own_length_with_the_same_outputs(mt_model):
    """A short task's rows are not run at the length of another task's long example."""
    mt_model.eval()
    inputs = batch()
    lengths = torch.tensor([7, 4, 2, 6, 3, 3])  # rte rows long, cola rows short
    mask = (torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = inputs["input_ids"] * mask
    seen: list[int] = []
    hook = mt_model.encoder.embeddings.register_forward_hook(
        lambda _module, _args, out: seen.append(out.shape[1]))  # returns None: output kept
    try:
        logits = mt_model(task_ids=inputs["task_ids"], input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    assert seen == [7, 4, 3]  # rte, stsb, cola: each its longest example
    for index, task in enumerate(TASKS):
        rows = (inputs["task_ids"] == index).nonzero(as_tuple=True)[0]
        untrimmed = mt_model.heads[task.name](input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(logits[rows, : task.num_labels], untrimmed)


def test_train_set_scales_stsb_and_lines_teacher_predictions_up_with_examples(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tasks = [get_task("rte"), get_task("stsb")]
    records = {
        "rte": [{"example_id": "train-0", "text_a": "a b", "text_b": "c", "label": 1},
                {"example_id": "train-1", "text_a": "d", "text_b": "e f", "label": 0}],
        "stsb": with_swapped_pairs([
            {"example_id": "train-0", "text_a": "the movie", "text_b": "a film", "label": 4.5},
            {"example_id": "train-1", "text_a": "good", "text_b": "bad", "label": 1.0}]),
    }
    # Predictions keyed by id, in an order unlike the rows', on each task's own scale.
    teachers = {"rte": {"train-1": [0.5, -0.5], "train-0": [-1.0, 2.0]},
                "stsb": {"train-1:swap": [1.5], "train-0": [4.0], "train-1": [0.5],
                         "train-0:swap": [3.0]}}
    data = build_train_set(tasks, records, tokenizer, 32, teachers, max_labels=2)
    rows = data.train
    assert data.task_indices == {"rte": [0, 1], "stsb": [2, 3, 4, 5]}
    assert rows["task_ids"] == [0, 0, 1, 1, 1, 1]
    assert rows["labels"] == pytest.approx([1.0, 0.0, 0.9, 0.2, 0.9, 0.2])  # STS-B as y/5
    np.testing.assert_allclose(rows["teacher_logits"], [
        [-1.0, 2.0], [0.5, -0.5],  # RTE: as predicted, by id
        [0.8, 0.0], [0.1, 0.0], [0.6, 0.0], [0.3, 0.0],  # STS-B: /5, then padded to 2 columns
    ], rtol=1e-6)
    swapped = tokenizer("a film", "the movie")["input_ids"]
    assert rows[4]["input_ids"] == swapped  # train-0:swap: the sentences in the other order


def test_export_gives_standalone_models_with_the_same_outputs(mt_model, tmp_path):
    mt_model.eval()
    inputs = batch()
    features = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        for name, scale in (("rte", 1.0), ("stsb", 5.0)):
            mt_model.export_task(name, tmp_path / name)
            standalone = AutoModelForSequenceClassification.from_pretrained(tmp_path / name)
            expected = mt_model.heads[name](**features).logits * scale
            torch.testing.assert_close(standalone.eval()(**features).logits, expected)


def manual_losses(mt_model, inputs, lam):
    logits = mt_model(task_ids=inputs["task_ids"], input_ids=inputs["input_ids"],
                      attention_mask=inputs["attention_mask"]).logits
    losses = []
    for i, t in enumerate(inputs["task_ids"].tolist()):
        task = TASKS[t]
        if task.is_regression:
            target = lam * inputs["labels"][i] + (1 - lam) * inputs["teacher_logits"][i, 0]
            losses.append((logits[i, 0] - target) ** 2)
        else:
            onehot = F.one_hot(inputs["labels"][i].long(), 2).float()
            target = lam * onehot + (1 - lam) * inputs["teacher_logits"][i].softmax(-1)
            losses.append(-(target * logits[i, :2].log_softmax(-1)).sum())
    return torch.stack(losses).mean()


def test_lambda_one_is_plain_multitask_and_zero_is_pure_distillation(mt_model):
    mt_model.eval()  # no dropout, so losses are comparable
    inputs = batch()
    plain = TeacherAnnealing(TASKS, with_teachers=False)
    loss_plain, _, _ = plain.compute_loss(mt_model, dict(inputs))
    fixed_gold = TeacherAnnealing(TASKS, with_teachers=True, schedule="fixed",
                                  distill_weight=0.0)
    loss_gold, _, _ = fixed_gold.compute_loss(mt_model, dict(inputs))
    torch.testing.assert_close(loss_plain, loss_gold)
    torch.testing.assert_close(loss_plain, manual_losses(mt_model, inputs, 1.0))
    pure = TeacherAnnealing(TASKS, with_teachers=True, schedule="fixed", distill_weight=1.0)
    torch.testing.assert_close(pure.compute_loss(mt_model, dict(inputs))[0],
                               manual_losses(mt_model, inputs, 0.0))
    linear = TeacherAnnealing(TASKS, with_teachers=True)
    linear.on_train_begin(mt_model, 0, 10)
    linear.on_step_end(mt_model, 3)
    assert linear.current_lambda() == pytest.approx(0.3)
    torch.testing.assert_close(linear.compute_loss(mt_model, dict(inputs))[0],
                               manual_losses(mt_model, inputs, 0.3))
    summed = TeacherAnnealing(TASKS, with_teachers=False, reduction="sum")
    torch.testing.assert_close(summed.compute_loss(mt_model, dict(inputs))[0], 6 * loss_plain)
    # A sum over the global batch: a step made of 4 parts (accumulation × processes), which
    # the Trainer and DDP average, must still add up to the sum over all of them.
    parts = TeacherAnnealing(TASKS, with_teachers=False, reduction="sum", batch_parts=4)
    torch.testing.assert_close(parts.compute_loss(mt_model, dict(inputs))[0], 4 * 6 * loss_plain)


def test_self_distilled_annealing_adds_the_masked_mse_to_the_averaged_past(mt_model):
    from selftune.multitask.objective import SelfDistilledAnnealing
    from selftune.self_distillation import SelfDistillation

    mt_model.eval()
    inputs = batch()
    annealing = TeacherAnnealing(TASKS, with_teachers=True)
    sd = SelfDistillation.for_strategy(mt_model, kind="sda", k=1, lam=0.7)
    sd.on_train_begin(mt_model, 0, 10)
    objective = SelfDistilledAnnealing(annealing, sd)
    # The teacher starts as the initial model itself: nothing to distill yet.
    loss, _, parts = objective.compute_loss(mt_model, dict(inputs))
    torch.testing.assert_close(loss, annealing.compute_loss(mt_model, dict(inputs))[0])
    assert float(parts["distill_loss"]) == pytest.approx(0.0, abs=1e-10)

    # After an update the teacher is the previous state (K = 1); the MSE only counts each
    # example's own task outputs (STS-B: one column, RTE/CoLA: two).
    sd.before_optimizer_step(mt_model, 0)
    with torch.no_grad():
        for p in mt_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    features = {k: v for k, v in inputs.items() if k not in ("labels", "teacher_logits")}
    with torch.no_grad():
        student = mt_model(**features).logits
        teacher = sd.teacher.model(**features).logits
    widths = [TASKS[t].num_labels for t in inputs["task_ids"].tolist()]
    expected = torch.stack([((student[i, :w] - teacher[i, :w]) ** 2).mean()
                            for i, w in enumerate(widths)]).mean()
    assert expected > 1e-6
    loss, _, parts = objective.compute_loss(mt_model, dict(inputs))
    torch.testing.assert_close(parts["distill_loss"], expected)
    torch.testing.assert_close(loss, annealing.compute_loss(mt_model, dict(inputs))[0]
                               + 0.7 * expected)
    # Summed over a global batch of 3 parts (accumulation × processes): both terms alike.
    summed = TeacherAnnealing(TASKS, with_teachers=True, reduction="sum", batch_parts=3)
    loss, _, parts = SelfDistilledAnnealing(summed, sd).compute_loss(mt_model, dict(inputs))
    torch.testing.assert_close(parts["distill_loss"], 3 * 6 * expected)
    torch.testing.assert_close(loss, summed.compute_loss(mt_model, dict(inputs))[0]
                               + 0.7 * 3 * 6 * expected)


def test_multitask_student_with_sda_exports_its_teacher(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "mt"
    result = train_multitask(mt_config(tiny_model, glue_dir, out, strategy="sda", sd_k=2))
    assert set(result["teacher_tasks"]) == {"rte", "stsb", "cola"}
    assert result["teacher_score"] == pytest.approx(
        np.mean([r["score"] for r in result["teacher_tasks"].values()]))
    for task in ("rte", "stsb", "cola"):
        assert (out / "teacher" / "tasks" / task / "model.safetensors").is_file()
    student = AutoModelForSequenceClassification.from_pretrained(out / "tasks" / "rte")
    teacher = AutoModelForSequenceClassification.from_pretrained(out / "teacher" / "tasks" / "rte")
    assert not torch.equal(student.classifier.weight, teacher.classifier.weight)


@pytest.mark.parametrize("option, message", [
    ({"strategy": "se"}, "single-task runs"),
    ({"sd_k": 5}, "--sd-k only apply to --strategy sda/sdv/ema"),
    ({"strategy": "sda", "se_pool": "steps"}, "--se-pool"),
    ({"distill_weight": 0.3}, "--distill-weight does nothing with --teacher-annealing linear"),
    ({"teacher_annealing": "fixed"}, "--teacher-annealing fixed does nothing without teachers"),
    ({"teacher_predictions": "rte=a.jsonl,stsb=b.jsonl,cola=c.jsonl,mrpc=d.jsonl"},
     "--teacher-predictions must name one file for each of --tasks"),
    ({"teacher_predictions": "rte=a.jsonl,rte=b.jsonl"}, "--teacher-predictions names rte twice"),
])
def test_multitask_strategy_options_are_checked(option, message, tiny_model, glue_dir, tmp_path):
    with pytest.raises(SelftuneError, match=message):
        train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "mt", **option))
    assert not (tmp_path / "mt").exists()


def mt_config(tiny_model, glue_dir, out, **kw):
    values = dict(tasks="rte,stsb,cola", model=str(tiny_model), data_dir=str(glue_dir),
                  output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=4,
                  learning_rate=1e-3, seed=5)
    values.update(kw)
    return MultiTaskConfig(**values)


def test_multitask_run_writes_every_task(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "mt"
    result = train_multitask(mt_config(tiny_model, glue_dir, out))
    assert set(result["tasks"]) == {"rte", "stsb", "cola"}
    # STS-B (2 pairs) is trained on both sentence orders, as BAM!; RTE and CoLA are not.
    assert result["num_train_examples"] == {"rte": 16, "stsb": 4, "cola": 6}
    assert result["score"] == pytest.approx(np.mean([r["score"] for r in result["tasks"].values()]))
    assert [round(h["epoch"]) for h in result["history"]] == [1, 2]
    tokenizer = AutoTokenizer.from_pretrained(out / "tasks" / "stsb")
    texts = (["the movie was good", "it was dull"], ["the film was good", "it was bad"])
    encoded = tokenizer(*texts, padding=True, return_tensors="pt")
    stsb = AutoModelForSequenceClassification.from_pretrained(out / "tasks" / "stsb").eval()
    rte = AutoModelForSequenceClassification.from_pretrained(out / "tasks" / "rte").eval()
    assert rte.config.id2label == {0: "entailment", 1: "not_entailment"}
    with torch.no_grad():
        # The encoders of all exported tasks are the same shared encoder.
        torch.testing.assert_close(stsb.bert(**encoded).last_hidden_state,
                                   rte.bert(**encoded).last_hidden_state)
        assert stsb(**encoded).logits.shape == (2, 1)


def test_multitask_run_reports_every_dev_set_of_a_task(tiny_model, glue_dir_with_mnli,
                                                         tmp_path):
    """MNLI in a multi-task run: scored on its matched dev set, the mismatched one reported
    beside it (once, at the end), as the exported task model measures it."""
    from selftune.data.loading import DataOptions
    from selftune.evaluation import evaluate_model

    out = tmp_path / "mt"
    result = train_multitask(mt_config(tiny_model, glue_dir_with_mnli, out, tasks="mnli,rte",
                                       num_train_epochs=1))
    mnli = result["tasks"]["mnli"]
    assert set(mnli["other_splits"]) == {"validation_mismatched"}
    assert "other_splits" not in result["tasks"]["rte"]
    assert "other_splits" not in result["history"][-1]["tasks"]["mnli"]
    mismatched = evaluate_model(str(out / "tasks" / "mnli"),
                                DataOptions(task="mnli", data_dir=str(glue_dir_with_mnli)),
                                "validation_mismatched", 128, 4)
    assert mismatched["metrics"] == pytest.approx(
        mnli["other_splits"]["validation_mismatched"]["metrics"])


def test_every_multitask_parameter_gets_the_learning_rate_of_its_depth(mt_model):
    """docs/methods.md §2.4 on the real parameter names: heads L+2, pooler L+1, layer i i+1,
    embeddings 0 (the tiny model has L = 2)."""
    from selftune.optim import layerwise_param_groups

    groups = layerwise_param_groups(mt_model, 1.0, 0.5, 0.01)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}

    def expected_depth(name: str) -> int:
        if name.startswith("heads."):
            return 4
        if name.startswith("encoder.pooler."):
            return 3
        if name.startswith("encoder.encoder.layer."):
            return int(name.split(".")[3]) + 1
        assert name.startswith("encoder.embeddings."), name
        return 0

    named = list(mt_model.named_parameters())
    assert {n.split(".")[0] for n, _ in named} == {"encoder", "heads"}
    for name, param in named:
        assert lr_of[id(param)] == pytest.approx(0.5 ** (4 - expected_depth(name))), name


def test_multitask_run_uses_layerwise_learning_rates(tiny_model, glue_dir, tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["lrs"] = sorted({g["initial_lr"] if "initial_lr" in g else g["lr"]
                                  for g in optimizer.param_groups})

    train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "mt", num_train_epochs=1,
                              layerwise_lr_decay=0.5), callbacks=[Capture()])
    # 2 layers: depths 0..4 → lr·0.5^4 ... lr·0.5^0
    assert seen["lrs"] == pytest.approx([1e-3 * 0.5 ** k for k in (4, 3, 2, 1, 0)])


def test_multitask_student_counts_skipped_updates(tiny_model, glue_dir, tmp_path):
    from transformers import TrainerCallback

    class PoisonHeads(TrainerCallback):  # every head outputs NaN from step 2 on
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    for head in model.heads.values():
                        head.classifier.weight.fill_(float("nan"))

    result = train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "mt",
                                       num_train_epochs=1, nan_policy="skip"),
                             callbacks=[PoisonHeads()])
    assert result["global_steps"] > 2
    assert result["skipped_steps"] == result["global_steps"] - 2


@pytest.mark.parametrize("options", [{}, {"strategy": "sda"}])
def test_multitask_resume_is_exact(options, tiny_model, glue_dir, tmp_path):
    reference = train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "ref", **options))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_multitask(mt_config(tiny_model, glue_dir, out, **options),
                        callbacks=[StopAfterFirstSave()])
    resumed = train_multitask(mt_config(tiny_model, glue_dir, out, **options))
    assert resumed["resumed_from"]
    assert resumed["tasks"] == reference["tasks"]
    assert resumed.get("teacher_tasks") == reference.get("teacher_tasks")
    # The learning curve includes the epoch evaluated before the interruption.
    assert [h["tasks"] for h in resumed["history"]] == [h["tasks"] for h in reference["history"]]


def test_bam_pipeline_stages_and_reuse(tiny_model, glue_dir, tmp_path, monkeypatch):
    from selftune import config, training
    from selftune.multitask import training as mt_training

    cfg = BamConfig(tasks="rte,stsb", model=str(tiny_model), data_dir=str(glue_dir),
                    output_dir=str(tmp_path / "bam"), num_train_epochs=1,
                    per_device_train_batch_size=4, learning_rate=1e-3, teacher_epochs=1,
                    teacher_batch_size=4, finetune_after=True)
    checked = []

    def record(options):
        checked.append((type(options).__name__, options.task))
        config.validate_options(options)

    for module in (training, mt_training):
        monkeypatch.setattr(module, "validate_options", record)
    summary = run_bam(cfg)
    # The options are checked once, before the first stage: the recipe's (with the student's)
    # and those of each single-task stage (teacher and --finetune-after), not again per stage.
    assert sorted(checked) == [("BamConfig", None), ("TrainConfig", "rte"),
                               ("TrainConfig", "stsb")]
    root = tmp_path / "bam"
    assert set(summary["teachers"]) == {"rte", "stsb"}
    both = root / "teachers" / "stsb" / "train_predictions.both-orders.jsonl"
    lines = both.read_text().splitlines()
    assert json.loads(lines[0])["num_examples"] == 4  # 2 pairs in both orders
    assert json.loads(lines[-1])["example_id"].endswith(":swap")
    assert (root / "student" / "tasks" / "rte" / "model.safetensors").is_file()
    assert set(summary["finetuned"]) == {"rte", "stsb"}
    stamps = {p: p.stat().st_mtime for p in root.rglob("metrics.json")}
    again = run_bam(cfg)  # every stage is finished: nothing is retrained
    assert again["student"] == summary["student"]
    assert {p: p.stat().st_mtime for p in root.rglob("metrics.json")} == stamps
    # A finished stage run with other options is not taken for this recipe's.
    finetuned_config = root / "finetuned" / "stsb" / "run_config.json"
    saved = json.loads(finetuned_config.read_text())
    finetuned_config.write_text(json.dumps({**saved, "learning_rate": 0.5}))
    with pytest.raises(SelftuneError, match="finetuned/stsb holds a finished run with other"):
        run_bam(cfg)


def test_multi_to_multi_distills_a_multitask_run_into_a_new_student(tiny_model, glue_dir,
                                                                    tmp_path):
    """Born-again without a change of setting (BAM!'s Multi→Multi): the task models exported by
    a plain multi-task run are the teachers of a second one."""
    from selftune.data.loading import load_task_data
    from selftune.multitask.teacher_cache import read_predictions

    common = dict(tasks="rte,stsb", model=str(tiny_model), data_dir=str(glue_dir),
                  num_train_epochs=1, per_device_train_batch_size=4, learning_rate=1e-3)
    multi = tmp_path / "multi"
    run_bam(BamConfig(output_dir=str(multi), teachers="none", **common))
    exported = multi / "student" / "tasks"
    teachers = ",".join(f"{t}={exported / t}" for t in ("rte", "stsb"))
    summary = run_bam(BamConfig(output_dir=str(tmp_path / "m2m"), teachers=teachers, **common))
    assert set(summary["student"]) == {"rte", "stsb"}
    assert not (tmp_path / "m2m" / "teachers").exists()  # given as directories: none trained
    # The STS-B teacher's cached predictions are the exported head's, on the 0-5 scale of
    # the gold scores (the student divides both by 5).
    stsb = get_task("stsb")
    cached = read_predictions(exported / "stsb" / "train_predictions.both-orders.jsonl", stsb)
    model = AutoModelForSequenceClassification.from_pretrained(exported / "stsb").eval()
    tokenizer = AutoTokenizer.from_pretrained(exported / "stsb")
    record = load_task_data(BamConfig(task="stsb", data_dir=str(glue_dir)).data_options()).train[0]
    with torch.no_grad():
        logits = model(**tokenizer(record["text_a"], record["text_b"], return_tensors="pt")).logits
    assert cached.logits[record["example_id"]] == pytest.approx(logits[0].tolist(), abs=1e-5)


def test_a_teacher_pruned_to_its_predictions_is_reused(tiny_model, glue_dir, tmp_path):
    shared = tmp_path / "teachers"

    def recipe(name: str) -> BamConfig:
        return BamConfig(tasks="rte", model=str(tiny_model), data_dir=str(glue_dir),
                         output_dir=str(tmp_path / name), teachers_root=str(shared),
                         num_train_epochs=1, per_device_train_batch_size=4, teacher_epochs=1,
                         teacher_batch_size=4)

    first = run_bam(recipe("a"))
    keep = {"run_config.json", "metrics.json", "train_predictions.jsonl"}
    for path in sorted((shared / "rte").rglob("*"), reverse=True):
        if path.name not in keep:
            path.rmdir() if path.is_dir() else path.unlink()
    assert {p.name for p in (shared / "rte").iterdir()} == keep
    second = run_bam(recipe("b"))
    assert second["teachers"] == first["teachers"]
    assert second["student"] == first["student"]  # the same seed and the same predictions
    (shared / "rte" / "train_predictions.jsonl").unlink()
    with pytest.raises(SelftuneError, match="without its model and without "
                                            "train_predictions.jsonl"):
        run_bam(recipe("c"))


def test_teachers_trained_one_task_per_run_are_reused_by_the_full_recipe(tiny_model, glue_dir,
                                                                         tmp_path):
    shared = tmp_path / "teachers"
    common = dict(model=str(tiny_model), data_dir=str(glue_dir), teachers_root=str(shared),
                  num_train_epochs=1, per_device_train_batch_size=4, teacher_epochs=1,
                  teacher_batch_size=4)
    for task in ("rte", "stsb"):
        summary = run_bam(BamConfig(tasks=task, output_dir=str(tmp_path / f"prep-{task}"),
                                    teachers_only=True, **common))
        assert set(summary["teachers"]) == {task}
        assert not (tmp_path / f"prep-{task}" / "student").exists()
        assert not (tmp_path / f"prep-{task}" / "bam.json").exists()
    assert (shared / "stsb" / "train_predictions.both-orders.jsonl").is_file()

    def teacher_files() -> dict[Path, float]:  # the lock files beside them are touched
        return {p: p.stat().st_mtime for p in shared.glob("*/**/*") if p.is_file()}

    stamps = teacher_files()
    full = run_bam(BamConfig(tasks="rte,stsb", output_dir=str(tmp_path / "bam"), **common))
    assert teacher_files() == stamps
    assert set(full["student"]) == {"rte", "stsb"}
    # A shared teacher made with other options lies outside what --overwrite-output-dir
    # clears: the error names the folder to delete instead.
    with pytest.raises(SelftuneError, match=f"delete {shared / 'rte'} to train it again"):
        run_bam(BamConfig(tasks="rte", output_dir=str(tmp_path / "other-lr"), teachers_only=True,
                          overwrite_output_dir=True, **{**common, "teacher_epochs": 2}))


def test_bam_runs_sharing_a_teachers_root_train_each_teacher_once(tiny_model, glue_dir,
                                                                 tmp_path):
    shared = tmp_path / "teachers"

    def bam_process(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        command = [sys.executable, "-m", "selftune", "bam", "--tasks", "rte", "--model",
                   str(tiny_model), "--data-dir", str(glue_dir), "--num-train-epochs", "1",
                   "--teacher-epochs", "1", "--per-device-train-batch-size", "4",
                   "--teacher-batch-size", "4", "--teachers-root", str(shared),
                   "--output-dir", str(tmp_path / name)]
        return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT), log

    # Both runs reach the teacher while a third process holds it, so both must wait for it.
    with directory_lock(shared / "rte", wait=False) as lock:
        assert lock is not None
        runs = [bam_process("a"), bam_process("b")]
        deadline = time.time() + 300
        while not all("waiting for it" in log.read_text() for _, log in runs):
            assert time.time() < deadline and all(p.poll() is None for p, _ in runs), \
                [log.read_text()[-2000:] for _, log in runs]
            time.sleep(0.5)
    assert [p.wait(timeout=600) for p, _ in runs] == [0, 0]
    logs = [log.read_text() for _, log in runs]
    assert sum("Teacher for rte: training in" in log for log in logs) == 1
    assert sum("Teacher for rte: reusing" in log for log in logs) == 1
    assert (shared / "rte" / "train_predictions.jsonl").is_file()


def test_bam_student_self_distills_while_its_teachers_stay_plain(tiny_model, glue_dir,
                                                                 tmp_path):
    cfg = BamConfig(tasks="rte", model=str(tiny_model), data_dir=str(glue_dir),
                    output_dir=str(tmp_path / "bam"), num_train_epochs=1,
                    per_device_train_batch_size=4, teacher_epochs=1, teacher_batch_size=4,
                    strategy="ema", group_by_length=True)
    run_bam(cfg)
    root = tmp_path / "bam"
    teacher_config = json.loads((root / "teachers" / "rte" / "run_config.json").read_text())
    assert teacher_config["strategy"] == "baseline" and teacher_config["group_by_length"]
    student = json.loads((root / "student" / "metrics.json").read_text())
    assert "rte" in student["teacher_tasks"] and student["teacher"] == "exponential moving average"
    assert not json.loads((root / "student" / "run_config.json").read_text())["group_by_length"]


def test_a_model_with_another_class_order_is_refused(tiny_model, glue_dir, tmp_path, capsys):
    """As a teacher, or to `selftune evaluate`: its predictions would be permuted."""
    from selftune.data.loading import DataOptions
    from selftune.evaluation import evaluate_model
    from selftune.recipes.bam import compute_teacher_predictions

    train(tiny_config(tiny_model, (None, None), tmp_path / "rte", task="rte",
                      data_dir=str(glue_dir), train_file=None, validation_file=None,
                      num_train_epochs=1))
    config_file = tmp_path / "rte" / "config.json"
    config = json.loads(config_file.read_text())
    options = DataOptions(data_dir=str(glue_dir))
    out = tmp_path / "p.jsonl"
    config["id2label"] = {"0": "not_entailment", "1": "entailment"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(SelftuneError, match="orders its classes.*not_entailment.*permuted"):
        compute_teacher_predictions(tmp_path / "rte", get_task("rte"), options, out, False)
    with pytest.raises(SelftuneError, match="orders its classes.*not_entailment.*permuted"):
        evaluate_model(str(tmp_path / "rte"), DataOptions(task="rte", data_dir=str(glue_dir)),
                       None, 128, 4)
    config["id2label"] = {"0": "yes", "1": "no"}  # other names: taken in the task's order
    config_file.write_text(json.dumps(config))
    evaluate_model(str(tmp_path / "rte"), DataOptions(task="rte", data_dir=str(glue_dir)),
                   None, 128, 4)
    assert "names its classes ['yes', 'no']" in capsys.readouterr().err
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}  # no names: taken as the task's order
    config_file.write_text(json.dumps(config))
    compute_teacher_predictions(tmp_path / "rte", get_task("rte"), options, out, False)
    assert out.is_file()
    assert "taken to be ['entailment', 'not_entailment']" in capsys.readouterr().err
    with pytest.raises(SelftuneError, match="cola has one sentence per example"):
        compute_teacher_predictions(tmp_path / "rte", get_task("cola"), options, out, True)


def given_rte_teacher(tiny_model, glue_dir, tmp_path) -> tuple[Path, Path, dict]:
    """A trained RTE teacher, where its cached predictions will go, and BAM! options using it."""
    teacher = tmp_path / "rte-teacher"
    train(tiny_config(tiny_model, (None, None), teacher, task="rte", data_dir=str(glue_dir),
                      train_file=None, validation_file=None, num_train_epochs=1))
    common = dict(tasks="rte", model=str(tiny_model), data_dir=str(glue_dir),
                  teachers=f"rte={teacher}", num_train_epochs=1, per_device_train_batch_size=4)
    return teacher, teacher / "train_predictions.jsonl", common


def test_a_given_teachers_cached_predictions_follow_the_input_length(tiny_model, glue_dir,
                                                                     tmp_path):
    teacher, cache, common = given_rte_teacher(tiny_model, glue_dir, tmp_path)
    run_bam(BamConfig(output_dir=str(tmp_path / "a"), **common))
    assert json.loads(cache.read_text().splitlines()[0])["max_seq_length"] == 128
    run_bam(BamConfig(output_dir=str(tmp_path / "b"), max_seq_length=8, **common))
    assert json.loads(cache.read_text().splitlines()[0])["max_seq_length"] == 8


def test_teacher_predictions_must_cover_the_student_data(tiny_model, glue_dir, tmp_path):
    run_bam(BamConfig(tasks="rte", model=str(tiny_model), data_dir=str(glue_dir),
                      output_dir=str(tmp_path / "bam"), num_train_epochs=1,
                      per_device_train_batch_size=4, teacher_epochs=1, teacher_batch_size=4))
    cache = tmp_path / "bam" / "teachers" / "rte" / "train_predictions.jsonl"
    lines = cache.read_text().splitlines()
    header = json.loads(lines[0])
    header["num_examples"] -= 2
    cache.write_text("\n".join([json.dumps(header), *lines[1:-2]]) + "\n")
    with pytest.raises(SelftuneError, match="no teacher prediction for 2 of the 16 rte"):
        train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "mt", tasks="rte",
                                  teacher_predictions=f"rte={cache}"))
    wrong = MultiTaskConfig(tasks="cola", model=str(tiny_model), data_dir=str(glue_dir),
                            output_dir=str(tmp_path / "mt2"), teacher_predictions=f"cola={cache}")
    with pytest.raises(SelftuneError, match="predictions for task 'rte', not 'cola'"):
        train_multitask(wrong)


def test_given_teacher_predictions_must_be_on_the_students_texts(tiny_model, glue_dir,
                                                                   tmp_path):
    """Ids alone do not tell that a text changed under its id; each line's input hash does,
    while a file made on more data than the student trains on still serves it."""
    from selftune.recipes.bam import compute_teacher_predictions

    teacher, _, _ = given_rte_teacher(tiny_model, glue_dir, tmp_path)
    task = get_task("rte")
    made = compute_teacher_predictions(teacher, task, BamConfig(data_dir=str(glue_dir))
                                       .data_options(), tmp_path / "rte.jsonl", False)
    subset = mt_config(tiny_model, glue_dir, tmp_path / "subset", tasks="rte", num_train_epochs=1,
                       max_train_samples=6, teacher_predictions=f"rte={made}")
    assert train_multitask(subset)["num_train_examples"] == {"rte": 6}

    train_tsv = glue_dir / "glue" / "RTE" / "train.tsv"
    rows = train_tsv.read_text().splitlines(keepends=True)
    rows[6] = rows[6].replace("the plot was bad", "the plot was fine")  # example train-5
    train_tsv.write_text("".join(rows))
    edited = dict(tasks="rte", num_train_epochs=1, teacher_predictions=f"rte={made}")
    with pytest.raises(SelftuneError, match=r"other texts than the student's for 1 of the 16 "
                                            r"rte training examples \(ids train-5\)"):
        train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "edited", **edited))
    # A file from before the input hashes can only be checked by its ids.
    made.write_text("".join(re.sub(r'"input_hash": "[0-9a-f]+", ', "", line)
                            for line in made.read_text().splitlines(keepends=True)))
    assert "input_hash" not in made.read_text()
    old = train_multitask(mt_config(tiny_model, glue_dir, tmp_path / "old", **edited))
    assert old["num_train_examples"] == {"rte": 16}


@pytest.mark.parametrize("option, message", [
    ({"distill_weight": 2.0}, "--distill-weight"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio"),
    ({"teacher_epochs": 0}, "--teacher-epochs"),
    ({"tasks": "rte,nope"}, "unknown task 'nope'"),
    ({"teachers": "rte"}, "--teachers expects task=PATH"),
    ({"teachers_only": True, "teachers": "none"}, "--teachers-only trains the teachers"),
    ({"teachers_only": True, "finetune_after": True}, "--teachers-only trains the teachers"),
    ({"teachers": "rte=runs/x,mrpc=runs/x"}, "teacher for mrpc, which is not among --tasks"),
    ({"teachers": "rte=runs/x,rte=runs/y"}, "--teachers names rte twice"),
    ({"distill_weight": 0.3}, "--distill-weight does nothing with --teacher-annealing linear"),
    ({"teachers": "none", "teacher_annealing": "fixed"},
     "--teacher-annealing fixed does nothing without teachers"),
])
def test_bam_options_are_checked_before_any_training(option, message, tiny_model, glue_dir,
                                                     tmp_path):
    cfg = BamConfig(**{"tasks": "rte", "model": str(tiny_model), "data_dir": str(glue_dir),
                       "output_dir": str(tmp_path / "bam"), **option})
    with pytest.raises(SelftuneError, match=message):
        run_bam(cfg)
    assert not (tmp_path / "bam").exists()


@pytest.mark.parametrize("norm", ["standardize", "isobn"])
def test_multitask_cls_norm_is_shared_and_exported(norm, tiny_model, glue_dir, tmp_path):
    from selftune.models.heads import NormalizedPooler
    from selftune.models.loading import load_finetuned

    out = tmp_path / "mt"
    result = train_multitask(mt_config(tiny_model, glue_dir, out, num_train_epochs=1,
                                       cls_norm=norm))
    if norm == "standardize":  # fixed statistics of the pre-trained [CLS] over all tasks
        assert (out / "cls_stats.safetensors").is_file()
    models = {t: load_finetuned(str(out / "tasks" / t)).eval() for t in ("rte", "stsb")}
    for model in models.values():
        assert model.config.selftune_cls_norm == norm
        assert isinstance(model.base_model.pooler, NormalizedPooler)
    # One normalizer on the shared encoder: both task models carry the same one.
    rte_norm = models["rte"].base_model.pooler.cls_norm.state_dict()
    stsb_norm = models["stsb"].base_model.pooler.cls_norm.state_dict()
    for name, tensor in rte_norm.items():
        torch.testing.assert_close(tensor, stsb_norm[name])
    # The reloaded task model reproduces the run's own dev metrics.
    from selftune.data.loading import DataOptions
    from selftune.evaluation import evaluate_model

    reloaded = evaluate_model(str(out / "tasks" / "rte"),
                              DataOptions(task="rte", data_dir=str(glue_dir)), None, 128, 16)
    assert reloaded["score"] == pytest.approx(result["tasks"]["rte"]["score"], abs=1e-6)


def test_option_checks_accept_every_option_at_its_default():
    """Configs built from a grid carry every option: only changed values are refused."""
    from selftune.multitask.training import check_multitask_options

    for teachers in ("none", "auto"):  # benchmarks/bam.yaml: multi and bam
        check_multitask_options(BamConfig(teachers=teachers), with_teachers=teachers != "none")
    for weight in (1.0, 0.5):  # benchmarks/bam_ablation.yaml: lambda-0, lambda-0.5
        check_multitask_options(BamConfig(teacher_annealing="fixed", distill_weight=weight),
                                with_teachers=True)


@pytest.mark.parametrize("argv, message", [
    (["--output-file", "tp.csv"], "give a file name ending in .jsonl"),
    (["--output-file", "tp.jsonl", "--both-orders"], "--both-orders is for the tasks whose "
                                                     "pairs have no order (mrpc, stsb"),
])
def test_teacher_predictions_refuses_what_it_would_ignore(argv, message, capsys, tmp_path,
                                                           monkeypatch):
    from selftune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["teacher-predictions", "no-model", "--task", "rte", *argv]) == 2
    err = capsys.readouterr().err
    assert "selftune: error: --" in err and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_teacher_cache_is_made_again_when_the_training_data_changed(tiny_model, glue_dir,
                                                                    tmp_path):
    """Same ids, other rows: the input hashes tell. A file without them (written before them,
    as the committed benchmark caches) is reused while it covers the ids."""
    from selftune.recipes.bam import _cached_teacher_predictions

    teacher = tmp_path / "rte-teacher"
    train(tiny_config(tiny_model, (None, None), teacher, task="rte", data_dir=str(glue_dir),
                      train_file=None, validation_file=None, num_train_epochs=1))
    cfg = BamConfig(tasks="rte", model=str(tiny_model), data_dir=str(glue_dir),
                    teachers=f"rte={teacher}")
    task, cache = get_task("rte"), teacher / "train_predictions.jsonl"

    def lines() -> dict[str, dict]:
        rows = map(json.loads, cache.read_text().splitlines()[1:])
        return {row["example_id"]: row for row in rows}

    _cached_teacher_predictions(teacher, task, cfg)
    before = lines()
    # Rows reordered (GLUE ids are row numbers): the same ids now name other examples.
    train_file = glue_dir / "glue" / "RTE" / "train.tsv"
    original = train_file.read_text()
    header, *rows = original.splitlines(keepends=True)
    train_file.write_text(header + "".join(reversed(rows)))
    _cached_teacher_predictions(teacher, task, cfg)
    after = lines()
    assert after["train-0"]["input_hash"] == before["train-15"]["input_hash"] \
        != before["train-0"]["input_hash"]
    assert after["train-0"]["logits"] == pytest.approx(before["train-15"]["logits"], abs=1e-4)
    # An old file without input hashes is reused as it is, even on other data.
    cache.write_text("".join(re.sub(r'"input_hash": "[0-9a-f]+", ', "", line)
                             for line in cache.read_text().splitlines(keepends=True)))
    legacy = cache.read_text()
    train_file.write_text(original)
    _cached_teacher_predictions(teacher, task, cfg)
    assert cache.read_text() == legacy


def test_a_stale_teacher_cache_with_other_ids_is_made_again_or_named(tiny_model, glue_dir,
                                                                     tmp_path):
    teacher, cache, common = given_rte_teacher(tiny_model, glue_dir, tmp_path)
    run_bam(BamConfig(output_dir=str(tmp_path / "a"), **common))

    def make_stale() -> None:  # made on data with other ids
        cache.write_text(cache.read_text().replace('"train-', '"other-'))

    make_stale()
    run_bam(BamConfig(output_dir=str(tmp_path / "b"), **common))  # selftune's own cache
    assert '"other-' not in cache.read_text() and '"example_id": "train-0"' in cache.read_text()
    # Without the teacher's model it cannot be made again: the error names the file.
    from selftune.recipes.bam import _cached_teacher_predictions

    make_stale()
    (teacher / "config.json").rename(teacher / "config.json.away")
    stale = re.escape(str(cache)) + " has no prediction for 16 of the 16 training examples"
    with pytest.raises(SelftuneError, match=stale + ".*delete the folder"):
        _cached_teacher_predictions(teacher, get_task("rte"), BamConfig(**common))
