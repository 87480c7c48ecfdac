"""``--push-to-hub``: a finished run folder uploaded to a model repository on the Hub, through
``huggingface_hub`` (as ``Trainer.push_to_hub`` does), checked before any training so that a
run never ends in an upload that could not work."""

from __future__ import annotations

from pathlib import Path

from selftune.errors import SelftuneError

# Left out of the upload: resumable state and the snapshots kept for 'selftune ensemble'.
NOT_UPLOADED = ["checkpoints/*", "checkpoints/**", "snapshots.safetensors", "*.lock"]


def repo_id_for(hub_model_id: str | None, output_dir: Path) -> str:
    return hub_model_id or output_dir.resolve().name


def check_can_push(hub_model_id: str | None, output_dir: Path) -> None:
    """Refuse at once, with one line, what would fail after training: offline, no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise SelftuneError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; "
                            "train without it and upload the run folder later")
    if get_token() is None:
        raise SelftuneError("--push-to-hub needs a Hugging Face token: run 'hf auth login' or "
                            "set HF_TOKEN")
    repo_id = repo_id_for(hub_model_id, output_dir)
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise SelftuneError(f"--hub-model-id {repo_id!r} is not a repository name ('user/name')")


def push_run(output_dir: Path, hub_model_id: str | None, private: bool) -> str:
    """Upload the run folder; returns the repository's URL. A failure leaves the run finished
    on disk and says so."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = repo_id_for(hub_model_id, output_dir)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir),
                          ignore_patterns=NOT_UPLOADED,
                          commit_message="Upload a selftune run")
    except Exception as err:  # network, permissions, quota: the run itself is done
        raise SelftuneError(f"the run finished and is saved in {output_dir}, but the upload to "
                            f"{repo_id} failed ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return str(url)
