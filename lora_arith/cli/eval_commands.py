"""Commands that evaluate mixes: eval, sweep and tune. They share one set of options
(:func:`eval_options`, gathered into an :class:`EvalOptions`); each parses, calls one library
function of :mod:`lora_arith.evaluation` and prints."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lora_arith.cli.options import adapter_option, force_option, model_option_decorators, option_group
from lora_arith.cli.options import output_option, progress_wanted
from lora_arith.evaluation.config import EvalConfig
from lora_arith.lora.specs import fixed_weights, named_paths, named_specs
from lora_arith.training.data import LABELS
from lora_arith._internal.wording import plural

__all__ = ["EvalOptions", "eval_options", "evaluate_command", "sweep", "tune"]


@dataclass
class EvalOptions:
    """The options eval, sweep and tune share: how to evaluate (``config``), on what, and where to write."""

    config: EvalConfig
    prompt_files: tuple = ()
    pair_files: tuple = ()
    limit: int | None = None
    max_pairs: int | None = None
    label: str | None = None
    out: Path = Path("out")
    force: bool = False

    def inputs(self) -> dict[str, Any]:
        """The library keywords for the inputs and the config."""
        return dict(
            prompts=self.prompt_files, pairs=self.pair_files, limit=self.limit, max_pairs=self.max_pairs,
            label=self.label, config=self.config,
        )  # fmt: skip

    def checked_output(self, kind: str, adapters=()):
        """The output, checked once against every input before any work."""
        from lora_arith._internal.atomic import check_output

        sources = self.config.sources(adapters, [*self.prompt_files, *self.pair_files])
        return check_output(self.out, force=self.force, inputs=sources, kind=kind)


def _log(text: str) -> None:
    click.echo(text, err=True)


def eval_options(command):
    """Add the options eval, sweep and tune share; the command receives them as ``options``."""
    decorators = [
        click.option(
            "--prompts",
            "prompt_files",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False),
            help="JSONL with 'prompt' and boolean 'should_refuse' (XSTest style), or \"kind\": \"ordinary\" "
            "(requests nothing should refuse; see examples/ordinary_prompts.py). Repeatable.",
        ),
        click.option(
            "--pairs",
            "pair_files",
            multiple=True,
            metavar="SPEC",
            help="Preference-pair JSONL (prompt/chosen/rejected) for reward accuracy and log-prob margin. Repeatable.",
        ),
        click.option("--beta", default=0.1, show_default=True, help="DPO β for the implicit reward."),
        click.option("--limit", type=int, default=None, help="Use only the first N prompts of each kind."),
        click.option("--max-pairs", type=int, default=None, help="Use only the first N pairs of each --pairs file."),
        click.option(
            "--label",
            type=click.Choice(sorted(LABELS)),
            default=None,
            help="For --pairs files of PKU-SafeRLHF records: the preference that picks the chosen reply "
            "(as train's --label).",
        ),
        output_option("Output directory.", hidden_aliases=("--out",), required=True, type=click.Path(path_type=Path)),
        force_option("Replace the output directory if it is an earlier output of this command (or empty)."),
        *model_option_decorators(),
        click.option(
            "--judge",
            default="strmatch",
            show_default=True,
            help="Who decides what is a refusal: strmatch (lora_arith/evaluation/refusal.py), MODULE:CALLABLE "
            "(f(prompt, completion) -> bool or XSTest class; MODULE installed or MODULE.py in the current folder), or the URL of an OpenAI-compatible endpoint "
            "(http://HOST:PORT/v1) asked to classify each reply with XSTest's three classes.",
        ),
        click.option("--judge-model", default="judge", show_default=True, help="Model name sent to a URL judge."),
    ]
    settings = ["beta", "base", "quantize_4bit", "device", "batch_size", "max_new_tokens", "judge", "judge_model"]
    inputs = ["prompt_files", "pair_files", "limit", "max_pairs", "label", "force"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        config = EvalConfig(**{name: kwargs.pop(name) for name in settings})
        options = EvalOptions(config, **{name: kwargs.pop(name) for name in inputs}, out=kwargs.pop("output"))
        return command(*args, options=options, **kwargs)

    return option_group(*decorators)(wrapper)


@click.command("eval")
@eval_options
@adapter_option
def evaluate_command(options: EvalOptions, adapters):
    """Measure refusal, over-refusal and DPO metrics of the base with adapters mixed in.

    Writes OUT/results.json, OUT/summary.md and OUT/completions.jsonl. Every rate carries its n
    and a Wilson 95% interval; the judge that scored the replies is recorded. The default
    refusal detector is documented in lora_arith/evaluation/refusal.py.
    """
    from lora_arith.evaluation.evaluate import evaluate

    named = named_specs(adapters)
    output = options.checked_output("eval", [spec.path for spec in named.values()])
    result = evaluate(named, progress=progress_wanted(), **options.inputs())
    result.save(output)
    click.echo(result.table)
    click.echo(f"wrote results.json, summary.md and completions.jsonl to {options.out}")


_vector_option = click.option(
    "--vector",
    "vectors",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A preference vector (repeatable; one or more).",
)
_points_per_batch_option = click.option(
    "--points-per-batch",
    default=10,
    show_default=True,
    help="Grid points generated together in one batch (per-row weights; same texts as one at a time; "
    "--batch-size × this many rows).",
)


@click.command()
@_vector_option
@click.option("--grid", default="-1,-0.5,0,0.5,1", show_default=True, help="Weights η tried for every vector.")
@click.option(
    "--fix",
    "fix",
    multiple=True,
    metavar="NAME=WEIGHT",
    help="With three or more vectors: the weight, one of --grid's, at which the vectors not on a heatmap's "
    "axes are held (repeatable; default: the grid value nearest 0).",
)
@_points_per_batch_option
@eval_options
def sweep(vectors, grid, fix, points_per_batch, options: EvalOptions):
    """Evaluate every combination of weights over the grid; write CSV, JSON and heatmaps.

    The base is loaded once; several grid points share every generation batch. Each finished
    point is appended to OUT/points.jsonl: run the same command again after an interruption and
    it resumes (checked against a hash of the settings and inputs); --force starts over.

    \b
    Example:
      lora-arith sweep --vector helpful=adapters/helpful \\
          --vector harmless=adapters/harmless --grid=-1,-0.5,0,0.5,1 \\
          --prompts ../shared/data/eval/xstest_prompts.jsonl -o sweep/
    """
    from lora_arith.evaluation.sweep import sweep as run_sweep

    named = named_paths(vectors)
    result = run_sweep(
        named, options.out, grid=grid, fix=fixed_weights(fix, list(named)), points_per_batch=points_per_batch,
        force=options.force, progress=progress_wanted(), log=_log, **options.inputs(),
    )  # fmt: skip
    names = ", ".join(path.name for path in result.files)
    done = len(result.rows) - result.resumed
    before = f" ({result.resumed} done by an earlier run)" if result.resumed else ""
    click.echo(f"evaluated {plural(done, 'grid point')}{before}; wrote {names} to {options.out}")


_tune_options = [
    _vector_option,
    click.option("--maximize", "maximize", default=None, help="The metric to maximise (e.g. refusal_rate)."),
    click.option("--minimize", "minimize", default=None, help="The metric to minimise, instead of --maximize."),
    click.option(
        "--subject-to", "subject_to", required=True, multiple=True,
        help="A constraint, e.g. 'compliance_rate>=0.9' (repeatable: every one must hold).",
    ),
    click.option(
        "--bounds", multiple=True, metavar="[NAME=]LOW,HIGH",
        help="Search range of η (for every vector, or NAME=LOW,HIGH for one; repeatable). Default: -1,2.",
    ),
    click.option("--budget", default=40, show_default=True, help="Points evaluated on the tuning prompts at most."),
    click.option("--split", default=0.5, show_default=True, help="Share of each prompt kind (and of each --pairs file) used for tuning."),
    click.option("--seed", default=0, show_default=True, help="Seed of the split."),
    click.option(
        "--compare", multiple=True, metavar="NAME=PATH[:WEIGHT]",
        help="An adapter evaluated the same way, for comparison (e.g. the union baseline; repeatable).",
    ),
    _points_per_batch_option,
    eval_options,
]  # fmt: skip


@click.command()
@option_group(*_tune_options)
def tune(vectors, compare, options: EvalOptions, **search):
    """Find the weights η that maximise one rate subject to a constraint on another.

    The prompts (with --prompts; kinds unsafe, safe and optional ordinary) are split, stratified
    by kind, into a tuning part and a held-out part (--pairs likewise, by file). A coarse grid
    then refinement searches η on the tuning part; the chosen η is measured on the held-out part.
    Metrics: refusal_rate, compliance_rate, ordinary_compliance_rate (and reward_accuracy,
    logprob_margin with --pairs).

    Writes OUT/report.md, OUT/report.json, OUT/frontier.png and OUT/adapter/ (the chosen mix as
    a PEFT adapter, written by combine).

    \b
    Example:
      lora-arith tune --vector helpful=adapters/helpful \\
          --vector harmless=adapters/harmless \\
          --prompts ../shared/data/eval/xstest_prompts.jsonl --prompts ordinary.jsonl \\
          --maximize refusal_rate --subject-to 'compliance_rate>=0.9' --bounds=-1,2 -o tuned/
    """
    from lora_arith.evaluation.tune import tune as run_tune

    named = named_paths(vectors)
    compared = named_specs(compare) if compare else {}
    output = options.checked_output("tune", [*named.values(), *(spec.path for spec in compared.values())])
    result = run_tune(named, compare=compared, log=_log if progress_wanted() else None, **search, **options.inputs())
    result.save(output)
    click.echo(result.markdown)
    click.echo(f"wrote report.json, report.md, frontier.png and adapter/ to {options.out}")
