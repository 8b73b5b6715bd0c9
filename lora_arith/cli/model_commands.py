"""Commands that load the base model and mix adapters at run time: generate, chat (eval, sweep and tune
live in :mod:`lora_arith.cli.eval_commands`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lora_arith.cli.options import device_option, force_option, four_bit_option, output_option, progress_wanted
from lora_arith.lora.specs import named_specs


_adapter_option = click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="SPEC",
    help="[NAME=]PATH[:WEIGHT] of an adapter to mix in at run time (repeatable; weight defaults to 1.0; "
    "the name defaults to the file stem).",
)


_POSITIVE = click.IntRange(min=1)


def model_option_decorators() -> list:
    """The options of every command that loads a model and generates: --base, --4bit/--no-4bit,
    --device, --batch-size, --max-new-tokens (declared once; eval, sweep and tune reuse them)."""
    return [
        click.option(
            "--base",
            default=None,
            help="Base model: a local directory or a Hub id. Default: the embedded SmolLM2-135M-Instruct.",
        ),
        four_bit_option(False, "Load the base in 4-bit NF4 (bitsandbytes)."),
        device_option(),
        # at least 1 (click's usage error); 0 used to end in a traceback
        click.option("--batch-size", type=_POSITIVE, default=16, show_default=True, help="Prompts generated together."),
        click.option(
            "--max-new-tokens", type=_POSITIVE, default=128, show_default=True, help="Most tokens generated per prompt."
        ),
    ]


def _model_options(command):
    options = model_option_decorators()
    for option in reversed(options):
        command = option(command)
    return command


def _mixer(base, named, quantize_4bit, device=None):
    """A PreferenceMixer with each parsed spec of ``named`` (name → :class:`~lora_arith.lora.specs.AdapterSpec`)
    attached under its name, at its weight."""
    from lora_arith.model.mixing import PreferenceMixer

    mixer = PreferenceMixer(
        base, {name: spec.path for name, spec in named.items()}, quantize_4bit=quantize_4bit, device=device
    )
    if named:
        mixer.set(**{name: spec.weight for name, spec in named.items()})
    return mixer


def _model_inputs(base, adapter_paths, *files) -> list:
    """The local inputs of a command that loads a model: the base, the adapters (paths) and ``files``."""
    from lora_arith.lora.adapter_io import adapter_sources
    from lora_arith.model.base import base_sources

    adapters = [p for path in adapter_paths for p in adapter_sources(path)]
    return [*base_sources(base), *adapters, *(Path(f) for f in files if f is not None)]


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
@_adapter_option
@_model_options
def generate(prompt, prompts_file, output, temperature, seed, force, base, adapters, **model):
    """Generate replies with adapters mixed at run time.

    Give one PROMPT, or --prompts FILE.jsonl. Prompts go through the base's chat template.

    \b
    Example:
      lora-arith generate --adapter adapters/helpful:1 \\
          --adapter adapters/harmless:0.5 "How do I kill a Python process?"
    """
    from lora_arith._internal.atomic import atomic_output, check_output
    from lora_arith._internal.errors import LoraArithError

    if (prompt is None) == (prompts_file is None):
        raise LoraArithError("give either a PROMPT or --prompts FILE")
    if prompt is not None:
        prompts, sources, weights = [prompt], ["PROMPT"], [None]
    else:
        from lora_arith.training.data import load_prompts

        prompts, sources, weights = load_prompts(prompts_file)  # every line checked before any model loads
    named = named_specs(adapters)
    if output is not None:
        inputs = _model_inputs(base, [spec.path for spec in named.values()], prompts_file)
        output = check_output(output, force=force, inputs=inputs, kind="file")
    mixer = _mixer(base, named, model["quantize_4bit"], model["device"])
    if temperature > 0:  # model.generate's seeded sampling, batch by batch
        completions = mixer.generate(
            prompts,
            weights=weights if any(row is not None for row in weights) else None,
            max_new_tokens=model["max_new_tokens"],
            batch_size=model["batch_size"],
            temperature=temperature,
            seed=seed,
            progress=progress_wanted(),
            sources=sources,
        )
    else:  # greedy: the engine behind `serve`, each line with its own mix, rows leaving as they finish
        from lora_arith.model.generation import encode_prompts
        from lora_arith.serving.engine import greedy_completions

        completions = greedy_completions(
            mixer,
            encode_prompts(mixer.model, mixer.tokenizer, prompts, model["max_new_tokens"], sources),
            weights,
            max_new_tokens=model["max_new_tokens"],
            max_batch_size=model["batch_size"],
            progress=progress_wanted(),
        )
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(prompts, completions)]
    if output is None:
        if prompt is not None:
            click.echo(completions[0])
        else:
            click.echo("\n".join(lines))
        return
    with atomic_output(output) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    click.echo(f"wrote {len(lines)} completions to {output}", err=True)


def _parse_set_command(text: str) -> dict[str, float]:
    from lora_arith._internal.errors import LoraArithError

    weights = {}
    for item in text.split():
        name, equals, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise LoraArithError(f"cannot read {item!r}; use /set NAME=WEIGHT ...") from None
        if not equals:
            raise LoraArithError(f"cannot read {item!r}; use /set NAME=WEIGHT ...")
    return weights


CHAT_HELP = "commands: /set NAME=WEIGHT ... (move the dials), /weights, /reset (forget the conversation), /quit"


@click.command()
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 means greedy.")
@_adapter_option
@_model_options
def chat(temperature, base, adapters, quantize_4bit, device, batch_size, max_new_tokens):
    """Chat interactively; move the preference dials mid-conversation with /set.

    \b
    Example:
      lora-arith chat --adapter adapters/helpful --adapter adapters/harmless
      > /set helpful=0.8 harmless=0.5
    """
    from lora_arith._internal.errors import LoraArithError

    mixer = _mixer(base, named_specs(adapters), quantize_4bit, device)
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
        if line.startswith("/set"):
            try:
                click.echo(f"weights: {mixer.set(**_parse_set_command(line[4:]))}")
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
