"""The CUDA path on a tiny random chat model: NF4 with bf16 compute, DPO with bf16 autocast,
runtime mixing, batched generation and merging on a GPU.

Skipped where no CUDA GPU is visible (as in CI). On a machine with one:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_base as load_cpu_reference
from helpers import logits
from safetensors.torch import load_file

from lora_arith.model.base import load_base
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith.model.mixing import PreferenceMixer
from lora_arith.training.train import TrainConfig, train_preference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16 = {"rtol": 2e-2, "atol": 2e-2}
"""Tolerance between two bf16 computations of the tiny model's logits (bf16 keeps 8 significant bits)."""


def test_bases_load_on_cuda_with_bf16_compute(chat_base):
    import bitsandbytes as bnb

    quantized, _ = load_base(str(chat_base), quantize_4bit=True, device="cuda")
    projection = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(projection, bnb.nn.Linear4bit) and projection.weight.device.type == "cuda"
    assert projection.compute_dtype == torch.bfloat16
    full, _ = load_base(str(chat_base), quantize_4bit=False, device="cuda")
    assert full.dtype == torch.bfloat16 and full.device.type == "cuda"


def test_dpo_on_cuda_4bit_uses_bf16_autocast_and_keeps_fp32_adapter(chat_base, pairs_file, tmp_path):
    out = train_preference(
        TrainConfig(
            data=[str(pairs_file)], base=str(chat_base), device="cuda",
            max_steps=3, batch_size=2, grad_accum=1, max_length=64, rank=4, alpha=8,
        ),
        tmp_path / "run",
    ).path  # fmt: skip
    info = json.loads((out / "training_metadata.json").read_text())
    assert info["training"]["bf16_autocast"] is True
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    losses = [entry["loss"] for entry in json.loads((out / "training_log.json").read_text())]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)  # the adapter starts at zero


def test_mixer_on_cuda_matches_combine(chat_base, two_adapters, tmp_path):
    from peft import PeftModel

    helpful, harmless = two_adapters
    mixer = PreferenceMixer(str(chat_base), {"helpful": helpful, "harmless": harmless}, device="cuda")
    for index, (w_helpful, w_harmless) in enumerate([(1.0, 1.0), (0.8, -0.5)]):
        mixer.set(helpful=w_helpful, harmless=w_harmless)
        mixed = combine(parse_specs([f"{helpful}:{w_helpful}", f"{harmless}:{w_harmless}"])).save(tmp_path / f"mix{index}")
        on_cuda = PeftModel.from_pretrained(load_base(str(chat_base), quantize_4bit=False, device="cuda")[0], mixed)
        torch.testing.assert_close(logits(mixer.model), logits(on_cuda.eval()), **BF16)


def test_fp32_mixer_on_cuda_matches_the_cpu_reference_and_merges(chat_base, two_adapters, tmp_path):
    from peft import PeftModel

    helpful, harmless = two_adapters
    tokenizer = load_base(str(chat_base), quantize_4bit=False, device="cpu")[1]
    fp32_on_cuda = load_cpu_reference(chat_base).to("cuda")  # load_base would round the weights to bf16
    mixer = PreferenceMixer(fp32_on_cuda, {"helpful": helpful, "harmless": harmless}, tokenizer=tokenizer)
    mixer.set(helpful=0.8, harmless=-0.5)
    mixed = combine(parse_specs([f"{helpful}:0.8", f"{harmless}:-0.5"])).save(tmp_path / "mix")
    expected = logits(PeftModel.from_pretrained(load_cpu_reference(chat_base), mixed).eval())
    torch.testing.assert_close(logits(mixer.model), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(mixer.merged_model()), expected, rtol=1e-4, atol=1e-4)


def test_batched_greedy_generation_on_cuda_4bit_is_repeatable(chat_base, two_adapters):
    mixer = PreferenceMixer(str(chat_base), {"helpful": two_adapters[0]}, quantize_4bit=True, device="cuda")
    prompts = ["hi", "How do I bake bread? Tell me step by step."]  # different lengths: left padding
    first = mixer.generate(prompts, max_new_tokens=6)
    assert len(first) == 2 and first == mixer.generate(prompts, max_new_tokens=6)
    mixer.set(helpful=0.0)
    assert mixer.generate(prompts, max_new_tokens=6) == PreferenceMixer(
        str(chat_base), {}, quantize_4bit=True, device="cuda"
    ).generate(prompts, max_new_tokens=6)
