"""Combined adapters, loaded back with PEFT, give the logits of densely patched weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import dense_patched_model, load_base, logits, peft_deltas

from lora_arith.lora.adapter_io import open_adapter
from lora_arith.lora.analysis import similarity
from lora_arith.lora.combine import combine
from lora_arith.lora.specs import AdapterSpec, parse_spec, parse_specs
from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.factors import to_dense


def peft_logits(base, adapter):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load_base(base), adapter).eval())


@pytest.fixture
def varied_adapters(adapter_factory):
    """Adapters with different r, alpha, rsLoRA, rank patterns and disjoint module sets."""
    return [
        adapter_factory("a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        adapter_factory("b", r=2, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "o_proj", "gate_proj"]),
        adapter_factory(
            "c", r=3, lora_alpha=3, rank_pattern={"up_proj": 5}, target_modules=["up_proj", "k_proj", "embed_tokens"]
        ),
    ]


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_round_trip_through_peft_equals_dense_patch(tiny_llama, tmp_path, varied_adapters, method):
    weights = [0.8, -1.3, 0.5]
    rank = 9 if method == "svd" else None  # ≥ every module's summed rank: exact
    specs = [AdapterSpec(str(p), w) for p, w in zip(varied_adapters, weights)]
    result = combine(specs, method=method, rank=rank)
    out = result.save(tmp_path / f"mix-{method}")
    assert result.partial_modules  # the module sets are disjoint in part
    expected = logits(dense_patched_model(tiny_llama, list(zip(varied_adapters, weights))))
    torch.testing.assert_close(peft_logits(tiny_llama, out), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, logits(load_base(tiny_llama)), atol=1e-3)  # the mix does change the model


def test_single_file_output_loads_like_directory(tiny_llama, tmp_path, adapter_factory):
    a, b = adapter_factory(), adapter_factory(r=6, lora_alpha=2)
    single = combine(parse_specs([f"{a}:1", f"{b}:-0.5"])).save(tmp_path / "mix.safetensors")
    via_dir = combine(parse_specs([str(single)])).save(tmp_path / "mix-dir")
    expected = logits(dense_patched_model(tiny_llama, [(a, 1.0), (b, -0.5)]))
    torch.testing.assert_close(peft_logits(tiny_llama, via_dir), expected, rtol=1e-4, atol=1e-4)


def test_output_config_and_recipe(tmp_path, varied_adapters, tiny_llama):
    out = combine(parse_specs([str(p) for p in varied_adapters]), method="svd", rank=2).save(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["base_model_name_or_path"] == tiny_llama.name  # a local base: its name, never its path
    assert set(config["target_modules"]) == {
        "q_proj",
        "v_proj",
        "down_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "k_proj",
        "embed_tokens",
    }
    recipe = open_adapter(out).recipe
    assert recipe["method"] == "svd" and recipe["rank"] == 2
    assert [item["weight"] for item in recipe["inputs"]] == [1.0, 1.0, 1.0]
    assert all(len(item["sha256"]) == 64 for item in recipe["inputs"])
    card = (out / "README.md").read_text()
    assert "preference-vector" in card and recipe["inputs"][0]["sha256"] in card


def test_mixed_ranks_get_rank_and_alpha_patterns(tmp_path, varied_adapters):
    out = combine(parse_specs([str(p) for p in varied_adapters])).save(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    opened = open_adapter(out)
    assert all(info.scaling == 1.0 for info in opened.modules.values())
    assert {info.rank for info in opened.modules.values()} == {config["r"], *config["rank_pattern"].values()}


def test_energy_is_per_module(tmp_path, adapter_factory):
    a, b = adapter_factory(r=4), adapter_factory(r=4)
    result = combine(parse_specs([str(a), str(b)]), method="svd", energy=0.9)
    assert all(m.relative_error**2 <= 0.1 + 1e-6 for m in result.modules)
    full = combine(parse_specs([str(a), str(b)]), method="svd", energy=1.0)
    assert max(m.relative_error for m in full.modules) < 1e-5


def test_compressed_modules_reach_dense_optimum(tiny_llama, adapter_factory):
    a, b = adapter_factory(r=4), adapter_factory(r=4)
    result = combine(parse_specs([f"{a}:1", f"{b}:0.5"]), method="svd", rank=3)
    deltas_a, deltas_b = peft_deltas(tiny_llama, a), peft_deltas(tiny_llama, b)
    for module in result.modules:
        dense = (deltas_a[module.name] + 0.5 * deltas_b[module.name]).double()
        U, S, Vh = torch.linalg.svd(dense)
        optimum = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(to_dense(result.deltas[module.name]).double(), optimum, rtol=1e-4, atol=1e-5)


def test_similarity_equals_dense_cosine(tiny_llama, adapter_factory):
    a, b, c = adapter_factory(), adapter_factory(r=2), adapter_factory(target_modules=["q_proj"])
    result = similarity([open_adapter(p) for p in (a, b, c)])
    dense = [peft_deltas(tiny_llama, p) for p in (a, b, c)]
    names = sorted(set().union(*dense))

    def flat(deltas, keep=lambda n: True):
        return torch.cat([deltas.get(n, torch.zeros_like(dense[0][n])).flatten().double() for n in names if keep(n)])

    for i in range(3):
        for j in range(3):
            x, y = flat(dense[i]), flat(dense[j])
            assert float(result.overall[i, j]) == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-6)
    x, y = flat(dense[0], lambda n: n.endswith("v_proj")), flat(dense[1], lambda n: n.endswith("v_proj"))
    expected = float(x @ y / (x.norm() * y.norm()))
    assert float(result.by_module_type["v_proj"][0, 1]) == pytest.approx(expected, abs=1e-6)
    assert math.isnan(result.by_module_type["v_proj"][0, 2])  # c has no v_proj: a cosine with zero is undefined


def test_deterministic_output(tmp_path, adapter_factory):
    from safetensors.torch import load_file

    a, b = adapter_factory(), adapter_factory()
    first = combine(parse_specs([str(a), f"{b}:-1"]), method="svd", rank=3).save(tmp_path / "1.safetensors")
    second = combine(parse_specs([str(a), f"{b}:-1"]), method="svd", rank=3).save(tmp_path / "2.safetensors")
    tensors_1, tensors_2 = load_file(first), load_file(second)
    assert tensors_1.keys() == tensors_2.keys()
    assert all(torch.equal(tensors_1[k], tensors_2[k]) for k in tensors_1)
    # (safetensors may order header metadata differently; its content is identical)
    assert open_adapter(first).metadata == open_adapter(second).metadata


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.safetensors", AdapterSpec("a.safetensors", 1.0)),
        ("a.safetensors:0.8", AdapterSpec("a.safetensors", 0.8)),
        ("a:-1", AdapterSpec("a", -1.0)),
        ("dir/with:colon:2e-1", AdapterSpec("dir/with:colon", 0.2)),
    ],
)
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize("text", ["a.safetensors:abc", "a:nan", ":1"])
def test_parse_spec_rejects(text):
    with pytest.raises(LoraArithError):
        parse_spec(text)


def test_modules_are_worked_on_ahead_in_order_and_boundedly(monkeypatch):
    """combine reads, sums and compresses the next modules in a pool while it collects the current
    one: in order, at most READ_AHEAD modules ahead, and no further once the loop stops (an error)."""
    from concurrent.futures import Future

    import lora_arith.lora.combine as combine_module

    submitted: list[str] = []

    class RecordingPool:  # runs each job at once, recording when it was handed over
        def submit(self, function, *args):
            submitted.append(args[-1])
            future: Future = Future()
            future.set_result(function(*args))
            return future

    names = [f"module{i}" for i in range(12)]
    ahead = combine_module.READ_AHEAD
    assert ahead >= 1
    seen = []
    for index, name in enumerate(combine_module._in_order(RecordingPool(), str.upper, names)):
        seen.append(name)
        # this module and the READ_AHEAD after it have been handed to the pool, no more
        assert submitted == names[: index + 1 + ahead]
    assert seen == [name.upper() for name in names]
    submitted.clear()
    working = combine_module._in_order(RecordingPool(), str.upper, names)
    next(working)
    working.close()  # as on an error in the loop: nothing more is started
    assert submitted == names[: 1 + ahead]


def test_output_dtypes_by_name_or_torch_dtype_alike_and_others_refused(adapter_factory, tmp_path, pairs_file):
    """``Combination.save(dtype="fp16")`` was torch's 'Invalid device string'; ``combine(dtype=torch.int8)``
    wrote an adapter open_adapter refuses; ``train_vector(dtype=...)`` found a bad one only after training."""
    from lora_arith._internal.errors import OptionError
    from lora_arith.training.train import TrainConfig
    from lora_arith.training.vector import train_vector

    mix = combine([AdapterSpec(str(adapter_factory()), 0.5)])
    by_name = mix.save(tmp_path / "by_name", dtype="fp16")
    by_torch = mix.save(tmp_path / "by_torch.safetensors", dtype=torch.float16)
    assert open_adapter(by_name).dtype == open_adapter(by_torch).dtype == torch.float16
    for bad in (torch.int8, "int8", torch.float64, 16):
        with pytest.raises(OptionError, match="dtype .* is not one of fp32, bf16, fp16"):
            combine([AdapterSpec(str(adapter_factory()), 0.5)], dtype=bad)
        with pytest.raises(OptionError, match="is not one of"):
            mix.save(tmp_path / "bad", dtype=bad)
        with pytest.raises(OptionError, match="is not one of"):  # before any training: no base is even loaded
            train_vector(TrainConfig(data=[str(pairs_file)], base="/nonexistent"), tmp_path / "v", dtype=bad)
    with pytest.raises(OptionError, match="method 'mean' is not one of"):
        train_vector(TrainConfig(data=[str(pairs_file)], base="/nonexistent"), tmp_path / "v", method="mean")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "v").exists()
