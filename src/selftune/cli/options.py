"""The options of the commands that use a model rather than train one (evaluate, predict,
teacher-predictions) and of diagnose-cls, as dataclasses: their flags are generated from these
fields (``config.add_dataclass_arguments``), as train's and bam's are from theirs."""

from __future__ import annotations

from dataclasses import dataclass

from selftune.config import DATA, MODEL, OUTPUT, opt

INFERENCE = "inference"
DIAGNOSIS = "diagnosis"
NORMS = ("none", "center", "standardize", "batchnorm", "layernorm", "isobn")
DATA_DIR_HELP = ("Local data folder like ../shared/data (default: $SELFTUNE_DATA, else the "
                 "Hub).")


@dataclass
class TextFileOptions:
    """Columns of a user's file."""

    text_columns: str = opt("text", "Text column(s) of your file, comma-separated for pairs.",
                            DATA)
    id_column: str | None = opt(None, "Column of example ids (default: the row number).", DATA)


@dataclass
class InferenceOptions:
    """How a saved model is run."""

    max_seq_length: int = opt(128, "Truncate inputs to this many tokens.", INFERENCE,
                              minimum=8)
    batch_size: int = opt(128, "Inference batch size.", INFERENCE, minimum=1)
    trust_remote_code: bool = opt(False, "Allow model code from the Hub (or the model's "
                                  "directory) to run.", INFERENCE)
    packing: bool = opt(True, "Pack each batch's examples into as few rows as fit, each "
                        "attending only to itself (BERT, RoBERTa, ELECTRA; other models are "
                        "padded). --no-packing: padded batches.", INFERENCE)


@dataclass
class EvaluateOptions(InferenceOptions, TextFileOptions):
    task: str | None = opt(None, "Registry task whose dev split to evaluate on.", DATA)
    data_dir: str | None = opt(None, DATA_DIR_HELP, DATA)
    eval_split: str | None = opt(None, "Split to evaluate (default: the task's dev split).",
                                 DATA)
    validation_file: str | None = opt(None, "Evaluate on your own labelled .csv/.tsv/.jsonl "
                                      "file instead.", DATA)
    label_column: str = opt("label", "Label column of --validation-file.", DATA)
    max_eval_samples: int | None = opt(None, "Evaluate on a fixed random subset of this size.",
                                       DATA, minimum=1)
    output_file: str | None = opt(None, "Also write the metrics to this JSON file.", OUTPUT)


@dataclass
class PredictOptions(InferenceOptions, TextFileOptions):
    input_file: str | None = opt(None, "Texts to classify: .csv, .tsv (tab-separated) or "
                                 ".jsonl.", DATA, required=True)
    output_file: str = opt("predictions.jsonl", "Where to write predictions; .jsonl, .csv or "
                           ".tsv.", OUTPUT)


@dataclass
class TeacherPredictionsOptions(InferenceOptions):
    task: str | None = opt(None, "The teacher's task.", DATA, required=True)
    output_file: str | None = opt(None, "Where to write the predictions (.jsonl).", OUTPUT,
                                  required=True)
    data_dir: str | None = opt(None, DATA_DIR_HELP, DATA)
    max_train_samples: int | None = opt(None, "The same fixed subset the student trains on.",
                                        DATA, minimum=1)
    both_orders: bool = opt(False, "Also predict every pair with its sentences swapped (for a "
                            "student trained with --double-unordered on MRPC/STS-B).", DATA)


@dataclass
class DiagnoseOptions:
    task: str | None = opt(None, "Registry task whose training data to analyse.", DATA)
    data_dir: str | None = opt(None, DATA_DIR_HELP, DATA)
    train_file: str | None = opt(None, "Or your own labelled file (needs --validation-file "
                                 "too).", DATA)
    validation_file: str | None = opt(None, "Your own dev file (only read to validate the "
                                      "labels).", DATA)
    text_columns: str = opt("text", "Text column(s) of your files.", DATA)
    label_column: str = opt("label", "Label column of your files.", DATA)
    model: str = opt("default", "Pretrained model (default: the packaged all-MiniLM-L6-v2).",
                     MODEL)
    max_examples: int = opt(2000, "Analyse a fixed subset of this many training examples.",
                            DIAGNOSIS, minimum=2)
    steps: int = opt(20, "Fine-tuning steps per normalization for the gradient norms.",
                     DIAGNOSIS, minimum=1)
    batch_size: int = opt(32, "Batch size.", DIAGNOSIS, minimum=1)
    learning_rate: float = opt(5e-5, "AdamW learning rate of the gradient runs.", DIAGNOSIS)
    max_seq_length: int = opt(128, "Truncate inputs to this many tokens.", DIAGNOSIS,
                              minimum=8)
    norms: str = opt(",".join(NORMS), "Normalizations to compare, comma-separated.",
                     DIAGNOSIS)
    sources: str | None = opt(None, "Representations: cls (last-layer [CLS] hidden state), "
                              "pooler (default: both; cls alone for a model without a "
                              "pooler).", DIAGNOSIS)
    seed: int = opt(0, "Seed.", DIAGNOSIS, minimum=0)
    out_dir: str | None = opt(None, "Where to write (default: diagnostics/<task>).", OUTPUT)
