"""The batched sweep's fast path: the greedy loop that drops finished rows gives the tokens
``model.generate`` gives, and fused per-row LoRA gives the logits of per-row scaling."""

from __future__ import annotations

import pytest
import torch

from lora_arith.generation import end_of_turn_ids, greedy_rows, left_pad, reserved_cache
from lora_arith.mixing import PreferenceMixer
from test_sweep_tune import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["How do I bake bread?", "hi", "Tell me a joke about cats.", "What is the capital of France?"]
MIXES = [{"helpful": 1.0, "harmless": 1.0}, {"helpful": 0.8, "harmless": -0.5}, {"helpful": -1.0}, None]


@pytest.fixture(scope="module")
def mixer(chat_base, two_adapters):
    mixer = PreferenceMixer(str(chat_base), {"helpful": two_adapters[0], "harmless": two_adapters[1]})
    mixer.set(helpful=0.3, harmless=1.5)
    return mixer


def encoded(tokenizer, prompts):
    from lora_arith.generation import chat_prompt

    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return left_pad(ids, tokenizer.pad_token_id)


@torch.no_grad()
def logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


def test_left_pad_matches_the_tokenizer(mixer):
    from lora_arith.generation import chat_prompt

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


@pytest.mark.parametrize("compact_share", [0.0, 0.5])  # each row at once; half the batch at a time
def test_greedy_rows_drops_finished_rows_and_matches_generate(mixer, compact_share):
    from transformers import LogitsProcessorList

    from lora_arith.generation import _RequireFiniteLogits

    model, tokenizer = mixer.model, mixer.tokenizer
    ids, mask = encoded(tokenizer, PROMPTS * 2)
    free = greedy_rows(model, ids, mask, max_new_tokens=10, stop_ids=end_of_turn_ids(tokenizer))
    # stop on a token some rows produce early and others late or never: rows finish at different steps
    stop = free[0][2]
    steps = [tokens.index(stop) if stop in tokens else None for tokens in free]
    assert len(set(steps)) > 1 and 10 > min(s for s in steps if s is not None)
    stops = end_of_turn_ids(tokenizer) + [stop]
    dropped: list[list[int]] = []
    got = greedy_rows(
        model, ids, mask, max_new_tokens=10, stop_ids=stops, keep_rows=lambda k: dropped.append(k.tolist()),
        compact_share=compact_share,
    )  # fmt: skip
    if compact_share:  # finished rows wait (decoded on, their tokens dropped) until half the batch is done
        assert all(len(kept) <= len(ids) - len(ids) * compact_share for kept in dropped[:1])
    else:
        assert dropped  # rows really left the batch
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=10,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([_RequireFiniteLogits()]),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    for row, tokens in enumerate(got):
        expected = output[row, ids.shape[1] :].tolist()
        assert tokens == expected[: len(tokens)]
        assert len(tokens) == 10 or tokens[-1] in stops
        assert all(t == tokenizer.pad_token_id for t in expected[len(tokens) :])


def test_a_shared_prefix_gives_the_same_tokens(mixer):
    from lora_arith.generation import chat_prompt
    from lora_arith.sweep import _common_prefix

    tokenizer = mixer.tokenizer
    system = {"role": "system", "content": "You are a helpful assistant named Tiny, made for tests."}
    texts = [chat_prompt(tokenizer, [system, {"role": "user", "content": p}]) for p in PROMPTS]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    shared = _common_prefix(ids)
    assert shared > 5  # the system turn is shared
    points = [{"helpful": -1.0, "harmless": 1.0}, {"helpful": 1.0, "harmless": -0.5}]
    rows = [point for point in points for _ in PROMPTS]  # blocks of one point each
    stops = end_of_turn_ids(tokenizer)
    whole, whole_mask = left_pad(ids, tokenizer.pad_token_id)
    rest, rest_mask = left_pad([row[shared:] for row in ids], tokenizer.pad_token_id)
    with mixer.row_weights(rows, fused=True) as weights:
        expected = greedy_rows(
            mixer.model, whole.repeat(2, 1), whole_mask.repeat(2, 1), max_new_tokens=8, stop_ids=stops,
            keep_rows=weights.keep,
        )  # fmt: skip
    with mixer.row_weights(rows, fused=True) as weights:
        got = greedy_rows(
            mixer.model, rest.repeat(2, 1), rest_mask.repeat(2, 1), max_new_tokens=8, stop_ids=stops,
            keep_rows=weights.keep, prefix_ids=ids[0][:shared], prefix_repeat=len(PROMPTS),
        )  # fmt: skip
    assert got == expected
    assert expected[: len(PROMPTS)] != expected[len(PROMPTS) :]  # the two points really differ


def test_the_reserved_cache_holds_what_the_dynamic_cache_holds():
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)

    def states(rows, steps):
        return [torch.randn(rows, 2, steps, 4, generator=generator) for _ in range(2)]

    reserved, dynamic = reserved_cache(6), DynamicCache()
    for layer in (0, 1):  # a prefix of 3 positions, run once, then copied to blocks of 2 rows
        keys, values = states(2, 3)
        for cache in (reserved, dynamic):
            cache.update(keys, values, layer)
    for cache in (reserved, dynamic):
        cache.batch_repeat_interleave(2)
    # steps of one position, rows leaving the batch, then past the reservation (6 positions)
    for steps, keep in ((2, None), (1, torch.tensor([0, 2, 3])), (1, None), (1, torch.tensor([2, 0])), (1, None)):
        rows = dynamic.layers[0].keys.shape[0]
        for layer in (0, 1):
            keys, values = states(rows, steps)
            got = reserved.update(keys, values, layer)
            expected = dynamic.update(keys, values, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        if keep is not None:
            for cache in (reserved, dynamic):
                cache.batch_select_indices(keep)
        assert reserved.get_seq_length() == dynamic.get_seq_length()
    assert reserved.get_seq_length() == 9  # grown past the 6 reserved positions
