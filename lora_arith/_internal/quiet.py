"""Silence messages of the libraries under lora-arith that a user can do nothing about.

Each filter drops one message, matched by its text, and nothing else:

* bitsandbytes, when imported on a CPU with AVX-512 BF16, tries to fetch a faster 4-bit kernel from
  the Hub's ``kernels-community``; offline, or without a ``kernels`` trust allowlist, it logs
  "Failed to load CPU gemm_4bit_forward ... Please make sure you already `pip install kernels`"
  (even with ``kernels`` installed) and uses its own CPU kernels, which is what lora-arith's
  figures were measured with. ``import peft`` imports bitsandbytes, so every command that loads the
  base printed it; with ``HF_HUB_OFFLINE=1`` the ``kernels`` package also logs that it skips the
  publisher trust check of that repository.
* transformers warns that ``is_gradient_checkpointing`` is deprecated each time PEFT wraps a
  model (PEFT reads the old name).

:func:`quiet_dependencies` runs when ``lora_arith.model`` or ``lora_arith.training`` is first
imported, before either library is: both packages import them inside their functions.
"""

from __future__ import annotations

import functools
import logging
import warnings

__all__ = ["quiet_dependencies"]

_BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
_BITSANDBYTES_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
_KERNELS_LOGGER = "kernels._internals.hf_hub"
_KERNELS_OFFLINE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
_PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@functools.cache  # once per process
def quiet_dependencies() -> None:
    """Install the filters described in this module's docstring (idempotent, imports nothing)."""
    logging.getLogger(_BITSANDBYTES_LOGGER).addFilter(_DropMessage(_BITSANDBYTES_KERNEL))
    logging.getLogger(_KERNELS_LOGGER).addFilter(_DropMessage(_KERNELS_OFFLINE))
    warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
