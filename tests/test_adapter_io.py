"""Reading adapters in every form, with every scaling variant, checked against PEFT itself."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import LLAMA_TARGETS, make_adapter, peft_deltas
from safetensors.torch import load_file, save_file

from lora_arith.lora.adapter_io import CONFIG_METADATA_KEY, open_adapter, save_adapter
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import parse_specs
from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.factors import to_dense


def assert_matches_peft(base, adapter_dir, transpose_linear: bool = False):
    """Every module's delta read by lora_arith equals PEFT's get_delta_weight."""
    opened = open_adapter(adapter_dir)
    expected = peft_deltas(base, adapter_dir)
    assert set(opened.modules) == set(expected)
    for name, info in opened.modules.items():
        dense = to_dense(opened.delta(name))
        if info.kind == "embedding" or transpose_linear:
            dense = dense.T  # PEFT returns these in the base weight's orientation
        torch.testing.assert_close(dense, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8),
        dict(r=3, lora_alpha=5, use_rslora=True),
        dict(
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 12},
        ),
        dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "lm_head"]),
    ],
    ids=["plain", "rslora", "patterns", "embedding"],
)
def test_scaling_matches_peft(tiny_llama, tmp_path, kwargs):
    adapter = make_adapter(tiny_llama, tmp_path / "a", **kwargs)
    assert_matches_peft(tiny_llama, adapter)


def test_fan_in_fan_out_matches_peft(tiny_gpt2, tmp_path):
    adapter = make_adapter(tiny_gpt2, tmp_path / "g", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert_matches_peft(tiny_gpt2, adapter, transpose_linear=True)


def test_three_input_forms_read_the_same(adapter_factory, tmp_path):
    directory = adapter_factory("dir")
    by_file = open_adapter(directory / "adapter_model.safetensors")
    single = combine(parse_specs([str(directory)])).save(tmp_path / "single.safetensors")
    for opened in (open_adapter(directory), by_file, open_adapter(single)):
        assert set(opened.modules) == set(by_file.modules)
        name = sorted(opened.modules)[0]
        torch.testing.assert_close(to_dense(opened.delta(name)), to_dense(by_file.delta(name)))
    assert not (tmp_path / "adapter_config.json").exists()  # the single file carries its own config
    assert CONFIG_METADATA_KEY in open_adapter(single).metadata


def test_missing_config_is_a_clear_error(adapter_factory, tmp_path):
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(adapter_factory() / "adapter_model.safetensors", lone)
    with pytest.raises(LoraArithError, match="no LoRA config"):
        open_adapter(lone)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_non_linear_deltas_are_refused(tiny_llama, tmp_path, kwargs, message):
    adapter = make_adapter(tiny_llama, tmp_path / "x", target_modules=["q_proj"], **kwargs)
    with pytest.raises(LoraArithError, match=message):
        open_adapter(adapter)


def test_dora_tensors_are_refused_even_without_the_config_flag(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "x", target_modules=["q_proj"], use_dora=True)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoraArithError, match="DoRA magnitude"):
        open_adapter(adapter)


def test_config_rank_mismatch_is_refused(adapter_factory):
    adapter = adapter_factory()
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 7
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoraArithError, match="config does not match tensors"):
        open_adapter(adapter)


def test_save_single_file_and_directory_round_trip(adapter_factory, tmp_path):
    combination = combine(parse_specs([f"{adapter_factory()}:0.5"]))
    directory = combination.save(tmp_path / "out")
    assert {p.name for p in directory.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and config["rank_pattern"] == {}
    single = combination.save(tmp_path / "out.safetensors")
    assert load_file(single).keys() == load_file(directory / "adapter_model.safetensors").keys()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary leftovers
    mask = os.umask(0)
    os.umask(mask)
    assert single.stat().st_mode & 0o777 == 0o666 & ~mask  # ordinary permissions, not mkstemp's 0600
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask


def test_save_refuses_existing_output_without_force(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_text("keep me")
    tensors = {
        "base_model.model.m.lora_A.weight": torch.ones(1, 2),
        "base_model.model.m.lora_B.weight": torch.ones(2, 1),
    }
    with pytest.raises(LoraArithError, match="exists; pass force") as raised:
        save_adapter(target, tensors, {"r": 1, "lora_alpha": 1})
    assert raised.value.options == ("force",)  # the CLI names it --force
    assert target.read_text() == "keep me"
    save_adapter(target, tensors, {"r": 1, "lora_alpha": 1}, force=True)
    assert open_adapter(target).modules["m"].shape == (2, 2)


def test_unsupported_dtype_file_is_readable_in_fp16(adapter_factory, tmp_path):
    adapter = adapter_factory()
    tensors = {k: v.half() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert open_adapter(adapter).dtype == torch.float16
    assert set(LLAMA_TARGETS) <= {n.rsplit(".", 1)[-1] for n in open_adapter(adapter).modules}


@pytest.mark.parametrize(
    "values, finite",
    [([1.0, 2.0], True), ([3e38, 3e38], True), ([-3e38, -3e38, 1.0], True), ([1.0, float("nan")], False),
     ([float("inf"), 1.0], False), ([float("inf"), float("-inf")], False)],
)
def test_all_finite_is_exact_even_when_the_sum_overflows(values, finite):
    """The fast finiteness check (one fp32 sum) falls back to element-wise when the sum is not finite."""
    from lora_arith.lora.numerics import all_finite

    assert all_finite(torch.tensor(values, dtype=torch.float32)) is finite


def test_delta_is_the_same_on_every_read(adapter_factory):
    """delta() scales a fresh copy in place: the file's (memory-mapped) fp32 tensors stay untouched."""
    adapter = open_adapter(adapter_factory(r=4, lora_alpha=8))  # scaling 2, factors stored in fp32
    module = next(iter(adapter.modules))
    first, second = adapter.delta(module), adapter.delta(module)
    assert torch.equal(first.B, second.B) and torch.equal(first.A, second.A)
    assert torch.equal(open_adapter(adapter.weights_path.parent).delta(module).B, first.B)
