"""GGUF LoRA adapters for llama.cpp (``llama-server``) and ollama, written with the ``gguf`` package.

A GGUF LoRA is what llama.cpp's ``convert_lora_to_gguf.py`` writes, made here without shelling
out and with three things done exactly:

* **names**: each PEFT module gets the GGUF name of the base weight it changes (``gguf``'s
  :func:`~gguf.get_tensor_name_map` for the architecture), with ``.lora_a``/``.lora_b``
  appended: ``model.layers.3.self_attn.q_proj`` becomes ``blk.3.attn_q.weight.lora_a`` and
  ``blk.3.attn_q.weight.lora_b``. A module llama.cpp has no place for is refused, named;
* **RoPE rows**: GGUF stores a Llama base's ``q_proj``/``k_proj`` weights with their rows
  permuted (llama.cpp rotates interleaved pairs, transformers rotates halves), so ``B`` of those
  modules gets the same permutation, with ``n_head`` (``q``) or ``n_head_kv`` (``k``) from the
  base's config, as the converter's ``LlamaModel.permute`` does;
* **scale**: llama.cpp multiplies each ``B @ A`` by ``user_scale * alpha / rank``, unless
  ``adapter.lora.alpha`` is 0, when it uses the user's scale as it is. The export folds every
  module's PEFT scaling (``lora_alpha / r``, rsLoRA, ``rank_pattern``/``alpha_pattern``) into
  ``B``, keeps each module's own rank, and writes ``alpha = 0``: the scale a request gives is
  then exactly the weight of the preference vector. (The converter writes the config's one
  ``lora_alpha`` and so ignores ``alpha_pattern`` and rsLoRA.)

llama-server loads several GGUF LoRAs and takes one scale per adapter in each request
(:func:`~lora_arith.sharing.llama_cpp.llama_server_command`,
:func:`~lora_arith.sharing.llama_cpp.lora_field`): per-user mixes on one server. ollama's
``ADAPTER`` line applies one adapter at a fixed scale of 1, so a mix is first folded into one
adapter, exactly (``combine(..., method="cat")``; ranks add up): :func:`export_gguf_adapters`
with ``mixes``.

Only Llama bases (``LlamaForCausalLM``, which SmolLM2 is) are supported. Outputs are written
atomically, never over an input, never over an existing file without ``force``, and carry no
local paths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_arith._internal.atomic import atomic_output, check_output
from lora_arith._internal.devices import DTYPE_NAMES
from lora_arith._internal.errors import LoraArithError, OptionError, first_line
from lora_arith._internal.privacy import public_name, scrub
from lora_arith._internal.provenance import RECIPE_METADATA_KEY
from lora_arith.lora.adapter_io import EMBEDDING, LINEAR, _read_json, open_adapter, rank_range
from lora_arith.lora.specs import AdapterSpec, check_mixes, file_stem, path_list
from lora_arith.model.base import base_model_id, default_base_config, is_default_base, model_inputs, resolve_base

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "GgufExport",
    "BaseLayout",
    "base_layout",
    "gguf_name",
    "permute_rows",
    "export_gguf",
    "export_gguf_adapters",
    "gguf_report",
]

ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""The transformers architectures this export supports, with their GGUF architecture name."""

DTYPES = DTYPE_NAMES
"""The tensor types a GGUF LoRA can be written in (``fp32`` is the converter's default)."""

