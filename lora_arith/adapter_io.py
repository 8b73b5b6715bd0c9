"""Reading and writing LoRA adapters as safetensors, lazily, module by module.

Three input forms are accepted (see :func:`open_adapter`):

* a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``);
* an ``adapter_model.safetensors`` file with ``adapter_config.json`` beside it;
* a single self-describing ``.safetensors`` file whose metadata header carries the LoRA
  config under :data:`CONFIG_METADATA_KEY` (this toolkit's single-file form).

Every delta is returned with the adapter's scaling folded into ``B``, so callers see
``ΔW = B @ A`` and never think about ``lora_alpha``, ``rank_pattern`` or rsLoRA again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_arith.atomic import atomic_output
from lora_arith.errors import LoraArithError
from lora_arith.factors import LowRankDelta, single_threaded
from lora_arith.hub import resolve
from lora_arith.model_card import model_card

CONFIG_METADATA_KEY = "lora_arith.adapter_config"
RECIPE_METADATA_KEY = "lora_arith.recipe"
TRAINING_METADATA_KEY = "lora_arith.training"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

LINEAR, EMBEDDING = "linear", "embedding"
_FACTOR_KEYS = {
    LINEAR: ("lora_B.weight", "lora_A.weight"),
    EMBEDDING: ("lora_embedding_B", "lora_embedding_A"),
}
_KEY_PATTERN = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModuleInfo:
    """What the safetensors header says about one LoRA module (no tensor data is read).

    Attributes:
        name: the module's path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: ``"linear"`` or ``"embedding"``.
        shape: ``(rows, cols)`` of ``B @ A``; for a linear layer that is ``(out, in)``.
        rank: the module's LoRA rank.
        scaling: the factor PEFT applies to ``B @ A`` (``alpha / r``, or ``alpha / √r`` with rsLoRA).
        dtype: the stored dtype of the factors.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    dtype: torch.dtype

    @property
    def module_type(self) -> str:
        """The last component of the name (``q_proj``, ``embed_tokens``, …)."""
        return self.name.rsplit(".", 1)[-1]


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """Look ``module_name`` up in a PEFT ``rank_pattern``/``alpha_pattern`` the way PEFT does.

    Keys are regular expressions matched against the end of the module name, on a dot
    boundary; the first matching key wins.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unsupported_key_reason(key: str) -> str | None:
    if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in key:
        return "a DoRA magnitude vector"
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        return "a LoRA bias (lora_bias=True)"
    if "modules_to_save" in key or not re.search(r"lora_|base_layer", key):
        return "a full weight (modules_to_save)"
    return None


class AdapterFile:
    """A LoRA adapter on disk, read lazily: the header at once, each module's factors on demand.

    Use :func:`open_adapter` to build one from any of the accepted input forms.
    """

    def __init__(self, weights_path: Path, config: dict[str, Any], metadata: dict[str, str], label: str):
        self.weights_path = weights_path
        self.config = config
        self.metadata = metadata
        self.label = label
        self._check_config()
        self.modules, self._keys, self.ignored_keys = self._index_modules()

    # -- construction helpers -------------------------------------------------------------

    def _check_config(self) -> None:
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise LoraArithError(f"{self.label}: peft_type is {peft_type}, only LORA adapters are supported")
        if self.config.get("use_dora"):
            raise LoraArithError(f"{self.label}: DoRA adapters are not a linear delta (use_dora=True); refusing")
        if self.config.get("lora_bias"):
            raise LoraArithError(f"{self.label}: adapters with lora_bias=True are not a pure low-rank delta; refusing")
        for field in ("r", "lora_alpha"):
            if not isinstance(self.config.get(field, 8), (int, float)):
                raise LoraArithError(f"{self.label}: {field} in the config is not a number")

    def _scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        if self.config.get("use_rslora"):
            return float(alpha) / rank**0.5
        return float(alpha) / rank

    def _index_modules(self) -> tuple[dict[str, ModuleInfo], dict[str, tuple[str, str]], list[str]]:
        parts: dict[str, dict[str, str]] = {}
        ignored: list[str] = []
        try:
            with safe_open(self.weights_path, framework="pt") as handle:
                keys = list(handle.keys())
                headers = {key: handle.get_slice(key) for key in keys}
                shapes = {key: tuple(headers[key].get_shape()) for key in keys}
                dtypes = {key: headers[key].get_dtype() for key in keys}
        except Exception as error:  # safetensors raises several types for bad files
            raise LoraArithError(f"{self.label}: not a readable safetensors file ({_first_line(error)})") from None

        for key in keys:
            match = _KEY_PATTERN.match(key)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
                continue
            if key.endswith("base_layer.weight"):
                ignored.append(key)  # a saved copy of a base weight, not a delta
                continue
            reason = _unsupported_key_reason(key) or "not a LoRA factor"
            raise LoraArithError(f"{self.label}: tensor {key} is {reason}; only plain LoRA deltas can be combined")

        modules: dict[str, ModuleInfo] = {}
        factor_keys: dict[str, tuple[str, str]] = {}
        for module, found in sorted(parts.items()):
            kind = EMBEDDING if any(p.startswith("lora_embedding") for p in found) else LINEAR
            b_part, a_part = _FACTOR_KEYS[kind]
            if set(found) != {b_part, a_part}:
                raise LoraArithError(f"{self.label}: module {module} lacks one of its factors ({a_part}, {b_part})")
            b_key, a_key = found[b_part], found[a_part]
            b_shape, a_shape = shapes[b_key], shapes[a_key]
            if len(b_shape) != 2 or len(a_shape) != 2 or b_shape[1] != a_shape[0]:
                raise LoraArithError(
                    f"{self.label}: module {module} has factors of shapes {b_shape} and {a_shape} that do not chain"
                )
            rank = a_shape[0]
            configured = pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
            if configured != rank:
                raise LoraArithError(
                    f"{self.label}: config does not match tensors: module {module} has rank {rank} "
                    f"but the config says r={configured}"
                )
            modules[module] = ModuleInfo(
                name=module,
                kind=kind,
                shape=(b_shape[0], a_shape[1]),
                rank=rank,
                scaling=self._scaling(module, rank),
                dtype=_torch_dtype(dtypes[b_key]),
            )
            factor_keys[module] = (b_key, a_key)
        if not modules:
            raise LoraArithError(f"{self.label}: no LoRA factors found")
        return modules, factor_keys, ignored

    # -- public API ------------------------------------------------------------------------

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the config, if any."""
        return self.config.get("base_model_name_or_path")

    @property
    def recipe(self) -> dict[str, Any] | None:
        """The recipe this toolkit wrote into the metadata, if the adapter came from it."""
        raw = self.metadata.get(RECIPE_METADATA_KEY)
        return json.loads(raw) if raw else None

    @property
    def training(self) -> dict[str, Any] | None:
        """How the adapter (or the inputs of its recipe) was trained, if recorded."""
        raw = self.metadata.get(TRAINING_METADATA_KEY)
        return json.loads(raw) if raw else None

    @cached_property
    def sha256(self) -> str:
        """The sha256 of the weights file."""
        return sha256_of(self.weights_path)

    @property
    def dtype(self) -> torch.dtype:
        """The widest dtype among the stored factors."""
        return max((info.dtype for info in self.modules.values()), key=lambda d: torch.finfo(d).bits)

    def delta(self, module: str) -> LowRankDelta:
        """The module's delta in fp32 with its scaling folded into ``B``.

        Raises :class:`LoraArithError` if the factors hold NaN or Inf.
        """
        info = self.modules[module]
        b_key, a_key = self._keys[module]
        B = self._reader.get_tensor(b_key).to(torch.float32, copy=True)  # a copy even when stored in fp32
        A = self._reader.get_tensor(a_key).to(torch.float32, copy=True)
        if not (_all_finite(B) and _all_finite(A)):
            raise LoraArithError(f"{self.label}: module {module} has NaN or Inf values")
        return LowRankDelta(B.mul_(info.scaling) if info.scaling != 1 else B, A)  # B is a fresh fp32 copy

    @cached_property
    def _reader(self):
        """One open (memory-mapped) handle for every :meth:`delta` call: reopening the file per
        module cost more than reading it (measured in benchmarks/bench_combine.py)."""
        return safe_open(self.weights_path, framework="pt")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the fp32 sum NaN or Inf, so a
    finite sum proves it in one cheap reduction (10× faster than ``isfinite().all()``); only a
    non-finite sum, which finite values can also reach by overflow, is checked element-wise."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _torch_dtype(name: str) -> torch.dtype:
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if name not in names:
        raise LoraArithError(f"unsupported tensor dtype {name}")
    return names[name]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoraArithError(f"{label}: cannot read {path.name} ({_first_line(error)})") from None
    if not isinstance(value, dict):
        raise LoraArithError(f"{label}: {path.name} is not a JSON object")
    return value


