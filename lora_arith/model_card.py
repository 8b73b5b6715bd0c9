"""The README model card written beside every adapter this toolkit saves."""

from __future__ import annotations

from typing import Any, Mapping


def _recipe_section(recipe: Mapping[str, Any]) -> list[str]:
    method = f"`{recipe.get('method')}`"
    if recipe.get("rank") is not None:
        method += f", rank {recipe['rank']}"
    if recipe.get("energy") is not None:
        method += f", energy {recipe['energy']}"
    lines = ["## Recipe", "", f"ΔW = Σ wᵢ ΔWᵢ, method {method}.", ""]
    lines += ["| input | weight | sha256 |", "| --- | --- | --- |"]
    for item in recipe.get("inputs", []):
        lines.append(f"| `{item['path']}` | {item['weight']:g} | `{item['sha256']}` |")
    return lines + [""]


def _run_lines(run: Mapping[str, Any]) -> list[str]:
    lines = []
    for item in run.get("data", []):
        where = item.get("file") or item.get("hub_dataset") or item.get("spec")
        sha = f" (sha256 `{item['sha256']}`)" if item.get("sha256") else ""
        count = f", {item['pairs']} pairs" if "pairs" in item else ""
        lines.append(f"- data: `{item.get('spec', where)}`{count}{sha}")
    if "swap" in run:
        lines.append(f"- chosen/rejected swapped: {run['swap']}")
    for key, value in sorted((run.get("hyperparameters") or {}).items()):
        lines.append(f"- {key}: {value}")
    for key, value in sorted((run.get("final_metrics") or {}).items()):
        lines.append(f"- final {key}: {value}")
    return lines


def _runs(training: Mapping[str, Any], name: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """The training runs in ``training``: one run (it has ``data``), or runs nested by name
    (a vector's ``positive``/``negative`` runs, the inputs of a combination)."""
    if "data" in training:
        return [(name, training)]
    runs = []
    for key, value in training.items():
        if isinstance(value, Mapping):
            runs += _runs(value, f"{name} / {key}" if name else key)
    return runs


def _training_section(training: Mapping[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    for name, run in _runs(training):
        if name:
            lines += [f"### {name}", ""]
        lines += _run_lines(run) + [""]
    return lines


def model_card(
    config: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
) -> str:
    """A Hugging Face model card (README.md with YAML front matter) for an adapter.

    It names the base model, the arithmetic recipe with the inputs' sha256, the training
    data and metrics when known, the licence and the tags ``peft``, ``lora`` and
    ``preference-vector``.
    """
    base = config.get("base_model_name_or_path")
    lines = ["---", "library_name: peft", f"license: {license}"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- peft", "- lora", "- preference-vector", "- lora-arith", "---", ""]
    lines += ["# Preference-vector LoRA adapter", ""]
    ranks = f"rank {config.get('r')}" + (" (per-module ranks in `rank_pattern`)" if config.get("rank_pattern") else "")
    lines += [f"Base model: `{base or 'unknown'}`; {ranks}.", ""]
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
    return "\n".join(lines)
