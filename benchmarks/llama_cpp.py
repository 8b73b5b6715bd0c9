"""llama.cpp as a peer for the benchmarks: find or build ``llama-server``, and turn PEFT adapters
into GGUF LoRAs with llama.cpp's own ``convert_lora_to_gguf.py``.

The code lives in :mod:`lora_arith.sharing.llama_cpp` (the tests and CI use it too); this module
keeps the benchmarks' ``import llama_cpp`` and command working.

Usage::

    python benchmarks/llama_cpp.py            # build (or find) llama-server; print its path
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora_arith.sharing.llama_cpp import (  # noqa: E402
    CMAKE_FLAGS,
    VERSION,
    build_server,
    convert_lora,
    fetch_source,
    find_server,
    home,
    main,
    source_tree,
)

__all__ = ["VERSION", "CMAKE_FLAGS", "home", "source_tree", "find_server", "fetch_source", "build_server", "convert_lora"]

if __name__ == "__main__":
    main()
