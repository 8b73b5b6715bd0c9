"""The batched sweep's fast path (the engine behind ``serve``, see ``test_engine.py``): left
padding as the tokenizer pads, and fused per-row LoRA gives the logits of per-row scaling."""

from __future__ import annotations

import pytest
import torch

from lora_arith.model.generation import left_pad
from lora_arith.model.mixing import PreferenceMixer

PROMPTS = ["How do I bake bread?", "hi", "Tell me a joke about cats.", "What is the capital of France?"]
pytestmark = pytest.mark.usefixtures("one_thread")

MIXES = [{"helpful": 1.0, "harmless": 1.0}, {"helpful": 0.8, "harmless": -0.5}, {"helpful": -1.0}, None]


@pytest.fixture(scope="module")
def mixer(chat_base, two_adapters):
    mixer = PreferenceMixer(str(chat_base), {"helpful": two_adapters[0], "harmless": two_adapters[1]})
    mixer.set(helpful=0.3, harmless=1.5)
    return mixer


def encoded(tokenizer, prompts):
    from lora_arith.model.generation import chat_prompt

    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return left_pad(ids, tokenizer.pad_token_id)


@torch.no_grad()
def logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


def test_left_pad_matches_the_tokenizer(mixer):
    from lora_arith.model.generation import chat_prompt

    tokenizer = mixer.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        texts = [chat_prompt(tokenizer, prompt) for prompt in PROMPTS]
        expected = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    ids, mask = encoded(tokenizer, PROMPTS)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert not bool(mask.all())  # the prompts really are padded


def test_fused_row_weights_give_the_logits_of_per_row_scaling(mixer):
    from peft.tuners.lora.layer import Linear

    ids, mask = encoded(mixer.tokenizer, PROMPTS)
    with mixer.row_weights(MIXES):
        expected = logits(mixer.model, ids, mask)
    with mixer.row_weights(MIXES, fused=True) as weights:
        fused_layers = [m for m in mixer.model.modules() if isinstance(m, Linear) and "forward" in m.__dict__]
        got = logits(mixer.model, ids, mask)
        weights.keep(torch.tensor([1, 3]))  # rows dropped: the others keep their own weights
        kept = logits(mixer.model, ids[[1, 3]], mask[[1, 3]])
    assert fused_layers  # the fused forward really ran
    assert not any("forward" in m.__dict__ for m in fused_layers)  # and is gone after the context
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kept, expected[[1, 3]], rtol=0, atol=1e-5)
    differs = [not torch.allclose(got[0], got[row], atol=1e-3) for row in (1, 2)]
    assert all(differs)  # the rows really are mixed differently
    torch.testing.assert_close(logits(mixer.model, ids, mask), logits(mixer.model, ids, mask))
    with mixer.row_weights([None] * len(PROMPTS)):
        plain = logits(mixer.model, ids, mask)
    torch.testing.assert_close(logits(mixer.model, ids, mask), plain, rtol=0, atol=0)  # the mixer's weights are back
