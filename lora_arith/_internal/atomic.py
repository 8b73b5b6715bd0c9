"""Safe outputs: the one place where an output path is checked, and how it is written.

Every command that writes goes through :func:`check_output` (directly, or through
:func:`atomic_output`, which calls it for a plain path). The rules, all in this module:

* an output never equals, contains or sits inside one of the run's inputs (symlinks resolved),
  with or without ``force``;
* ``-o .``, ``-o x/..`` and the like are refused: an output needs a name of its own;
* an existing output is replaced only with ``force``, and then only if it is a file, an empty
  folder, or a folder that is recognisably an earlier output of the same kind (see
  :data:`OUTPUT_KINDS`); anything else is an error naming what would be deleted;
* the output is written into a temporary sibling ``.NAME.lora-arith-tmp.<pid>.<random>``
  and renamed into place at the end; without ``force`` that rename fails if the output
  appeared meanwhile (another run), leaving the other run's output intact;
* the temporary is removed on failure, on SIGTERM and on SIGINT; temporaries left by killed
  processes (SIGKILL) are removed by the next run that writes the same output;
* every file and folder of the output gets the ordinary mode ``0o666 & ~umask`` (folders
  ``0o777 & ~umask``), whatever the writer (safetensors writes through its own private file);
* write errors (read-only folder, full disk, file-size limit) become one-line errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from lora_arith._internal.errors import LoraArithError, OptionError

__all__ = [
    "OUTPUT_KINDS",
    "Output",
    "check_output",
    "check_apart",
    "require_output_path",
    "remove_stale_temporaries",
    "removed_on_signal",
    "atomic_output",
]

OUTPUT_KINDS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "file": ("a file", ()),
    "folder": ("a folder", ()),
    "adapter": ("an adapter folder", (("adapter_config.json",), ("adapter_model.safetensors",))),
    "model": (
        "a model folder",
        (
            ("config.json",),
            ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
        ),
    ),
    "eval": ("an eval folder", (("results.json",), ("summary.md",))),
    "sweep": ("a sweep folder", (("points.jsonl", "sweep.csv"),)),
    "tune": ("a tune folder", (("report.json",), ("report.md",))),
    "runs": ("a {} folder", (("positive/adapter_config.json",), ("negative/adapter_config.json",))),
    "mixes": ("a folder of exported mixes", (("*/adapter_config.json",),)),
    "gguf": ("a folder of GGUF files", (("*.gguf",),)),
}
"""Output kinds: a description, and the files (any one of each group) that make an existing
folder recognisably an earlier output of that kind, which ``force`` may replace. A name with
``*`` is a pattern, and then everything in the folder must match one (a folder of mixes holds
nothing else). ``file`` is written as a file; every other kind as a folder. A ``{}`` in a
description names the option of that output (:data:`_KIND_OPTIONS`)."""

_KIND_OPTIONS = {"runs": "keep_runs"}

_MARKER = "lora-arith"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.lora-arith-(?:tmp|old)\.(?P<pid>\d+)\.[0-9a-f]+(?:\..+)?$")


@dataclass(frozen=True)
class Output(os.PathLike):
    """An output path that passed :func:`check_output`. It is path-like (``Path(output)``
    works), so it can be handed to any function that takes an output path, and
    :func:`atomic_output` writes it without checking again."""

    path: Path
    kind: str = "file"
    force: bool = False
    create_parents: bool = False
    inputs: tuple[Path, ...] = field(default=(), repr=False)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def directory(self) -> bool:
        return self.kind != "file"


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "would overwrite an input"
    if output in source.parents:
        return f"would overwrite an input ({source} is inside it)"
    if source in output.parents:
        return f"would write inside an input ({source})"
    return None


def require_output_path(path: object) -> None:
    """A :class:`TypeError` naming the mistake unless ``path`` is a path (text, ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an output must be a path, not {path!r}")


def check_apart(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], option: str = "output"
) -> tuple[Path, ...]:
    """Refuse ``path`` (a place to write, given as ``option``) when it equals, holds or sits inside
    one of ``inputs`` (symlinks resolved; inputs that do not exist are left out): inputs are never
    modified. Returns the inputs that exist, resolved."""
    given = Path(os.path.expanduser(os.fspath(path)))
    resolved = _real(given)
    sources = tuple(_real(s) for s in inputs if s is not None and os.path.lexists(os.path.expanduser(os.fspath(s))))
    for source in sources:
        relation = _relation(resolved, source)
        if relation:
            if option == "output":  # outputs have a --force, which does not apply to inputs
                raise OptionError(
                    "force", "output {given} {relation}; inputs are never modified, not even with {}", given=given, relation=relation
                )
            raise OptionError(option, "{} {given} {relation}; inputs are never modified", given=given, relation=relation)
    return sources


