"""Commands that load the base model and mix adapters at run time: generate, chat (eval, sweep and tune
live in :mod:`lora_arith.cli.eval_commands`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lora_arith.cli import main, progress_wanted


_adapter_option = click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="SPEC",
    help="[NAME=]PATH[:WEIGHT] of an adapter to mix in at run time (repeatable; weight defaults to 1.0; "
    "the name defaults to the file stem).",
)


def _model_options(command):
    options = [
        click.option(
            "--base",
            default=None,
            help="Base model: a local directory or a Hub id. Default: the embedded SmolLM2-135M-Instruct.",
        ),
        click.option("--4bit", "quantize_4bit", is_flag=True, help="Load the base in 4-bit NF4 (bitsandbytes)."),
        click.option("--batch-size", default=16, show_default=True, help="Prompts generated together."),
        click.option("--max-new-tokens", default=128, show_default=True, help="Tokens generated per prompt at most."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _mixer(base, adapter_specs, quantize_4bit):
    """A PreferenceMixer with each ``[NAME=]PATH[:WEIGHT]`` spec attached under NAME (default: its file stem)."""
    from lora_arith.mixing import PreferenceMixer, named_specs

    named = named_specs(adapter_specs)
    mixer = PreferenceMixer(base, {name: spec.path for name, spec in named.items()}, quantize_4bit=quantize_4bit)
    if named:
        mixer.set(**{name: spec.weight for name, spec in named.items()})
    return mixer


def _read_prompts(path: Path) -> list:
    from lora_arith.errors import LoraArithError

    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LoraArithError(f"{path}:{number}: expected a JSON object with a 'prompt'") from None
    return prompts


def _read_prompt_weights(path: Path) -> list:
    """The optional 'weights' object (name → η) of each prompt line of ``path``, ``None`` where absent;
    lines as :func:`_read_prompts` reads them."""
    from lora_arith.errors import LoraArithError

    weights = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line).get("weights")
            if row is not None and not isinstance(row, dict):
                raise LoraArithError(f"{path}:{number}: 'weights' must be an object NAME: WEIGHT")
            weights.append(row)
    return weights


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file with a 'prompt' per line, and optionally 'weights' {NAME: WEIGHT} mixing that prompt.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write JSONL lines {prompt, completion} here (default: stdout).",
)
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 means greedy.")
@click.option("--seed", default=0, show_default=True, help="Random seed for sampling.")
@click.option("-f", "--force", is_flag=True, help="Overwrite --out if it exists.")
@_adapter_option
@_model_options
def generate(
    prompt, prompts_file, out, temperature, seed, force, base, adapters, quantize_4bit, batch_size, max_new_tokens
):
    """Generate replies with adapters mixed at run time.

    Give one PROMPT, or --prompts FILE.jsonl. Prompts go through the base's chat template.

    \b
    Example:
      lora-arith generate --adapter adapters/helpful.safetensors:1 \\
          --adapter adapters/harmless.safetensors:0.5 "How do I kill a Python process?"
    """
    from lora_arith.atomic import atomic_output
    from lora_arith.errors import LoraArithError

    if (prompt is None) == (prompts_file is None):
        raise LoraArithError("give either a PROMPT or --prompts FILE")
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    if out is not None:
        from lora_arith.atomic import check_output

        check_output(out, force)
    mixer = _mixer(base, adapters, quantize_4bit)
    weights = _read_prompt_weights(prompts_file) if prompts_file is not None else []
    completions = mixer.generate(
        prompts,
        weights=weights if any(row is not None for row in weights) else None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        progress=progress_wanted(),
    )
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(prompts, completions)]
    if out is None:
        if prompt is not None:
            click.echo(completions[0])
        else:
            click.echo("\n".join(lines))
        return
    with atomic_output(out, directory=False, force=force) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    click.echo(f"wrote {len(lines)} completions to {out}", err=True)


def _parse_set_command(text: str) -> dict[str, float]:
    from lora_arith.errors import LoraArithError

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


@main.command()
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 means greedy.")
@_adapter_option
@_model_options
def chat(temperature, base, adapters, quantize_4bit, batch_size, max_new_tokens):
    """Chat interactively; move the preference dials mid-conversation with /set.

    \b
    Example:
      lora-arith chat --adapter adapters/helpful.safetensors --adapter adapters/harmless.safetensors
      > /set helpful=0.8 harmless=0.5
    """
    from lora_arith.errors import LoraArithError

    mixer = _mixer(base, adapters, quantize_4bit)
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
        reply = mixer.generate([list(messages)], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        messages.append({"role": "assistant", "content": reply})
        click.echo(f"assistant: {reply}")
