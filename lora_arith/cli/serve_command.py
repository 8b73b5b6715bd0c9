"""``lora-arith serve``: an OpenAI-compatible chat server, each request with its own preference weights."""

from __future__ import annotations

import functools
import os

import click

from lora_arith.cli.options import adapter_option, base_option, device_option, four_bit_option, option_group
from lora_arith.lora.specs import named_specs
from lora_arith.serving import ENGINES

__all__ = ["serve"]


def _limit(flag: str, default, kind, help: str):
    """A bound of the server, shown with its default in ``--help``."""
    return click.option(flag, default=default, show_default=True, type=kind, help=help)


_SERVER_OPTIONS = option_group(
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
    click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free port)."),
    click.option(
        "--api-key",
        envvar="LORA_ARITH_API_KEY",
        default=None,
        metavar="KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/* (or set LORA_ARITH_API_KEY). /health, /metrics and / stay open.",
    ),
    click.option(
        "--allowed-origin",
        "allowed_origins",
        multiple=True,
        metavar="ORIGIN",
        help="Let web pages from ORIGIN call the API (CORS; repeatable). Default: no cross-origin calls.",
    ),
    _limit("--max-batch-size", 32, click.IntRange(min=1), "Rows decoded together at most (--engine lora-arith)."),
    _limit("--max-batch-tokens", 32768, click.IntRange(min=1), "Rows x tokens of the batch's KV cache at most (--engine lora-arith)."),
    _limit("--max-queue", 256, click.IntRange(min=0), "Requests waiting for a free row at most; beyond, 429 with Retry-After (--engine lora-arith)."),
    _limit("--max-request-bytes", 4 * 2**20, click.IntRange(min=1), "Largest body; larger ones get 413 unread."),
    _limit("--request-timeout", 30.0, click.FloatRange(min=0, min_open=True), "Seconds to send a whole request."),
    _limit("--max-eta", 4.0, click.FloatRange(min=0, min_open=True), "Largest |weight| a request may ask for."),
    _limit("--max-tokens", 512, click.IntRange(min=1), "Largest max_tokens a request may ask for (and the default)."),
    _limit("--shutdown-timeout", 30.0, click.FloatRange(min=0), "Seconds running requests get on Ctrl-C/SIGTERM."),
)
"""Where ``serve`` listens, who may call it and its bounds."""

_ENGINE_OPTIONS = option_group(
    click.option(
        "--engine",
        type=click.Choice(ENGINES),
        default="lora-arith",
        show_default=True,
        help="What generates: our continuous-batching engine, or a vLLM or llama-server at --engine-url, "
        "behind the same API, key, limits and metrics.",
    ),
    click.option("--engine-url", default=None, metavar="URL", help="vllm/llama.cpp: the engine's server, e.g. http://127.0.0.1:8001."),
    click.option(
        "--adapter-dir",
        default=None,
        metavar="DIR",
        help="vllm: the folder each mix's adapter is written into; vLLM must read it at the same path.",
    ),
    _limit("--eta-step", 0.05, click.FloatRange(min=0, min_open=True), "vllm: weights are rounded to multiples of this."),
    _limit("--max-loras", 8, click.IntRange(min=1), "vllm: mixes kept loaded while unused (least recently used unloaded)."),
)
"""``--engine`` and what the other engines need (:mod:`lora_arith.serving.proxy`)."""


@click.command()
@base_option()
@adapter_option
@click.option("--weights", default="", metavar="NAME=W,...", help="Default weights (override the specs' :WEIGHT).")
@_SERVER_OPTIONS
@_ENGINE_OPTIONS
@four_bit_option(False, "Load the base in 4-bit NF4 (bitsandbytes).")
@click.option(
    "--int8",
    is_flag=True,
    help="CPU: quantize the base's linear layers to int8 (adapters stay fp32): about 2x the tokens/s, "
    "but replies differ from the full-precision base's.",
)
@device_option()
def serve(base, adapters, weights, api_key, **options):
    """Serve an OpenAI-compatible chat API; each request may carry its own preference weights.

    Requests add "preferences": {"helpful": 0.8, "harmless": 1.0} (with the openai client:
    extra_body={"preferences": {...}}); names left out take the server's defaults. Requests are
    batched continuously: each joins the running batch at the next decoding step, with its own
    mix, and leaves it the moment it is done. GET / is a playground page, GET /metrics Prometheus
    metrics.

    Bounds: a request must arrive whole within --request-timeout (else its connection is closed,
    or it gets 408); it joins the batch only while rows x tokens of the KV cache stay within
    --max-batch-tokens, each row counted at its longest, prompt and max_tokens (all rows share one
    time axis, so a long request waits rather than make every row as long); beyond --max-queue
    requests waiting for a free row, 429.

    With --engine vllm or llama.cpp, the same front end forwards each request to that engine:
    vLLM gets one exact adapter per mix (rounded to --eta-step), loaded at run time;
    llama-server gets the mix as its per-request "lora" scales. See docs/guides/serving.md.

    \b
    Example:
      lora-arith serve --adapter helpful=adapters/helpful \\
          --adapter harmless=adapters/harmless --weights helpful=1,harmless=1 --api-key "$KEY"
    """
    from lora_arith._internal.errors import OptionError
    from lora_arith.serving.launch import parse_default_weights, serve as serve_adapters

    if api_key is None and os.environ.get("LORA_ARITH_API_KEY") == "":  # click reads an empty variable as unset
        raise OptionError("api_key", "LORA_ARITH_API_KEY is set but empty: set it to a key, or unset it to serve without one")
    if api_key is not None and not api_key:
        raise OptionError("api_key", "{} (or LORA_ARITH_API_KEY) must not be empty")
    serve_adapters(
        base,
        named_specs(adapters),
        parse_default_weights(weights),
        api_key=api_key,
        announce=functools.partial(click.echo, err=True),
        **options,
    )