def _listing(folder: Path, limit: int = 3) -> str:
    names: list[str] = []
    count = 0
    for entry in sorted(folder.rglob("*")):
        if entry.is_dir() and not entry.is_symlink():
            continue
        count += 1
        if len(names) < limit:
            names.append(str(entry))
    if count == 0:
        return f"the empty folders inside {folder}"
    more = f" and {count - len(names)} more file{'s' if count - len(names) > 1 else ''}" if count > len(names) else ""
    return ", ".join(names) + more


def _marked(folder: Path, name: str) -> set[str]:
    """The entries of ``folder`` that the marker ``name`` (a path, or a pattern with ``*``) finds."""
    if "*" in name:
        return {match.relative_to(folder).parts[0] for match in folder.glob(name)}
    return {Path(name).parts[0]} if (folder / name).exists() else set()


def _refusal(path: Path, kind: str) -> OptionError | None:
    """Why ``force`` may not replace the existing ``path`` with an output of ``kind``, or None."""
    if path.is_symlink() or not path.is_dir():
        return None  # a file (or a link, replaced itself, its target untouched)
    if not any(path.iterdir()):
        return None
    description, markers = OUTPUT_KINDS[kind]
    if markers:
        found = [set().union(*(_marked(path, name) for name in group)) for group in markers]
        patterned = any("*" in name for group in markers for name in group)
        if all(found) and (not patterned or {entry.name for entry in path.iterdir()} <= set().union(*found)):
            return None
    wanted = f"is not {description}" if markers else "is a folder that is not empty"
    options = (_KIND_OPTIONS[kind],) if "{}" in wanted else ()
    return OptionError(
        (*options, "force"),
        "output {path} exists and " + wanted + "; {} would delete {listing}. Remove it yourself or choose another output",
        path=path,
        listing=_listing(path),
    )


def check_output(
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    kind: str = "file",
    create_parents: bool = False,
    outputs: Iterable[str | os.PathLike[str]] = (),
) -> Output:
    """Check that ``path`` may be written as an output of ``kind`` (see :data:`OUTPUT_KINDS`).

    Refuses an output that equals, contains or sits inside one of ``inputs`` (always, symlinks
    resolved); ``.``/``..`` and other nameless outputs; an existing output without ``force``,
    or with ``force`` one that is not a file, an empty folder or an earlier output of ``kind``;
    and a missing parent folder unless ``create_parents``. ``outputs`` are the run's other
    outputs, which must not overlap this one either (existing or not).

    Returns:
        An :class:`Output` to hand to :func:`atomic_output` (or to any writer taking a path).
    """
    if isinstance(path, Output):
        return path
    require_output_path(path)
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    text = os.fspath(path)
    given = Path(os.path.expanduser(text))
    if given.name in ("", ".", ".."):
        raise OptionError("output", "output {text!r} names no file or folder of its own; give it a name, e.g. {} out", text=text)
    resolved = _real(given)
    sources = check_apart(given, inputs)
    for other in outputs:
        if _relation(resolved, _real(other)):
            raise LoraArithError(f"output {given} overlaps the other output {other}; give them separate places")
    if os.path.lexists(given):
        if not force:
            raise OptionError("force", "output {given} exists; pass {} to replace it", given=given)
        refusal = _refusal(given, kind)
        if refusal:
            raise refusal
    parent = resolved.parent
    if not parent.is_dir():
        if not create_parents:
            raise LoraArithError(f"output directory {given.parent} does not exist")
        for ancestor in (parent, *parent.parents):
            if ancestor.exists() and not ancestor.is_dir():
                raise LoraArithError(f"cannot create output directory {given.parent}: {ancestor} is a file")
    return Output(given, kind, force, create_parents, sources)


