"""The README model card written beside every adapter this toolkit saves.

The card's metadata is huggingface_hub's :class:`~huggingface_hub.ModelCardData` as YAML front matter
(exactly what :class:`~huggingface_hub.ModelCard` writes), so the Hub reads it as it reads any PEFT
adapter's: ``library_name: peft``, ``pipeline_tag: text-generation``, ``base_model`` with the
``base_model:adapter:<id>`` tag, ``datasets`` when the training data came from the Hub, and a
licence taken from the caller (``--license``) or from the base model's own card.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from lora_arith._internal.privacy import public_data_spec, public_name, public_training, scrub

__all__ = ["KNOWN_LICENSES", "is_hub_id", "hub_datasets", "base_license", "model_card", "training_runs"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
"""Licences of bases whose card is known without network access (the embedded default base)."""


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` reads as a Hub repository id (``org/name``) and is not a local path."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def _recipe_section(recipe: Mapping[str, Any]) -> list[str]:
    method = f"`{recipe.get('method')}`"
    if recipe.get("rank") is not None:
        method += f", rank {recipe['rank']}"
    if recipe.get("energy") is not None:
        method += f", energy {recipe['energy']}"
    lines = ["## Recipe", "", f"ΔW = Σ wᵢ ΔWᵢ, method {method}.", ""]
    lines += ["| input | weight | sha256 |", "| --- | --- | --- |"]
    for item in recipe.get("inputs", []):
        lines.append(f"| `{public_name(item['path'])}` | {item['weight']:g} | `{item['sha256']}` |")
    return lines + [""]


def _run_lines(run: Mapping[str, Any]) -> list[str]:
    lines = []
    for item in run.get("data", []):
        sha = f" (sha256 `{item['sha256']}`)" if item.get("sha256") else ""
        count = f", {item['pairs']} pairs" if "pairs" in item else ""
        lines.append(f"- data: `{public_data_spec(item)}`{count}{sha}")
    if "swap" in run:
        lines.append(f"- chosen/rejected swapped: {run['swap']}")
    for key, value in sorted((run.get("hyperparameters") or {}).items()):
        lines.append(f"- {key}: {value}")
    for key, value in sorted((run.get("final_metrics") or {}).items()):
        lines.append(f"- final {key}: {value}")
    return lines


def training_runs(training: Mapping[str, Any], name: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """The training runs in ``training``: one run (it has ``data``), or runs nested by name
    (a vector's ``positive``/``negative`` runs, the inputs of a combination)."""
    if "data" in training:
        return [(name, training)]
    runs = []
    for key, value in training.items():
        if isinstance(value, Mapping):
            runs += training_runs(value, f"{name} / {key}" if name else key)
    return runs


def _training_section(training: Mapping[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    for name, run in training_runs(training):
        if name:
            lines += [f"### {public_name(name)}", ""]
        lines += _run_lines(run) + [""]
    return lines


def hub_datasets(training: Mapping[str, Any] | None) -> list[str]:
    """The Hub dataset ids (without config, revision or split) the training data came from."""
    names: list[str] = []
    for _, run in training_runs(training or {}):
        for item in run.get("data", []):
            dataset = item.get("hub_dataset")
            if isinstance(dataset, str):
                dataset = re.split(r"[:@]", dataset, maxsplit=1)[0]
                if dataset not in names:
                    names.append(dataset)
    return names


def base_license(base: str | None, *, online: bool = False) -> str | None:
    """The licence of ``base``: known for the default base, read from a local folder's
    ``README.md``, or (``online``) from the Hub card through huggingface_hub. ``None`` if unknown."""
    if not base:
        return None
    if base in KNOWN_LICENSES:
        return KNOWN_LICENSES[base]
    readme = Path(os.path.expanduser(base)) / "README.md"
    source = readme if readme.is_file() else base if online and is_hub_id(base) else None
    if source is None:
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(source).data.license
    except Exception:  # no card, no network, unreadable card: the licence stays unknown
        return None


def model_card(
    config: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> str:
    """A Hugging Face model card (README.md with YAML front matter) for an adapter.

    The metadata follows PEFT's own cards: ``library_name: peft``, ``pipeline_tag:
    text-generation``, ``base_model`` and the ``base_model:adapter:<id>`` tag when the base is
    a Hub id, ``datasets`` for Hub training data, and ``license`` (``license`` if given, else the
    base's, else left out). The text names the recipe with the inputs' sha256 and the training
    data and metrics when known. No local path is written: files are named by basename.
    """
    from huggingface_hub import ModelCardData  # (huggingface_hub.repocard_data: 0.05 s; ModelCard would import hf_api: 0.3 s)

    recipe, training = scrub(recipe), public_training(training)  # metadata written elsewhere may hold local paths
    base = config.get("base_model_name_or_path")
    hub_base = base if is_hub_id(base) else None
    tags = ["peft", "lora", "preference-vector", "lora-arith"]
    if hub_base:
        tags.insert(0, f"base_model:adapter:{hub_base}")
    data = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        license=license or base_license(base),
        base_model=hub_base,
        datasets=hub_datasets(training) or None,
        tags=tags,
    )
    lines = ["# Preference-vector LoRA adapter", ""]
    ranks = f"rank {config.get('r')}" + (" (per-module ranks in `rank_pattern`)" if config.get("rank_pattern") else "")
    lines += [f"Base model: `{public_name(base) if base else 'unknown'}`; {ranks}.", ""]
    if recipe:
        lines += _recipe_section(recipe)
    if training:
        lines += _training_section(training)
    lines += [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, ADAPTER_PATH)",
        "```",
        "",
        "Written by lora-arith.",
        "",
    ]
    # What ModelCard(text) would give back as str(): the metadata's YAML between "---" lines, then the text.
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
