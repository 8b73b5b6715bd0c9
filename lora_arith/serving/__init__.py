"""Serving per-request preference mixes: the continuous-batching engine, the OpenAI protocol and the HTTP server."""

__all__ = ["ENGINES"]

ENGINES = ("lora-arith", "vllm", "llama.cpp")
"""What ``serve --engine`` accepts: our own engine, or a proxy to vLLM or ``llama-server`` (here,
where the command line reads it without importing the server)."""
