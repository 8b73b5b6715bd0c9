"""Commands that load the base model and mix adapters at run time: generate, chat (eval, sweep and tune
live in :mod:`lora_arith.cli.eval_commands`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lora_arith.cli.options import (
    adapter_option,
    force_option,
    model_option_decorators,
    option_group,
    output_option,
    progress_wanted,
)
from lora_arith.lora.specs import named_specs, parse_weight
from lora_arith._internal.wording import plural

__all__ = ["generate", "chat", "CHAT_HELP", "SET_USAGE"]


_model_options = option_group(*model_option_decorators())


@click.command()
@click.argument("prompt", required=False)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file with a 'prompt' per line, and optionally 'weights' {NAME: WEIGHT} mixing that prompt.",
)
@output_option(
    "Write JSONL lines {prompt, completion} here (default: stdout).",
    hidden_aliases=("--out",),
    type=click.Path(path_type=Path),
)
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 means greedy.")
@click.option("--seed", default=0, show_default=True, help="Random seed for sampling.")
@force_option("Replace the output file if it exists.")
@adapter_option
@_model_options
def generate(prompt, prompts_file, output, temperature, seed, force, base, adapters, **model):
    """Generate replies with adapters mixed at run time.

    Give one PROMPT, or --prompts FILE.jsonl. Prompts go through the base's chat template.

    \b
    Example:
      lora-arith generate --adapter adapters/helpful:1 \\
          --adapter adapters/harmless:0.5 "How do I kill a Python process?"
    """
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.serving.completions import generate_completions

    if (prompt is None) == (prompts_file is None):
        raise LoraArithError("give either a PROMPT or --prompts FILE")
    if prompt is not None:
        prompts, sources, weights = [prompt], ["PROMPT"], [None]
    else:
        from lora_arith.training.data import load_prompts

        prompts, sources, weights = load_prompts(prompts_file)  # every line checked before any model loads
    made = generate_completions(
        base,
        named_specs(adapters),
        prompts,
        weights,
        output=output,
        force=force,
        inputs=[prompts_file],
        sources=sources,
        temperature=temperature,
        seed=seed,
        progress=progress_wanted(),
        **model,
    )
    if made.path is not None:
        click.echo(f"wrote {plural(len(made.texts), 'completion')} to {made.path}", err=True)
    else:
        click.echo(made.texts[0] if prompt is not None else "\n".join(made.lines()))


SET_USAGE = "cannot read {item!r}; use /set NAME=WEIGHT ..."
"""The error of a ``/set`` item that :func:`~lora_arith.lora.specs.parse_weight` cannot read."""


def _parse_set_command(text: str) -> dict[str, float]:
    """The weights of chat's ``/set NAME=WEIGHT ...`` (``text``: what follows ``/set``)."""
    return dict(parse_weight(item, (), SET_USAGE) for item in text.split())


CHAT_HELP = "commands: /set NAME=WEIGHT ... (move the dials), /weights, /reset (forget the conversation), /quit"


@click.command()
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 means greedy.")
@adapter_option
@_model_options
def chat(temperature, base, adapters, quantize_4bit, device, batch_size, max_new_tokens):
    """Chat interactively; move the preference dials mid-conversation with /set.

    \b
    Example:
      lora-arith chat --adapter adapters/helpful --adapter adapters/harmless
      > /set helpful=0.8 harmless=0.5
    """
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.model.generation import check_sampling
    from lora_arith.model.mixing import PreferenceMixer

    check_sampling(temperature, 0)  # before the base loads (it was refused at every message, and chat exited 0)
    mixer = PreferenceMixer.from_specs(base, named_specs(adapters), quantize_4bit=quantize_4bit, device=device)
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    click.echo(f"adapters: {mixer.weights or 'none'}; {CHAT_HELP}")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages.clear()
            click.echo("(conversation cleared)")
            continue
        if line == "/weights":
            click.echo(f"weights: {mixer.weights}")
            continue
        command, _, rest = line.partition(" ")
        if command == "/set":  # not "/seta1=2" or "/settings": those get the help
            try:
                click.echo(f"weights: {mixer.set(**_parse_set_command(rest))}")
            except LoraArithError as error:
                click.echo(f"Error: {error}")
            continue
        if line.startswith("/"):
            click.echo(CHAT_HELP)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = mixer.generate([list(messages)], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        except LoraArithError as error:  # e.g. the conversation outgrew the context: say so, keep chatting
            messages.pop()
            click.echo(f"Error: {error}")
            continue
        messages.append({"role": "assistant", "content": reply})
        click.echo(f"assistant: {reply}")
