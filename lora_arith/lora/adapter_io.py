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

import json
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_arith._internal.atomic import atomic_output, require_output_path
from lora_arith._internal.devices import DTYPE_NAMES, torch_dtype
from lora_arith._internal.errors import LoraArithError, first_line
from lora_arith.lora.factors import LowRankDelta, single_threaded
from lora_arith.sharing.hub import resolve
from lora_arith.sharing.model_card import model_card
from lora_arith.lora.numerics import DTYPE_HINT, all_finite, cast_finite, finite_number, require_finite
from lora_arith._internal.privacy import public_training, scrub
from lora_arith._internal.provenance import CONFIG_METADATA_KEY, RECIPE_METADATA_KEY, TRAINING_METADATA_KEY, sha256_of
from lora_arith.lora.specs import CONFIG_NAME, WEIGHTS_NAME

__all__ = [
    "KEY_PREFIX",
    "LINEAR",
    "EMBEDDING",
    "DTYPES",
    "ModuleInfo",
    "AdapterFile",
    "pattern_value",
    "rank_range",
    "adapter_sources",
    "output_kind",
    "open_adapter",
    "factor_tensors",
    "unit_scaling_config",
    "save_adapter",
    "public_config",
    "convert_adapter",
]

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
DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}
"""The output dtypes by name (see :mod:`lora_arith._internal.devices`)."""


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


