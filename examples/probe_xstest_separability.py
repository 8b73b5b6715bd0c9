"""How well can the base model's own features tell XSTest's unsafe prompts from its safe-but-scary ones?

A diagnostic for the results (docs/results.md), not part of the recipe. For every layer of the
default base, it fits an L2-regularised logistic regression (a linear probe) on the last-token
hidden state of the chat-templated prompt, trained on the XSTest *train* half (the prompts of
``harmless/xstest_unsafe_pairs.jsonl`` and ``helpful/xstest_safe_pairs.jsonl``) and scored on the
*eval* half (``eval/xstest_prompts.jsonl``). It prints, per layer, the share of unsafe prompts the
probe flags and the share of safe prompts it lets through.

With ``--add-templated-sources`` the training set also gets the AdvBench and Do-Not-Answer requests
as unsafe and the general-pairs and Alpaca instructions as safe (prompts under 400 characters), the
prompts the shipped harmless and helpful vectors are trained on.

    python examples/probe_xstest_separability.py [--add-templated-sources]   # from the repository root

A linear probe on frozen features is a hint, not a bound, on what a LoRA fine-tune can learn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lora_arith.model.base import load_base
from lora_arith.model.generation import chat_prompt
from lora_arith.training.data import load_pairs
from lora_arith.evaluation.evaluate import load_eval_prompts

MAX_PROMPT_CHARS = 400

XSTEST_SOURCES = (("harmless/xstest_unsafe_pairs.jsonl", 1), ("helpful/xstest_safe_pairs.jsonl", 0))
"""The XSTest train half, as (data spec relative to the data folder, is_unsafe)."""

TEMPLATED_SOURCES = (
    ("refusal:harmless/advbench_behaviors.jsonl", 1),
    ("refusal:harmless/donotanswer_prompts.jsonl", 1),
    ("helpful/general_pairs.jsonl", 0),
    ("answer:helpful/alpaca_demo.jsonl", 0),
)
"""The other prompt sources of the shipped vectors (and Alpaca), as (data spec, is_unsafe)."""


def source_prompts(data: Path, spec: str, label: int) -> list[tuple[str, int]]:
    """The short single-turn prompts of one data spec, read with the recipe's own loader."""
    kind, _, relative = spec.rpartition(":")
    pairs, _ = load_pairs([f"{kind}:{data / relative}" if kind else str(data / relative)])
    return [
        (pair.prompt, label)
        for pair in pairs
        if isinstance(pair.prompt, str) and len(pair.prompt) < MAX_PROMPT_CHARS
    ]


def training_prompts(data: Path, add_templated_sources: bool) -> list[tuple[str, int]]:
    """Unique (prompt, is_unsafe) pairs to fit the probe on; never the eval half."""
    sources = XSTEST_SOURCES + (TEMPLATED_SOURCES if add_templated_sources else ())
    labelled = [item for spec, label in sources for item in source_prompts(data, spec, label)]
    return sorted(dict(labelled).items(), key=lambda item: len(item[0]))


@torch.no_grad()
def last_token_states(model, tokenizer, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Hidden states of the last prompt token: (prompts, layers + 1, hidden)."""
    tokenizer.padding_side = "left"
    states = []
    for start in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        states.append(torch.stack([layer[:, -1] for layer in hidden], dim=1))
    return torch.cat(states)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2):
    """A standardised logistic regression; returns a function from features to 0/1 predictions."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    inputs = (features - mean) / std
    weight = torch.zeros(inputs.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss():
        optimizer.zero_grad()
        logits = inputs @ weight + bias
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        value = value + l2 * weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return lambda new: ((((new - mean) / std) @ weight + bias) > 0).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--add-templated-sources", action="store_true")
    args = parser.parse_args()

    train = training_prompts(args.data, args.add_templated_sources)
    evaluation = load_eval_prompts([args.data / "eval/xstest_prompts.jsonl"])
    model, tokenizer = load_base(None, quantize_4bit=False)
    train_states = last_token_states(model, tokenizer, [prompt for prompt, _ in train])
    eval_states = last_token_states(model, tokenizer, [item.prompt for item in evaluation])
    train_labels = torch.tensor([label for _, label in train], dtype=torch.float32)
    eval_unsafe = torch.tensor([item.should_refuse for item in evaluation])

    unsafe_count = int(train_labels.sum())
    print(f"train: {len(train)} prompts ({unsafe_count} unsafe); eval: {len(evaluation)} prompts")
    print("layer | unsafe flagged | safe let through")
    for layer in range(1, train_states.shape[1]):
        predict = fit_probe(train_states[:, layer], train_labels)
        flagged = predict(eval_states[:, layer])
        unsafe_flagged = flagged[eval_unsafe].float().mean().item()
        safe_passed = (~flagged[~eval_unsafe]).float().mean().item()
        print(f"{layer:5d} | {unsafe_flagged:14.1%} | {safe_passed:16.1%}")


if __name__ == "__main__":
    main()
