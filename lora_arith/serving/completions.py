"""Completions of many prompts, each with its own mix: the library side of ``lora-arith generate``.

Greedy decoding runs on the engine behind ``serve``
(:func:`~lora_arith.serving.engine.greedy_completions`): every prompt is a row with its own
weights, and a row leaves the batch the moment it is done. Sampling (``temperature > 0``) runs
through transformers' seeded ``model.generate``, batch by batch
(:meth:`~lora_arith.model.mixing.PreferenceMixer.generate`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from lora_arith.lora.specs import AdapterSpec
    from lora_arith.model.mixing import PreferenceMixer

__all__ = ["Completions", "complete", "generate_completions"]


@dataclass(frozen=True)
class Completions:
    """What :func:`generate_completions` made.

    Attributes:
        prompts: the prompts, in their order.
        texts: the completion of each prompt.
        path: the JSON Lines file written, if one was asked for.
    """

    prompts: Sequence[Any]
    texts: list[str]
    path: Path | None = None

    def lines(self) -> list[str]:
        """One JSON line ``{"prompt": ..., "completion": ...}`` per prompt, as the file holds them."""
        return [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(self.prompts, self.texts)]


def complete(
    mixer: "PreferenceMixer",
    prompts: Sequence[Any],
    weights: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    sources: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """The completion of each prompt (a string or chat messages), row ``i`` mixed with
    ``weights[i]`` (name → η; names left out, or ``None``, keep the mixer's weights).

    Greedy (``temperature`` 0) on the engine, at most ``batch_size`` rows at a time; sampled
    with ``seed`` through ``model.generate``, ``batch_size`` prompts a batch. Every prompt is checked
    against the model's context first, named by its entry in ``sources``. ``progress`` shows a
    bar on stderr."""
    from lora_arith.model.generation import check_sampling

    check_sampling(temperature, seed)
    rows = list(weights) if weights is not None else [None] * len(prompts)
    if temperature > 0:  # model.generate's seeded sampling, batch by batch
        mixed = rows if any(row is not None for row in rows) else None
        return mixer.generate(
            prompts, mixed, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed,
            progress=progress, sources=sources,
        )
    # greedy: the engine behind `serve`, each row with its own mix, rows leaving as they finish
    from lora_arith.model.generation import encode_prompts
    from lora_arith.serving.engine import greedy_completions

    return greedy_completions(
        mixer,
        encode_prompts(mixer.model, mixer.tokenizer, prompts, max_new_tokens, sources),
        rows,
        max_new_tokens=max_new_tokens,
        max_batch_size=batch_size,
        progress=progress,
    )


def generate_completions(
    base: str | None,
    named: Mapping[str, "AdapterSpec"],
    prompts: Sequence[Any],
    weights: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    quantize_4bit: bool = False,
    device: str | None = None,
    **options: Any,
) -> Completions:
    """Load ``base`` with the adapters ``named`` attached at their weights
    (:meth:`~lora_arith.model.mixing.PreferenceMixer.from_specs`) and complete ``prompts``
    (:func:`complete`, which takes ``weights`` and ``options``).

    With ``output``, the completions are written there as JSON Lines (:meth:`Completions.lines`),
    atomically; the output is checked before the base loads, against the base, the adapters and
    the files ``inputs`` (which it must not overwrite)."""
    from lora_arith._internal.atomic import atomic_output, check_output
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.lora.specs import check_named_weights
    from lora_arith.model.base import model_inputs
    from lora_arith.model.generation import check_sampling
    from lora_arith.model.mixing import PreferenceMixer

    # what can be checked without the model, before the base loads
    check_sampling(options.get("temperature", 0.0), options.get("seed", 0))
    sources = options.get("sources")
    for index, row in enumerate(weights or ()):
        try:
            check_named_weights(row, list(named))
        except LoraArithError as error:
            raise LoraArithError(f"{sources[index] if sources else f'prompt {index + 1}'}: {error}") from None
    checked = None
    if output is not None:
        files = model_inputs(base, [spec.path for spec in named.values()], *inputs)
        checked = check_output(output, force=force, inputs=files, kind="file")
    mixer = PreferenceMixer.from_specs(base, named, quantize_4bit=quantize_4bit, device=device)
    result = Completions(prompts, complete(mixer, prompts, weights, **options))
    if checked is None:
        return result
    with atomic_output(checked) as temporary:
        temporary.write_text("\n".join(result.lines()) + "\n", encoding="utf-8")
    return Completions(prompts, result.texts, checked.path)
