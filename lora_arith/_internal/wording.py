"""How messages count things: ``1 step``, ``2 steps``."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun``, in the plural (``nouns``, default ``noun + "s"``) unless it is 1."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
