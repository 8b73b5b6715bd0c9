"""Per-row mixing: every row of one batch with its own weights η equals that row alone with
the adapter ``combine`` writes for its weights (same greedy text, logits within 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lora_arith.cli import main
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith._internal.errors import LoraArithError
from lora_arith.model.mixing import PreferenceMixer

PROMPTS = [
    "How do I bake bread?",
    "hi",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke about cats."}],
    "What is the capital of France? Answer in one word.",
]
MIXES = [{"helpful": 1.0, "harmless": 1.0}, {"helpful": 0.8, "harmless": -0.5}, {"helpful": -1.0}, None]
DEFAULTS = {"helpful": 0.3, "harmless": 1.5}  # the mixer's own weights: rows leave names out or give None


@pytest.fixture(scope="module")
def vectors(chat_base, tmp_path_factory):
    """Like conftest's ``two_adapters`` (different ranks, scalings, rsLoRA, target modules) but
    with fixed seeds, so the logits compared below do not depend on which tests ran before."""
    from helpers import make_adapter

    folder = tmp_path_factory.mktemp("row-vectors")
    helpful = make_adapter(chat_base, folder / "helpful", seed=10, r=4, lora_alpha=8)
    harmless = make_adapter(
        chat_base,
        folder / "harmless",
        seed=11,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    return helpful, harmless


def full_mix(row):
    return {**DEFAULTS, **(row or {})}


def combined_adapter(two_adapters, mix, folder):
    helpful, harmless = two_adapters
    name = "_".join(f"{v:g}" for v in mix.values())
    return combine(parse_specs([f"{helpful}:{mix['helpful']}", f"{harmless}:{mix['harmless']}"])).save(folder / f"mix{name}")


def padded_batch(tokenizer, prompts):
    from lora_arith.model.generation import chat_prompt

    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = encoded["attention_mask"]
    return encoded["input_ids"], mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def row_logits(model, ids, mask, positions):
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


@pytest.fixture
def fp32_nf4_matmul(monkeypatch):
    """Make bitsandbytes' 4-bit layers multiply in fp32 with their dequantized NF4 weights.

    On CPU, bitsandbytes' 4-bit kernel casts activations to bf16, so any two different
    fp32 computations (even ``mixer.set`` against ``combine``) drift apart by ~1e-4 after a
    few layers. Logits are compared with this fp32 matmul of the same NF4 weights; greedy
    texts are compared with the real kernel."""
    import bitsandbytes
    import bitsandbytes.functional

    def forward(self, x):
        weight = bitsandbytes.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
        return torch.nn.functional.linear(x, weight.to(x.dtype), self.bias)

    def patch():
        monkeypatch.setattr(bitsandbytes.nn.Linear4bit, "forward", forward)

    return patch


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["fp32", "4bit"])
def test_each_row_equals_its_combined_adapter_alone(chat_base, vectors, tmp_path, quantize_4bit, fp32_nf4_matmul):
    two_adapters = vectors
    mixer = PreferenceMixer(
        str(chat_base), {"helpful": two_adapters[0], "harmless": two_adapters[1]}, quantize_4bit=quantize_4bit
    )
    mixer.set(**DEFAULTS)
    batched = mixer.generate(PROMPTS, weights=MIXES, max_new_tokens=8, batch_size=4)
    alones = [
        PreferenceMixer(
            str(chat_base),
            {"mix": combined_adapter(two_adapters, full_mix(weights), tmp_path)},
            quantize_4bit=quantize_4bit,
        )
        for weights in MIXES
    ]
    for row, (prompt, alone) in enumerate(zip(PROMPTS, alones)):
        assert batched[row] == alone.generate([prompt], max_new_tokens=8)[0]
    if quantize_4bit:
        fp32_nf4_matmul()
    ids, mask, positions = padded_batch(mixer.tokenizer, PROMPTS)
    with mixer.row_weights(MIXES):
        batch_logits = row_logits(mixer.model, ids, mask, positions)
    differs = 0
    for row, (prompt, alone) in enumerate(zip(PROMPTS, alones)):
        single_ids, single_mask, single_positions = padded_batch(alone.tokenizer, [prompt])
        expected = row_logits(alone.model, single_ids, single_mask, single_positions)[0]
        real = mask[row].bool()
        torch.testing.assert_close(batch_logits[row, real], expected, rtol=0, atol=1e-5)
        plain = row_logits(mixer.model, single_ids, single_mask, single_positions)[0]  # the defaults, not this row's
        differs += not torch.allclose(plain, expected, rtol=0, atol=1e-3)
    assert differs == 3  # three rows really mix differently from the defaults; the None row does not
    # the context put the mixer's own weights back
    assert mixer.generate(PROMPTS, max_new_tokens=8, batch_size=4) == mixer.generate(
        PROMPTS, weights=[None] * 4, max_new_tokens=8, batch_size=4
    )


def test_row_weights_are_checked(chat_base, two_adapters):
    mixer = PreferenceMixer(str(chat_base), {"helpful": two_adapters[0]})
    with pytest.raises(LoraArithError, match="no adapter named nope"):
        mixer.generate(["hi"], weights=[{"nope": 1.0}], max_new_tokens=2)
    for bad in (float("nan"), float("inf"), "1", True, None):
        with pytest.raises(LoraArithError, match="finite number"):
            mixer.generate(["hi"], weights=[{"helpful": bad}], max_new_tokens=2)
    with pytest.raises(LoraArithError, match="2 weight rows for 1 prompts"):
        mixer.generate(["hi"], weights=[None, None], max_new_tokens=2)


def test_generate_command_reads_weights_per_line(chat_base, two_adapters, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "hi", "weights": {"helpful": -1.0, "harmless": 2.0}},
        {"prompt": "How do I bake bread?"},
        {"prompt": "hi", "weights": {"helpful": 0.5}},
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--base", chat_base, "--max-new-tokens", 6]
    specs = ["--adapter", f"helpful={two_adapters[0]}:0.25", "--adapter", f"{two_adapters[1]}:0.75"]
    result = CliRunner().invoke(main, [str(a) for a in args + specs + ["--prompts", prompts, "--out", out]])
    assert result.exit_code == 0, result.output
    completions = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    mixer = PreferenceMixer(str(chat_base), {"helpful": two_adapters[0], "harmless": two_adapters[1]})
    for row, completion in zip(rows, completions):
        mixer.set(helpful=0.25, harmless=0.75)
        mixer.set(**row.get("weights", {}))
        assert completion == mixer.generate([row["prompt"]], max_new_tokens=6)[0]
    assert completions[0] != completions[2]
    prompts.write_text('{"prompt": "hi", "weights": {"nope": 1}}\n')
    result = CliRunner().invoke(main, [str(a) for a in args + specs + ["--prompts", prompts]])
    assert result.exit_code == 1 and "Error: " in result.output and "nope" in result.output
    prompts.write_text('{"prompt": "hi", "weights": [1, 2]}\n')
    result = CliRunner().invoke(main, [str(a) for a in args + specs + ["--prompts", prompts]])
    assert result.exit_code == 1 and "weights" in result.output


def test_named_specs(tmp_path, monkeypatch):
    from lora_arith.lora.specs import named_specs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd=name.safetensors").write_text("")
    named = named_specs(["a/helpful.safetensors:0.5", "helpful=b/x:-1", "odd=name.safetensors", "c/helpful/"])
    assert {n: (s.path, s.weight) for n, s in named.items()} == {
        "helpful-2": ("a/helpful.safetensors", 0.5),
        "helpful": ("b/x", -1.0),
        "odd_name": ("odd=name.safetensors", 1.0),  # a stem is made a valid PEFT adapter name
        "helpful-3": ("c/helpful/", 1.0),
    }
    assert list(named) == ["helpful-2", "helpful", "odd_name", "helpful-3"]
    with pytest.raises(LoraArithError, match="two adapters are named 'x'"):
        named_specs(["x=a", "x=b"])


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_fused_rows_on_each_device_equal_each_row_set_alone(chat_base, vectors, device):
    """The fused path (every adapter of a layer in one GEMM pair, each rank scaled per row) on an
    fp32 base on ``device``: each row's logits are those of the mixer set to that row's weights
    and run alone. The CUDA case is the GPU check of per-row mixing (skipped without a GPU)."""
    from helpers import load_base

    mixer = PreferenceMixer(
        load_base(chat_base).to(device),  # fp32 on the GPU too (load_base there gives bf16)
        {"helpful": vectors[0], "harmless": vectors[1]},
        tokenizer=PreferenceMixer(str(chat_base), {}, device="cpu").tokenizer,
    )
    mixer.set(**DEFAULTS)
    ids, mask, positions = (t.to(device) for t in padded_batch(mixer.tokenizer, PROMPTS))
    with mixer.row_weights(MIXES, fused=True):
        batch_logits = row_logits(mixer.model, ids, mask, positions)
    for row, weights in enumerate(MIXES):
        mixer.set(**full_mix(weights))
        alone = row_logits(mixer.model, ids[row : row + 1], mask[row : row + 1], positions[row : row + 1])[0]
        real = mask[row].bool()
        torch.testing.assert_close(batch_logits[row, real], alone[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch_logits[0, -1], batch_logits[1, -1], atol=1e-3)  # the rows do mix differently
