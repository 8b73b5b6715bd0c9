"""Sharing adapters on the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_arith.adapter_io import CONFIG_NAME, WEIGHTS_NAME, open_adapter
from lora_arith.errors import LoraArithError, first_line
from lora_arith.model_card import model_card


@dataclass(frozen=True)
class UploadPlan:
    """What an upload creates in the repository.

    Attributes:
        copied: repository path → local file uploaded as is.
        generated: repository path → text written for the upload (the model card, and the
            config of a single-file adapter).
    """

    copied: dict[str, Path]
    generated: dict[str, str]

    @property
    def names(self) -> list[str]:
        """Every repository path, sorted."""
        return sorted({*self.copied, *self.generated})


def plan_upload(adapter: str | os.PathLike[str], license: str = "apache-2.0") -> UploadPlan:
    """The files :func:`push` uploads: a PEFT folder layout (``adapter_config.json``,
    ``adapter_model.safetensors``, a generated ``README.md`` model card) plus any other files
    of an adapter folder. A single-file adapter is uploaded in that layout, its config taken
    from its metadata.
    """
    opened = open_adapter(adapter)
    copied = {WEIGHTS_NAME: opened.weights_path}
    source = opened.weights_path.parent if opened.weights_path.name == WEIGHTS_NAME else None
    if source is not None:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != "README.md" and not path.name.startswith("."):
                copied.setdefault(path.name, path)
    generated = {"README.md": model_card(opened.config, opened.recipe, opened.training, license=license)}
    if CONFIG_NAME not in copied:
        generated[CONFIG_NAME] = json.dumps(opened.config, indent=2, sort_keys=True) + "\n"
    return UploadPlan(copied, generated)


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
    license: str = "apache-2.0",
) -> str:
    """Upload the adapter with huggingface_hub's API (``HF_TOKEN`` or the saved login); returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    plan = plan_upload(adapter, license)
    api = HfApi()
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging)
        for name, path in plan.copied.items():
            (folder / name).symlink_to(path.resolve())
        for name, text in plan.generated.items():
            (folder / name).write_text(text)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message="Upload preference-vector adapter",
            )
        except _network_errors(HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
            raise LoraArithError(f"upload to {repo_id} failed: {first_line(error)}") from None
    return str(getattr(commit, "commit_url", commit))
