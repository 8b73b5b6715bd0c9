"""Sharing adapters on the Hugging Face Hub with a generated model card.

Only what an adapter repository needs is uploaded: ``adapter_config.json``,
``adapter_model.safetensors`` and a generated ``README.md`` model card; ``include`` patterns add
more files of an adapter folder. Nothing local leaks: paths in the config, the safetensors
metadata and the card are reduced to basenames (see :mod:`lora_arith._internal.privacy`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_arith.lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME, open_adapter, public_config
from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith.sharing.model_card import base_license, model_card
from lora_arith._internal.privacy import public_training, scrub
from lora_arith._internal.provenance import TRAINING_METADATA_KEY

__all__ = ["UPLOADED", "DEFAULT_COMMIT_MESSAGE", "UploadPlan", "check_repo_id", "check_revision", "plan_upload", "push"]

UPLOADED = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
"""The files an adapter repository gets without ``--include``."""

DEFAULT_COMMIT_MESSAGE = "Upload preference-vector adapter"


@dataclass(frozen=True)
class UploadPlan:
    """What an upload creates in the repository.

    Attributes:
        copied: repository path → local file uploaded as is.
        generated: repository path → text written for the upload (the model card, and the
            config when the adapter's own has a local path or is embedded in a single file).
        rewritten: repository path → weights file whose safetensors metadata must be rewritten
            without local paths before upload (the tensors are unchanged).
    """

    copied: dict[str, Path]
    generated: dict[str, str]
    rewritten: dict[str, Path]

    @property
    def names(self) -> list[str]:
        """Every repository path, sorted."""
        return sorted({*self.copied, *self.generated, *self.rewritten})

    def __repr__(self) -> str:  # not the whole model card
        return f"UploadPlan(files={self.names}, model_card={len(self.generated.get('README.md', ''))} characters)"


def _metadata(weights: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as handle:
        return dict(handle.metadata() or {})


def _public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Safetensors metadata with local paths in its values reduced to basenames (values
    without paths are kept byte for byte)."""
    public = {}
    for key, value in metadata.items():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            public[key] = scrub(value)
            continue
        cleaned = public_training(parsed) if key == TRAINING_METADATA_KEY else scrub(parsed)
        public[key] = value if cleaned == parsed else json.dumps(cleaned, sort_keys=True)
    return public


def _included(folder: Path, patterns: Sequence[str]) -> dict[str, Path]:
    """Files of ``folder`` (relative names) that match any of ``patterns``."""
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    for pattern in patterns:  # a pattern that adds nothing is a typo, not an empty wish
        if not any(fnmatch.fnmatch(name, pattern) for name in files):
            raise OptionError("include", "{} {pattern!r} matches no file of the adapter folder", pattern=pattern)
    return {name: path for name, path in files.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it as a model repository's id (``NAME`` or
    ``NAMESPACE/NAME``, huggingface_hub's own check), else a one-line :class:`LoraArithError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be text, NAME or NAMESPACE/NAME, not {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LoraArithError(
            f"{repo_id!r} is not a Hub repository id: NAME or NAMESPACE/NAME, of letters, digits, '-', '_' and '.'"
        ) from None
    return repo_id


_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[/.-]|[/.]$|\.lock$|/\.|\.lock/")
"""What git's ``check-ref-format`` refuses in a branch name (the Hub's branches are git refs)."""


def check_revision(revision: str | None) -> str | None:
    """``revision`` if it can name a branch (``None``: the default branch), else an
    :class:`OptionError`, found before anything is uploaded (the Hub refused it only then)."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not revision or revision == "@" or _BAD_REF.search(revision):
        raise OptionError("revision", "{} {revision!r} cannot name a branch (git's rules for refs)", revision=revision)
    return revision


def plan_upload(
    adapter: str | os.PathLike[str],
    license: str | None = None,
    include: str | Sequence[str] = (),
    *,
    online: bool = False,
) -> UploadPlan:
    """The files :func:`push` uploads: ``adapter_config.json``, ``adapter_model.safetensors``
    and a generated ``README.md`` model card, plus the adapter folder's files that match an
    ``include`` pattern (shell-style, relative to the folder; one pattern or a list). A single-file adapter is
    uploaded in the same layout, its config taken from its metadata. The licence is ``license``,
    else the base model's (``online``: also looked up on the Hub), else left out.

    What ``push --dry-run`` shows; nothing is uploaded. ``plan.generated["README.md"]`` is the card.
    """
    opened = open_adapter(adapter)
    copied: dict[str, Path] = {}
    rewritten: dict[str, Path] = {}
    metadata = _metadata(opened.weights_path)
    if _public_metadata(metadata) == metadata:
        copied[WEIGHTS_NAME] = opened.weights_path
    else:
        rewritten[WEIGHTS_NAME] = opened.weights_path
    generated: dict[str, str] = {}
    config_file = opened.weights_path.parent / CONFIG_NAME
    public = public_config(opened.config)
    if opened.weights_path.name == WEIGHTS_NAME and config_file.is_file() and public == opened.config:
        copied[CONFIG_NAME] = config_file
    else:
        generated[CONFIG_NAME] = json.dumps(public, indent=2, sort_keys=True) + "\n"
    include = [include] if isinstance(include, str) else list(include)  # one pattern, not one per character
    if include:
        if opened.weights_path.name != WEIGHTS_NAME:
            raise OptionError("include", "{} adds files of an adapter folder; this adapter is a single file")
        for name, path in _included(opened.weights_path.parent, include).items():
            if name not in UPLOADED:
                copied[name] = path
    license = license or base_license(opened.base_model, online=online)
    generated["README.md"] = model_card(public, opened.recipe, opened.training, license=license)
    return UploadPlan(copied, generated, rewritten)


def _network_errors(*errors: type[BaseException]) -> tuple[type[BaseException], ...]:
    """``errors`` plus the base error of the HTTP client huggingface_hub uses (httpx's
    ``HTTPError``: connection refused, DNS failure, timeouts), which is not an ``OSError``."""
    try:
        from huggingface_hub.utils import httpx
    except ImportError:  # older huggingface_hub: requests, whose errors are OSErrors
        return errors
    return (*errors, httpx.HTTPError)


def push(
    adapter: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license: str | None = None,
    include: str | Sequence[str] = (),
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload the adapter with huggingface_hub's API (``HF_TOKEN`` or the saved login).

    ``create_pr`` opens a pull request instead of committing to the branch. Returns the
    commit URL, or the pull request's URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from safetensors.torch import load_file, save_file

    check_repo_id(repo_id)
    check_revision(revision)
    plan = plan_upload(adapter, license, include, online=True)
    api = HfApi()
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging)
        for name, path in plan.copied.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(path.resolve())
        for name, path in plan.rewritten.items():
            save_file(load_file(path), folder / name, metadata=_public_metadata(_metadata(path)))
        for name, text in plan.generated.items():
            (folder / name).write_text(text)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                create_pr=create_pr,
            )
        except _network_errors(HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
            raise LoraArithError(f"upload to {repo_id} failed: {first_line(error)}") from None
    return str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", commit))
