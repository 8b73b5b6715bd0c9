"""Batched chat generation with left padding, and log-probabilities of given replies."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch

from lora_arith.base_model import chat_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def end_of_turn_ids(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """Token ids that end an assistant turn: EOS plus chat end markers the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[token] for token in ("<|im_end|>", "<|end|>", "<|eot_id|>") if token in vocabulary)
    return sorted(ids)


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    batch_context: Callable[[list[int]], ContextManager] | None = None,
) -> list[str]:
    """Complete each prompt (a string or chat messages) through the chat template.

    Prompts are batched by length with left padding; decoding is greedy unless
    ``temperature > 0``. Returns the completions in the prompts' order.
    ``batch_context(indices)``, if given, is entered around the generation of each batch
    (``indices``: the prompts of the batch, in row order), e.g. to set per-row weights.
    """
    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    completions: list[str] = [""] * len(texts)
    stop_ids = end_of_turn_ids(tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batches = list(_batches(order, batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generating", unit="batch", leave=False)
    torch.manual_seed(seed)
    try:
        for batch in batches:
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = encoded.to(_device(model))
            sampling = (
                dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                if temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            )
            with batch_context(batch) if batch_context is not None else contextlib.nullcontext():
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for i, tokens in zip(batch, new_tokens):
                completions[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return completions


@torch.no_grad()
def reply_logprobs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[Any],
    replies: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> torch.Tensor:
    """Sum of the log-probabilities of each reply's tokens (plus the end-of-turn token) given
    its prompt through the chat template. Sequences are cut to ``max_length`` tokens from the
    right of the reply; returns a float64 tensor, one value per pair."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, reply_starts = [], []
    for prompt, reply in zip(prompts, replies):
        prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + end
        ids = (prompt_ids + reply_ids)[:max_length]
        sequences.append(ids)
        reply_starts.append(min(len(prompt_ids), len(ids)))
    totals = torch.zeros(len(sequences), dtype=torch.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    for batch in _batches(list(range(len(sequences))), batch_size):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, i in enumerate(batch):
            start, stop = reply_starts[i], len(sequences[i])
            totals[i] = logprobs[row, max(start - 1, 0) : stop - 1].double().sum()
    return totals