_FILE_SUFFIX = ".gguf"


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the GGUF file.
        ranks: every PEFT module's rank in the file (each keeps its own).
        architecture: the GGUF architecture (``general.architecture``), e.g. ``llama``.
    """

    path: Path
    ranks: dict[str, int]
    architecture: str

    @property
    def rank(self) -> int:
        """The largest module rank."""
        return max(self.ranks.values())

    def __repr__(self) -> str:  # not every module's rank
        return (
            f"GgufExport(path={self.path!r}, architecture={self.architecture!r}, modules={len(self.ranks)}, "
            f"rank={rank_range(self.ranks.values())})"
        )

    @property
    def tensors(self) -> int:
        """How many tensors the file holds: two per module, ``lora_a`` and ``lora_b``."""
        return 2 * len(self.ranks)


@dataclass(frozen=True)
class BaseLayout:
    """What the export needs to know about the base, read from its ``config.json``.

    Attributes:
        name: how the base is named in messages (a folder's name, or a Hub id).
        architecture: the GGUF architecture name (``llama``).
        layers: ``num_hidden_layers``.
        hidden: ``hidden_size``.
        intermediate: ``intermediate_size``.
        vocab: ``vocab_size``.
        heads: ``num_attention_heads`` (the ``q_proj`` permutation).
        kv_heads: ``num_key_value_heads`` (the ``k_proj`` permutation).
        head_dim: ``head_dim``, or ``hidden_size // num_attention_heads``.
        tied: whether the output layer reuses the token embeddings (``tie_word_embeddings``).
    """

    name: str
    architecture: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def shapes(self) -> dict[str, tuple[int, int]]:
        """The ``(rows, cols)`` of ``B @ A`` for each GGUF tensor kind (the PEFT orientation:
        ``(out, in)`` for a linear layer, ``(hidden, vocab)`` for the token embeddings)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "attn_q": (q, self.hidden),
            "attn_k": (kv, self.hidden),
            "attn_v": (kv, self.hidden),
            "attn_output": (self.hidden, q),
            "ffn_gate": (self.intermediate, self.hidden),
            "ffn_up": (self.intermediate, self.hidden),
            "ffn_down": (self.hidden, self.intermediate),
            "output": (self.vocab, self.hidden),
            "token_embd": (self.hidden, self.vocab),
        }