def rank_range(ranks: Iterable[int]) -> str:
    """How a summary shows the ranks of an adapter's modules: ``16``, or ``8-32`` when they differ."""
    ranks = sorted(set(ranks))
    if not ranks:
        return "0"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """Look ``module_name`` up in a PEFT ``rank_pattern``/``alpha_pattern`` the way PEFT does.

    Keys are regular expressions matched against the end of the module name, on a dot
    boundary; the first matching key wins.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


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
        for key in (RECIPE_METADATA_KEY, TRAINING_METADATA_KEY):
            self._metadata_object(key)  # a malformed block is refused now, not where it is first read

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
            value = self.config.get(field, 8)
            if not _is_number(value):
                raise LoraArithError(f"{self.label}: {field} in the config is not a number")
            if finite_number(value) is None:
                raise LoraArithError(f"{self.label}: {field} in the config is {value}, not a finite number")
        for field in ("rank_pattern", "alpha_pattern"):
            _check_pattern(self.config.get(field), f"{self.label}: {field} in the config")
        base = self.config.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise LoraArithError(f"{self.label}: base_model_name_or_path in the config is {base!r}, not a name or path")

    def _scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        scaling = float(alpha) / (rank**0.5 if self.config.get("use_rslora") else rank)
        if not math.isfinite(scaling) or abs(scaling) > torch.finfo(torch.float32).max:
            raise LoraArithError(
                f"{self.label}: module {module} has scaling {scaling:g} (lora_alpha {alpha:g} / r {rank}), "
                "which overflows fp32"
            )
        return scaling

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
            raise LoraArithError(f"{self.label}: not a readable safetensors file ({first_line(error)})") from None

        for key in keys:
            match = _KEY_PATTERN.match(key)
            if match:
                found = parts.setdefault(match["module"], {})
                if match["part"] in found:
                    raise LoraArithError(
                        f"{self.label}: module {match['module']} is stored twice, as {found[match['part']]} "
                        f"and as {key}; refusing to pick one"
                    )
                found[match["part"]] = key
                if dtypes[key] not in _FLOAT_DTYPES:
                    raise LoraArithError(
                        f"{self.label}: tensor {key} in {self.weights_path.name} has dtype {dtypes[key]}; "
                        f"LoRA factors must be floating point ({', '.join(_FLOAT_DTYPES)})"
                    )
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
            if rank == 0:
                raise LoraArithError(f"{self.label}: module {module} has rank 0")
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
                dtype=_FLOAT_DTYPES[dtypes[b_key]],
            )
            factor_keys[module] = (b_key, a_key)
        if not modules:
            raise LoraArithError(f"{self.label}: no LoRA factors found")
        return modules, factor_keys, ignored

    # -- public API ------------------------------------------------------------------------

    def __repr__(self) -> str:
        ranks = rank_range(info.rank for info in self.modules.values())
        return f"AdapterFile({self.label!r}, modules={len(self.modules)}, rank={ranks}, base={self.base_model!r})"

    @property
    def sources(self) -> list[Path]:
        """The local files and folders this adapter is read from, which an output must not touch."""
        return adapter_sources(self.weights_path)

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the config, if any."""
        return self.config.get("base_model_name_or_path")

    def _metadata_object(self, key: str) -> dict[str, Any] | None:
        raw = self.metadata.get(key)
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            raise LoraArithError(f"{self.label}: the {key} metadata is not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise LoraArithError(f"{self.label}: the {key} metadata is not a JSON object")
        flaw = _recipe_flaw(value) if key == RECIPE_METADATA_KEY else _training_flaw(value)
        if flaw:
            raise LoraArithError(f"{self.label}: the {key} metadata is malformed: {flaw}")
        return value

    @property
    def recipe(self) -> dict[str, Any] | None:
        """The recipe this toolkit wrote into the metadata, if the adapter came from it."""
        return self._metadata_object(RECIPE_METADATA_KEY)

    @property
    def training(self) -> dict[str, Any] | None:
        """How the adapter (or the inputs of its recipe) was trained, if recorded."""
        return self._metadata_object(TRAINING_METADATA_KEY)

    @cached_property
    def sha256(self) -> str:
        """The sha256 of the weights file."""
        return sha256_of(self.weights_path)

    @property
    def dtype(self) -> torch.dtype:
        """The widest dtype among the stored factors."""
        return max((info.dtype for info in self.modules.values()), key=lambda d: torch.finfo(d).bits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every LoRA tensor of the file as stored (names, dtypes, values), without saved copies
        of base weights (``ignored_keys``): what PEFT's ``set_peft_model_state_dict`` takes."""
        return {k: v for k, v in load_file(self.weights_path).items() if k not in self.ignored_keys}

    def delta(self, module: str) -> LowRankDelta:
        """The module's delta in fp32 with its scaling folded into ``B``.

        Raises :class:`LoraArithError` if the factors hold NaN or Inf.
        """
        info = self.modules[module]
        b_key, a_key = self._keys[module]
        B = self._reader.get_tensor(b_key).to(torch.float32, copy=True)  # a copy even when stored in fp32
        A = self._reader.get_tensor(a_key).to(torch.float32, copy=True)
        if not (all_finite(B) and all_finite(A)):
            raise LoraArithError(f"{self.label}: module {module} has NaN or Inf values")
        if info.scaling != 1:  # B is a fresh fp32 copy: scale it in place
            B = require_finite(
                B.mul_(info.scaling), f"{self.label}: module {module}", f"its scaling {info.scaling:g} overflows fp32"
            )
        return LowRankDelta(B, A)

    @cached_property
    def _reader(self):
        """One open (memory-mapped) handle for every :meth:`delta` call: reopening the file per
        module cost more than reading it (measured in benchmarks/bench_combine.py)."""
        return safe_open(self.weights_path, framework="pt")


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
"""Safetensors dtype names of the factors we read, and their torch dtypes."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_pattern(patterns: Any, what: str) -> None:
    """Refuse a ``rank_pattern``/``alpha_pattern`` that is not ``{regex: finite number}``."""
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise LoraArithError(f"{what} must be a JSON object of pattern → number, not a {type(patterns).__name__}")
    for key, value in patterns.items():
        try:
            re.compile(key)
        except re.error as error:
            raise LoraArithError(f"{what}: {key!r} is not a valid regular expression ({error})") from None
        if finite_number(value) is None:
            raise LoraArithError(f"{what}: the value for {key!r} is {value!r}, not a finite number")


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraArithError(f"{label}: cannot read {path.name} ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise LoraArithError(f"{label}: {path.name} is not a JSON object")
    return value


def _read_metadata(weights: Path, label: str) -> dict[str, str]:
    try:
        with safe_open(weights, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise LoraArithError(f"{label}: not a readable safetensors file ({first_line(error)})") from None


def _recipe_flaw(recipe: Mapping[str, Any]) -> str | None:
    """What is wrong with a recorded recipe's shape (what reports and model cards read), or None."""
    inputs = recipe.get("inputs", [])
    if not isinstance(inputs, list):
        return "inputs is not a list"
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            return f"input {index} is not an object"
        if not isinstance(item.get("path"), str) or not isinstance(item.get("sha256"), str):
            return f"input {index} lacks a path or a sha256 as text"
        if finite_number(item.get("weight")) is None:
            return f"input {index} has no finite weight"
    for key in ("rank", "energy", "max_rank"):
        if recipe.get(key) is not None and finite_number(recipe[key]) is None:
            return f"{key} is not a number"
    return None


def _training_flaw(training: Mapping[str, Any], where: str = "") -> str | None:
    """What is wrong with a training record's shape (one run with ``data``, or runs nested by
    name, as model cards read them), or None."""
    if "data" not in training:
        for name, value in training.items():
            flaw = _training_flaw(value, f"{where}{name}: ") if isinstance(value, dict) else None
            if flaw:
                return flaw
        return None
    data = training["data"]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        return f"{where}data is not a list of objects"
    for key in ("hyperparameters", "final_metrics"):
        if training.get(key) is not None and not isinstance(training[key], dict):
            return f"{where}{key} is not an object"
    return None


def adapter_sources(path: str | os.PathLike[str]) -> list[Path]:
    """The local files and folders an adapter at ``path`` (a local spec path) is read from:
    a folder; or a weights file, with its folder when it is a PEFT folder's
    ``adapter_model.safetensors``, and an ``adapter_config.json`` beside it. Empty for a Hub
    reference."""
    path = Path(os.path.expanduser(path))
    if not path.exists():
        return []
    if path.is_dir():
        return [path]
    sources = [path, path.parent / CONFIG_NAME]
    if path.name == WEIGHTS_NAME:
        sources.append(path.parent)
    return [p for p in sources if p.exists()]


def output_kind(path: str | os.PathLike[str]) -> str:
    """How :func:`save_adapter` writes ``path``: ``"file"`` (single-file form) or ``"adapter"`` (a PEFT folder)."""
    require_output_path(path)
    return "file" if Path(path).suffix == ".safetensors" else "adapter"


def open_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Open an adapter in any accepted form: a PEFT directory, a weights file with its
    ``adapter_config.json`` beside it, or a single self-describing ``.safetensors`` file —
    locally, or as a Hub reference ``org/name[@revision][/subfolder]`` (see :mod:`lora_arith.sharing.hub`).
    Returns an :class:`AdapterFile` (its factors are read lazily, module by module); raises
    :class:`LoraArithError` for a path that holds no adapter or an adapter that is malformed."""
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
        if not isinstance(config, dict):
            raise LoraArithError(f"{label}: the embedded LoRA config is not a JSON object")
        return AdapterFile(weights, config, metadata, label)
    if config_file.is_file():
        return AdapterFile(weights, _read_json(config_file, label), metadata, label)
    raise LoraArithError(f"{label}: no LoRA config (no embedded config and no {CONFIG_NAME} beside it)")


# -- writing ----------------------------------------------------------------------------------


def factor_tensors(
    deltas: Mapping[str, LowRankDelta], kinds: Mapping[str, str], dtype: torch.dtype, hint: str = DTYPE_HINT
) -> dict[str, torch.Tensor]:
    """The PEFT state-dict tensors for ``deltas`` (scaling already folded in), cast to ``dtype``.

    Raises :class:`LoraArithError` naming the module if a factor is not finite or overflows
    ``dtype`` (``hint`` says what to do about an overflow)."""
    tensors: dict[str, torch.Tensor] = {}
    with single_threaded():  # hundreds of small casts: threads only add overhead
        for module, delta in deltas.items():
            b_part, a_part = _FACTOR_KEYS[kinds[module]]
            tensors[f"{KEY_PREFIX}{module}.{b_part}"] = cast_finite(delta.B, dtype, f"module {module}", hint).contiguous()
            tensors[f"{KEY_PREFIX}{module}.{a_part}"] = cast_finite(delta.A, dtype, f"module {module}", hint).contiguous()
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
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write an adapter atomically: the single-file form if ``path`` ends in ``.safetensors``,
    else a PEFT directory (weights, ``adapter_config.json``, a README model card and
    ``extra_files``). ``recipe`` (the arithmetic) and ``training`` (how the inputs were
    trained) go into the safetensors metadata and the model card, with every local path
    reduced to its basename (:func:`lora_arith._internal.privacy.scrub`). Nothing is left behind if
    writing fails. ``path`` may be an :class:`~lora_arith._internal.atomic.Output` already checked;
    otherwise it is checked here against ``inputs`` (see :func:`~lora_arith._internal.atomic.check_output`).
    """
    if not isinstance(tensors, Mapping) or not any(isinstance(key, str) and _KEY_PATTERN.match(key) for key in tensors):
        raise LoraArithError(  # open_adapter would refuse what is written
            "tensors holds no LoRA factors (PEFT's names, e.g. "
            "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'); nothing to save"
        )
    single_file = output_kind(path) == "file"
    config, recipe, training = public_config(config), scrub(recipe), public_training(training)
    metadata = _metadata(config, recipe, training, single_file)
    with atomic_output(path, kind=output_kind(path), force=force, inputs=inputs) as temporary:
        if single_file:
            save_file(dict(tensors), temporary, metadata=metadata)
        else:
            save_file(dict(tensors), temporary / WEIGHTS_NAME, metadata=metadata)
            (temporary / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (temporary / "README.md").write_text(model_card(config, recipe, training))
            for name, text in (extra_files or {}).items():
                (temporary / name).write_text(text)
    return Path(path)


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every local path in it (``base_model_name_or_path`` or any other field)
    reduced to its basename (:func:`~lora_arith._internal.privacy.scrub`; a Hub id stays)."""
    return scrub(dict(config))


def convert_adapter(
    adapter: str | os.PathLike[str], output: str | os.PathLike[str], *, force: bool = False
) -> Path:
    """Rewrite ``adapter`` in the other form, losslessly: a ``.safetensors`` ``output`` gets the
    single-file form, anything else a PEFT folder (``adapter_config.json``,
    ``adapter_model.safetensors``, a model card). Tensors (names, dtypes, values) and the LoRA
    config are kept exactly; the recipe and training records are kept with local paths reduced
    to basenames. Saved copies of base weights (not deltas) are dropped. Returns the written path;
    raises :class:`LoraArithError` for an unreadable adapter or an existing output without ``force``."""
    opened = open_adapter(adapter)
    return save_adapter(
        output, opened.state_dict(), opened.config, opened.recipe, training=opened.training, force=force, inputs=opened.sources
    )
