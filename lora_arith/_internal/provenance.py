"""Provenance: what an output records about how it was made. The safetensors metadata keys, the
:class:`Recipe` of a combination, file hashes and package versions."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from lora_arith import __version__

__all__ = [
    "CONFIG_METADATA_KEY",
    "RECIPE_METADATA_KEY",
    "TRAINING_METADATA_KEY",
    "METHODS",
    "EXPORT_TARGETS",
    "EXPORT_METHOD",
    "TRAINING_PACKAGES",
    "hash_ahead",
    "sha256_of",
    "versions",
    "RecipeInput",
    "Recipe",
]

CONFIG_METADATA_KEY = "lora_arith.adapter_config"
"""Safetensors metadata key of the LoRA config in the single-file form."""
RECIPE_METADATA_KEY = "lora_arith.recipe"
"""Safetensors metadata key of the :class:`Recipe` (the arithmetic that made the adapter)."""
TRAINING_METADATA_KEY = "lora_arith.training"
"""Safetensors metadata key of the training summaries (how the adapter or its inputs were trained)."""

METHODS = ("cat", "svd")
"""How :func:`lora_arith.lora.combine.combine` sums: ``cat`` (exact, ranks add up) or ``svd`` (optimal rank reduction)."""

EXPORT_TARGETS = ("vllm", "llama.cpp")
"""The serving engines :mod:`lora_arith.sharing.export` writes for."""

EXPORT_METHOD = "export-vllm"
"""The recipe method of :func:`lora_arith.sharing.export.export_for_vllm`'s outputs, which also record ``max_rank``."""

TRAINING_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
"""The packages whose versions a training run records."""


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """``(real path, size, mtime)``: a hash computed ahead is used only for the same file, unchanged."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


if TYPE_CHECKING:
    from concurrent.futures import Future

_AHEAD: dict[tuple[str, int, int], Future] = {}
"""The hashes :func:`hash_ahead` started, by :func:`_file_key`: each future gives the hex digest,
or ``None`` when the file could not be read."""


def hash_ahead(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Start computing the sha256 of each existing file in ``paths`` in a daemon thread, for a later
    :func:`sha256_of`. Only the standard library runs there, and hashing releases the GIL, so a
    caller that is about to import torch (a second or so on one core) overlaps the two."""
    from concurrent.futures import Future  # here: this module is on the CLI's start-up path

    def run(key: tuple[str, int, int], future: Future) -> None:
        try:
            future.set_result(_hash_file(Path(key[0])))
        except OSError:  # reported by sha256_of, which then reads the file itself
            future.set_result(None)

    for key in map(_file_key, paths):
        if key is not None and key not in _AHEAD:
            _AHEAD[key] = Future()
            threading.Thread(target=run, args=(key, _AHEAD[key]), name="lora-arith-hash", daemon=True).start()


_KNOWN: dict[tuple[str, int, int], str] = {}
"""Digests :func:`sha256_of` computed, by :func:`_file_key`: a file is read once per process while
it stays the same (a command that combines it into several mixes hashes it once)."""


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (or waited for, if :func:`hash_ahead` is on
    it; or remembered, if it was hashed before and has not changed since)."""
    key = _file_key(path)
    if key in _KNOWN:
        return _KNOWN[key]
    if key in _AHEAD:
        digest = _AHEAD[key].result()
        if digest is not None and _file_key(path) == key:
            return digest
    digest = _hash_file(Path(path))
    if key is not None and _file_key(path) == key:  # unchanged while it was read
        _KNOWN[key] = digest
    return digest


def versions(packages: Iterable[str] = TRAINING_PACKAGES) -> dict[str, str]:
    """Versions of Python, lora-arith and ``packages`` (``"not installed"`` for a missing one)."""
    from importlib import metadata  # here, not at import: this module is on the CLI's start-up path

    found = {"python": platform.python_version(), "lora-arith": __version__}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


@dataclass(frozen=True)
class RecipeInput:
    """One input of a recipe: its public name (no local folders), weight, hash and base."""

    path: str
    weight: float
    sha256: str
    base_model: str | None


@dataclass(frozen=True)
class Recipe:
    """How a combined adapter was made, recorded in its metadata and model card."""

    method: str
    inputs: tuple[RecipeInput, ...]
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    """Only for :data:`EXPORT_METHOD`: the rank above which modules were compressed."""
    tool: str = "lora-arith"
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """The recipe as written (JSON): ``tool``, ``version``, ``method``, ``rank``, ``energy``,
        ``inputs``, and ``max_rank`` for an export."""
        record: dict[str, Any] = {
            "tool": self.tool,
            "version": self.version,
            "method": self.method,
            "rank": self.rank,
            "energy": self.energy,
            "inputs": [asdict(item) for item in self.inputs],
        }
        if self.method == EXPORT_METHOD:
            record["max_rank"] = self.max_rank
        return record
