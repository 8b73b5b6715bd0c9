"""Streaming merge: shard by shard, equal to PEFT's merge_and_unload and to the mixer, bad input refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import load_base, logits
from safetensors import safe_open

from lora_arith.cli import main
from lora_arith.lora.specs import parse_specs


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.fixture(scope="module")
def sharded_base(chat_base, tmp_path_factory):
    """The chat base saved again in several shards (with its tokenizer), in fp32."""
    folder = tmp_path_factory.mktemp("sharded")
    load_base(chat_base).save_pretrained(folder, max_shard_size="60KB")
    for path in chat_base.iterdir():
        if "token" in path.name or path.name.startswith("chat_template"):
            shutil.copy(path, folder / path.name)
    assert len(list(folder.glob("*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").is_file()
    return folder


def test_merge_equals_peft_merge_and_unload_and_the_mixer(chat_base, two_adapters, tmp_path):
    from peft import PeftModel

    from lora_arith.model.mixing import PreferenceMixer

    helpful, harmless = two_adapters
    result = run("merge", "--base", chat_base, "--adapter", f"{helpful}:0.7", "--adapter", f"{harmless}:-1.2",
                 "-o", tmp_path / "merged")  # fmt: skip
    assert result.exit_code == 0, result.output
    merged = logits(load_base(tmp_path / "merged"))

    mixer = PreferenceMixer(str(chat_base), {"helpful": helpful, "harmless": harmless}, device="cpu")
    mixer.set(helpful=0.7, harmless=-1.2)
    torch.testing.assert_close(merged, logits(mixer.model), rtol=0, atol=1e-5)

    peft_model = PeftModel.from_pretrained(load_base(chat_base), helpful, adapter_name="helpful")
    peft_model.load_adapter(harmless, adapter_name="harmless")
    peft_model.base_model.add_weighted_adapter(["helpful", "harmless"], [0.7, -1.2], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    torch.testing.assert_close(merged, logits(peft_model.merge_and_unload(adapter_names=["mix"])), rtol=0, atol=1e-5)

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] > 0


def test_sharded_base_merges_to_the_same_weights_as_its_single_file_copy(chat_base, sharded_base, two_adapters, tmp_path):
    helpful, harmless = two_adapters
    for name, base in (("single", chat_base), ("sharded", sharded_base)):
        result = run("merge", "--base", base, "--adapter", f"{helpful}:1", "--adapter", f"{harmless}:0.5", "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    single, sharded = read_tensors(tmp_path / "single"), read_tensors(tmp_path / "sharded")
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=0)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index == json.loads((sharded_base / "model.safetensors.index.json").read_text()) | {"metadata": index["metadata"]}
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors")) == sorted(
        p.name for p in sharded_base.glob("*.safetensors")
    )
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    base = read_tensors(chat_base)
    changed = [key for key in base if not torch.equal(base[key], single[key])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" not in changed


def test_merge_keeps_the_base_dtype_unless_told(chat_base, two_adapters, tmp_path):
    helpful, _ = two_adapters
    bf16 = tmp_path / "bf16-base"
    load_base(chat_base).to(torch.bfloat16).save_pretrained(bf16)
    assert run("merge", "--base", bf16, "--adapter", helpful, "-o", tmp_path / "kept").exit_code == 0
    assert {t.dtype for t in read_tensors(tmp_path / "kept").values()} == {torch.bfloat16}
    assert run("merge", "--base", bf16, "--adapter", helpful, "-o", tmp_path / "fp16", "--dtype", "fp16").exit_code == 0
    assert {t.dtype for t in read_tensors(tmp_path / "fp16").values()} == {torch.float16}
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert load_base(tmp_path / "fp16").model.embed_tokens.weight.dtype == torch.float32  # loads fine


def test_base_without_tokenizer_still_merges(tiny_llama, adapter_factory, tmp_path):
    adapter = adapter_factory()
    result = run("merge", "--base", tiny_llama, "--adapter", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(
        p.name for p in tiny_llama.iterdir() if p.name in ("config.json", "generation_config.json", "model.safetensors")
    )
    load_base(tmp_path / "merged")


def assert_refused(result, output, *words):
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith("Error: ") and "\n" not in line and "Traceback" not in line, line
    assert all(word in line for word in words), line
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), "temporary output left behind"


def test_missing_shard_is_refused_without_partial_output(sharded_base, two_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_base, broken)
    missing = sorted(broken.glob("*.safetensors"))[1]
    missing.unlink()
    result = run("merge", "--base", broken, "--adapter", two_adapters[0], "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", f"shard {missing.name} listed in model.safetensors.index.json is missing")


def _set_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header with ``edit(header)``, keeping its data."""
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + length]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda h: {**h, _first_tensor(h): {k: v for k, v in h[_first_tensor(h)].items() if k != "data_offsets"}},
         "header entry of"),
        (lambda h: {**h, _first_tensor(h): 5}, "header entry of"),
        (lambda h: [1, 2], "header is not a JSON object"),
        ("truncate", "malformed or the file is cut short"),
        ({"weight_map": [1, 2]}, "has no weight_map"),
        ({"weight_map": {"model.norm.weight": 5}}, "has no weight_map"),
        ("config", "config.json is not valid JSON"),
        ("config, no dtype", "config.json is not valid JSON"),  # copied as it was, and the merge said it wrote a model
        ("config list", "config.json is not a JSON object"),
    ],
)  # fmt: skip
def test_a_damaged_base_is_refused_in_one_line_without_partial_output(sharded_base, two_adapters, tmp_path, damage, words):
    """Headers and indexes of the wrong shape, a cut-short shard or a broken config were KeyErrors,
    TypeErrors, AttributeErrors or mmap errors (tracebacks)."""
    broken = tmp_path / "broken"
    shutil.copytree(sharded_base, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage in ("config", "config, no dtype"):
        (broken / "config.json").write_text("{not json")
    elif damage == "config list":
        (broken / "config.json").write_text("[1]")
    elif isinstance(damage, dict):
        (broken / "model.safetensors.index.json").write_text(json.dumps(damage))
    else:
        _set_header(shard, damage)
    options = ["--dtype", "bf16"] if damage == "config" else []
    result = run("merge", "--base", broken, "--adapter", two_adapters[0], *options, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", words)


def test_adapter_module_matching_no_weight_is_refused(chat_base, two_adapters, tmp_path):
    from tiny_models import make_tiny_chat_model

    one_layer = make_tiny_chat_model(tmp_path / "one-layer", num_layers=1)
    result = run("merge", "--base", one_layer, "--adapter", two_adapters[0], "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "model.layers.1.", "matches no weight")
    narrow = make_tiny_chat_model(tmp_path / "narrow", hidden_size=32)
    result = run("merge", "--base", narrow, "--adapter", two_adapters[0], "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "delta but the base weight is")


@pytest.mark.parametrize(
    "case, words",
    [
        ("alpha-nan", ["lora_alpha", "not a finite number"]),  # refused when the adapter is opened
        ("weight-1e39", ["model.layers.", "values in fp32 after adding", "1e+39"]),
        ("fp16-overflow", ["model.layers.", "overflows fp16", "--dtype fp32 or bf16"]),
    ],
)
def test_non_finite_merge_is_refused(chat_base, two_adapters, tmp_path, case, words):
    helpful = two_adapters[0]
    spec, extra = f"{helpful}:1", []
    if case == "alpha-nan":
        copy = tmp_path / "nan-alpha"
        shutil.copytree(helpful, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": float("nan")}))
        spec = str(copy)
    elif case == "weight-1e39":
        spec = f"{helpful}:1e39"
    else:
        spec, extra = f"{helpful}:1e5", ["--dtype", "fp16"]
    result = run("merge", "--base", chat_base, "--adapter", spec, "-o", tmp_path / "out", *extra)
    assert_refused(result, tmp_path / "out", *words)


def test_merge_refuses_4bit_without_requantize(chat_base, two_adapters, tmp_path):
    result = run("merge", "--base", chat_base, "--adapter", two_adapters[0], "-o", tmp_path / "m4", "--4bit")
    assert_refused(result, tmp_path / "m4", "--requantize", "rounded away")
    result = run("merge", "--base", chat_base, "--adapter", two_adapters[0], "-o", tmp_path / "m4", "--4bit", "--requantize")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    assert sorted(p.name for p in (tmp_path / "m4").iterdir() if p.name.startswith(".")) == []


@pytest.mark.base
def test_default_gguf_base_merges_through_its_dequantised_cache(tmp_path):
    """The embedded default base (GGUF, dequantised once into the cache) merges with a shipped vector in bf16."""
    from pathlib import Path

    from lora_arith.model.base import default_base_dir
    from lora_arith.model.mixing import PreferenceMixer

    vector = Path(__file__).resolve().parents[1] / "adapters" / "helpful"
    result = run("merge", "--adapter", f"{vector}:0.5", "-o", tmp_path / "merged", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    merged = read_tensors(tmp_path / "merged")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    cached = read_tensors(default_base_dir())
    mixer = PreferenceMixer(None, {"helpful": str(vector)}, device="cpu")
    mixer.set(helpful=0.5)
    expected = mixer.merged_model().state_dict()
    key = "model.layers.3.self_attn.q_proj.weight"
    assert not torch.equal(merged[key].float(), cached[key].to(torch.bfloat16).float())
    torch.testing.assert_close(merged[key].float(), expected[key].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_blockwise_merge_equals_the_whole_tensor_merge(chat_base, two_adapters, tmp_path, monkeypatch):
    """Big weights are merged a block of rows at a time; one-row blocks give the same weights as one block
    (up to the matmul's round-off, which depends on the block shape)."""
    import lora_arith.model.merge as merge

    helpful, harmless = two_adapters
    specs = parse_specs([f"{helpful}:0.7", f"{harmless}:-1.2"])
    merge.merge_adapters(str(chat_base), specs, tmp_path / "whole")
    monkeypatch.setattr(merge, "_BLOCK_ELEMENTS", 100)  # a 64-wide row: one row per block
    merge.merge_adapters(str(chat_base), specs, tmp_path / "blocks")
    whole, blocks = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    for key in whole:
        torch.testing.assert_close(blocks[key], whole[key], rtol=0, atol=1e-6)


def test_fan_in_fan_out_gpt2_merge_equals_peft(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D weights are stored transposed (fan_in_fan_out): the delta is added as (B A)ᵀ."""
    from peft import PeftModel

    from helpers import make_adapter

    adapter = make_adapter(tiny_gpt2, tmp_path / "gpt2-lora", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    result = run("merge", "--base", tiny_gpt2, "--adapter", f"{adapter}:-0.8", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    peft_model = PeftModel.from_pretrained(load_base(tiny_gpt2), adapter)
    for layer in peft_model.base_model.model.modules():
        if hasattr(layer, "set_scale") and "default" in getattr(layer, "scaling", {}):
            layer.set_scale("default", -0.8)
    expected = logits(peft_model.merge_and_unload())
    torch.testing.assert_close(logits(load_base(tmp_path / "merged")), expected, rtol=0, atol=1e-5)


def test_merge_shows_its_progress_over_the_base_bytes(sharded_base, two_adapters, tmp_path, capsys, monkeypatch):
    """A long merge said nothing until it ended; with progress, a bar counts the base's bytes to
    the end, across the shards, and the files are the same as without it."""
    import tqdm

    from lora_arith.lora.specs import AdapterSpec
    from lora_arith.model.merge import merge_adapters

    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    specs = [AdapterSpec(two_adapters[0], 1.0)]
    merge_adapters(str(sharded_base), specs, tmp_path / "quiet")
    assert bars == [] and "merging" not in capsys.readouterr().err
    merge_adapters(str(sharded_base), specs, tmp_path / "shown", progress=True)
    assert "merging" in capsys.readouterr().err
    ((desc, done, total),) = set(bars)  # one bar (tqdm closes it once more when collected)
    data = sum(p.stat().st_size for p in sharded_base.glob("*.safetensors"))
    assert desc == "merging" and done == total and 0.9 * data < total < data  # the tensors' bytes, not the headers
    for shard in (tmp_path / "quiet").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "shown" / shard.name).read_bytes()
