"""Test-time mixing: one base model, several adapters attached, each with its own weight η.

All adapters stay active on PEFT's LoRA layers; changing the mix only rescales each
layer's per-adapter ``scaling`` (``η · α / r``), which takes milliseconds — nothing is
re-merged or reloaded. The output of the model is then ``W x + Σ ηᵢ ΔWᵢ x``, exactly what
``lora-arith combine`` with the same weights produces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from lora_arith.lora.adapter_io import open_adapter
from lora_arith._internal.errors import LoraArithError, first_line
from lora_arith._internal.privacy import public_name
from lora_arith._internal.quiet import peft_warnings_hidden
from lora_arith.lora.numerics import dtype_name, require_finite_number
from lora_arith.lora.specs import check_adapter_name, check_named_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_arith.lora.specs import AdapterSpec

__all__ = ["PreferenceMixer", "RowWeights", "attach_adapter", "lora_config_from", "scaled_peak"]


def lora_config_from(config: Mapping[str, Any]):
    """A ``peft.LoraConfig`` from a saved config dict, ignoring keys this PEFT version lacks."""
    from peft import LoraConfig

    known = {field.name for field in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping")}
    kwargs["inference_mode"] = True
    return LoraConfig(**kwargs)


def attach_adapter(model, name: str, path: str | Path):
    """Attach the adapter at ``path`` (any form :func:`open_adapter` reads) to ``model`` as
    ``name``. ``model`` may be a plain transformers model (it is wrapped) or a PeftModel.
    Returns the PeftModel.

    The adapter is checked before the model is touched: every module must exist in the base
    with the adapter's shape, and its scaled factors must be finite in the model's dtype.
    """
    return _attach(model, name, open_adapter(path), str(path))


def _base_shape(module) -> tuple[int, int] | None:
    """The ``(rows, cols)`` of ``B @ A`` a LoRA on this base module must have, if known."""
    from torch import nn

    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Embedding):
        return (module.embedding_dim, module.num_embeddings)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # transformers' Conv1D: (in, out)
        return (weight.shape[1], weight.shape[0])
    return None


def _check_fits(model, opened, label: str) -> None:
    """Refuse an adapter made for another base: a module of another shape. (A module the base
    lacks is left to PEFT, which may map renamed keys, and to the unmatched-key check after it.)"""
    from peft import PeftModel

    base = model.base_model.model if isinstance(model, PeftModel) else model
    modules = dict(base.named_modules())
    for name, info in opened.modules.items():
        if name not in modules:
            continue
        module = getattr(modules[name], "base_layer", modules[name])
        expected = _base_shape(module)
        if expected is not None and tuple(expected) != tuple(info.shape):
            raise LoraArithError(
                f"{label}: module {name} is {info.shape[0]}×{info.shape[1]} in the adapter but "
                f"{expected[0]}×{expected[1]} in the base model; the adapter was made for another base"
            )


def scaled_peak(opened) -> float:
    """The largest ``|value|`` of any module's ``B`` with its scaling folded in (finite, checked)."""
    peak = 0.0
    for name in opened.modules:
        peak = max(peak, float(opened.delta(name).B.abs().max()))
    return peak


def _model_dtype(model) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return dtypes[0] if dtypes else torch.float32


def _check_scale(label: str, peak: float, weight: float, dtype: torch.dtype) -> None:
    """Refuse a weight (or scaling) that makes the adapter's factors overflow ``dtype``."""
    require_finite_number(weight, f"the weight of {label}")
    limit = torch.finfo(dtype).max
    if peak * abs(weight) > limit:
        raise LoraArithError(
            f"{label} at weight {weight:g} overflows {dtype_name(dtype)} (its largest scaled factor would be "
            f"{peak * abs(weight):.3g}; {dtype_name(dtype)} holds up to {limit:.3g})"
        )


def _attach(model, name: str, opened, label: str, peak: float | None = None):
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    _check_fits(model, opened, label)
    peak = scaled_peak(opened) if peak is None else peak
    _check_scale(label, peak, 1.0, _model_dtype(model))
    config = lora_config_from(opened.config)
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if config.base_model_name_or_path and public_name(config.base_model_name_or_path) == public_name(
        getattr(inner, "name_or_path", "") or ""
    ):
        # the same base, recorded by its path where the model carries its public name (as
        # load_base names it): PEFT would warn that the name changed, printing the local path
        config.base_model_name_or_path = inner.name_or_path
    try:
        with peft_warnings_hidden():  # the factors are set from the adapter's tensors below, whatever the name
            if isinstance(model, PeftModel):
                if name in model.peft_config:
                    raise LoraArithError(f"an adapter named {name!r} is already attached")
                model.add_adapter(name, config)
            else:
                model = get_peft_model(model, config, adapter_name=name)
    except (ValueError, KeyError, TypeError) as error:
        raise LoraArithError(f"{label}: PEFT cannot attach this adapter ({first_line(error)})") from None
    state = opened.state_dict()
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()}, adapter_name=name)
    unmatched = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unmatched:
        raise LoraArithError(f"{label}: {len(unmatched)} tensors match no module of the base, e.g. {unmatched[0]}")
    model.eval()
    return model


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _unit_scaling(layer, name: str) -> float:
    """``α / r`` (``α / √r`` for rsLoRA) of adapter ``name`` in ``layer``: its scaling at η = 1."""
    r, alpha = layer.r[name], layer.lora_alpha[name]
    return alpha / math.sqrt(r) if layer.use_rslora.get(name, False) else alpha / r


def _lora_weight(layer, name: str) -> torch.Tensor:
    if name in layer.lora_A:
        return layer.lora_A[name].weight
    return layer.lora_embedding_A[name]


def _base_kernel(module) -> "Callable[[torch.Tensor], torch.Tensor] | None":
    """What ``module(x)`` computes, as one direct call, for the base layers of a decoding step:
    a plain ``nn.Linear`` or torch's dynamic int8 ``Linear`` with no hooks. Their ``__call__`` and
    ``forward`` cost more than the product itself for one row of a 135M model (a decoding step
    calls 210 of them). ``None`` for anything else, which keeps its own ``__call__``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from lora_arith.model.decode import hooked

    if hooked(module):
        return None
    if type(module) is torch.nn.Linear:
        return lambda x: torch.nn.functional.linear(x, module.weight, module.bias)
    if type(module) is DynamicLinear and module._packed_params.dtype == torch.qint8 and (module.version or 0) >= 4:
        dynamic = torch.ops.quantized.linear_dynamic  # what DynamicLinear.forward calls for qint8, version 4
        # the operator itself: the packet's __call__ first searches the arguments for tracing's fake
        # objects, which eager calls never have (about 5% of a one-row int8 decoding step here)
        dynamic = getattr(dynamic, "_op", dynamic)
        packed = module._packed_params._packed_params  # fixed while the handle lives (nothing re-packs it)

        def int8(x: torch.Tensor) -> torch.Tensor:
            y = dynamic(x, packed, reduce_range=True)
            return y if y.dtype == x.dtype else y.to(x.dtype)

        return int8
    return None


class RowWeights:
    """The per-row weights that :meth:`PreferenceMixer.row_weights` put on the LoRA layers.

    :meth:`assign` gives the layers the weights of a new set of rows (a decoding loop whose batch
    changes: rows joining, rows leaving); :meth:`keep` drops rows. Layers whose ranks have the same
    adapters and ``α / r`` share one scale tensor, so either costs a few tensor ops per distinct
    layout rather than per layer."""

    def __init__(self) -> None:
        # (layer, adapter, the float it replaced, column in the mix, α / r, dtype, device)
        self._scaled: list[tuple[Any, str, Any, int, float, torch.dtype, torch.device]] = []
        self._fused: dict[Any, list] = {}  # layer -> [per-row rank scales (batch, 1, R)]
        self._layouts: dict[Any, tuple] = {}  # layer -> (columns, α / r of each rank, dtype, device)

    def _scale(self, layer, name: str, column: int, unit: float, dtype: torch.dtype, device: torch.device) -> None:
        self._scaled.append((layer, name, layer.scaling[name], column, unit, dtype, device))

    def _fuse(self, layer, factors) -> None:
        stacked_a, stacked_b, columns, units = factors
        state: list = [None]
        self._fused[layer] = state
        self._layouts[layer] = (tuple(columns), tuple(units.tolist()), stacked_a.dtype, stacked_a.device)

        base = _base_kernel(layer.base_layer)
        # transposed once: torch.mm on them is one call, where F.linear is four (a step makes 420)
        a_t, b_t = stacked_a.t().contiguous(), stacked_b.t().contiguous()

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = base(x) if base is not None and not args and not kwargs else layer.base_layer(x, *args, **kwargs)
            flat = x.reshape(-1, x.shape[-1])
            low = torch.mm(flat if flat.dtype == a_t.dtype else flat.to(a_t.dtype), a_t).view(*x.shape[:-1], -1).mul_(state[0])
            if result.dtype == b_t.dtype and result.is_contiguous() and not torch.is_grad_enabled():
                # one pass over the output: result += low · Bᵀ in the GEMM itself
                result.view(-1, result.shape[-1]).addmm_(low.view(-1, low.shape[-1]), b_t)
                return result
            return (result + torch.matmul(low, b_t)).to(result.dtype)

        layer.forward = forward  # an instance attribute: nn.Module.__call__ uses it; removed on exit

    def assign(self, etas: torch.Tensor) -> None:
        """Give row ``i`` of the batches that follow the weights ``etas[i]`` (one column per adapter
        of the mixer, in its order)."""
        etas = etas.to(torch.float64)
        made: dict[tuple, torch.Tensor] = {}
        for layer, state in self._fused.items():
            layout = self._layouts[layer]
            if layout not in made:
                columns, units, dtype, device = layout
                scales = etas[:, list(columns)] * torch.tensor(units, dtype=torch.float64)
                made[layout] = scales.to(dtype=dtype, device=device)[:, None, :]
            state[0] = made[layout]
        for layer, name, _, column, unit, dtype, device in self._scaled:
            key = (column, unit, dtype, device)
            if key not in made:
                made[key] = (etas[:, column] * unit).to(dtype=dtype, device=device).view(-1, 1, 1)
            layer.scaling[name] = made[key]

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (of the current batch) in the batches that follow."""
        kept: dict[int, torch.Tensor] = {}

        def select(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in kept:
                kept[id(tensor)] = tensor[indices.to(tensor.device)]
            return kept[id(tensor)]

        for layer, name, *_ in self._scaled:
            layer.scaling[name] = select(layer.scaling[name])
        for state in self._fused.values():
            state[0] = select(state[0])

    def restore(self) -> None:
        """Put back the layers' own scalings and forwards (after this the handle holds nothing)."""
        for layer, name, value, *_ in reversed(self._scaled):
            layer.scaling[name] = value
        for layer in self._fused:
            layer.__dict__.pop("forward", None)
        self._scaled, self._fused, self._layouts = [], {}, {}


class PreferenceMixer:
    """A base model with named adapters attached, mixed at run time with per-adapter weights.

    Example::

        mixer = PreferenceMixer(None, {"helpful": "adapters/helpful",
                                       "harmless": "adapters/harmless"})
        mixer.set(helpful=0.8, harmless=0.5)
        mixer.generate(["How do I kill a Python process?"])

    Args:
        base: a base model id or directory (``None`` = the embedded default), or an already
            loaded transformers model (then ``tokenizer`` is required). A loaded model is changed
            in place, as PEFT's ``get_peft_model`` changes it: the adapters' LoRA layers are
            injected into it (give each mixer a model of its own).
        adapters: name → adapter path (may be empty: then this is the plain base).
        tokenizer: the tokenizer, when ``base`` is a loaded model.
        quantize_4bit: load the base in NF4 (bitsandbytes).
        device: ``"cpu"``/``"cuda"``; default: CUDA when available.

    Every adapter starts with weight 1.0.
    """

    def __init__(
        self,
        base: "str | None | PreTrainedModel",
        adapters: Mapping[str, str | Path],
        *,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        quantize_4bit: bool = False,
        device: str | None = None,
    ) -> None:
        if not isinstance(adapters, Mapping):
            raise LoraArithError("adapters maps a name to each adapter, e.g. {'helpful': 'adapters/helpful'}")
        for name in adapters:  # checked before the base loads (PEFT's own errors are obscure)
            check_adapter_name(name)
        if base is None or isinstance(base, (str, Path)):
            from lora_arith.model.base import load_base

            model, tokenizer = load_base(
                None if base is None else str(base), quantize_4bit=quantize_4bit, device=device
            )
        elif tokenizer is None:
            raise LoraArithError("a loaded base model needs its tokenizer")
        else:
            model = base
        self.quantized = getattr(model, "hf_quantizer", None) is not None
        self.base: str | None = None if base is None else str(base) if isinstance(base, (str, Path)) else (
            getattr(getattr(model, "config", None), "name_or_path", None) or None
        )
        """The base as given (``None``: the embedded default; a loaded model: its ``name_or_path``),
        which a run on this mixer records."""
        self._peaks: dict[str, float] = {}
        self._labels: dict[str, str] = {}
        for name, path in adapters.items():
            opened = open_adapter(path)
            self._labels[name], self._peaks[name] = str(path), scaled_peak(opened)
            model = _attach(model, name, opened, str(path), self._peaks[name])
        self._dtype = _model_dtype(model)
        self.model = model
        self.tokenizer = tokenizer
        self.names = list(adapters)
        if self.names:
            self.model.base_model.set_adapter(self.names, inference_mode=True)
        self._weights: dict[str, float] = {name: 1.0 for name in self.names}
        self._lora_layers = _lora_layers(self.model)
        self._merged = False
        self._owner: threading.Thread | None = None  # a running Engine's worker, which alone may use the mixer

    @classmethod
    def from_specs(
        cls,
        base: "str | None",
        named: Mapping[str, "AdapterSpec"],
        *,
        quantize_4bit: bool = False,
        device: str | None = None,
    ) -> "PreferenceMixer":
        """A mixer with each parsed spec of ``named`` (name → :class:`~lora_arith.lora.specs.AdapterSpec`,
        as :func:`~lora_arith.lora.specs.named_specs` gives) attached under its name, at its weight."""
        mixer = cls(base, {name: spec.path for name, spec in named.items()}, quantize_4bit=quantize_4bit, device=device)
        if named:
            mixer.set(**{name: spec.weight for name, spec in named.items()})
        return mixer

    @property
    def weights(self) -> dict[str, float]:
        """The current weight η of each adapter (a copy: change them with :meth:`set`)."""
        return dict(self._weights)

    def _check_open(self) -> None:
        if self._merged:
            raise LoraArithError(
                "this mixer's adapters were folded into its base by merged_model(); make a new PreferenceMixer"
            )
        owner = self._owner
        if owner is not None and owner is not threading.current_thread() and owner.is_alive():
            # its layers hold the engine's per-row weights: another caller would get the engine's mixes
            raise LoraArithError("a running Engine holds this mixer: generate through the engine, or close() it first")

    def __repr__(self) -> str:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        device = next(self.model.parameters()).device
        return (
            f"PreferenceMixer(base={getattr(inner, 'name_or_path', None)!r}, weights={self.weights}, "
            f"device={str(device)!r}, dtype={self._dtype}, quantized={self.quantized})"
        )

    def set(self, **weights: float) -> dict[str, float]:
        """Set the weights η of the named adapters (others keep theirs); returns the full mix."""
        mix = self.row_mix(weights)  # an unknown name or a weight that is not a finite number is an error
        for name in weights:
            _check_scale(self._labels[name], self._peaks[name], mix[name], self._dtype)
        self._weights.update(mix)
        for layer in self._lora_layers:
            for name in weights:
                layer.set_scale(name, self._weights[name])
        return dict(self._weights)

    def row_mix(self, weights: Mapping[str, Any] | None) -> dict[str, float]:
        """The full mix of one row: the mixer's current weights, overridden by ``weights``.

        Raises :class:`LoraArithError` for an unknown name or a weight that is not a finite number,
        or once :meth:`merged_model` has folded the adapters into the base."""
        self._check_open()
        return self._weights | check_named_weights(weights, self.names)

    @contextlib.contextmanager
    def row_weights(self, rows: Sequence[Mapping[str, Any] | None], *, fused: bool = False) -> Iterator["RowWeights"]:
        """Within this context, row ``i`` of every batch fed to :attr:`model` is mixed with
        ``rows[i]`` (names left out, or a ``None`` row, keep the current weights).

        Each LoRA layer's ``scaling[name]`` becomes a ``(batch, 1, 1)`` tensor ``ηᵢ · α / r``
        that broadcasts over PEFT's LoRA branch ``lora_B(lora_A(x)) * scaling``; the floats are
        put back on exit. Batches must have exactly ``len(rows)`` rows (no beam search), and
        the mixer must not be used from another thread meanwhile.

        With ``fused=True``, each plain LoRA ``Linear`` runs all its adapters as one GEMM pair
        instead: ``x · Aᵀ`` with every adapter's ``A`` stacked, each rank scaled by its row's
        ``ηᵢ · α / r``, then ``· Bᵀ`` with the ``B`` side by side: one pass over the layer's output
        instead of four per adapter. The sum is the same up to float rounding. Other layers
        (embeddings, quantized, DoRA) keep the per-row ``scaling`` tensors.

        Yields a :class:`RowWeights`, whose ``keep(indices)`` drops rows from the batch (for a
        decoding loop that drops finished rows).
        """
        handle = self.row_handle(fused=fused)
        try:
            handle.assign(self.row_etas(rows))
            yield handle
        finally:
            handle.restore()

    def row_etas(self, rows: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """The ``(rows, adapters)`` float64 weights of each row's full mix (see :meth:`row_mix`)."""
        mixes = [self.row_mix(row) for row in rows]
        return torch.tensor([[mix[name] for name in self.names] for mix in mixes], dtype=torch.float64).view(
            len(mixes), len(self.names)
        )

    def row_handle(self, *, fused: bool = False) -> "RowWeights":
        """Put per-row weights on the LoRA layers, for :meth:`RowWeights.assign` to fill; the caller
        must call its ``restore()`` (:meth:`row_weights` is the context manager that does)."""
        self._check_open()
        handle = RowWeights()
        try:
            for layer in self._lora_layers:
                factors = self._fused_factors(layer) if fused else None
                if factors is not None:
                    handle._fuse(layer, factors)
                    continue
                for column, name in enumerate(self.names):
                    if name not in layer.scaling:
                        continue
                    weight = _lora_weight(layer, name)
                    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
                    handle._scale(layer, name, column, _unit_scaling(layer, name), dtype, weight.device)
        except BaseException:
            handle.restore()
            raise
        return handle

    def _fused_factors(self, layer) -> "tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor] | None":
        """``(A stacked, B side by side, the column in self.names of each rank, α / r of each rank)``
        of a plain LoRA ``Linear`` (cached), or ``None`` for a layer that cannot be fused."""
        cache = self.__dict__.setdefault("_fused_cache", {})
        if id(layer) in cache:
            return cache[id(layer)][1]
        from peft.tuners.lora.layer import Linear

        names = [name for name in self.names if name in getattr(layer, "lora_A", {})]
        factors = None
        if (
            type(layer) is Linear
            and names
            and not layer.merged
            and not layer.lora_variant
            and not any(layer.lora_bias.get(name, False) for name in names)
            and not any(isinstance(layer.lora_dropout[name], torch.nn.Dropout) and layer.training for name in names)
        ):
            with torch.no_grad():
                stacked_a = torch.cat([layer.lora_A[name].weight for name in names], dim=0).contiguous()
                stacked_b = torch.cat([layer.lora_B[name].weight for name in names], dim=1).contiguous()
            columns = [self.names.index(name) for name in names for _ in range(layer.r[name])]
            units = torch.tensor(
                [_unit_scaling(layer, name) for name in names for _ in range(layer.r[name])], dtype=torch.float64
            )
            factors = (stacked_a, stacked_b, columns, units)
        cache[id(layer)] = (layer, factors)  # the layer is kept so that its id stays its own
        return factors

    def generate(
        self,
        prompts: Sequence[Any] | str,
        weights: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list[str]:
        """Generate completions for ``prompts`` (see :func:`lora_arith.model.generation.generate`);
        one prompt given as a string gets a list of one completion, as vLLM's ``generate`` does.

        With ``weights`` (one mapping name → η, or ``None``, per prompt), each prompt gets its own
        mix within the same batches; names a row leaves out take the current weights. One mapping
        is the mix of every prompt. Without it, every prompt gets the current mix.
        """
        from lora_arith.model.generation import generate

        self._check_open()
        if isinstance(prompts, str):
            prompts = [prompts]  # not one prompt per character
        if isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
            raise TypeError(f"prompts must be a prompt or a list of prompts (text or chat messages), not {prompts!r}")
        prompts = list(prompts)  # a pandas Series, a generator: iterated once
        if isinstance(weights, (str, bytes)):  # a sequence too: read per character, it was "3 weight rows"
            raise TypeError(f"weights is a mapping name → η, or one per prompt, e.g. {{'helpful': 1.0}}, not {weights!r}")
        if isinstance(weights, Mapping):
            weights = [weights] * len(prompts)
        if weights is None:
            return generate(self.model, self.tokenizer, prompts, **options)
        if len(weights) != len(prompts):
            raise LoraArithError(f"{len(weights)} weight rows for {len(prompts)} prompts")
        mixes = [self.row_mix(row) for row in weights]
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            batch_context=lambda indices: self.row_weights([mixes[i] for i in indices]),
            **options,
        )

    def quantize_int8(self) -> int:
        """Quantize the base's linear layers (not the adapters) to int8, in place: weights int8 (one
        scale per layer), activations quantized per batch on the fly (torch's dynamic quantization,
        fbgemm's CPU kernels). Decoding on a CPU reads a quarter of the bytes per token: about twice
        as fast with one request and with 32 (``benchmarks/bench_serve.py``). But the replies
        are no longer exactly those of the full-precision base (as with llama.cpp's quantized
        bases), and a row's reply can depend on what it is batched with (the activations' scale is
        the batch's). The adapters and their per-row weights stay in full precision. Returns the
        number of layers quantized. CPU only; not for a 4-bit base."""
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        self._check_open()
        if self.quantized:
            raise LoraArithError("the base is already quantized (4-bit); load it in full precision for int8")
        if next(self.model.parameters()).device.type != "cpu":
            raise LoraArithError("int8 quantization is for a base on the CPU")
        names = {
            name
            for name, module in self.model.named_modules()
            if type(module) is torch.nn.Linear and "lora_" not in name
        }
        with warnings.catch_warnings():
            # torch.ao.quantization's move to torchao: its deprecation of quantize_dynamic, and of the
            # quantized tensors it makes (a UserWarning; torch is pinned, so they work as measured)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
            quantize_dynamic(self.model, {name: default_dynamic_qconfig for name in names}, inplace=True)
        self.quantized = True
        return len(names)

    @torch.no_grad()
    def merged_model(self) -> "PreTrainedModel":
        """The base with the current mix folded into its weights (a plain transformers model).

        Faster at inference; only for a base that is not quantized. This unloads the
        adapters: the mixer cannot be used afterwards (its methods raise :class:`LoraArithError`).
        """
        self._check_open()
        if not self.names:
            return self.model
        if self.quantized:
            raise LoraArithError(
                "cannot fold adapters into a 4-bit base without rounding; load it with quantize_4bit=False"
            )
        merged = self.model.merge_and_unload(adapter_names=self.names)
        self._merged = True
        return merged
