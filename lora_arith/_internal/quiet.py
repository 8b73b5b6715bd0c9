"""Silence messages of the libraries under lora-arith that a user can do nothing about.

Each filter drops one message, matched by its text, and nothing else:

* bitsandbytes, when imported on a CPU with AVX-512 BF16, tries to fetch a faster 4-bit kernel from
  the Hub's ``kernels-community``; offline, or without a ``kernels`` trust allowlist, it logs
  "Failed to load CPU gemm_4bit_forward ... Please make sure you already `pip install kernels`"
  (even with ``kernels`` installed) and uses its own CPU kernels, which is what lora-arith's
  figures were measured with. ``import peft`` imports bitsandbytes, so every command that loads the
  base printed it; with ``HF_HUB_OFFLINE=1`` the ``kernels`` package also logs that it skips the
  publisher trust check of that repository. :func:`quiet_dependencies` installs these two logging
  filters (on those two loggers only) when ``lora_arith.model`` or ``lora_arith.training`` is first
  imported, before either library is: both packages import them inside their functions.
* While PEFT wraps a model (and TRL trains one), :func:`peft_warnings_hidden` hides transformers'
  warning that ``is_gradient_checkpointing`` (the name PEFT and TRL read) is deprecated, and
  PEFT's warning that an adapter name inside its ``lora_`` prefix (``a``, ``r``) may be
  reinitialized when PEFT loads saved keys: lora-arith sets the factors from the adapter's own
  tensors (``tests/test_mixing.py`` checks every such name gives the same model). Only inside that
  block: a user's own code still gets the warnings.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Iterator

__all__ = ["peft_warnings_hidden", "quiet_dependencies"]

_BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
_BITSANDBYTES_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
_KERNELS_LOGGER = "kernels._internals.hf_hub"
_KERNELS_OFFLINE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
_GRADIENT_CHECKPOINTING = r"`is_gradient_checkpointing` is deprecated"
_ADAPTER_PREFIX = r"Adapter name .* should not be contained in the prefix"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@functools.cache  # once per process: the loggers live as long as it
def quiet_dependencies() -> None:
    """Install the two logging filters described in this module's docstring (imports nothing)."""
    logging.getLogger(_BITSANDBYTES_LOGGER).addFilter(_DropMessage(_BITSANDBYTES_KERNEL))
    logging.getLogger(_KERNELS_LOGGER).addFilter(_DropMessage(_KERNELS_OFFLINE))


@contextlib.contextmanager
def peft_warnings_hidden() -> Iterator[None]:
    """Hide the two warnings of PEFT's wrapping described in this module's docstring, inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _GRADIENT_CHECKPOINTING, FutureWarning)
        warnings.filterwarnings("ignore", _ADAPTER_PREFIX, UserWarning)
        yield