def _read_config(base: str | None) -> tuple[dict[str, Any], str]:
    """The base's ``config.json`` and its public name: the default base's
    (:func:`~lora_arith.model.base.default_base_config`), a local folder's own file, or a Hub
    model's file (downloaded through huggingface_hub)."""
    name = base_model_id(base)
    if is_default_base(base):
        return default_base_config(), name  # without converting it
    local = Path(os.path.expanduser(base))
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise LoraArithError(f"base model directory {base} has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        location = resolve_base(base)  # refuses a path that is not a model folder: a Hub id is left
        try:
            path = Path(hf_hub_download(location, "config.json"))
        except Exception as error:  # the Hub raises many types; all mean "cannot get it"
            raise LoraArithError(f"cannot get the config of base model {base}: {first_line(error)}") from None
    return _read_json(path, f"base model {name}"), name


def base_layout(base: str | None = None) -> BaseLayout:
    """Read the base's layout from its ``config.json``, refusing a base this export does not support.

    Args:
        base: ``None`` for the default base (SmolLM2-135M-Instruct), a local model folder (only its
            ``config.json`` is read), or a Hub model id.

    Raises:
        LoraArithError: if the config cannot be read, or the base is not a Llama model.
    """
    config, name = _read_config(base)
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in ARCHITECTURES and not (architecture is None and config.get("model_type") == "llama"):
        found = architecture or config.get("model_type") or "an unknown architecture"
        raise LoraArithError(
            f"base model {name} is {found}; GGUF LoRA export supports only {', '.join(ARCHITECTURES)} bases"
        )
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return BaseLayout(
            name=name,
            architecture=ARCHITECTURES.get(architecture, "llama"),
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LoraArithError(f"base model {name}: config.json lacks a usable {first_line(error)}") from None


@functools.lru_cache(maxsize=8)
def _name_map(architecture: str, layers: int):
    """``(gguf.MODEL_ARCH, its TensorNameMap for a base of `layers` blocks)``."""
    import gguf

    arch = next(a for a, text in gguf.MODEL_ARCH_NAMES.items() if text == architecture)
    return arch, gguf.get_tensor_name_map(arch, layers)


def gguf_name(module: str, layout: BaseLayout, *, kind: str = LINEAR, shape: tuple[int, int] | None = None) -> str:
    """The GGUF name of the base weight a PEFT module changes, e.g. ``blk.0.attn_q.weight``.

    Args:
        module: the PEFT module name, e.g. ``model.layers.0.self_attn.q_proj``.
        layout: the base (:func:`base_layout`).
        kind: ``"linear"`` or ``"embedding"`` (the module's LoRA type).
        shape: the module's ``B @ A`` shape, checked against the base's if given.

    Raises:
        LoraArithError: naming the module, if llama.cpp has no place for it (no GGUF tensor of the
            architecture, a kind of layer llama.cpp does not apply LoRA to, a layer the base lacks,
            the embeddings of a base that ties them to its output), or if its shape is not the base's.
    """
    import gguf

    arch, names = _name_map(layout.architecture, layout.layers)
    found = names.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
    expected = layout.shapes()
    kind_name = gguf.TENSOR_NAMES[found[0]].split(".")[-1] if found else None
    if found is None or found[0] not in gguf.MODEL_TENSORS[arch] or kind_name not in expected:
        raise LoraArithError(
            f"module {module} has no place in llama.cpp's {layout.architecture} model (no GGUF LoRA tensor "
            f"for it in a base of {layout.layers} layers); llama.cpp applies LoRA to "
            "q/k/v/o_proj, gate/up/down_proj, embed_tokens and lm_head"
        )
    if (kind == EMBEDDING) != (kind_name == "token_embd"):
        what = "the token embeddings" if kind_name == "token_embd" else "a linear layer"
        raise LoraArithError(f"module {module} is an {kind} LoRA, but {found[1]} is {what}")
    if layout.tied and kind_name in ("token_embd", "output"):
        # With tied embeddings llama.cpp's Llama model has no output.weight (an lm_head LoRA does not
        # load) and uses token_embd.weight as its output layer (src/models/llama.cpp:44-45); LoRA
        # weights are found by tensor name, so a token_embd LoRA is applied to the output matmul
        # too, where its shapes do not fit: llama-server 11434.0.0 aborts on the first request
        # (GGML_ASSERT(ggml_can_mul_mat(a, b)); tried with the converter's file for SmolLM2).
        raise LoraArithError(
            f"module {module}: base model {layout.name} ties its output layer to the token embeddings, "
            "so llama.cpp cannot apply a LoRA to either alone; refusing"
        )
    if shape is not None and tuple(shape) != expected[kind_name]:
        raise LoraArithError(
            f"module {module} has a {shape[0]}×{shape[1]} delta, but {found[1]} of base model {layout.name} "
            f"is {expected[kind_name][0]}×{expected[kind_name][1]}; is the adapter for another base?"
        )
    return found[1]


def permute_rows(B, heads: int):
    """``B`` with its rows reordered as GGUF stores a Llama ``q_proj``/``k_proj`` weight.

    transformers rotates the two halves of each head (rows ``i`` and ``i + d/2``), llama.cpp
    rotates adjacent pairs (``2i`` and ``2i + 1``); the converter reorders the base's rows, and
    so the output side of the delta, ``B``, the same way (its ``LlamaModel.permute``).

    Args:
        B: a ``(heads * head_dim, rank)`` tensor or array.
        heads: ``num_attention_heads`` for ``q_proj``, ``num_key_value_heads`` for ``k_proj``.
    """
    rows = B.shape[0]
    return B.reshape(heads, 2, rows // heads // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def _factors(name: str, module: str, delta, kind: str, layout: BaseLayout, dtype: str):
    """The ``(lora_a, lora_b)`` arrays of one module as llama.cpp reads them, in ``dtype``."""
    import numpy as np
    import torch

    from lora_arith.lora.numerics import cast_finite

    B, A = delta.B, delta.A
    if name.endswith(".attn_q.weight"):
        B = permute_rows(B, layout.heads)
    elif name.endswith(".attn_k.weight"):
        B = permute_rows(B, layout.kv_heads)
    if kind == EMBEDDING:
        A = A.T  # llama.cpp gathers rows of lora_a by token id (see llm_graph_context::build_inp_embd)
    hint = "its folded scaling does not fit {}; write fp32"
    arrays = []
    for factor in (A, B):
        factor = factor.contiguous()
        if dtype == "fp16":
            arrays.append(cast_finite(factor, torch.float16, f"module {module}", hint).numpy())
        elif dtype == "bf16":
            import gguf

            cast_finite(factor, torch.bfloat16, f"module {module}", hint)  # refuses an overflow
            arrays.append(gguf.quants.quantize(factor.numpy(), gguf.GGMLQuantizationType.BF16))
        else:
            arrays.append(np.ascontiguousarray(factor.numpy(), dtype=np.float32))
    return arrays[0], arrays[1]


def _check_recorded_base(opened: Mapping[str, Any], base: str | None) -> None:
    """With the default base, refuse adapters recorded for another: its config decides the RoPE
    permutation, which a wrong base would get silently wrong where the shapes happen to agree."""
    from lora_arith.model.base import DEFAULT_BASE_ID

    if base is not None:
        return
    for adapter, adapter_file in opened.items():
        recorded = adapter_file.base_model
        if recorded not in (None, DEFAULT_BASE_ID):
            raise OptionError(
                "base",
                "{adapter} was trained on {recorded}, not on the default base; pass that model as {}",
                adapter=public_name(adapter),
                recorded=public_name(recorded),
            )


def _check_modules(opened: Mapping[str, Any], layout: BaseLayout) -> None:
    for adapter, adapter_file in opened.items():
        if adapter_file.config.get("fan_in_fan_out"):
            raise LoraArithError(f"{public_name(adapter)}: fan_in_fan_out=True is not a Llama adapter")
        for module, info in adapter_file.modules.items():
            try:
                gguf_name(module, layout, kind=info.kind, shape=info.shape)
            except LoraArithError as error:
                raise LoraArithError(f"{public_name(adapter)}: {error}") from None


def _metadata(writer, name: str, base_model: str | None, recipe: Mapping[str, Any]) -> None:
    import gguf

    from lora_arith.sharing.model_card import is_hub_id

    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name)
    if is_hub_id(base_model):
        organization, _, model = base_model.partition("/")
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, model)
        writer.add_base_model_organization(0, organization)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    # llama.cpp scales each module by `alpha ? user_scale * alpha / rank : user_scale`
    # (llama.cpp 11434.0.0, src/llama-adapter.h:55, llama_adapter_lora_weight::get_scale, called by
    # llm_graph_context::build_lora_mm in src/llama-graph.cpp:1574; the alpha is read from this key
    # in src/llama-adapter.cpp:221, 0 when absent). Every PEFT scaling is folded into B, so alpha 0
    # makes the effective scale exactly the one each request gives.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    writer.add_string(RECIPE_METADATA_KEY, json.dumps(scrub(dict(recipe)), sort_keys=True))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write(specs: Sequence[AdapterSpec], output, name: str, layout: BaseLayout, dtype: str) -> GgufExport:
    """Fold ``specs`` into one adapter (exactly) and write it as a GGUF LoRA into ``output``
    (a path already checked, or a temporary file)."""
    import gguf

    from lora_arith.lora.adapter_io import public_config
    from lora_arith.lora.combine import combine

    combination = combine(list(specs), method="cat")
    writer = gguf.GGUFWriter(os.fspath(output), layout.architecture)
    try:
        _metadata(writer, name, public_config(combination.config).get("base_model_name_or_path"), combination.recipe.to_dict())
        for module, delta in combination.deltas.items():
            tensor = gguf_name(module, layout, kind=combination.kinds[module], shape=delta.shape)
            lora_a, lora_b = _factors(tensor, module, delta, combination.kinds[module], layout, dtype)
            raw = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else None
            writer.add_tensor(f"{tensor}.lora_a", lora_a, raw_dtype=raw)
            writer.add_tensor(f"{tensor}.lora_b", lora_b, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    ranks = {module: delta.rank for module, delta in combination.deltas.items()}
    return GgufExport(Path(output), ranks, layout.architecture)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise OptionError("dtype", "{} {dtype!r} is not one of {choices}", dtype=dtype, choices=", ".join(DTYPES))


def _prepare(adapters: Sequence[str], base: str | None) -> BaseLayout:
    """Check the adapters against the base before anything is written; the base's layout."""
    opened = {adapter: open_adapter(adapter) for adapter in adapters}
    _check_recorded_base(opened, base)
    layout = base_layout(base)
    _check_modules(opened, layout)
    return layout


def export_gguf(
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
) -> GgufExport:
    """Write ``adapter`` as a GGUF LoRA file for llama.cpp at ``output``.

    Args:
        adapter: a PEFT adapter (folder, file or Hub reference) for a Llama base.
        output: the ``.gguf`` file to write.
        base: the adapter's base (``None``: the default base), whose ``config.json`` gives the
            head counts of the RoPE permutation and the shapes every module is checked against.
        dtype: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"`` for the factors.
        force: replace an existing ``output``.

    Returns:
        The file written, with every module's rank.

    Raises:
        LoraArithError: for a base that is not a Llama model, an adapter recorded for another base
            than the default one when ``base`` is ``None``, a module llama.cpp cannot place (named),
            a factor that overflows ``dtype``, or an output that exists or would touch an input.
    """
    _check_dtype(dtype)
    checked = check_output(output, force=force, inputs=model_inputs(base, [str(adapter)]), kind="file")
    layout = _prepare([str(adapter)], base)
    with atomic_output(checked) as temporary:
        written = _write([AdapterSpec(str(adapter), 1.0)], temporary, public_name(adapter), layout, dtype)
    return dataclasses.replace(written, path=checked.path)


def export_gguf_adapters(
    adapters: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    mixes: Mapping[str, Sequence[float]] | None = None,
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
) -> dict[str, GgufExport]:
    """Write GGUF LoRAs into the folder ``output``: each adapter as its own file, or each mix as one.

    Without ``mixes``, every adapter becomes ``output/NAME.gguf`` (``NAME``: its folder's or file's
    name), for ``llama-server``, which mixes them per request (:func:`~lora_arith.sharing.llama_cpp.lora_field`). With
    ``mixes``, every mix becomes ``output/MIX.gguf``, the exact weighted sum of the adapters
    (ranks add up): for ollama, whose ``ADAPTER`` line has no scale.

    Args:
        adapters: the adapters (for the same Llama base).
        output: the folder to write (it must not exist, or be empty, unless ``force``).
        mixes: name → one weight per adapter.
        base: the adapters' base (``None``: the default base), see :func:`export_gguf`.
        dtype: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``.
        force: replace an existing empty ``output`` folder.

    Returns:
        ``NAME`` → what was written, in the order given.

    Raises:
        LoraArithError: as :func:`export_gguf`; also for names that clash or are not plain file names,
            or a mix without one weight per adapter. Nothing is written then.
    """
    _check_dtype(dtype)
    adapters = path_list(adapters, "adapters")  # one path is a list of one
    if not adapters:
        raise LoraArithError("give at least one adapter")
    if mixes is not None:
        checked_mixes = check_mixes(mixes, len(adapters))
        plan = {name: [AdapterSpec(a, w) for a, w in zip(adapters, weights)] for name, weights in checked_mixes.items()}
    else:
        plan = {file_stem(a): [AdapterSpec(a, 1.0)] for a in adapters}
        if len(plan) != len(adapters):
            raise LoraArithError("two adapters have the same name; the GGUF files are named after them")
        for name in plan:
            if name in ("", ".", "..") or name.startswith(".") or "\\" in name:
                raise LoraArithError(f"adapter {name!r}: its name is not a plain file name, and the GGUF file is named after it")
    checked = check_output(output, force=force, inputs=model_inputs(base, adapters), kind="gguf")
    layout = _prepare(adapters, base)
    exports: dict[str, GgufExport] = {}
    with atomic_output(checked) as folder:
        for name, specs in plan.items():
            written = _write(specs, folder / f"{name}{_FILE_SUFFIX}", name, layout, dtype)
            exports[name] = dataclasses.replace(written, path=checked.path / f"{name}{_FILE_SUFFIX}")
    return exports


def gguf_report(exports: Mapping[str, GgufExport], *, mixes: bool, base: str | None = None) -> list[str]:
    """The lines that say what :func:`export_gguf_adapters` wrote and how to serve it: the
    ``llama-server`` command line and the per-request ``lora`` field (one file per adapter), or the
    lines of an ollama Modelfile (one file per mix, whose scale ollama cannot change)."""
    from lora_arith.model.base import embedded_gguf
    from lora_arith.sharing.export import ranks_text
    from lora_arith.sharing.llama_cpp import llama_server_command, lora_field

    lines = []
    for result in exports.values():
        lines.append(f"wrote {result.path}: {len(result.ranks)} modules, {ranks_text(result.ranks)}, {result.tensors} tensors")
    base_gguf = embedded_gguf() if base is None else "BASE.gguf"
    paths = [result.path for result in exports.values()]
    if mixes:
        lines.append(f"ollama Modelfile (one per mix): FROM {base_gguf} / ADAPTER {paths[0]}")
        return lines
    lines.append("serve with: " + " ".join(llama_server_command(base_gguf, paths)))
    field = json.dumps({"lora": lora_field([1.0] * len(paths))})
    lines.append(f"per request, a scale for every adapter (in --lora order; the base alone is all 0): {field}")
    return lines
