"""Device and dtype choice, in one place: which device a model goes on, which dtype it computes
in, whether training autocasts to bf16, and the dtype names the options accept. Importing this
module is cheap (torch is imported inside the functions)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from lora_arith._internal.errors import LoraArithError, OptionError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "torch_dtype", "default_device", "resolve_device", "compute_dtype", "use_bf16"]

DTYPE_NAMES = ("fp32", "bf16", "fp16")
"""The dtypes an output may be written in, as the options name them."""

_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPE_NAMES`."""
    import torch

    if name not in _TORCH_NAMES:
        raise LoraArithError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, _TORCH_NAMES[name])


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")


def resolve_device(device: str | None) -> str:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``) checked against what this
    machine has, or :func:`default_device` for ``None``.

    Raises:
        OptionError: for another name, or a device this machine does not have.
    """
    import torch

    if device is None:
        return default_device()
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise OptionError("device", "{} must be 'cpu', 'cuda', 'cuda:N' or 'mps', not {device!r}", device=device)
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device.partition(":")[2] or 0) >= count:
            seen = "no CUDA GPU is visible here" if count == 0 else f"this machine has {count} CUDA GPU(s)"
            raise OptionError("device", "{} {device}: " + seen, device=device)
    elif device == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", "{} mps: no Apple GPU is available here", device=device)
    return device


def compute_dtype(device: str) -> torch.dtype:
    """The dtype a base model is loaded and computes in on ``device``: bf16 on CUDA, fp32 elsewhere."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def use_bf16(requested: bool | None, device: str) -> bool:
    """Whether to train with bf16 autocast: ``requested`` if given, else whether ``device`` does bf16 fast.

    Raises:
        LoraArithError: if bf16 is requested on a CUDA device without bf16 support.
    """
    import torch

    on_cuda = device.startswith("cuda")
    supported = torch.cuda.is_bf16_supported() if on_cuda else True  # CPUs emulate bf16 where they lack it
    if requested and not supported:
        raise LoraArithError(f"bf16 was requested but {device} does not support it")
    return requested if requested is not None else (supported if on_cuda else _cpu_has_fast_bf16())


def _cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16); Linux only."""
    try:
        cpuinfo = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None
