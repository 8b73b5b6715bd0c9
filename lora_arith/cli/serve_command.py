"""``lora-arith serve``: an OpenAI-compatible chat server, each request with its own preference weights."""

from __future__ import annotations

import click

from lora_arith.cli.options import device_option, four_bit_option
from lora_arith.cli.model_commands import _adapter_option


def parse_weights(text: str) -> dict[str, float]:
    """``helpful=1,harmless=0.5`` → {name: weight}."""
    import math

    from lora_arith.errors import LoraArithError

    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not equals or not name or not math.isfinite(weight):
            raise LoraArithError(f"cannot read {item!r} in --weights; use NAME=WEIGHT,NAME=WEIGHT")
        weights[name.strip()] = weight
    return weights


@click.command()
@click.option(
    "--base",
    default=None,
    help="Base model: a local directory or a Hub id. Default: the embedded SmolLM2-135M-Instruct.",
)
@_adapter_option
@click.option("--weights", default="", metavar="NAME=W,...", help="Default weights (override the specs' :WEIGHT).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--max-batch-size", default=16, show_default=True, help="Requests generated together at most.")
@click.option(
    "--max-wait-ms", default=20.0, show_default=True, help="How long a request waits for others to batch with."
)
@click.option("--max-eta", default=4.0, show_default=True, help="Largest |weight| a request may ask for.")
@click.option(
    "--max-tokens", default=512, show_default=True, help="Largest max_tokens a request may ask for (and the default)."
)
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    help="Seconds running requests get to finish on Ctrl-C/SIGTERM.",
)
@four_bit_option(False, "Load the base in 4-bit NF4 (bitsandbytes).")
@device_option()
def serve(
    base,
    adapters,
    weights,
    host,
    port,
    max_batch_size,
    max_wait_ms,
    max_eta,
    max_tokens,
    shutdown_timeout,
    quantize_4bit,
    device,
):
    """Serve an OpenAI-compatible chat API; each request may carry its own preference weights.

    Requests add "preferences": {"helpful": 0.8, "harmless": 1.0} (with the openai client:
    extra_body={"preferences": {...}}); names left out take the server's defaults. Concurrent
    requests are generated together in one batch, each row with its own mix. GET / is a
    playground page.

    \b
    Example:
      lora-arith serve --adapter helpful=adapters/helpful \\
          --adapter harmless=adapters/harmless --weights helpful=1,harmless=1
    """
    from lora_arith.errors import LoraArithError
    from lora_arith.mixing import PreferenceMixer
    from lora_arith.specs import named_specs
    from lora_arith.serve import run_server

    if max_tokens < 1:
        raise LoraArithError("--max-tokens must be at least 1")
    if max_eta <= 0:
        raise LoraArithError("--max-eta must be positive")
    named = named_specs(adapters)
    defaults = {name: spec.weight for name, spec in named.items()}
    overrides = parse_weights(weights)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise LoraArithError(f"--weights names {', '.join(unknown)}, which no --adapter is named")
    defaults.update(overrides)
    for name, weight in defaults.items():
        if abs(weight) > max_eta:
            raise LoraArithError(f"the default weight of {name} ({weight:g}) is above --max-eta {max_eta:g}")
    mixer = PreferenceMixer(
        base, {name: spec.path for name, spec in named.items()}, quantize_4bit=quantize_4bit, device=device
    )
    if defaults:
        mixer.set(**defaults)
    run_server(
        mixer,
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_eta=max_eta,
        max_tokens=max_tokens,
        shutdown_timeout=shutdown_timeout,
        model_id="lora-arith",
        announce=lambda line: click.echo(line, err=True),
    )
