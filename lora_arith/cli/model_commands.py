"""Commands that load the base model and mix adapters at run time: generate, chat, eval, sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lora_arith.cli import device_option, force_option, four_bit_option, main, output_option, progress_wanted


_adapter_option = click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="SPEC",
    help="[NAME=]PATH[:WEIGHT] of an adapter to mix in at run time (repeatable; weight defaults to 1.0; "
    "the name defaults to the file stem).",
)


_POSITIVE = click.IntRange(min=1)


def _model_options(command):
    options = [
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
    for option in reversed(options):
        command = option(command)
    return command


def _mixer(base, adapter_specs, quantize_4bit, device=None):
    """A PreferenceMixer with each ``[NAME=]PATH[:WEIGHT]`` spec attached under NAME (default: its file stem)."""
    from lora_arith.mixing import PreferenceMixer, named_specs

    named = named_specs(adapter_specs)
    mixer = PreferenceMixer(
        base, {name: spec.path for name, spec in named.items()}, quantize_4bit=quantize_4bit, device=device
    )
    if named:
        mixer.set(**{name: spec.weight for name, spec in named.items()})
    return mixer


def _model_inputs(base, adapter_specs, *files) -> list:
    """The local inputs of a command that loads a model: the base, the adapters and ``files``."""
    from lora_arith.adapter_io import adapter_sources
    from lora_arith.base_model import base_sources
    from lora_arith.mixing import named_specs

    adapters = [p for spec in named_specs(adapter_specs).values() for p in adapter_sources(spec.path)]
    return [*base_sources(base), *adapters, *(Path(f) for f in files if f is not None)]


@main.command()
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
    from lora_arith.atomic import atomic_output, check_output
    from lora_arith.errors import LoraArithError

    if (prompt is None) == (prompts_file is None):
        raise LoraArithError("give either a PROMPT or --prompts FILE")
    if prompt is not None:
        prompts, sources = [prompt], ["PROMPT"]
    else:
        from lora_arith.data import load_prompt_weights, load_prompts

        prompts, sources = load_prompts(prompts_file)  # every line checked before any model loads
    if output is not None:
        output = check_output(output, force=force, inputs=_model_inputs(base, adapters, prompts_file), kind="file")
    mixer = _mixer(base, adapters, model["quantize_4bit"], model["device"])
    weights = load_prompt_weights(prompts_file) if prompts_file is not None else []
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
def chat(temperature, base, adapters, quantize_4bit, device, batch_size, max_new_tokens):
    """Chat interactively; move the preference dials mid-conversation with /set.

    \b
    Example:
      lora-arith chat --adapter adapters/helpful --adapter adapters/harmless
      > /set helpful=0.8 harmless=0.5
    """
    from lora_arith.errors import LoraArithError

    mixer = _mixer(base, adapters, quantize_4bit, device)
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


def _eval_options(command):
    options = [
        click.option(
            "--prompts",
            "prompt_files",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False),
            help="JSONL with 'prompt' and boolean 'should_refuse' (XSTest style). Repeatable.",
        ),
        click.option(
            "--pairs",
            "pair_files",
            multiple=True,
            help="Preference-pair JSONL (prompt/chosen/rejected) for reward accuracy and log-prob margin. Repeatable.",
        ),
        click.option("--beta", default=0.1, show_default=True, help="DPO β for the implicit reward."),
        click.option("--limit", type=int, default=None, help="Use only the first N should-refuse and N other prompts."),
        click.option("--max-pairs", type=int, default=None, help="Use only the first N pairs of each --pairs file."),
        output_option("Output directory.", hidden_aliases=("--out",), required=True, type=click.Path(path_type=Path)),
        force_option("Replace the output directory if it is an earlier output of this command (or empty)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_eval_inputs(prompt_files, pair_files, limit, max_pairs):
    from lora_arith.data import load_pairs
    from lora_arith.errors import LoraArithError
    from lora_arith.evaluation import load_eval_prompts

    if not prompt_files and not pair_files:
        raise LoraArithError("give --prompts and/or --pairs")
    prompts = load_eval_prompts(prompt_files) if prompt_files else []
    if limit is not None:
        prompts = _balanced_head(prompts, limit)
    pairs = [pair for path in pair_files for pair in load_pairs([path])[0][:max_pairs]]
    return prompts, pairs


def _balanced_head(prompts, limit):
    """The first ``limit`` should-refuse prompts and the first ``limit`` others."""
    unsafe = [p for p in prompts if p.should_refuse][:limit]
    safe = [p for p in prompts if not p.should_refuse][:limit]
    return unsafe + safe


@main.command("eval")
@_eval_options
@_adapter_option
@_model_options
def evaluate_command(
    prompt_files,
    pair_files,
    beta,
    limit,
    max_pairs,
    output,
    force,
    base,
    adapters,
    quantize_4bit,
    device,
    batch_size,
    max_new_tokens,
):
    """Measure refusal, over-refusal and DPO metrics of the base with adapters mixed in.

    Writes OUT/results.json, OUT/summary.md and OUT/completions.jsonl. The refusal
    detector is documented in lora_arith/refusal.py.
    """
    from lora_arith.atomic import atomic_output, check_output
    from lora_arith.evaluation import evaluate, summary_table

    output = check_output(
        output, force=force, inputs=_model_inputs(base, adapters, *prompt_files, *pair_files), kind="eval"
    )
    prompts, pairs = _load_eval_inputs(prompt_files, pair_files, limit, max_pairs)
    mixer = _mixer(base, adapters, quantize_4bit, device)
    result = evaluate(
        mixer.model,
        mixer.tokenizer,
        prompts,
        pairs,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        beta=beta,
        progress=progress_wanted(),
    )
    label = " + ".join(f"{w:g}·{n}" for n, w in mixer.weights.items()) or "base"
    completions = result.pop("completions", [])
    table = summary_table({label: result})
    with atomic_output(output) as temporary:
        (temporary / "results.json").write_text(
            json.dumps({"model": label, "weights": mixer.weights, **result}, indent=1)
        )
        (temporary / "summary.md").write_text(table + "\n")
        (temporary / "completions.jsonl").write_text(
            "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in completions)
        )
    click.echo(table)


@main.command()
@click.option(
    "--vector",
    "vectors",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A preference vector to sweep (repeatable).",
)
@click.option("--grid", default="-1,-0.5,0,0.5,1", show_default=True, help="Weights η tried for every vector.")
@_eval_options
@_model_options
def sweep(
    vectors,
    grid,
    prompt_files,
    pair_files,
    beta,
    limit,
    max_pairs,
    output,
    force,
    base,
    quantize_4bit,
    device,
    batch_size,
    max_new_tokens,
):
    """Evaluate every combination of weights over the grid; write CSV, JSON and heatmaps.

    The base is loaded once and reused for every grid point; only the weights change.

    \b
    Example:
      lora-arith sweep --vector helpful=adapters/helpful \\
          --vector harmless=adapters/harmless --grid=-1,-0.5,0,0.5,1 \\
          --prompts ../shared/data/eval/xstest_prompts.jsonl -o sweep/
    """
    from lora_arith.atomic import atomic_output, check_output
    from lora_arith.errors import LoraArithError
    from lora_arith.evaluation import evaluate
    from lora_arith.mixing import PreferenceMixer
    from lora_arith.sweep import parse_grid, run_sweep, write_sweep

    named = {}
    for item in vectors:
        name, equals, path = item.partition("=")
        if not equals or not name or not path:
            raise LoraArithError(f"cannot read --vector {item!r}; use NAME=PATH")
        if name in named:
            raise LoraArithError(f"--vector {name} is given twice")
        named[name] = path
    values = parse_grid(grid)
    inputs = _model_inputs(base, named.values(), *prompt_files, *pair_files)
    output = check_output(output, force=force, inputs=inputs, kind="sweep")
    prompts, pairs = _load_eval_inputs(prompt_files, pair_files, limit, max_pairs)
    mixer = PreferenceMixer(base, named, quantize_4bit=quantize_4bit, device=device)

    def evaluate_point(current):
        return evaluate(
            current.model,
            current.tokenizer,
            prompts,
            pairs,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            beta=beta,
        )

    rows = run_sweep(mixer, values, evaluate_point, progress=progress_wanted())
    with atomic_output(output) as temporary:
        written = write_sweep(rows, mixer.names, temporary)
    click.echo(f"evaluated {len(rows)} grid points; wrote {', '.join(p.name for p in written)} to {output}")
