"""Writing a full model with weighted adapter deltas merged into the base weights, one shard at a time.

The base is never loaded as a model. Each safetensors shard is read a block of rows at a time
through a memory map of just those bytes; a weight that adapters target gets ``Σ wᵢ·BᵢAᵢ`` added
(in fp32, from the lazily read factors), and every block is streamed straight into the output shard
(untouched tensors are copied byte for byte), so peak memory is about one block, not the model. Then the index, the config, the generation config and the
tokenizer files (when present) are written beside the shards. The whole folder appears atomically.

Tensors are written in a safetensors file of our own making because ``safetensors.save_file`` needs
every tensor of a shard in memory at once; the files are ordinary safetensors (read back with
``safe_open`` in the tests).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from lora_arith._internal.atomic import atomic_output, check_output
from lora_arith._internal.devices import resolve_device
from lora_arith._internal.errors import LoraArithError, OptionError, first_line

if TYPE_CHECKING:
    import torch

    from lora_arith.lora.adapter_io import AdapterFile
    from lora_arith.lora.specs import AdapterSpec

__all__ = ["merge_adapters", "REQUANTIZE_WARNING", "SINGLE_FILE", "INDEX_FILE", "COPIED_FILES"]

REQUANTIZE_WARNING = (  # {}: the requantize option (see OptionError)
    "merging into a 4-bit model rounds every merged weight back to NF4, whose steps (about 1/8 of each "
    "64-weight block's largest value) are far larger than a typical LoRA delta, so most of the preference "
    "is rounded away; pass {} to accept that loss, or write a bf16/fp32 model instead"
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied unchanged from the base folder when present (``config.json`` gets the new dtype)."""

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPE_NAMES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_USER_NAMES = {"F64": "fp64", "F32": "fp32", "BF16": "bf16", "F16": "fp16"}
_ALTERNATIVES = {"F16": "use {} fp32 or bf16", "BF16": "use {} fp32"}  # {}: the dtype option
_COPY_BLOCK = 16 << 20
_BLOCK_ELEMENTS = 8 << 20  # rows of a weight are merged in blocks of about this many values (32 MiB in fp32)


@dataclass
class _Tensor:
    """One tensor of a safetensors shard, as its header describes it."""

    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    end: int


