"""Hub I/O: `push_to_hub` (one commit of a saved folder) and what the Hub knows about a base model.

This is the only module that talks to the Hub's write APIs; `push_to_hub` takes an injectable `api` so tests run
offline with a fake `HfApi`. The card it uploads is written by `card.py`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from .card import CARD_NAME, RANDOM_WEIGHTS_NOTE, checkpoint_size, create_model_card, plot_layer_widths, save_model_card
from .errors import IsoPruneError

logger = logging.getLogger(__name__)

_SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints", ".huggingface"}  # never uploaded

__all__ = [
    "HubPublishError",
    "validate_repo_id",
    "push_to_hub",
    "base_model_info_from_hub",
    # the card's public names, importable from here as before
    "RANDOM_WEIGHTS_NOTE",
    "checkpoint_size",
    "create_model_card",
    "plot_layer_widths",
    "save_model_card",
]


class HubPublishError(IsoPruneError, OSError):
    """Publishing to the Hub failed; the local folder is complete and the push can be retried."""

    def __init__(self, message: str, *, repo_id: str, folder: str, step: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.folder = folder
        self.step = step


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if the Hub would accept it ("name" or "namespace/name"), else raise ValueError."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: give 'namespace/name', e.g. 'my-user/deit-tiny-isopruned'.")
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: {err} Expected 'namespace/name' made of letters, digits, "
            "'-', '_' and '.', e.g. 'my-user/deit-tiny-isopruned'."
        ) from err
    return repo_id


# -------------------------------------------------------------------------------------- hub I/O


def base_model_info_from_hub(repo_id: str, *, api: HfApi | None = None, token: str | None = None) -> dict[str, Any]:
    """License, tags, pipeline tag, datasets and weight size of a Hub model (read-only calls).

    Returns {} when the Hub cannot be reached, so a card can still be written offline.
    """
    api = api or HfApi(token=token)
    try:
        info = api.model_info(repo_id, files_metadata=True)
    except (HfHubHTTPError, OSError, *_transport_errors()) as err:
        logger.warning(
            "Could not read base model info of %s from the Hub (%s); the card will lack its license and tags.",
            repo_id,
            err,
        )
        return {}
    card_data = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
    sizes = {s.rfilename: s.size for s in (info.siblings or []) if s.size is not None}
    weights = sizes.get("model.safetensors")
    if weights is None:
        shards = [size for name, size in sizes.items() if name.startswith("model-") and name.endswith(".safetensors")]
        weights = sum(shards) if shards else None
    tags = card_data.get("tags") or []
    return {
        "license": card_data.get("license"),
        "license_name": card_data.get("license_name"),
        "license_link": card_data.get("license_link"),
        "tags": [tags] if isinstance(tags, str) else list(tags),
        "pipeline_tag": info.pipeline_tag,
        "datasets": card_data.get("datasets"),
        "checkpoint_bytes": weights,
    }


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2

        return (httpx2.HTTPError,)
    except ImportError:  # older huggingface_hub releases use httpx / requests, whose errors are OSError
        try:
            import httpx

            return (httpx.HTTPError,)
        except ImportError:
            return ()


def _folder_files(folder: Path) -> list[str]:
    """Regular files under `folder` to upload; symbolic links are skipped (and logged), never followed."""
    files, links = [], []
    for root, dirs, names in os.walk(folder):
        links += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not (Path(root) / d).is_symlink())
        for name in sorted(names):
            if name.endswith(".pyc"):
                continue
            if (Path(root) / name).is_symlink():
                links.append(Path(root) / name)
                continue
            files.append((Path(root) / name).relative_to(folder).as_posix())
    if links:
        logger.warning(
            "Not uploading %d symbolic link(s), which may point outside %s: %s",
            len(links),
            folder,
            ", ".join(p.relative_to(folder).as_posix() for p in sorted(links)),
        )
    return files


def _card_for_repo(text: str, folder_name: str, repo_id: str) -> str:
    """The card's loading snippets rewritten from the local folder name to the Hub repo it is pushed to."""
    if folder_name == repo_id or f'"{folder_name}"' not in text:
        return text
    text = text.replace(f'load_pruned_model("{folder_name}")', f'load_pruned_model(snapshot_download("{repo_id}"))')
    text = text.replace(
        "\nfrom optimum_isoprune import load_pruned_model\n",
        "\nfrom huggingface_hub import snapshot_download\nfrom optimum_isoprune import load_pruned_model\n",
    )
    return text.replace(f'"{folder_name}"', f'"{repo_id}"')


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
):
    """Upload every file of a saved pruned-model folder to `repo_id` in one commit; returns the CommitInfo.

    The repo id and the folder are checked before any network call. On a Hub or network error a
    `HubPublishError` says which step failed and how to retry; the local folder is never modified.
    """
    validate_repo_id(repo_id)
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise FileNotFoundError(
            f"No folder at {os.fspath(folder)!r}: save the pruned model there first (save_pretrained)."
        )
    files = _folder_files(folder_path)
    if not files:
        raise ValueError(f"Folder {os.fspath(folder)!r} is empty; nothing to push.")
    for expected in ("config.json", CARD_NAME):
        if expected not in files:
            logger.warning("%s has no %s; the Hub repo will lack it.", folder, expected)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder_path / name)) for name in files]
    if CARD_NAME in files:  # a card saved without a repo id names its folder: the uploaded copy names the repo
        text = (folder_path / CARD_NAME).read_text(encoding="utf-8")
        published = _card_for_repo(text, Path(os.path.abspath(folder_path)).name, repo_id)
        if published != text:
            operations[files.index(CARD_NAME)] = CommitOperationAdd(
                path_in_repo=CARD_NAME, path_or_fileobj=published.encode("utf-8")
            )
    commit_message = commit_message or "Upload model pruned with optimum-isoprune (Isomorphic Pruning)"

    api = api or HfApi(token=token)
    retry = (
        f"The local folder {os.fspath(folder)!r} is complete and unchanged; retry with "
        f"`optimum-isoprune push {os.fspath(folder)} {repo_id}` or "
        f"`optimum_isoprune.hub.push_to_hub({os.fspath(folder)!r}, {repo_id!r})` "
        "(check your token with `hf auth whoami` and your network first)."
    )
    # HTTP and network errors, and the RuntimeErrors the client raises itself; a TypeError stays a bug, not a Hub error.
    errors = (HfHubHTTPError, OSError, RuntimeError, *_transport_errors())

    def fail(step: str, err: BaseException) -> HubPublishError:
        return HubPublishError(
            f"Could not {step} for {repo_id!r}: {type(err).__name__}: {err}. {retry}",
            repo_id=repo_id,
            folder=os.fspath(folder),
            step=step,
        )

    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except errors as err:
        raise fail("create the repo", err) from err
    if revision is not None and revision != "main":
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        except errors as err:
            raise fail(f"create branch {revision!r}", err) from err
    try:
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    except errors as err:
        raise fail(f"upload {len(operations)} files", err) from err
    logger.info("Pushed %d files to %s", len(operations), getattr(commit, "commit_url", repo_id))
    return commit
