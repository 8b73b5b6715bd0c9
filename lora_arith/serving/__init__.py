"""Serving per-request preference mixes: the continuous-batching engine, the OpenAI protocol and the HTTP server."""