def _read_metadata(weights: Path, label: str) -> dict[str, str]:
    try:
        with safe_open(weights, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise LoraArithError(f"{label}: not a readable safetensors file ({_first_line(error)})") from None


def open_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Open an adapter in any accepted form: a PEFT directory, a weights file with its
    ``adapter_config.json`` beside it, or a single self-describing ``.safetensors`` file —
    locally, or as a Hub reference ``org/name[@revision][/subfolder]`` (see :mod:`lora_arith.hub`)."""
    label = str(path)
    path = resolve(label)
    if path.is_dir():
        weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            raise LoraArithError(f"{label}: no {WEIGHTS_NAME} in this directory")
        metadata = _read_metadata(weights, label)
        if config_file.is_file():
            return AdapterFile(weights, _read_json(config_file, label), metadata, label)
    elif path.is_file():
        weights, config_file = path, path.parent / CONFIG_NAME
        metadata = _read_metadata(weights, label)
    else:
        raise LoraArithError(f"{label}: no such file or directory")

    if CONFIG_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraArithError(f"{label}: the embedded LoRA config is not valid JSON") from None
        return AdapterFile(weights, config, metadata, label)
    if config_file.is_file():
        return AdapterFile(weights, _read_json(config_file, label), metadata, label)
    raise LoraArithError(f"{label}: no LoRA config (no embedded config and no {CONFIG_NAME} beside it)")


# -- writing ----------------------------------------------------------------------------------


def factor_tensors(
    deltas: Mapping[str, LowRankDelta], kinds: Mapping[str, str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The PEFT state-dict tensors for ``deltas`` (scaling already folded in), cast to ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    with single_threaded():  # hundreds of small casts: threads only add overhead
        for module, delta in deltas.items():
            b_part, a_part = _FACTOR_KEYS[kinds[module]]
            tensors[f"{KEY_PREFIX}{module}.{b_part}"] = delta.B.to(dtype).contiguous()
            tensors[f"{KEY_PREFIX}{module}.{a_part}"] = delta.A.to(dtype).contiguous()
    return tensors


def unit_scaling_config(ranks: Mapping[str, int], template: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA config whose scaling is 1 for every module (``lora_alpha == r`` everywhere).

    ``r`` is the most common rank; ``rank_pattern``/``alpha_pattern`` list only modules whose
    rank differs. ``template`` supplies the other fields (base model, targets, …).
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = max(sorted(counts), key=lambda r: counts[r])
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != common}
    config = dict(template)
    config.update(
        peft_type="LORA",
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        lora_bias=False,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=None,
        inference_mode=True,
    )
    return config


def _metadata(
    config: Mapping[str, Any], recipe: Mapping[str, Any] | None, training: Mapping[str, Any] | None, single_file: bool
) -> dict[str, str]:
    metadata = {"format": "pt"}
    if single_file:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
    for key, value in ((RECIPE_METADATA_KEY, recipe), (TRAINING_METADATA_KEY, training)):
        if value is not None:
            metadata[key] = json.dumps(value, sort_keys=True)
    return metadata


def save_adapter(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    *,
    training: Mapping[str, Any] | None = None,
    force: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write an adapter atomically: the single-file form if ``path`` ends in ``.safetensors``,
    else a PEFT directory (weights, ``adapter_config.json``, a README model card and
    ``extra_files``). ``recipe`` (the arithmetic) and ``training`` (how the inputs were
    trained) go into the safetensors metadata and the model card. Nothing is left behind if
    writing fails.
    """
    single_file = Path(path).suffix == ".safetensors"
    metadata = _metadata(config, recipe, training, single_file)
    with atomic_output(path, directory=not single_file, force=force) as temporary:
        if single_file:
            save_file(dict(tensors), temporary, metadata=metadata)
        else:
            save_file(dict(tensors), temporary / WEIGHTS_NAME, metadata=metadata)
            (temporary / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (temporary / "README.md").write_text(model_card(config, recipe, training))
            for name, text in (extra_files or {}).items():
                (temporary / name).write_text(text)
    return Path(path)


def write_single_file(
    adapter: str | os.PathLike[str], path: str | os.PathLike[str], *, training: Mapping[str, Any] | None = None
) -> Path:
    """Write a copy of ``adapter`` in the single-file form (its tensors unchanged, its config and
    ``training`` embedded in the metadata) at ``path``."""
    opened = open_adapter(adapter)
    tensors = {k: v for k, v in load_file(opened.weights_path).items() if k not in opened.ignored_keys}
    return save_adapter(path, tensors, opened.config, opened.recipe, training=training or opened.training)
