"""The engine's decoding step without transformers' machinery (``lora_arith.model.decode``) and the
direct base kernels of fused LoRA layers: the same logits as the model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_arith.model.decode import FastDecoder
from lora_arith.model.mixing import PreferenceMixer

pytestmark = pytest.mark.usefixtures("one_thread")

ETAS = torch.tensor([[1.0, 1.0], [0.5, -1.0], [-1.0, 0.2]], dtype=torch.float64)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
KINDS = [
    pytest.param("fp32", id="fp32"),
    pytest.param("int8", id="int8"),
    pytest.param("4bit", id="nf4"),
    pytest.param("cuda", id="cuda-bf16", marks=CUDA),
    pytest.param("cuda-4bit", id="cuda-4bit", marks=CUDA),
]


def _mixer(chat_base, two_adapters, kind: str = "fp32") -> PreferenceMixer:
    helpful, harmless = two_adapters
    device = "cuda" if kind.startswith("cuda") else "cpu"
    mixer = PreferenceMixer(
        str(chat_base), {"helpful": helpful, "harmless": harmless}, device=device, quantize_4bit=kind.endswith("4bit")
    )
    if kind == "int8":
        mixer.quantize_int8()
    return mixer


def _prefill(model):
    """Three left-padded rows of different lengths, their cache, mask, next tokens and positions."""
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(3, 60, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(), use_cache=True)
    return output.cache, mask, output.logits[:, -1].argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)


def _steps(model, step, count: int = 4):
    """``count`` greedy decoding steps from the same prefill; the logits of each."""
    cache, mask, tokens, positions = _prefill(model)
    cache = copy.deepcopy(cache)
    logits = []
    for _ in range(count):
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=-1)
        out = step(tokens, positions, mask, cache)
        logits.append(out)
        tokens, positions = out.argmax(-1, keepdim=True), positions + 1
    return logits


def _model_step(model):
    def step(tokens, positions, mask, cache):
        output = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return output.logits[:, -1, :]

    return step


def _fast_step(decoder):
    return lambda tokens, positions, mask, cache: decoder(tokens, positions, mask, cache.layers)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_steps_give_the_models_logits_for_padded_rows_with_their_own_mixes(chat_base, two_adapters, kind):
    mixer = _mixer(chat_base, two_adapters, kind)
    decoder = FastDecoder.for_model(mixer.model)  # before per-row weights: it checks one row
    assert decoder is not None
    handle = mixer.row_handle(fused=True)
    try:
        handle.assign(ETAS)
        with torch.no_grad():
            expected = _steps(mixer.model, _model_step(mixer.model))
            got = _steps(mixer.model, _fast_step(decoder))
    finally:
        handle.restore()
    for want, have in zip(expected, got):  # on the CPU bit for bit (the same modules and arithmetic)
        torch.testing.assert_close(have, want, rtol=0, atol=0 if kind in ("fp32", "int8", "4bit") else 1e-2)
    assert not torch.equal(got[0][0], got[0][1])  # the rows' mixes differ


def test_a_model_the_step_does_not_know_takes_its_own_forward(chat_base, two_adapters, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    assert FastDecoder.for_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2)) is None  # another architecture
    eager = AutoModelForCausalLM.from_pretrained(chat_base, attn_implementation="eager")
    assert FastDecoder.for_model(eager) is None  # another attention function
    assert FastDecoder.for_model(AutoModelForCausalLM.from_pretrained(chat_base)) is not None
    eager.config._attn_implementation = "sdpa"
    eager.__class__ = type("RemoteLlama", (type(eager),), {})  # remote code naming itself llama
    assert FastDecoder.for_model(eager) is None
    mixer = _mixer(chat_base, two_adapters)
    assert FastDecoder.for_model(mixer.model) is not None
    mixer.model.train()
    assert FastDecoder.for_model(mixer.model) is None  # dropout would differ
    mixer.model.eval()
    hook = mixer.model.get_base_model().model.norm.register_forward_hook(lambda *args: None)
    assert FastDecoder.for_model(mixer.model) is None  # a hook (device maps, offloading) must run
    hook.remove()


def test_a_fused_layer_calls_its_base_directly_unless_the_base_has_a_hook(chat_base, two_adapters, monkeypatch):
    """The fused forward skips the base layer's ``__call__`` and ``forward`` (the same product),
    but not when the base has a hook, which must run."""
    mixer = _mixer(chat_base, two_adapters)
    layer = mixer.model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 2, layer.base_layer.in_features)
    forwards, hooks = [], []
    original = type(layer.base_layer).forward
    monkeypatch.setattr(type(layer.base_layer), "forward", lambda self, x: forwards.append(1) or original(self, x))
    hook = layer.base_layer.register_forward_hook(lambda *args: hooks.append(1))
    with torch.no_grad(), mixer.row_weights([None] * 3, fused=True):
        hooked = layer(x)
    assert hooks == [1] and forwards == [1]  # through the module: its hook ran
    hook.remove()
    with torch.no_grad(), mixer.row_weights([None] * 3, fused=True):
        direct = layer(x)
    assert forwards == [1]  # no hook: the product itself, not the module's forward
    torch.testing.assert_close(direct, hooked, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_engine_decodes_with_the_plain_loop(chat_base, two_adapters, monkeypatch, kind):
    """The engine's steps go through :class:`FastDecoder` (its texts are checked against
    ``generate`` in ``test_engine.py``), not the model's forward."""
    from lora_arith.serving.engine import Engine
    from lora_arith.serving.protocol import RowRequest

    steps = []
    original = FastDecoder.__call__
    monkeypatch.setattr(FastDecoder, "__call__", lambda self, *args: steps.append(len(args[0])) or original(self, *args))
    engine = Engine(_mixer(chat_base, two_adapters, kind), max_batch_size=2).start()
    try:
        ids = engine.encode([{"role": "user", "content": "hi"}])
        rows = [RowRequest(list(ids), {"helpful": 1.0}, max_tokens=5), RowRequest(list(ids), max_tokens=3)]
        results = engine.generate(rows, timeout=60)
    finally:
        engine.close(timeout=10)
    assert all(result.completion_tokens >= 1 for result in results)
    # every step (both rows at once), after the loop's one-row check against the model's forward
    assert steps[0] == 1 and max(steps) == 2 and len(steps) == engine.steps + 1


def test_a_loop_that_does_not_give_the_models_logits_is_not_used(chat_base, two_adapters, monkeypatch, caplog):
    """The loop copies transformers' Llama forward; a transformers whose forward computes
    something else (here: the loop's norm changed) makes it fall back, saying so."""
    mixer = _mixer(chat_base, two_adapters)
    assert FastDecoder.for_model(mixer.model) is not None
    monkeypatch.setattr(FastDecoder, "_norm", staticmethod(lambda module, hidden: module(hidden) * 1.001))
    assert FastDecoder.for_model(mixer.model) is None
    assert "differ from this model's forward" in caplog.text
    monkeypatch.setattr(FastDecoder, "_norm", staticmethod(lambda module, hidden: module.no_such_attribute))
    assert FastDecoder.for_model(mixer.model) is None
    assert "does not fit this model" in caplog.text
