"""Atomic outputs: write into a temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lora_arith.errors import LoraArithError


def check_output(path: str | os.PathLike[str], force: bool, inputs: list[Path] = ()) -> Path:
    """Check that ``path`` may be written: refuse an existing one without ``force``, one whose
    parent folder is missing, and one that is (or holds) an input, since inputs are never modified."""
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise LoraArithError(f"output {path} would overwrite an input")
    if path.exists() and not force:
        raise LoraArithError(f"output {path} exists; pass --force to overwrite it")
    if not path.parent.resolve().is_dir():
        raise LoraArithError(f"output directory {path.parent} does not exist")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(temporary: Path, final: Path) -> None:
    if final.is_dir() and not final.is_symlink():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(temporary, final)
        shutil.rmtree(trash)
    else:
        if temporary.is_dir() and final.exists():
            final.unlink()
        os.replace(temporary, final)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, directory: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a folder if ``directory``) to write into.

    When the block succeeds the temporary replaces ``path`` in one rename (an old ``path`` is
    only replaced with ``force``); when it fails the temporary is removed and ``path`` is untouched.
    """
    path = check_output(path, force)
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        temporary.chmod((0o777 if directory else 0o666) & ~_umask())  # mkstemp/mkdtemp made it private
        _move_into_place(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
