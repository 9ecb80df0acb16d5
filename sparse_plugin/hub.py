"""Adapters and models named by a Hugging Face Hub repo id: found, and uploaded, through `huggingface_hub`.

A path that exists on disk always wins, as with `from_pretrained`; anything else that is a valid repo id is
looked up with `huggingface_hub.snapshot_download`, so its cache, `HF_HUB_OFFLINE`, revisions and tokens behave
as they do for transformers. `huggingface_hub` is imported only then: `sparse-merge` on local directories never
loads it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from .io import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter, save_adapter
from .merge import _OTHER_WEIGHT_SUFFIXES, INDEX_FILE, SINGLE_FILE
from .model_card import CARD_NAME
from .peft_interop import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

# What an adapter repo holds that a reader needs: ours, or PEFT's SHiRA / Super-Tuning files.
ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
_OUR_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]


def resolve_adapter(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The directory of an adapter: `name_or_path` itself if it exists, else its Hub snapshot (adapter files only).

    Raises `AdapterError` (one line) when it is a repo id that cannot be found in the cache or on the Hub.
    """
    return _resolve(name_or_path, revision, token, allow_patterns=ADAPTER_FILES)


def resolve_model(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The directory of a safetensors checkpoint: `name_or_path` if it exists, else its Hub snapshot.

    The snapshot is fetched in two passes: everything but weight files (config, tokenizer, shard index), then the
    shards the index names, so that other formats and stray `.safetensors` (a `consolidated.safetensors` beside the
    shards) are never downloaded: the merge would not copy them anyway.
    """
    ignore = [f"*{suffix}" for suffix in _OTHER_WEIGHT_SUFFIXES]
    directory = _resolve(name_or_path, revision, token, ignore_patterns=ignore)
    if directory == Path(name_or_path):
        return directory
    return _resolve(name_or_path, revision, token, allow_patterns=_shard_names(directory))


def _shard_names(directory: Path) -> list[str]:
    """The shards of a checkpoint per its index (or the single file); `open_checkpoint` reports a broken index."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE]
    try:
        return sorted({str(shard) for shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _resolve(name_or_path, revision, token, **patterns) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return path  # neither a directory nor a repo id: the reader names it as a missing directory
    where = f"`{repo_id}`" + (f" (revision `{revision}`)" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, **patterns))
    except RevisionNotFoundError:
        raise AdapterError(
            f"{where}: the Hub repo has no such revision; pass a branch, tag or commit it has"
        ) from None
    except RepositoryNotFoundError:
        raise AdapterError(
            f"{where}: no local directory and no Hub repo of that name (a private or gated repo needs "
            "`hf auth login` or a token); check the name"
        ) from None
    except LocalEntryNotFoundError:
        raise AdapterError(
            f"{where}: no local directory, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "while the Hub cannot be reached (HF_HUB_OFFLINE or no network); download it once online or "
            "pass a local directory"
        ) from None
    except OSError as err:  # other HTTP errors (HfHubHTTPError is one) and local I/O
        raise AdapterError(
            f"{where}: the Hub download failed ({type(err).__name__}: {err}); retry, or pass a local directory"
        ) from None


def push_adapter_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload sparse adapter",
    base_model_name_or_path: str | None = None,
):
    """Upload an adapter (its two files and model card) to a Hub model repo, created if needed.

    Everything goes through `huggingface_hub.HfApi` (`create_repo`, `create_branch`, `upload_folder`), so tokens,
    endpoints and retries are its own.

    Args:
        model_or_dir (`nn.Module`, `str` or `PathLike`): a prepared model (saved with `save_adapter` to a temporary
            directory first) or an adapter directory, validated before anything is uploaded.
        repo_id (`str`): the Hub repo, `org/name`.
        private (`bool`, *optional*): visibility of a newly created repo; the Hub's default when `None`.
        token (`str` or `bool`, *optional*): Hub token; the stored login or `HF_TOKEN` when `None`.
        revision (`str`, *optional*): branch to commit to (created from the default branch if missing).
        commit_message (`str`, defaults to `"Upload sparse adapter"`).
        base_model_name_or_path (`str`, *optional*): recorded as the base when a model is saved.

    Returns:
        `huggingface_hub.CommitInfo` of the upload.

    Example:
        ```python
        >>> push_adapter_to_hub(model, "me/smollm2-spiel-wordnet", private=True)
        ```
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sparse-adapter-") as tmp:
        if isinstance(model_or_dir, nn.Module):
            folder = Path(tmp) / "adapter"
            save_adapter(model_or_dir, folder, base_model_name_or_path=base_model_name_or_path)
        else:
            folder = Path(model_or_dir)
            read_adapter(folder)  # refuse a corrupt adapter before it reaches the Hub
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            repo_type="model",
            commit_message=commit_message,
            allow_patterns=_OUR_FILES,
        )
