"""Batched chat generation with left padding, and log-probabilities of given replies."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import torch

from lora_arith.training.data import Prompt, to_messages
from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.lora.numerics import finite_number, require_count

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "chat_prompt",
    "end_of_turn_ids",
    "context_length",
    "most_characters",
    "check_prompt_lengths",
    "check_sampling",
    "encode_prompts",
    "generate",
    "reply_logprobs",
    "left_pad",
]


def chat_prompt(tokenizer: "PreTrainedTokenizerBase", prompt: Prompt) -> str:
    """The text the model sees for ``prompt``, with the chat template and the assistant header.

    Args:
        tokenizer: a tokenizer with a chat template.
        prompt: a user turn as a string, or chat messages ending with a user turn.

    Raises:
        LoraArithError: if the prompt is malformed or the tokenizer has no chat template.
    """
    try:
        messages = to_messages(prompt)
    except ValueError as error:
        raise LoraArithError(f"bad prompt: {error}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise LoraArithError("the base model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_ids(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """Token ids that end an assistant turn: EOS plus chat end markers the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[token] for token in ("<|im_end|>", "<|end|>", "<|eot_id|>") if token in vocabulary)
    return sorted(ids)


DEFAULT_CONTEXT_LENGTH = 2048
"""The context assumed for a model that states none (neither its config nor its tokenizer)."""


def context_length(model, tokenizer) -> int:
    """The most tokens the model attends to: its config's ``max_position_embeddings`` (or
    ``n_positions``, ``max_sequence_length``, ``seq_length``), else its tokenizer's
    ``model_max_length`` (unless that is transformers' "no limit" placeholder), else
    :data:`DEFAULT_CONTEXT_LENGTH`. The one decision of the context that ``generate``, ``sweep``
    and ``serve`` check prompts against."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else DEFAULT_CONTEXT_LENGTH


def most_characters(tokenizer: "PreTrainedTokenizerBase", context: int, longest: int | None = None) -> int:
    """The most characters a prompt that fits ``context`` tokens can have. No token spells more
    than ``longest`` characters (the vocabulary's longest, if not given), so a longer text has more
    tokens than the context: refuse it without tokenizing megabytes (twice the context leaves room
    for normalizers that drop characters)."""
    if longest is None:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1) or 1
    return 2 * context * longest


def check_prompt_lengths(
    model, tokenizer, texts: Sequence[str], max_new_tokens: int, sources: Sequence[str] | None = None
) -> None:
    """Refuse a templated prompt that is not UTF-8 text, or whose tokens plus ``max_new_tokens`` do not
    fit the model's context."""
    context = context_length(model, tokenizer)
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1) or 1
    for index, text in enumerate(texts):
        where = sources[index] if sources is not None else f"prompt {index + 1}"
        try:  # a lone surrogate (bytes that are not UTF-8 on the command line, "\ud800" in JSON) fails in the tokenizer
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise LoraArithError(f"{where}: the prompt is not valid UTF-8 text (it holds {text[error.start]!r})") from None
        if len(text) > most_characters(tokenizer, context, longest):
            raise LoraArithError(
                f"{where}: the prompt is {len(text)} characters, at least {len(text) // longest} tokens; "
                f"the model's context is {context} tokens"
            )
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count + max_new_tokens > context:
            raise LoraArithError(
                f"{where}: the prompt is {count} tokens; with {max_new_tokens} new tokens that exceeds "
                f"the model's context of {context} tokens"
            )


def encode_prompts(
    model, tokenizer, prompts: Sequence[Any], max_new_tokens: int, sources: Sequence[str] | None = None
) -> list[list[int]]:
    """The token ids of each prompt through the chat template, every prompt checked against the
    model's context first (see :func:`check_prompt_lengths`)."""
    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    check_prompt_lengths(model, tokenizer, texts, max_new_tokens, sources)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


class _RequireFiniteLogits:
    """A logits processor that stops generation when the logits hold NaN or +Inf (a weight or
    scaling too large for the model's dtype), instead of letting it decode an empty reply."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
            raise LoraArithError(
                "the model's logits are NaN or Inf: an adapter weight or scaling is too large for its dtype"
            )
        return scores


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_sampling(temperature: float, seed: int) -> None:
    """A temperature of 0 (greedy) or more, finite, and a seed torch takes (64 bits): -1 or NaN
    decoded greedily without a word, and a larger seed overflowed inside torch."""
    if finite_number(temperature) is None or temperature < 0:
        raise OptionError("temperature", "{} must be 0 (greedy) or a positive number, got {value!r}", value=temperature)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise OptionError("seed", "{} must be a whole number that fits 64 bits, got {value!r}", value=seed)


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
    sources: Sequence[str] | None = None,
    batch_context: Callable[[list[int]], ContextManager] | None = None,
) -> list[str]:
    """Complete each prompt (a string or chat messages) through the chat template.

    Prompts are batched by length with left padding; decoding is greedy unless
    ``temperature > 0``. Returns the completions in the prompts' order.

    Every prompt is tokenized and checked against the model's context before the model runs:
    one whose tokens plus ``max_new_tokens`` exceed it is refused, named by its entry in
    ``sources`` (e.g. ``FILE:LINE``) or by its position.

    ``batch_context(indices)``, if given, is entered around the generation of each batch
    (``indices``: the prompts of the batch, in row order), e.g. to set per-row weights.
    """
    require_count(batch_size, "batch_size")
    require_count(max_new_tokens, "max_new_tokens")
    check_sampling(temperature, seed)
    from transformers import LogitsProcessorList

    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    check_prompt_lengths(model, tokenizer, texts, max_new_tokens, sources)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    completions: list[str] = [""] * len(texts)
    stop_ids = end_of_turn_ids(tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batches = list(_batches(order, batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generating", unit="batch", leave=False)
    # sampling draws from torch's global generator (transformers): seeded here, and restored after
    with _seeded(seed, _device(model)) if temperature > 0 else contextlib.nullcontext():
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
                        logits_processor=LogitsProcessorList([_RequireFiniteLogits()]),
                        **sampling,
                    )
                new_tokens = output[:, encoded["input_ids"].shape[1] :]
                for i, tokens in zip(batch, new_tokens):
                    completions[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        finally:
            tokenizer.padding_side = padding_side
    return completions


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global random state seeded with ``seed`` inside, and the caller's restored after
    (every call used to reseed it for good, greedy ones too)."""
    accelerated = device.type in ("cuda", "mps")
    devices = [device.index if device.index is not None else 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        torch.manual_seed(seed)
        yield


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


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded ``(input_ids, attention_mask)`` pair, as the tokenizer
    pads a batch with ``padding_side="left"``."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask
