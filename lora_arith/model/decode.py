"""One decoding step of a Llama-family model without transformers' per-call machinery.

A decoding step of a 135M model with one row is mostly Python: transformers builds a 4-D mask,
passes keyword arguments through decorators, output recorders and PEFT's wrappers at every layer,
and wraps every result in an output object. :class:`FastDecoder` runs the same modules (the same
projections, with PEFT's LoRA layers and per-row weights, the same norms, rotary embedding and
attention function) in one plain loop, for one new token per row. It gives the same logits as
``model(input_ids, attention_mask, position_ids, cache)`` (``tests/test_decode.py`` compares them),
and falls back to that call for any model it does not know (:meth:`FastDecoder.for_model` returns
``None``): prefill always takes the model's own forward.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from lora_arith._internal.errors import first_line

__all__ = ["FastDecoder", "hooked"]

logger = logging.getLogger(__name__)


def hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks (its own or global ones: device maps,
    offloading), which a direct call of what it computes would skip."""
    everywhere = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or everywhere._global_forward_hooks
        or everywhere._global_forward_pre_hooks
    )


def _inner(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FastDecoder:
    """A decoding step (one token per row) over a transformers Llama model's own modules.

    Args:
        model: a ``LlamaForCausalLM`` or a PEFT model wrapping one.
    """

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

        inner = _inner(model)
        self._plain_norms = all(
            type(norm) is LlamaRMSNorm and norm.weight.dtype == torch.float32
            for layer in inner.model.layers
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        )
        self.embed = inner.model.embed_tokens
        self.rotary = inner.model.rotary_emb
        self.layers = list(inner.model.layers[: inner.config.num_hidden_layers])
        self.norm, self.lm_head = inner.model.norm, inner.lm_head
        self._rotate_half, self._attend = rotate_half, sdpa_attention_forward

    @classmethod
    def for_model(cls, model: Any) -> "FastDecoder | None":
        """The decoder for ``model``, or ``None`` when its step must take the model's own forward:
        another architecture (or Llama classes other than transformers' own), another attention
        implementation than ``sdpa``, hooks on its modules (device maps, offloading), training, or
        a step whose logits differ from the model's forward (a check on two tokens, logged)."""
        from transformers.models.llama import modeling_llama as llama

        inner = _inner(model)
        # transformers' own Llama classes (not remote code under the same model_type): the loop in
        # __call__ is their forward, line for line
        if type(inner) is not llama.LlamaForCausalLM or type(inner.model) is not llama.LlamaModel:
            return None
        known = (llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP)
        if any((type(layer), type(layer.self_attn), type(layer.mlp)) != known for layer in inner.model.layers):
            return None
        config = inner.config
        if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        if model.training or any(hooked(module) for module in model.modules()):
            return None
        try:
            decoder = cls(model)
            agrees = decoder._agrees_with(model)
        except Exception as error:  # noqa: BLE001 - a transformers version this loop does not fit
            agrees, decoder = False, None
            logger.warning("the plain decoding loop does not fit this model (%s); using its forward", first_line(error))
        return decoder if agrees else None

    @torch.no_grad()
    def _agrees_with(self, model: Any) -> bool:
        """Whether one step of this loop gives the model's own logits (checked once, on two tokens:
        the loop copies transformers' Llama forward, which a later transformers may change)."""
        import copy

        from transformers.cache_utils import DynamicCache

        device = next(model.parameters()).device
        ids, positions = torch.tensor([[0, 1]], device=device), torch.tensor([[1]], device=device)
        cache = model(input_ids=ids[:, :1], cache=DynamicCache(), use_cache=True).cache
        copied = copy.deepcopy(cache)
        expected = model(input_ids=ids[:, 1:], position_ids=positions, cache=cache, use_cache=True).logits[:, -1, :]
        got = self(ids[:, 1:], positions, None, copied.layers)
        exact = expected.dtype == torch.float32 and device.type == "cpu"
        if torch.allclose(got.float(), expected.float(), rtol=0 if exact else 1e-3, atol=0 if exact else 1e-3):
            return True
        logger.warning("the plain decoding loop's logits differ from this model's forward; using its forward")
        return False

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache_layers: Sequence[Any],
    ) -> torch.Tensor:
        """The next-token logits ``(rows, vocabulary)`` of ``input_ids`` ``(rows, 1)`` at
        ``position_ids`` ``(rows, 1)``; ``attention_mask`` ``(rows, columns)`` (1: attend; the
        last column is the new token's) or ``None`` for all; ``cache_layers`` are the cache's
        layers, whose ``update(keys, values)`` stores the new column and returns all of them."""
        hidden = self.embed(input_ids)
        cos, sin = (part.unsqueeze(1) for part in self.rotary(hidden, position_ids=position_ids))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        rows = hidden.shape[0]
        norm = self._norm if self._plain_norms and hidden.dtype == torch.float32 else _call
        for layer, cache in zip(self.layers, cache_layers):
            attention = layer.self_attn
            head_dim = attention.head_dim
            normed = norm(layer.input_layernorm, hidden)
            query = attention.q_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
            key = attention.k_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
            value = attention.v_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
            # transformers' apply_rotary_pos_emb on queries and keys at once (it is elementwise)
            both = torch.cat([query, key], dim=1)
            both = both * cos + self._rotate_half(both) * sin
            query, key = both[:, : query.shape[1]], both[:, query.shape[1] :]
            key, value = cache.update(key, value)
            output, _ = self._attend(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
            hidden = hidden + attention.o_proj(output.reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(norm(layer.post_attention_layernorm, hidden))
        return self.lm_head(self.norm(hidden))[:, -1, :]

    @staticmethod
    def _norm(module: Any, hidden: torch.Tensor) -> torch.Tensor:
        """``LlamaRMSNorm`` of an fp32 ``hidden`` as one op (the same arithmetic, the same bits)."""
        return torch.rms_norm(hidden, module.weight.shape, module.weight, module.variance_epsilon)


def _call(module: Any, hidden: torch.Tensor) -> torch.Tensor:
    return module(hidden)
