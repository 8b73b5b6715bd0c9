"""Finiteness checks for scaled and cast results, so that NaN or Inf is never written.

Used wherever numbers are scaled (adapter scalings, user weights) or cast to a narrower dtype
(``--dtype fp16``) before they are written or attached to a model. The checks raise
:class:`LoraArithError` naming what overflowed and why; :mod:`lora_arith.lora.factors` stays pure.

The checks of single numbers (:func:`finite_number`, :func:`require_finite_number`) need no
torch, so that :mod:`lora_arith.lora.specs`, which the command line imports at start-up, can use
them: torch is imported by the tensor checks only, when they run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lora_arith._internal.errors import LoraArithError, OptionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "require_finite",
    "require_finite_number",
    "finite_number",
    "require_count",
    "require_positive",
    "parse_finite",
    "all_finite",
    "cast_finite",
    "dtype_name",
    "DTYPE_HINT",
]

DTYPE_HINT = "use {} fp32 or bf16"
"""What to do about an fp16 overflow where the user chooses the output dtype (``{}``: the
``dtype`` option, see :class:`~lora_arith._internal.errors.OptionError`)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16``, ``fp16``, … for a torch dtype."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the fp32 sum NaN or Inf, so a
    finite sum proves it in one cheap reduction (10× faster than ``isfinite().all()``); only a
    non-finite sum, which finite values can also reach by overflow, is checked element-wise."""
    import torch

    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def require_finite(tensor: torch.Tensor, what: str, why: str = "") -> torch.Tensor:
    """Return ``tensor`` unchanged if every value is finite, else raise :class:`LoraArithError`.

    Args:
        tensor: a floating-point tensor (integer tensors are always finite).
        what: names the tensor for the user, e.g. ``"mix: module model.layers.0.q_proj"``.
        why: an optional explanation appended to the message (e.g. the scaling that overflowed).
    """
    if tensor.is_floating_point() and not all_finite(tensor):
        import torch

        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise LoraArithError(f"{what} has {kind} values" + (f" ({why})" if why else ""))
    return tensor


def require_count(value: Any, option: str, least: int = 1) -> int:
    """``value`` if it is a whole number (an ``int``, not a bool) of at least ``least``, else an
    :class:`~lora_arith._internal.errors.OptionError` naming ``option`` (a rank, a budget, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(option, "{} must be a whole number of at least {least}, got {value!r}", least=least, value=value)
    return value


def require_positive(value: Any, option: str, *, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number above 0 (or 0, with ``zero``), else an
    :class:`~lora_arith._internal.errors.OptionError` naming ``option`` (a learning rate, a β, ...)."""
    number = finite_number(value)
    if number is None or number < 0 or (number == 0 and not zero):
        least = "0 or a positive" if zero else "a positive"
        raise OptionError(option, "{} must be {least} finite number, got {value!r}", least=least, value=value)
    return number


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not one: not an ``int`` or ``float``
    (a bool, a string such as ``"1"``, ``None``: values read from JSON are taken as they are
    typed), NaN, infinite, or an integer too large for a float. The one test of a weight the
    user gives (the command line's ``NAME=WEIGHT`` and ``PATH:WEIGHT`` after ``float()``, a
    prompt line's or a request's ``{NAME: WEIGHT}``) and of a number in an adapter's config."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_finite(text: str) -> float | None:
    """The finite number ``text`` spells (``float()``, then :func:`finite_number`), or ``None``."""
    try:
        return finite_number(float(text))
    except ValueError:
        return None


def require_finite_number(value: float, what: str) -> float:
    """Return ``value`` as a float if it is finite, else raise :class:`LoraArithError`."""
    value = float(value)
    if not math.isfinite(value):
        raise LoraArithError(f"{what} is {value}, not a finite number")
    return value


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype, what: str, hint: str = DTYPE_HINT) -> torch.Tensor:
    """``tensor`` cast to ``dtype``, refusing values that are not finite or that the cast turns
    into Inf (fp16 holds up to 65504). ``hint`` ends the message of an overflow; each ``{}`` in
    it names the ``dtype`` option.

    One check of the cast result covers both (a cast keeps NaN and Inf); only when it fails is
    the input checked, to tell a non-finite input from an overflow."""
    cast = tensor.to(dtype)
    if not cast.is_floating_point() or all_finite(cast):
        return cast
    require_finite(tensor, what)
    import torch

    peak = float(tensor.detach().abs().max())
    limit = torch.finfo(dtype).max
    raise OptionError(
        ("dtype",) * hint.count("{}"),
        "{what} overflows {name} (largest value {peak:.3g}, {name} holds up to {limit:.3g}); " + hint,
        what=what,
        name=dtype_name(dtype),
        peak=peak,
        limit=limit,
    )
