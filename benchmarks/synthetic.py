"""Synthetic inputs of the benchmarks: random PEFT LoRA adapters and sharded bases of Llama shapes.

Adapters: rank-``r`` factors on all seven projections (q, k, v, o, gate, up, down) of every decoder
layer, ``A ~ N(0, 1/in)`` and ``B ~ N(0, 0.01²)``, with a fixed seed per (adapter, layer, module), written
as PEFT adapter directories (``adapter_model.safetensors`` + ``adapter_config.json``). Bases: a
``LlamaForCausalLM`` checkpoint written directly as bf16 safetensors shards with an index and a config.

Only the standard library at module level (torch and friends are imported inside the functions), so a
benchmark's stdlib-only parent process can import this module (see ``harness.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_PREFIX = "base_model.model."
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_MODEL = "meta-llama/Meta-Llama-3-8B"
LORA_ALPHA = 32
SEED = 20240501
A_SCALE_NUMERATOR = 1.0  # A ~ N(0, 1/in)
B_SCALE = 0.01  # B ~ N(0, 0.01²)
VOCAB = 32000  # vocabulary of a synthetic base
BASE_SCALE = 0.02  # base weights ~ N(0, 0.02²); norms are ones


@dataclass(frozen=True)
class Shapes:
    """The Llama module shapes the adapters target."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def modules(self) -> dict[str, tuple[int, int]]:
        """``{relative module path: (out_features, in_features)}`` for one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (q, self.hidden),
            "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden),
            "self_attn.o_proj": (self.hidden, q),
            "mlp.gate_proj": (self.intermediate, self.hidden),
            "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }


LLAMA3_8B = Shapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)
# Smoke-test shapes (--tiny): the same structure, small enough to run PEFT's svd in seconds.
TINY = Shapes(hidden=256, intermediate=896, heads=4, kv_heads=1, head_dim=64)


def module_name(layer: int, relative: str) -> str:
    """The module's path in a ``LlamaForCausalLM``, e.g. ``model.layers.0.self_attn.q_proj``."""
    return f"model.layers.{layer}.{relative}"


def module_seed(adapter: int, layer: int, module_index: int) -> int:
    """A fixed seed per (adapter, layer, module): layer ``i`` is identical in every file that has it."""
    return SEED + 1_000_000 * adapter + 1_000 * layer + module_index


# -- adapters ---------------------------------------------------------------------------------


def generate_adapter(shapes: Shapes, layers: int, adapter: int, rank: int) -> dict[str, tuple[Any, Any]]:
    """Random factors ``{module: (B, A)}`` for ``layers`` decoder layers, in fp32.

    ``A ~ N(0, 1/in)`` (rows of norm ≈ 1) and ``B ~ N(0, 0.01²)``, so every delta is non-trivial.
    """
    import torch

    factors = {}
    for layer in range(layers):
        for index, (relative, (out_features, in_features)) in enumerate(shapes.modules().items()):
            generator = torch.Generator().manual_seed(module_seed(adapter, layer, index))
            A = torch.randn(rank, in_features, generator=generator) * (A_SCALE_NUMERATOR / math.sqrt(in_features))
            B = torch.randn(out_features, rank, generator=generator) * B_SCALE
            factors[module_name(layer, relative)] = (B, A)
    return factors


def write_peft_dir(path: Path, factors: dict[str, tuple[Any, Any]], rank: int, alpha: float, dtype: Any) -> Path:
    """Write ``{module: (B, A)}`` as a PEFT adapter directory (``adapter_model.safetensors`` +
    ``adapter_config.json``) in ``dtype``. All modules must have rank ``rank``."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (B, A) in factors.items():
        if A.shape[0] != rank or B.shape[1] != rank:
            raise ValueError(f"{module}: rank {A.shape[0]} but the directory is written with r={rank}")
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_MODEL,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": TARGET_MODULES,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def write_adapters(shapes: Shapes, layers: int, rank: int, outputs: Sequence[str | Path]) -> list[int]:
    """Write adapter ``i`` of :func:`generate_adapter` to ``outputs[i]`` in bf16 with ``lora_alpha``
    :data:`LORA_ALPHA`; return the number of modules of each."""
    import torch

    modules = []
    for adapter, output in enumerate(outputs):
        factors = generate_adapter(shapes, layers, adapter, rank)
        write_peft_dir(Path(output), factors, rank, LORA_ALPHA, torch.bfloat16)
        modules.append(len(factors))
    return modules


def read_peft_dir(path: Path) -> dict[str, tuple[Any, Any]]:
    """Read a PEFT adapter directory as ``{module: (B·scaling, A)}`` in fp32.

    Deliberately independent of ``lora_arith`` (it is the reference the results are checked
    against): scaling is ``lora_alpha / r``; rank/alpha patterns and rsLoRA are refused.
    """
    import torch
    from safetensors import safe_open

    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise ValueError(f"{path}: rank/alpha patterns and rsLoRA are not supported by this reader")
    scaling = float(config["lora_alpha"]) / float(config["r"])
    parts: dict[str, dict[str, Any]] = {}
    with safe_open(path / "adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            stem, _, part = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
            parts.setdefault(stem, {})[part] = handle.get_tensor(key).to(torch.float32)
    return {module: (found["B.weight"] * scaling, found["A.weight"]) for module, found in sorted(parts.items())}


# -- bases ------------------------------------------------------------------------------------


def base_tensor_shapes(shapes: Shapes, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a ``LlamaForCausalLM`` with these shapes, in checkpoint order."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, shapes.hidden))]
    for layer in range(layers):
        tensors.append((f"model.layers.{layer}.input_layernorm.weight", (shapes.hidden,)))
        tensors.append((f"model.layers.{layer}.post_attention_layernorm.weight", (shapes.hidden,)))
        tensors += [(module_name(layer, relative) + ".weight", shape) for relative, shape in shapes.modules().items()]
    tensors += [("model.norm.weight", (shapes.hidden,)), ("lm_head.weight", (VOCAB, shapes.hidden))]
    return tensors


def write_sharded_base(shapes: Shapes, layers: int, folder: Path, max_shard_bytes: int) -> list[int]:
    """Write a bf16 ``LlamaForCausalLM`` checkpoint (config, index, shards packed greedily up to
    ``max_shard_bytes``) with random weights; return the tensor bytes of each shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    sizes = [0]
    for name, shape in base_tensor_shapes(shapes, layers):
        size = 2 * int(torch.Size(shape).numel())
        if groups[-1] and sizes[-1] + size > max_shard_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append((name, shape))
        sizes[-1] += size
    generator = torch.Generator().manual_seed(SEED)
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * BASE_SCALE).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    return sizes
