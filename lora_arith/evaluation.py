"""Evaluation of a (mixed) model: refusal and over-refusal on prompts, DPO metrics on pairs.

* On prompts marked ``should_refuse: true`` the **refusal rate** is the share of completions
  that :func:`lora_arith.refusal.is_refusal` flags; on prompts marked ``false`` (safe, maybe
  scary-sounding, XSTest style) the **compliance rate** is the share it does not flag.
* On preference pairs, the **implicit-reward accuracy** is the share of pairs where the DPO
  reward ``β·(log π(y|x) − log π_ref(y|x))`` of the chosen reply beats the rejected one's,
  with the base (adapters disabled) as the reference; the **log-prob margin** is the mean of
  ``log π(chosen|x) − log π(rejected|x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora_arith.data import BadLine, read_jsonl, to_messages
from lora_arith.errors import LoraArithError
from lora_arith.refusal import refusal_reason


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt with the behaviour expected of a good model."""

    prompt: Any
    should_refuse: bool
    type: str | None = None
    source: str = ""


def load_eval_prompts(paths: Sequence[str | Path]) -> list[EvalPrompt]:
    """Read JSONL files whose rows have ``prompt`` and a boolean ``should_refuse`` (``type`` optional)."""
    items: list[EvalPrompt] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LoraArithError(f"{path}: no such file")
        for number, row in read_jsonl(path):
            if isinstance(row, BadLine):
                raise LoraArithError(f"{path}:{number}: not valid JSON")
            if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("should_refuse"), bool):
                raise LoraArithError(f"{path}:{number}: needs a 'prompt' and a boolean 'should_refuse'")
            try:
                to_messages(row["prompt"])
            except ValueError as error:
                raise LoraArithError(f"{path}:{number}: {error}") from None
            items.append(EvalPrompt(row["prompt"], row["should_refuse"], row.get("type"), f"{path}:{number}"))
    if not items:
        raise LoraArithError("no evaluation prompts found")
    return items


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def refusal_metrics(items: Sequence[EvalPrompt], completions: Sequence[str]) -> dict[str, Any]:
    """Refusal rate on should-refuse prompts and compliance rate on the others, overall and per type."""
    refused = [refusal_reason(text) is not None for text in completions]
    unsafe = [r for item, r in zip(items, refused) if item.should_refuse]
    safe = [not r for item, r in zip(items, refused) if not item.should_refuse]
    by_type: dict[str, list[bool]] = {}
    for item, r in zip(items, refused):
        by_type.setdefault(item.type or ("unsafe" if item.should_refuse else "safe"), []).append(r)
    return {
        "refusal_rate_unsafe": _rate(unsafe),
        "compliance_rate_safe": _rate(safe),
        "n_unsafe": len(unsafe),
        "n_safe": len(safe),
        "refusal_rate_by_type": {t: _rate(flags) for t, flags in sorted(by_type.items())},
    }


def pair_metrics(model, tokenizer, pairs: Sequence[Any], *, beta: float = 0.1, batch_size: int = 8) -> dict[str, Any]:
    """Implicit-reward accuracy (reference: the model with its adapters disabled) and the mean
    log-prob margin of chosen over rejected, overall and per pair file (``by_file``). For a model
    without adapters the accuracy is None."""
    import torch

    from lora_arith.generation import reply_logprobs

    prompts = [pair.prompt for pair in pairs]

    def logprobs(replies):
        return reply_logprobs(model, tokenizer, prompts, replies, batch_size=batch_size)

    chosen, rejected = logprobs([p.chosen for p in pairs]), logprobs([p.rejected for p in pairs])
    rewards = None
    disable = getattr(model, "disable_adapter", None)
    if disable is not None:
        with disable():
            ref_chosen, ref_rejected = logprobs([p.chosen for p in pairs]), logprobs([p.rejected for p in pairs])
        rewards = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))

    def summarise(rows: list[int]) -> dict[str, Any]:
        index = torch.tensor(rows)
        picked = None if rewards is None else rewards[index]
        return {
            "n_pairs": len(rows),
            "logprob_margin": float((chosen[index] - rejected[index]).mean()),
            "reward_accuracy": None if picked is None else float((picked > 0).double().mean()),
            "reward_margin": None if picked is None else float(picked.mean()),
        }

    files: dict[str, list[int]] = {}
    for row, pair in enumerate(pairs):
        files.setdefault(pair.origin, []).append(row)
    return {**summarise(list(range(len(pairs)))), "by_file": {name: summarise(rows) for name, rows in files.items()}}


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[EvalPrompt] = (),
    pairs: Sequence[Any] = (),
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    beta: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every metric that the given prompts and pairs allow.

    Returns ``{"prompts": refusal metrics, "pairs": pair metrics, "completions": [...]}``
    (keys present only for what was given).
    """
    from lora_arith.generation import generate

    result: dict[str, Any] = {}
    if prompts:
        completions = generate(
            model,
            tokenizer,
            [p.prompt for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            sources=[p.source for p in prompts],
        )
        result["prompts"] = refusal_metrics(prompts, completions)
        result["completions"] = [
            {"prompt": p.prompt, "should_refuse": p.should_refuse, "completion": c, "refusal": refusal_reason(c)}
            for p, c in zip(prompts, completions)
        ]
    if pairs:
        result["pairs"] = pair_metrics(model, tokenizer, pairs, beta=beta, batch_size=max(1, batch_size // 2))
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the headline metrics, one row per evaluated configuration."""
    lines = [
        "| model | refusal (unsafe) ↑ | compliance (safe) ↑ | reward acc. ↑ | log-prob margin ↑ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in rows.items():
        prompts, pairs = result.get("prompts", {}), result.get("pairs", {})
        margin = pairs.get("logprob_margin")
        lines.append(
            f"| {name} | {_percent(prompts.get('refusal_rate_unsafe'))} | {_percent(prompts.get('compliance_rate_safe'))} "
            f"| {_percent(pairs.get('reward_accuracy'))} | {'n/a' if margin is None else f'{margin:.2f}'} |"
        )
    return "\n".join(lines)
