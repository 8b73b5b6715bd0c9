"""Keeping local paths out of everything that can be shared (metadata, model cards, uploads).

Files are recorded by basename (with their sha256 next to them, where the caller has it); a
base model or dataset keeps its name only when it is a Hub id rather than a local path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["scrub", "public_name"]

_ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[\s:=(\[{,'\"`]))(?:~|/)[^\s:'\"`()\[\]{},]*")


def _basename(match: re.Match[str]) -> str:
    text = match.group(0).rstrip("/")
    return Path(text).name or text


def scrub(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every absolute or ``~`` path inside a
    string, or a dict key, replaced by its basename: ``/home/me/data/pairs.jsonl`` becomes
    ``pairs.jsonl`` and ``refusal:/data/x.jsonl`` becomes ``refusal:x.jsonl``."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(_basename, value)
    if isinstance(value, dict):
        return {scrub(key) if isinstance(key, str) else key: scrub(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(item) for item in value]
    return value


def public_name(text: str | Path) -> str:
    """How a local file, folder or Hub reference is named in shareable output: the basename
    for anything that exists locally or is an absolute path (a ``KIND:PATH`` data spec keeps
    its ``KIND:``), the text itself otherwise (a Hub id, a label)."""
    text = str(text)
    kind, sep, rest = text.partition(":")
    if sep and re.fullmatch(r"[a-z]+", kind) and rest and Path(rest).expanduser().exists():
        return f"{kind}:{public_name(rest)}"
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve().name or text
    return scrub(text)
