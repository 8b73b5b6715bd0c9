"""Keeping local paths out of everything that can be shared (metadata, model cards, uploads).

Files are recorded by basename (with their sha256 next to them, where the caller has it); a
base model or dataset keeps its name only when it is a Hub id rather than a local path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["scrub", "public_name", "public_data_spec", "public_training"]

_NOT_URL = "".join(f"(?<!{scheme}:)" for scheme in ("http", "https", "ws", "wss", "ftp", "s3", "gs", "hf"))
"""No path starts at a network URL's ``//`` (``file:///home/me`` is a local path)."""
_START = _NOT_URL + r"(?:~|/|[A-Za-z]:[\\/]|\\\\)"
"""Where a local path starts: ``~``, ``/`` (``//server`` too), a Windows drive (``C:\\``, ``C:/``)
or share (``\\\\server``), as PEFT records them on the machine that trained."""
_ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[\s:=(\[{,'\"`]))" + _START + r"[^\s:'\"`()\[\]{},]*")
"""A local path inside free text: up to the first space or delimiter."""
_WHOLE = re.compile(r"(?P<kind>[a-z]{2,}:)?(?P<path>" + _START + r"[^\n]*)")
"""A text that is one local path (spaces and all), after an optional ``KIND:`` (``refusal:/data/x``)."""


def _name(path: str) -> str:
    """The last part of a POSIX or Windows path (the path itself if it has none, e.g. ``~``)."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def _basename(match: re.Match[str]) -> str:
    return _name(match.group(0))


def scrub(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every absolute or ``~`` path inside a
    string, or a dict key, replaced by its basename: ``/home/me/data/pairs.jsonl`` becomes
    ``pairs.jsonl`` and ``refusal:/data/x.jsonl`` becomes ``refusal:x.jsonl``."""
    if isinstance(value, str):
        whole = _WHOLE.fullmatch(value)
        if whole and len(_ABSOLUTE.findall(value)) == 1:  # one path, with spaces in it: not "/a x, /b y"
            return (whole["kind"] or "") + _name(whole["path"])
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
    if sep and re.fullmatch(r"[a-z]+", kind) and rest and Path(os.path.expanduser(rest)).exists():
        return f"{kind}:{public_name(rest)}"
    path = Path(os.path.expanduser(text))
    if path.exists():
        return path.resolve().name or text
    return scrub(text)


def public_data_spec(entry: Mapping[str, Any]) -> Any:
    """How a training record's data entry names its source in shareable output: a Hub dataset by
    its id, a local file as ``[KIND:]FILE`` with the file's basename. A record written by an
    earlier version holds the spec as the user gave it (``../shared/data/x.jsonl``), which
    :func:`scrub` keeps (it is not an absolute path). An entry without a spec is named by its Hub
    dataset or file."""
    if "spec" not in entry:
        return public_name(entry.get("hub_dataset") or entry.get("file") or "")
    spec = entry["spec"]
    if not isinstance(spec, str):
        return scrub(spec)
    if entry.get("hub_dataset") or not isinstance(entry.get("file"), str):
        return public_name(spec)
    kind, colon, _ = spec.partition(":")  # a data kind has a name of its own; "c:" is a drive
    return (f"{kind}:" if colon and re.fullmatch(r"[a-z]{2,}", kind) else "") + Path(entry["file"]).name


def public_training(record: Any) -> Any:
    """A training record (one run, or runs nested by name) as shared: :func:`scrub`, and each
    ``data`` entry's ``spec`` named by :func:`public_data_spec`."""
    if isinstance(record, list):
        return [public_training(value) for value in record]
    if not isinstance(record, Mapping):
        return scrub(record)
    public = {key: public_training(value) for key, value in record.items()}
    if isinstance(record.get("data"), list):
        public["data"] = [
            {**scrub(dict(entry)), "spec": public_data_spec(entry)} if isinstance(entry, Mapping) and "spec" in entry else scrub(entry)
            for entry in record["data"]
        ]
    return public