# -- writing ----------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(path: Path) -> None:
    """Give ``path`` and everything under it the modes of ordinary new files and folders."""
    mask = _umask()
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return
    if not path.is_dir():
        path.chmod(file_mode)
        return
    path.chmod(folder_mode)
    for root, folders, files in os.walk(path):
        for name in folders:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, folder_mode)
        for name in files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, file_mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _temporary_name(final: Path, role: str = "tmp") -> Path:
    return final.with_name(f".{final.name}.{_MARKER}-{role}.{os.getpid()}.{secrets.token_hex(4)}")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if it is not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0  # alive; start unknown, so assume it may be the writer


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove temporaries of ``final`` left by processes that are gone (killed, say, by SIGKILL).

    A temporary is stale when the process in its name is not running, or is a newer process
    that got the same pid after the temporary was last written (its mtime).
    """
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["name"] != final.name:
            continue
        pid = int(match["pid"])
        if pid == os.getpid():
            continue
        started = _process_start(pid)
        try:
            stat = entry.lstat()
        except OSError:
            continue
        if started is None or started > stat.st_mtime + 1:
            _remove(entry)
            removed.append(entry)
    return removed


# Temporaries of this process, removed by the signal handler below on SIGTERM/SIGINT.
_live: dict[Path, None] = {}
_previous_handlers: dict[int, object] = {}
_lock = threading.RLock()


def _on_signal(signum: int, frame) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        # Python's SIGINT handler raises KeyboardInterrupt: the writers' own clean-up runs as it unwinds.
        previous(signum, frame)
        return
    for path in list(_live):
        _remove(path)
    _live.clear()
    _restore_handlers()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # the default action: die of this signal, as the caller expects


def _install_handlers() -> None:
    if _previous_handlers or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or current is None:
            continue
        _previous_handlers[signum] = current
        signal.signal(signum, _on_signal)
    # Exceeding the file-size limit must give EFBIG, an error we report, not kill the process.
    _previous_handlers[signal.SIGXFSZ] = signal.getsignal(signal.SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in list(_previous_handlers.items()):
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    _previous_handlers.clear()


@contextlib.contextmanager
def removed_on_signal(path: Path) -> Iterator[Path]:
    """Remove ``path`` if SIGTERM or SIGINT arrives while the block runs (and at its end)."""
    with _lock:
        _live[path] = None
        _install_handlers()
    try:
        yield path
    finally:
        with _lock:
            _live.pop(path, None)
            if not _live:
                _restore_handlers()
        _remove(path)


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2`` with ``flags``; False where the system or file system lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; FileExistsError if ``target`` exists, checked atomically."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if source.is_dir():
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target))
        try:
            os.rename(source, target)  # fails if a non-empty folder or a file appeared meanwhile
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
            raise
    else:
        os.link(source, target)  # EEXIST if the target exists
        os.unlink(source)


def _move_into_place(temporary: Path, output: Output) -> None:
    final = output.path
    try:
        _rename_no_replace(temporary, final)
        return
    except FileExistsError:
        if not output.force:
            raise LoraArithError(
                f"output {final} appeared while this run was writing it (another run?); left it as it is"
            ) from None
    reason = _refusal(final, output.kind)  # what is there now may differ from what was checked
    if reason:
        raise LoraArithError(reason)
    if not output.directory and not (final.is_dir() and not final.is_symlink()):
        os.replace(temporary, final)
        return
    if not final.is_symlink() and _renameat2(temporary, final, _RENAME_EXCHANGE):
        _remove(temporary)  # now holds the old output
        return
    trash = _temporary_name(final, "old")
    os.rename(final, trash)
    try:
        _rename_no_replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(trash, final)
        raise
    _remove(trash)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _write_error(output: Output, error: BaseException) -> LoraArithError | None:
    """A one-line error for a failed write (OSError, or a library's wrapped OS error), or None."""
    if isinstance(error, OSError) and error.errno is not None:
        code = error.errno
    else:
        match = _OS_ERROR.search(str(error))
        if not match:
            return None
        code = int(match.group(1))
    hint = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EFBIG: " (the file-size limit, ulimit -f, is too small)",
        errno.EROFS: "; choose a writable folder",
        errno.EACCES: "; choose a writable folder",
    }.get(code, "")
    return LoraArithError(f"cannot write output {output.path}: {os.strerror(code)}{hint}")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str] | Output,
    *,
    kind: str | None = None,
    directory: bool | None = None,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling of the output to write into: a folder, or a file's path.

    ``path`` is an :class:`Output` from :func:`check_output`, or a plain path, which is checked
    here with ``kind`` (default ``"folder"`` if ``directory`` else ``"file"``), ``force`` and
    ``inputs``. When the block succeeds, the temporary gets ordinary file modes and is renamed
    into place; when it fails, or SIGTERM/SIGINT arrives, it is removed and the output is
    untouched. OS errors while writing become one-line :class:`LoraArithError`.
    """
    if not isinstance(path, Output):
        path = check_output(path, force=force, inputs=inputs, kind=kind or ("folder" if directory else "file"))
    output = path
    final = output.path
    try:
        if output.create_parents:
            final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        while True:
            temporary = _temporary_name(final)
            try:
                if output.directory:
                    temporary.mkdir(0o777)
                else:
                    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as error:
        raise _write_error(output, error) or error from None
    with removed_on_signal(temporary):
        try:
            yield temporary
            _normal_modes(temporary)
            _move_into_place(temporary, output)
        except LoraArithError:
            raise
        except Exception as error:
            converted = _write_error(output, error)
            if converted is None:
                raise
            raise converted from None
