"""Model cards, push --dry-run and vLLM export (merge: test_merge.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_base, logits, make_adapter

from lora_arith.adapter_io import open_adapter
from lora_arith.cli import main
from lora_arith.combine import combine
from lora_arith.export import VLLM_RANKS, choose_rank
from lora_arith.factors import to_dense


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_push_dry_run_lists_files_and_card(adapter_factory, tmp_path):
    a, b = adapter_factory(), adapter_factory()
    mix = combine([f"{a}:0.8", f"{b}:-0.5"]).save(tmp_path / "mix.safetensors")
    result = run("push", mix, "me/mix", "--dry-run", "--private")
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json  (generated)", "README.md  (generated)"):
        assert name in result.output
    recipe = open_adapter(mix).recipe
    card = result.output.split("--- README.md ---", 1)[1]
    assert "license: apache-2.0" in card
    assert "- peft" in card and "- lora" in card and "- preference-vector" in card
    assert f"base_model: {recipe['inputs'][0]['base_model']}" in card
    assert all(item["sha256"] in card for item in recipe["inputs"]) and "| -0.5 |" in card


def test_model_card_includes_training_data_and_metrics():
    from lora_arith.model_card import model_card

    training = {
        "data": [{"spec": "pairs.jsonl", "file": "/data/pairs.jsonl", "pairs": 10, "sha256": "ab" * 32}],
        "swap": False,
        "hyperparameters": {"beta": 0.1, "lr": 5e-4},
        "final_metrics": {"rewards/accuracies": 0.9},
    }
    card = model_card({"base_model_name_or_path": "org/base", "r": 8}, None, training, license="mit")
    assert "license: mit" in card and "pairs.jsonl`, 10 pairs" in card and "ab" * 32 in card
    assert "beta: 0.1" in card and "rewards/accuracies: 0.9" in card
    vector = model_card({"r": 16}, None, {"positive": training, "negative": {**training, "swap": True}})
    assert "### positive" in vector and "### negative" in vector and "swapped: True" in vector


@pytest.mark.parametrize(
    "needed, cap, expected", [(3, None, 8), (8, None, 8), (9, None, 16), (300, None, 320), (40, 32, 32)]
)
def test_choose_rank(needed, cap, expected):
    assert choose_rank(needed, cap) == expected and expected in VLLM_RANKS


def test_vllm_export_pads_exactly(adapter_factory, tmp_path):
    a, b = (
        adapter_factory(r=4, lora_alpha=8),
        adapter_factory(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj"]),
    )
    mix = combine([f"{a}:1", f"{b}:-1"]).save(tmp_path / "mix")  # ranks 6 and 4 → padded to 8
    result = run("export", mix, "-o", tmp_path / "vllm", "--for", "vllm")
    assert result.exit_code == 0, result.output and "padded" in result.output
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8
    assert "rank_pattern" not in config and "alpha_pattern" not in config
    assert set(config) <= {
        "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "bias",
        "lora_dropout", "use_rslora", "use_dora", "modules_to_save", "fan_in_fan_out",
    }  # fmt: skip
    original, exported = open_adapter(mix), open_adapter(tmp_path / "vllm")
    assert {info.rank for info in exported.modules.values()} == {8}
    for name in original.modules:
        assert torch.equal(to_dense(exported.delta(name)), to_dense(original.delta(name)))


def test_vllm_export_compresses_above_cap(adapter_factory, tmp_path):
    wide = combine([str(adapter_factory(r=6)), str(adapter_factory(r=6))]).save(tmp_path / "wide")  # rank 12
    result = run("export", wide, "-o", tmp_path / "vllm", "--max-rank", "8")
    assert result.exit_code == 0, result.output
    assert "compressed; max relative error" in result.output
    assert {info.rank for info in open_adapter(tmp_path / "vllm").modules.values()} == {8}


def test_vllm_export_refuses_embedding_lora(adapter_factory, tmp_path):
    adapter = adapter_factory(target_modules=["embed_tokens", "q_proj"])
    result = run("export", adapter, "-o", tmp_path / "vllm")
    assert result.exit_code == 1 and "embedding" in result.output
