"""Hub in and out without a network: --dataset-name against a local fake of datasets'
load_dataset, --push-to-hub against a fake HfApi, and the one-line refusals offline."""

from __future__ import annotations

import json

import datasets
import huggingface_hub
import pytest

from selftune.cli import main
from selftune.config import TrainConfig
from selftune.errors import SelftuneError
from selftune.training import train

from .conftest import sentiment_rows


def fake_reviews(rows_train: int = 32, rows_dev: int = 8) -> datasets.DatasetDict:
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "idx": datasets.Value("int32")})

    def split(n: int, seed: int) -> datasets.Dataset:
        rows = sentiment_rows(n, seed)
        return datasets.Dataset.from_dict({"sentence": [t for t, _ in rows],
                                           "label": [y for _, y in rows],
                                           "idx": list(range(n))}, features=features)

    return datasets.DatasetDict(train=split(rows_train, 0), validation=split(rows_dev, 1))


def fake_similarity() -> datasets.DatasetDict:
    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "sentence1": ["the movie was good"] * n, "sentence2": ["the film was fine"] * n,
            "label": [float(i % 5) + 0.5 for i in range(n)]})

    return datasets.DatasetDict(train=split(16), test=split(4))


@pytest.fixture()
def fake_hub(monkeypatch):
    asked = []
    made = {"me/reviews": fake_reviews(), "me/similarity": fake_similarity()}

    def load_dataset(name, config=None, **kwargs):
        asked.append((name, config))
        if name not in made:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return made[name]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def config(tiny_model, tmp_path, **options) -> TrainConfig:
    return TrainConfig(model=str(tiny_model), output_dir=str(tmp_path / "run"),
                       num_train_epochs=1, per_device_train_batch_size=8, **options)


def test_a_hub_dataset_trains_with_its_class_names(fake_hub, tiny_model, tmp_path):
    result = train(config(tiny_model, tmp_path, dataset_name="me/reviews",
                          dataset_config_name="default"))
    assert fake_hub == [("me/reviews", "default")]
    assert result["eval_split"] == "validation" and result["num_train_examples"] == 32
    assert result["data_source"] == "hub:me/reviews/default"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"}


def test_a_hub_dataset_of_pairs_with_float_labels_is_a_regression(fake_hub, tiny_model,
                                                                  tmp_path):
    result = train(config(tiny_model, tmp_path, dataset_name="me/similarity"))
    assert result["eval_split"] == "test"  # no validation split: the labelled test split
    assert set(result["metrics"]) == {"pearson", "spearman"}


@pytest.mark.parametrize("options, message", [
    ({"dataset_name": "me/unknown"}, "could not load the dataset me/unknown"),
    ({"dataset_name": "me/reviews", "label_column": "stars"}, "no label column 'stars'"),
    ({"dataset_name": "me/reviews", "text_columns": "review"}, "no column 'review'"),
    ({"dataset_name": "me/reviews", "task": "rte"}, "drop --task"),
    ({"dataset_config_name": "x", "task": "rte"}, "goes with --dataset-name"),
])
def test_hub_dataset_mistakes_are_one_line(options, message, fake_hub, tiny_model, tmp_path):
    with pytest.raises(SelftuneError, match=message):
        train(config(tiny_model, tmp_path, **options))
    assert not (tmp_path / "run").exists()


def test_offline_a_hub_dataset_fails_at_once_with_one_line(tiny_model, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--dataset-name", "nobody/no-such-dataset-xyz", "--model",
                 str(tiny_model), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "could not load the dataset" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, ignore_patterns, commit_message):
        self.calls.append(("upload_folder", repo_id, folder_path, tuple(ignore_patterns)))


@pytest.fixture()
def online(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_to_hub_uploads_the_finished_run(online, tiny_model, sentiment_files, tmp_path):
    train_file, dev_file = sentiment_files
    result = train(config(tiny_model, tmp_path, train_file=str(train_file),
                          validation_file=str(dev_file), push_to_hub=True,
                          hub_model_id="me/my-run", hub_private_repo=True))
    assert result["hub_url"] == "https://huggingface.co/me/my-run"
    assert online[0] == ("create_repo", "me/my-run", True)
    kind, repo, folder, ignored = online[1]
    assert (kind, repo, folder) == ("upload_folder", "me/my-run", str(tmp_path / "run"))
    assert "checkpoints/**" in ignored
    assert (tmp_path / "run" / "metrics.json").is_file()  # finished before the upload


@pytest.mark.parametrize("offline, token, message", [
    (True, "hf_fake", "HF_HUB_OFFLINE is set"), (False, None, "needs a Hugging Face token")])
def test_push_to_hub_is_refused_before_training(offline, token, message, monkeypatch,
                                                tiny_model, sentiment_files, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    train_file, dev_file = sentiment_files
    with pytest.raises(SelftuneError, match=message):
        train(config(tiny_model, tmp_path, train_file=str(train_file),
                     validation_file=str(dev_file), push_to_hub=True))
    assert not (tmp_path / "run").exists()
