"""selftune's objectives in a plain transformers.Trainer (TrainerHooks): the same losses and the
same weights as in SelftuneTrainer, resume included."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from selftune.data.features import tokenize_records
from selftune.data.loading import DataOptions, load_task_data, parse_text_columns
from selftune.plain_trainer import TrainerHooks
from selftune.self_distillation import SelfDistillation
from selftune.self_ensemble import SelfEnsemble
from selftune.teachers import float_state
from selftune.trainer import SelftuneTrainer

from .test_training import StopAfterFirstSave


def objective_for(kind: str, model):
    if kind == "se":
        return SelfEnsemble(model, k=2, pool="steps", interval=2)
    return SelfDistillation.for_strategy(model, kind=kind, k=2, lam=1.0, interval=2)


def setup(tiny_model, sentiment_files):
    train_file, dev_file = sentiment_files
    opts = DataOptions(train_file=str(train_file), validation_file=str(dev_file),
                       text_columns=parse_text_columns("text"))
    records = load_task_data(opts).train
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenize_records(records, tokenizer, 32), tokenizer


def fresh_model(tiny_model):
    transformers.set_seed(3)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)


def arguments(out, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(out), seed=3, num_train_epochs=2, learning_rate=1e-2,
                  per_device_train_batch_size=8, logging_steps=1, report_to=[], use_cpu=True,
                  save_strategy="no", eval_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def run(kind, plain, tiny_model, data, out, callbacks=(), resume=None, **overrides):
    train_set, tokenizer = data
    model = fresh_model(tiny_model)
    objective = objective_for(kind, model)
    common = dict(model=model, args=arguments(out, **overrides), train_dataset=train_set,
                  data_collator=DataCollatorWithPadding(tokenizer))
    if plain:
        hooks = TrainerHooks(objective)
        trainer = Trainer(compute_loss_func=hooks.compute_loss, callbacks=[hooks, *callbacks],
                          **common)
    else:
        trainer = SelftuneTrainer(objective=objective, callbacks=list(callbacks), **common)
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    teacher = (objective.averaged_teacher() if kind != "se" else objective.averaged_model())
    return losses, float_state(model), float_state(teacher)


@pytest.mark.parametrize("kind", ["sda", "sdv", "ema", "se"])
def test_a_plain_trainer_gives_selftunes_losses_and_weights(kind, tiny_model, sentiment_files,
                                                            tmp_path):
    data = setup(tiny_model, sentiment_files)
    ours = run(kind, False, tiny_model, data, tmp_path / "ours")
    plain = run(kind, True, tiny_model, data, tmp_path / "plain")
    assert len(ours[0]) == 12 and plain[0] == ours[0]
    for mine, theirs in ((plain[1], ours[1]), (plain[2], ours[2])):
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), name
    assert any(not torch.equal(plain[1][n], plain[2][n]) for n in plain[1])  # a real teacher


def test_gradient_accumulation_agrees(tiny_model, sentiment_files, tmp_path):
    data = setup(tiny_model, sentiment_files)
    ours = run("sda", False, tiny_model, data, tmp_path / "ours", gradient_accumulation_steps=2)
    plain = run("sda", True, tiny_model, data, tmp_path / "plain", gradient_accumulation_steps=2)
    assert plain[0] == pytest.approx(ours[0], rel=1e-6)
    for name in ours[1]:
        torch.testing.assert_close(plain[1][name], ours[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sda", "ema"])
def test_a_plain_trainer_resumes_the_teacher_exactly(kind, tiny_model, sentiment_files,
                                                     tmp_path):
    data = setup(tiny_model, sentiment_files)
    reference = run(kind, True, tiny_model, data, tmp_path / "ref")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(kind, True, tiny_model, data, out, callbacks=[StopAfterFirstSave()],
            save_strategy="steps", save_steps=5)
    resumed = run(kind, True, tiny_model, data, out, resume=True, save_strategy="steps",
                  save_steps=5)
    for mine, theirs in ((resumed[1], reference[1]), (resumed[2], reference[2])):
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), name


def test_a_checkpoint_without_the_objective_state_is_refused(tiny_model, sentiment_files,
                                                             tmp_path):
    from selftune.errors import SelftuneError

    data = setup(tiny_model, sentiment_files)
    out = tmp_path / "plainrun"
    with pytest.raises(KeyboardInterrupt):  # a run without hooks leaves a checkpoint
        train_set, tokenizer = data
        Trainer(model=fresh_model(tiny_model), args=arguments(out, save_strategy="steps",
                                                              save_steps=2),
                train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                callbacks=[StopAfterFirstSave()]).train()
    with pytest.raises(SelftuneError, match="holds no selftune_objective.safetensors"):
        run("sda", True, tiny_model, data, out, resume=True)
