"""The task registry: what each benchmark task is made of.

A task knows its text fields, its label set (or that it is a regression), its metrics, and where
its data lives (a local folder laid out like ``../shared/data``, or the Hugging Face Hub). Readers
turn every source into the same canonical columns: ``example_id``, ``text_a``, optional
``text_b``, ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selftune.errors import SelftuneError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Number of text fields: 1 (single sentence) or 2 (sentence pair).
    num_texts: int
    # Class names in label-id order; ``None`` means a regression task.
    label_names: tuple[str, ...] | None
    # Metric names computed by ``selftune.metrics``; the task score is their mean (GLUE).
    metrics: tuple[str, ...]
    # Names of the evaluation splits; the first is the default ``--eval-split``.
    eval_splits: tuple[str, ...] = ("validation",)
    # Hugging Face Hub dataset (path, config) used when no local folder is given.
    hub: tuple[str, str | None] | None = None
    # Text columns and label column in the Hub dataset.
    hub_text_columns: tuple[str, ...] = ()
    hub_label_column: str = "label"
    # Hub split names for our canonical splits (train, validation, ...).
    hub_splits: dict[str, str] = field(default_factory=dict)
    # Sets without an official dev split get a seeded stratified split of their one file set.
    needs_split: bool = False
    description: str = ""

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


def _glue(name: str, num_texts: int, labels, metrics, columns, **kw) -> TaskSpec:
    return TaskSpec(
        name=name,
        num_texts=num_texts,
        label_names=labels,
        metrics=metrics,
        hub=("nyu-mll/glue", name),
        hub_text_columns=columns,
        hub_splits=kw.pop("hub_splits", {"train": "train", "validation": "validation"}),
        **kw,
    )


ACC = ("accuracy",)
ACC_F1 = ("accuracy", "f1")
ENTAIL = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        _glue("cola", 1, ("unacceptable", "acceptable"), ("matthews_correlation",), ("sentence",),
              description="CoLA: grammatical acceptability (Matthews correlation)"),
        _glue("sst2", 1, ("negative", "positive"), ACC, ("sentence",),
              description="SST-2: movie-review sentence sentiment"),
        _glue("mrpc", 2, ("not_equivalent", "equivalent"), ACC_F1, ("sentence1", "sentence2"),
              description="MRPC: paraphrase detection (accuracy, F1)"),
        _glue("stsb", 2, None, ("pearson", "spearman"), ("sentence1", "sentence2"),
              description="STS-B: semantic similarity, a 0-5 regression (Pearson, Spearman)"),
        _glue("qqp", 2, ("not_duplicate", "duplicate"), ACC_F1, ("question1", "question2"),
              description="QQP: duplicate questions (accuracy, F1)"),
        _glue("mnli", 2, ("entailment", "neutral", "contradiction"), ACC, ("premise", "hypothesis"),
              eval_splits=("validation_matched", "validation_mismatched"),
              hub_splits={"train": "train", "validation_matched": "validation_matched",
                          "validation_mismatched": "validation_mismatched"},
              description="MNLI: 3-way entailment; dev matched and mismatched"),
        _glue("qnli", 2, ENTAIL, ACC, ("question", "sentence"),
              description="QNLI: question/answer-sentence entailment"),
        _glue("rte", 2, ENTAIL, ACC, ("sentence1", "sentence2"),
              description="RTE: textual entailment"),
        _glue("wnli", 2, ("not_entailment", "entailment"), ACC, ("sentence1", "sentence2"),
              description="WNLI: Winograd entailment"),
        TaskSpec("imdb", 1, ("neg", "pos"), ACC, eval_splits=("test",),
                 hub=("stanfordnlp/imdb", None), hub_text_columns=("text",),
                 hub_splits={"train": "train", "test": "test"},
                 description="IMDb: movie-review sentiment (evaluated on the test split)"),
        TaskSpec("ag_news", 1, ("World", "Sports", "Business", "Sci/Tech"), ACC,
                 eval_splits=("test",), hub=("fancyzhx/ag_news", None),
                 hub_text_columns=("text",), hub_splits={"train": "train", "test": "test"},
                 description="AG News: 4-way news topic (evaluated on the test split)"),
        TaskSpec("mr", 1, ("neg", "pos"), ACC, needs_split=True,
                 description="MR: movie-review sentence polarity (seeded 90/10 split)"),
        TaskSpec("cr", 1, ("neg", "pos"), ACC, needs_split=True,
                 description="CR: customer-review polarity (seeded 90/10 split)"),
        TaskSpec("mpqa", 1, ("neg", "pos"), ACC, needs_split=True,
                 description="MPQA: opinion polarity (seeded 90/10 split)"),
    ]
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name (case-insensitive; ``sst-2`` and ``sts-b`` are accepted)."""
    key = name.lower().replace("-", "")
    key = {"agnews": "ag_news"}.get(key, key)
    if key not in TASKS:
        raise SelftuneError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
            "(or give your own data with --train-file/--validation-file)"
        )
    return TASKS[key]


def custom_task(name: str, num_texts: int, label_names: tuple[str, ...] | None) -> TaskSpec:
    """A task described by user files rather than the registry."""
    metrics = ("pearson", "spearman") if label_names is None else ACC
    if label_names is not None and len(label_names) == 2:
        metrics = ACC_F1
    return TaskSpec(name=name, num_texts=num_texts, label_names=label_names, metrics=metrics)