@dataclass
class _Shard:
    path: Path
    tensors: dict[str, _Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Delta:
    """The adapters' contributions to one base weight."""

    parts: list[tuple["AdapterFile", str, float]]  # (adapter, module, weight)
    transpose: bool


def _read_header(path: Path) -> _Shard:
    """Parse a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            size = os.fstat(handle.fileno()).st_size
    except (OSError, struct.error, ValueError) as error:
        raise LoraArithError(f"base shard {path.name} is not a readable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise LoraArithError(f"base shard {path.name} is not a readable safetensors file (its header is not a JSON object)")
    base = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            tensor = _Tensor(name, info["dtype"], [int(n) for n in info["shape"]], base + start, base + end)
            whole = isinstance(tensor.dtype, str) and 0 <= start <= end and tensor.end <= size
        except (KeyError, TypeError, ValueError):
            whole = False
        if not whole:
            raise LoraArithError(f"base shard {path.name}: the header entry of {name} is malformed or the file is cut short")
        tensors[name] = tensor
    return _Shard(path, tensors, metadata)


def _base_folder(base: str | None) -> Path:
    """The local folder of ``base``: the converted default (GGUF) base, a local folder, or a Hub snapshot."""
    from lora_arith.model.base import resolve_base

    location = resolve_base(base)
    if Path(location).is_dir():
        return Path(location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, allow_patterns=["*.safetensors", "*.json", *COPIED_FILES]))
    except Exception as error:  # the Hub raises many types; all mean "cannot get it"
        raise LoraArithError(f"cannot get base model {base}: {first_line(error)}") from None


def _base_shards(folder: Path) -> tuple[list[_Shard], bool]:
    """The base's shards (and whether it is sharded), checked against the index."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise LoraArithError(f"base model {folder.name}: {INDEX_FILE} has no weight_map of tensor → file names")
        shards = []
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise LoraArithError(f"base model {folder.name}: shard {name} listed in {INDEX_FILE} is missing")
            shards.append(_read_header(folder / name))
        where = {key: shard for shard in shards for key in shard.tensors}
        for key, name in weight_map.items():
            if key not in where or where[key].path.name != name:
                raise LoraArithError(f"base model {folder.name}: {INDEX_FILE} puts {key} in {name}, which lacks it")
        return shards, True
    if (folder / SINGLE_FILE).is_file():
        return [_read_header(folder / SINGLE_FILE)], False
    raise LoraArithError(f"base model {folder.name} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors bases merge)")


def _plan(shards: list[_Shard], adapters: Sequence[tuple["AdapterFile", float]]) -> dict[str, _Delta]:
    """Base weight name → the deltas to add; every adapter module must match a weight of the right shape."""
    from lora_arith.lora.adapter_io import EMBEDDING

    shapes = {name: tuple(t.shape) for shard in shards for name, t in shard.tensors.items()}
    plan: dict[str, _Delta] = {}
    for adapter, weight in adapters:
        fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
        for module, info in adapter.modules.items():
            key = f"{module}.weight"
            if key not in shapes and "." in module:  # checkpoints saved without the model's base prefix (GPT-2: h.0...)
                key = key.split(".", 1)[1] if key.split(".", 1)[1] in shapes else key
            if key not in shapes:
                raise LoraArithError(f"{adapter.label}: module {module} matches no weight of the base ({module}.weight)")
            transpose = info.kind == EMBEDDING or fan_in_fan_out  # PEFT's orientation of B @ A
            expected = tuple(reversed(info.shape)) if transpose else tuple(info.shape)
            if shapes[key] != expected:
                raise LoraArithError(
                    f"{adapter.label}: module {module} has a {expected[0]}×{expected[1]} delta but the base weight "
                    f"is {'×'.join(map(str, shapes[key]))}"
                )
            if not math.isfinite(info.scaling * weight):
                raise LoraArithError(
                    f"{adapter.label}: module {module} has a non-finite scale ({info.scaling:g} × weight {weight:g}); "
                    "check lora_alpha in its config"
                )
            plan.setdefault(key, _Delta([], transpose)).parts.append((adapter, module, weight))
    return plan


def _load_rows(handle, tensor: _Tensor, first: int, last: int) -> "torch.Tensor":
    """Rows ``first:last`` of the tensor (viewed as rows × rest) in fp32, read through a memory map of
    just their bytes, which is unmapped again before returning."""
    import torch

    dtype = getattr(torch, _ST_DTYPES[tensor.dtype])
    rows = tensor.shape[0] if tensor.shape else 1
    row_bytes = (tensor.end - tensor.start) // max(rows, 1)
    start, size = tensor.start + first * row_bytes, (last - first) * row_bytes
    if size == 0:
        return torch.empty((last - first, 0), dtype=torch.float32)
    page = start - start % mmap.ALLOCATIONGRANULARITY
    view = mmap.mmap(handle.fileno(), start + size - page, offset=page, access=mmap.ACCESS_COPY)
    try:
        raw = torch.frombuffer(view, dtype=torch.uint8, count=size, offset=start - page)
        values = raw.view(dtype).reshape(last - first, -1).to(torch.float32, copy=True)
        del raw
    finally:
        view.close()
    return values


def _write_tensor(handle, out, tensor: _Tensor, delta: _Delta | None, out_dtype: str) -> None:
    """Write the tensor in ``out_dtype`` with the delta added (in fp32), a block of rows at a time,
    so that memory stays at one block; refuses a non-finite result before writing it."""
    import torch

    factors = []
    for adapter, module, weight in delta.parts if delta else ():
        pair = adapter.delta(module)  # scaling folded into B; refuses non-finite factors
        B, A = pair.B * weight, pair.A
        factors.append((A.T, B.T) if delta.transpose else (B, A))  # rows of the weight = rows of the left factor
    rows = tensor.shape[0] if tensor.shape else 1
    row_elements = max(1, (tensor.end - tensor.start) // _itemsize(tensor.dtype) // max(rows, 1))
    step = max(1, _BLOCK_ELEMENTS // row_elements)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        values = _load_rows(handle, tensor, first, last)
        for left, right in factors:
            values.addmm_(left[first:last], right)
        result = values.to(getattr(torch, _ST_DTYPES[out_dtype]))
        _check_finite(result, values, tensor.name, delta, out_dtype)  # NaN/Inf survive the cast: one check
        out.write(memoryview(result.contiguous().view(torch.uint8).numpy()))


def _check_finite(result: "torch.Tensor", values: "torch.Tensor", name: str, delta: _Delta | None, dtype: str) -> None:
    """Refuse a non-finite ``result`` (``values`` cast to ``dtype``), saying whether the fp32 sum or the cast failed."""
    import torch

    from lora_arith.lora.numerics import all_finite

    if all_finite(result):
        return
    what = "the merged weight" if delta else "the weight"
    if all_finite(values):
        raise OptionError(
            "dtype",
            "{what} {name} overflows {dtype}; " + _ALTERNATIVES.get(dtype, "use {} fp32"),
            what=what,
            name=name,
            dtype=_USER_NAMES[dtype],
        )
    kind = "NaN" if torch.isnan(values).any() else "Inf"
    message = f"{what} {name} has {kind} values in fp32"
    if delta:
        names = ", ".join(f"{adapter.label}:{weight:g}" for adapter, _, weight in delta.parts)
        message += f" after adding {names}; check the adapters' lora_alpha and the weights"
    raise LoraArithError(message)


def _copy_bytes(source, target, start: int, size: int) -> None:
    """Copy ``size`` bytes at ``start`` of ``source`` to the current end of ``target``."""
    source.seek(start)
    while size:
        block = source.read(min(size, _COPY_BLOCK))
        if not block:
            raise LoraArithError(f"base shard {Path(source.name).name} is truncated")
        target.write(block)
        size -= len(block)


def _write_shard(
    shard: _Shard, target: Path, plan: dict[str, _Delta], dtype: str | None, advance: Callable[[int], Any] | None = None
) -> int:
    """Stream ``shard`` into ``target`` with the planned deltas added; return the bytes of tensor
    data. ``advance`` is told the bytes of each base tensor done (a progress bar)."""
    names = sorted(shard.tensors)
    out_dtypes = {}
    for name in names:
        stored = shard.tensors[name].dtype
        if name in plan and stored not in _ST_DTYPES:
            raise LoraArithError(f"base weight {name} is stored as {stored}, not as floating point; cannot merge into it")
        out_dtypes[name] = dtype if dtype and stored in _ST_DTYPES else stored
    header: dict[str, Any] = {"__metadata__": {**shard.metadata, "format": "pt"}}
    offset = 0
    for name in names:
        tensor = shard.tensors[name]
        size = (tensor.end - tensor.start) // _itemsize(tensor.dtype) * _itemsize(out_dtypes[name])
        header[name] = {"dtype": out_dtypes[name], "shape": tensor.shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(shard.path, "rb") as source, open(target, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            tensor = shard.tensors[name]
            if name not in plan and out_dtypes[name] == tensor.dtype:
                _copy_bytes(source, out, tensor.start, tensor.end - tensor.start)
            else:
                _write_tensor(source, out, tensor, plan.get(name), out_dtypes[name])
            if advance is not None:
                advance(tensor.end - tensor.start)
    return offset


_ITEMSIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZES.get(dtype, 1)


def _base_config(folder: Path) -> dict[str, Any]:
    """The base's ``config.json``, read before anything is written: a merged model without a
    readable config would not load (it was copied as it was, and the merge reported success)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraArithError(f"base model {folder.name}: no config.json") from None
    except (OSError, ValueError) as error:
        raise LoraArithError(f"base model {folder.name}: config.json is not valid JSON ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise LoraArithError(f"base model {folder.name}: config.json is not a JSON object")
    return config


def _copy_side_files(folder: Path, target: Path, dtype: str | None, config: dict[str, Any]) -> None:
    """Copy the base's config (``config``, as read by :func:`_base_config`), generation config and
    tokenizer files; with ``dtype``, the config says the new dtype."""
    for name in COPIED_FILES:
        if not (folder / name).is_file():
            continue
        if name != "config.json" or not dtype:
            shutil.copyfile(folder / name, target / name)
            continue
        config = dict(config)
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = _ST_DTYPES[dtype]
        (target / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_adapters(
    base: str | None,
    specs: Iterable[AdapterSpec],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    quantize_4bit: bool = False,
    requantize: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """Fold ``Σ wᵢ ΔWᵢ`` of the parsed adapter specs into the base, shard by shard, and
    write the model folder (shards, index, config, generation config, tokenizer files) to ``output``,
    loadable with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        base: the base (``None`` = the embedded default, via its dequantised cache; a local folder of
            safetensors, single-file or sharded; or a Hub id).
        specs: the adapters with their weights (text is parsed by :func:`lora_arith.lora.specs.parse_specs`
            or, for ``[NAME=]PATH[:WEIGHT]``, :func:`lora_arith.lora.specs.named_specs`).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for the floating-point tensors; ``None`` keeps the
            base's dtype. The sum is always computed in fp32, on the CPU, one block of rows at a time.
        quantize_4bit: store the result in NF4, refused unless ``requantize`` acknowledges the loss.
        device: where the 4-bit requantisation loads the merged model (the merge itself streams on
            the CPU and never loads the base as a model).
        progress: show a progress bar over the base's bytes on stderr.

    Raises:
        LoraArithError: on bad input (a shard missing from the index, an adapter module that matches no
            base weight or has the wrong shape, a non-finite merged tensor); nothing is written then.
    """
    from lora_arith.lora.adapter_io import adapter_sources, open_adapter
    from lora_arith.lora.specs import require_specs

    if quantize_4bit and not requantize:
        raise OptionError("requantize", REQUANTIZE_WARNING)
    if requantize and not quantize_4bit:  # it acknowledges a loss that only the 4-bit output has
        raise OptionError(("requantize", "quantize_4bit"), "{} goes with {}: without it the merge is not re-quantized")
    specs = require_specs(specs, "merge_adapters")
    if not specs:
        raise OptionError("adapter", "give at least one {} to merge")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise LoraArithError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPE_NAMES)}")
    if device is not None:
        resolve_device(device)  # checked now, not after the merge has streamed
    folder = _base_folder(base)
    config = _base_config(folder)
    inputs = [folder] + [p for spec in specs for p in adapter_sources(spec.path)]
    output = check_output(output, force=force, inputs=inputs, kind="model")
    shards, sharded = _base_shards(folder)
    plan = _plan(shards, [(open_adapter(spec.path), spec.weight) for spec in specs])
    st_dtype = "F32" if quantize_4bit else (_DTYPE_NAMES[dtype] if dtype else None)

    with contextlib.ExitStack() as stack:
        advance = None
        if progress:
            from tqdm import tqdm

            total = sum(t.end - t.start for shard in shards for t in shard.tensors.values())
            advance = stack.enter_context(tqdm(total=total, desc="merging", unit="B", unit_scale=True, leave=False)).update
        temporary = stack.enter_context(atomic_output(output))
        if quantize_4bit:
            staging = temporary / ".full-precision"
            staging.mkdir()
            _write_model(folder, shards, sharded, plan, st_dtype, staging, config, advance)
            _requantize(staging, temporary, device)
            shutil.rmtree(staging)
        else:
            _write_model(folder, shards, sharded, plan, st_dtype, temporary, config, advance)
    return output.path


def _write_model(
    folder: Path,
    shards: list[_Shard],
    sharded: bool,
    plan: dict[str, _Delta],
    dtype: str | None,
    target: Path,
    config: dict[str, Any],
    advance: Callable[[int], Any] | None = None,
) -> None:
    total, weight_map = 0, {}
    for shard in shards:
        total += _write_shard(shard, target / shard.path.name, plan, dtype, advance)
        weight_map.update({name: shard.path.name for name in shard.tensors})
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(folder, target, dtype, config)


def _requantize(full_precision: Path, folder: Path, device: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        full_precision,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        **({"device_map": {"": device}} if device not in (None, "cpu") else {}),
    )
    quantized.save_pretrained(folder)
    for name in COPIED_FILES:
        if name != "config.json" and (full_precision / name).is_file():
            shutil.copyfile(full_precision / name, folder / name)
