"""Hugging Face Hub references (parsed by :func:`lora_arith.lora.specs.parse_reference`): resolving ``org/name[@revision][/subfolder]`` to cached files.

Anywhere an adapter path is accepted, a Hub reference works too:

* ``org/name`` — a PEFT adapter at the root of a model repository;
* ``org/name/sub/folder`` — a PEFT adapter in a subfolder;
* ``org/name/file.safetensors`` — a single-file adapter;
* each with an optional ``@revision`` after the repository name (``org/name@v1/sub``), including
  a pull request's ``@refs/pr/N`` (``org/name@refs/pr/1/sub``).

**A local path always wins:** a reference is looked up on the Hub only when no file or folder
of that name exists locally and its first component is not a local folder (so a mistyped
``adapters/helpfull`` is reported as missing, not fetched). Downloads go through huggingface_hub's own ``hf_hub_download``, so
its cache, ``HF_TOKEN``, ``HF_HOME`` and offline mode (``HF_HUB_OFFLINE=1``: resolve from the
local cache only) all apply.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.specs import HubReference, parse_reference

__all__ = ["resolve"]


def _download(reference: HubReference, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{reference.repo_id}{'@' + reference.revision if reference.revision else ''}"
    try:
        return Path(hf_hub_download(reference.repo_id, filename, revision=reference.revision))
    except LocalEntryNotFoundError:
        raise LoraArithError(
            f"{where}: {filename} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode or no network); download it once while online"
        ) from None
    except RepositoryNotFoundError:
        raise LoraArithError(f"{where}: no such local path, and no such repository on the Hub") from None
    except RevisionNotFoundError:
        raise LoraArithError(f"{where}: no such revision on the Hub") from None
    except EntryNotFoundError:
        raise LoraArithError(f"{where}: no file {filename} in this repository") from None


def resolve(text: str) -> Path:
    """The local path for an adapter path or Hub reference (a local path wins).

    Returns the path unchanged when it exists locally or is not a Hub reference; otherwise
    downloads (or finds in the cache) the adapter's files and returns their local folder or file.
    """
    path = Path(os.path.expanduser(text))
    try:
        local = path.exists() or Path(text.split("/", 1)[0]).is_dir()
    except OSError as error:  # a name too long for the file system, say
        raise LoraArithError(f"{text[:60]}{'...' if len(text) > 60 else ''}: {error.strerror}") from None
    if local:
        return path  # a local path (or one inside a local folder): never looked up on the Hub
    reference = parse_reference(text)
    if reference is None:
        return path
    if reference.is_single_file:
        return _download(reference, reference.subpath)
    prefix = f"{reference.subpath}/" if reference.subpath else ""
    config = _download(reference, f"{prefix}adapter_config.json")
    _download(reference, f"{prefix}adapter_model.safetensors")
    return config.parent
