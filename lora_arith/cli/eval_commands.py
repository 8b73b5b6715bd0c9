"""Commands that evaluate mixes: eval, sweep and tune. They share one set of options
(:func:`eval_options`, gathered into an :class:`EvalOptions`)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lora_arith.cli.options import force_option, output_option, progress_wanted
from lora_arith.cli.model_commands import _adapter_option, _mixer, _model_inputs, model_option_decorators
from lora_arith.lora.specs import AdapterSpec, fixed_weights, named_paths, named_specs


@dataclass
class EvalOptions:
    """The options eval, sweep and tune share: inputs, model, generation, judge and output."""

    prompt_files: tuple = ()
    pair_files: tuple = ()
    beta: float = 0.1
    limit: int | None = None
    max_pairs: int | None = None
    out: Path = Path("out")
    force: bool = False
    base: str | None = None
    quantize_4bit: bool = False
    device: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 128
    judge: str = "strmatch"
    judge_model: str = "judge"
    _inputs: tuple | None = field(default=None, repr=False)

    def inputs(self):
        """(prompts, pairs) read from the files, ``--limit``/``--max-pairs`` applied."""
        if self._inputs is None:
            from lora_arith.training.data import load_pairs
            from lora_arith._internal.errors import LoraArithError
            from lora_arith.evaluation.evaluate import load_eval_prompts

            if not self.prompt_files and not self.pair_files:
                raise LoraArithError("give --prompts and/or --pairs")
            prompts = load_eval_prompts(self.prompt_files) if self.prompt_files else []
            if self.limit is not None:
                prompts = [
                    p
                    for kind in ("unsafe", "safe", "ordinary")
                    for p in [q for q in prompts if q.kind == kind][: self.limit]
                ]
            pairs = [pair for path in self.pair_files for pair in load_pairs([path])[0][: self.max_pairs]]
            self._inputs = (prompts, pairs)
        return self._inputs

    def checked_output(self, kind: str, adapters=(), *, resume: bool = False):
        """The output, checked once against every input (base, ``adapters`` paths, prompt and pair files);
        ``resume``: an existing earlier output of ``kind`` may be continued without --force."""
        from lora_arith._internal.atomic import check_output

        inputs = _model_inputs(self.base, [str(a) for a in adapters], *self.prompt_files, *self.pair_files)
        force = self.force or (resume and Path(self.out).exists())
        return check_output(self.out, force=force, inputs=inputs, kind=kind)

    def make_judge(self):
        from lora_arith.evaluation.judge import make_judge

        return make_judge(self.judge, self.judge_model)

    def mixer(self, adapters: dict[str, str]):
        from lora_arith.model.mixing import PreferenceMixer

        return PreferenceMixer(self.base, adapters, quantize_4bit=self.quantize_4bit, device=self.device)

    def evaluation_kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, beta=self.beta)

    def public_base(self) -> str:
        """The base's name without local folders (for shareable reports)."""
        if self.base is None:
            return "default (SmolLM2-135M-Instruct)"
        path = Path(self.base)
        return path.name if path.exists() else self.base

    def settings(self, adapters: dict[str, str]) -> dict[str, Any]:
        """Everything that decides the results, hashed (inputs by content) for resuming."""
        from lora_arith.lora.adapter_io import open_adapter

        prompts, pairs = self.inputs()
        content = json.dumps(
            [[p.prompt, p.kind, p.type] for p in prompts] + [[q.prompt, q.chosen, q.rejected] for q in pairs],
            sort_keys=True,
            ensure_ascii=False,
        )
        return {
            "inputs_sha256": hashlib.sha256(content.encode()).hexdigest(),
            "adapters": {name: open_adapter(path).sha256 for name, path in adapters.items()},
            "base": self.base,
            "quantize_4bit": self.quantize_4bit,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "beta": self.beta,
            "judge": self.make_judge().name,
        }


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
            help="Preference-pair JSONL (prompt/chosen/rejected) for reward accuracy and log-prob margin. Repeatable.",
        ),
        click.option("--beta", default=0.1, show_default=True, help="DPO β for the implicit reward."),
        click.option("--limit", type=int, default=None, help="Use only the first N prompts of each kind."),
        click.option("--max-pairs", type=int, default=None, help="Use only the first N pairs of each --pairs file."),
        output_option("Output directory.", hidden_aliases=("--out",), required=True, type=click.Path(path_type=Path)),
        force_option("Replace the output directory if it is an earlier output of this command (or empty)."),
        *model_option_decorators(),
        click.option(
            "--judge",
            default="strmatch",
            show_default=True,
            help="Who decides what is a refusal: strmatch (lora_arith/evaluation/refusal.py), MODULE:CALLABLE "
            "(f(prompt, completion) -> bool or XSTest class), or the URL of an OpenAI-compatible endpoint "
            "(http://HOST:PORT/v1) asked to classify each reply with XSTest's three classes.",
        ),
        click.option("--judge-model", default="judge", show_default=True, help="Model name sent to a URL judge."),
    ]
    names = [
        "prompt_files", "pair_files", "beta", "limit", "max_pairs", "output", "force", "base",
        "quantize_4bit", "device", "batch_size", "max_new_tokens", "judge", "judge_model",
    ]  # fmt: skip

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        values["out"] = values.pop("output")
        options = EvalOptions(**values)
        return command(*args, options=options, **kwargs)

    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


@click.command("eval")
@eval_options
@_adapter_option
def evaluate_command(options: EvalOptions, adapters):
    """Measure refusal, over-refusal and DPO metrics of the base with adapters mixed in.

    Writes OUT/results.json, OUT/summary.md and OUT/completions.jsonl. Every rate carries its n
    and a Wilson 95% interval; the judge that scored the replies is recorded. The default
    refusal detector is documented in lora_arith/evaluation/refusal.py.
    """
    from lora_arith._internal.atomic import atomic_output
    from lora_arith.evaluation.evaluate import evaluate, summary_table

    named = named_specs(adapters)
    output = options.checked_output("eval", [spec.path for spec in named.values()])
    prompts, pairs = options.inputs()
    judge = options.make_judge()
    mixer = _mixer(options.base, named, options.quantize_4bit, options.device)
    result = evaluate(
        mixer.model, mixer.tokenizer, prompts, pairs, progress=progress_wanted(), judge=judge,
        **options.evaluation_kwargs(),
    )  # fmt: skip
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


_vector_option = click.option(
    "--vector",
    "vectors",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A preference vector (repeatable; two, three or more).",
)


@click.command()
@_vector_option
@click.option("--grid", default="-1,-0.5,0,0.5,1", show_default=True, help="Weights η tried for every vector.")
@click.option(
    "--fix",
    "fix",
    multiple=True,
    metavar="NAME=WEIGHT",
    help="With three or more vectors: the weight at which the vectors not on a heatmap's axes are held "
    "(repeatable; default: the grid value nearest 0).",
)
@click.option(
    "--points-per-batch",
    default=10,
    show_default=True,
    help="Grid points generated together in one batch (per-row weights; same texts as one at a time; "
    "--batch-size × this many rows).",
)
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
    from lora_arith.evaluation.sweep import PointLog, evaluate_points, grid_points, heatmap_planes, parse_grid, point_key
    from lora_arith.evaluation.sweep import sweep_row, write_sweep

    named = named_paths(vectors)
    options.checked_output("sweep", named.values(), resume=True)
    values = parse_grid(grid)
    fixed = fixed_weights(fix, list(named))
    heatmap_planes(list(named), {n: values for n in named}, fixed)  # check --fix before any work
    prompts, pairs = options.inputs()
    judge = options.make_judge()
    points = grid_points(list(named), values)
    log = PointLog(options.out, {**options.settings(named), "points": points}, force=options.force)
    todo = [p for p in points if point_key(p) not in log.done]
    if len(todo) < len(points):
        click.echo(f"resuming: {len(points) - len(todo)} of {len(points)} points already done", err=True)
    if todo:
        mixer = options.mixer(named)
        evaluate_points(
            mixer, todo, prompts, pairs, judge=judge, points_per_batch=points_per_batch, on_point=log.add,
            progress=progress_wanted(), **options.evaluation_kwargs(),
        )  # fmt: skip
    rows = [sweep_row(p, log.done[point_key(p)]) for p in points]
    written = write_sweep(rows, list(named), options.out, fixed=fixed)
    click.echo(f"evaluated {len(rows)} grid points; wrote {', '.join(p.name for p in written)} to {options.out}")


@click.command()
@_vector_option
@click.option("--maximize", "maximize", default=None, help="The metric to maximise (e.g. refusal_rate).")
@click.option("--minimize", "minimize", default=None, help="The metric to minimise, instead of --maximize.")
@click.option(
    "--subject-to",
    "subject_to",
    required=True,
    multiple=True,
    help="A constraint, e.g. 'compliance_rate>=0.9' (repeatable: every one must hold).",
)
@click.option(
    "--bounds",
    multiple=True,
    metavar="[NAME=]LOW,HIGH",
    help="Search range of η (for every vector, or NAME=LOW,HIGH for one; repeatable). Default: -1,2.",
)
@click.option("--budget", default=40, show_default=True, help="Points evaluated on the tuning prompts at most.")
@click.option("--split", default=0.5, show_default=True, help="Share of each prompt kind used for tuning.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split.")
@click.option(
    "--compare",
    multiple=True,
    metavar="NAME=PATH[:WEIGHT]",
    help="An adapter evaluated the same way, for comparison (e.g. the union baseline; repeatable).",
)
@click.option("--points-per-batch", default=8, show_default=True, help="Points generated together in one batch.")
@eval_options
def tune(vectors, maximize, minimize, subject_to, bounds, budget, split, seed, compare, points_per_batch, options):
    """Find the weights η that maximise one rate subject to a constraint on another.

    The prompts (with --prompts; kinds unsafe, safe and optional ordinary) are split, stratified
    by kind, into a tuning part and a held-out part. A coarse grid then refinement searches η on
    the tuning part; the chosen η is measured on the held-out part. Metrics: refusal_rate,
    compliance_rate, ordinary_compliance_rate (and reward_accuracy, logprob_margin with --pairs).

    Writes OUT/report.md, OUT/report.json, OUT/frontier.png and OUT/adapter/ (the chosen mix as
    a PEFT adapter, written by combine).

    \b
    Example:
      lora-arith tune --vector helpful=adapters/helpful \\
          --vector harmless=adapters/harmless \\
          --prompts ../shared/data/eval/xstest_prompts.jsonl --prompts ordinary.jsonl \\
          --maximize refusal_rate --subject-to 'compliance_rate>=0.9' --bounds=-1,2 -o tuned/
    """
    from lora_arith._internal.atomic import atomic_output
    from lora_arith.lora.combine import combine
    from lora_arith._internal.errors import LoraArithError
    from lora_arith.evaluation.sweep import evaluate_points, flatten
    from lora_arith.evaluation import tune as tuning

    if (maximize is None) == (minimize is None):
        raise LoraArithError("give one of --maximize METRIC or --minimize METRIC")
    objective = tuning.metric_key(maximize or minimize)
    constraint = tuning.parse_constraints(subject_to)
    named = named_paths(vectors)
    compared = named_specs(compare) if compare else {}
    clash = sorted(set(compared) & set(named))
    if clash:
        raise LoraArithError(f"--compare and --vector share the name {clash[0]}")
    ranges = tuning.parse_bounds(bounds, list(named), (-1.0, 2.0))
    output = options.checked_output("tune", [*named.values(), *(spec.path for spec in compared.values())])
    prompts, pairs = options.inputs()
    if not prompts and objective not in ("reward_accuracy", "logprob_margin"):
        raise LoraArithError("tune needs --prompts for the refusal and compliance rates")
    tuning_prompts, held_out = tuning.split_prompts(prompts, split, seed)
    for key in (objective, *constraint.keys):
        kind = {"refusal_rate_unsafe": "unsafe", "compliance_rate_safe": "safe", "ordinary_compliance_rate": "ordinary"}
        if key in kind and not any(p.kind == kind[key] for p in prompts):
            raise LoraArithError(f"{key} needs {kind[key]} prompts, and --prompts has none")
    judge = options.make_judge()
    mixer = options.mixer({**named, **{name: spec.path for name, spec in compared.items()}})
    zeros = {name: 0.0 for name in mixer.names}
    mixer.set(**zeros)

    def evaluate(points, items):
        full = [{**zeros, **point} for point in points]
        results = evaluate_points(
            mixer, full, items, pairs, judge=judge, points_per_batch=points_per_batch, **options.evaluation_kwargs()
        )
        return [flatten(result) for result in results]

    progress = progress_wanted()
    calls = iter(range(1, 10**6))

    def evaluate_tuning(points):
        rows = evaluate(points, tuning_prompts)
        if progress:
            click.echo(f"round {next(calls)}: {len(points)} points", err=True)
        return rows

    result = tuning.search(evaluate_tuning, ranges, objective, constraint, budget=budget, minimize=minimize is not None)
    if result.chosen is None:
        best = result.best_constraint
        if len(constraint.items) == 1:
            value = best.get(constraint.items[0].key)
            raise LoraArithError(
                f"no evaluated point satisfies {constraint}: the best {constraint.items[0].metric} reached was "
                f"{'n/a' if value is None else f'{value:.3f}'} at {tuning.eta_text(best['eta'])}"
            )
        raise LoraArithError(
            f"no evaluated point satisfies {constraint}: the closest was {tuning.eta_text(best['eta'])}, "
            f"with {constraint.values_text(best)}"
        )
    chosen_eta = result.chosen["eta"]
    compare_points = {name: {**zeros, name: spec.weight} for name, spec in compared.items()}
    all_points = [chosen_eta] + list(compare_points.values())
    held_rows = evaluate(all_points, held_out)
    tuning_compare = evaluate(list(compare_points.values()), tuning_prompts) if compare_points else []
    report = {
        "objective": {"metric": maximize or minimize, "key": objective, "direction": "max" if maximize else "min"},
        "constraint": str(constraint),
        "bounds": {n: list(b) for n, b in ranges.items()},
        "budget": budget,
        "split": split,
        "seed": seed,
        "judge": judge.name,
        "base": options.public_base(),
        "max_new_tokens": options.max_new_tokens,
        "batch_size": options.batch_size,
        "n_prompts": {
            "tuning": {k: sum(p.kind == k for p in tuning_prompts) for k in ("unsafe", "safe", "ordinary")},
            "held_out": {k: sum(p.kind == k for p in held_out) for k in ("unsafe", "safe", "ordinary")},
        },
        "vectors": {name: Path(path).name if Path(path).is_absolute() else path for name, path in named.items()},
        "chosen": {"eta": chosen_eta, "tuning": _strip(result.chosen), "held_out": held_rows[0]},
        "compare": {
            name: {"weight": compared[name].weight, "tuning": tune_row, "held_out": held_row}
            for name, tune_row, held_row in zip(compare_points, tuning_compare, held_rows[1:])
        },
        "evaluated": result.evaluated,
    }
    combination = combine([AdapterSpec(named[n], w) for n, w in chosen_eta.items()])
    with atomic_output(output) as temporary:
        combination.save(temporary / "adapter")
        (temporary / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        (temporary / "report.md").write_text(_tune_markdown(report, objective, constraint))
        x_key = next((key for key in constraint.keys if key != objective), "compliance_rate_safe")
        tuning.plot_frontier(
            result.evaluated,
            result.chosen,
            {name: row for name, row in zip(compare_points, tuning_compare)},
            x_key,
            objective,
            constraint,
            temporary / "frontier.png",
            title=f"tune: {' + '.join(named)} on the tuning prompts ({judge.name})",
        )
    click.echo(_tune_markdown(report, objective, constraint))


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("eta", "round")}


def _tune_markdown(report: dict[str, Any], objective: str, constraint) -> str:
    from lora_arith.evaluation.evaluate import rate_text

    def cells(row):
        return [
            rate_text(row, "refusal_rate_unsafe", "n_unsafe"),
            rate_text(row, "compliance_rate_safe", "n_safe"),
            rate_text(row, "ordinary_compliance_rate", "n_ordinary"),
        ]

    from lora_arith.evaluation.tune import eta_text

    chosen = report["chosen"]
    lines = [
        f"# tune: {report['objective']['direction']} {report['objective']['metric']} subject to {report['constraint']}",
        "",
        f"Chosen η: **{eta_text(chosen['eta'])}** (bounds {report['bounds']}, {len(report['evaluated'])} points "
        f"evaluated on the tuning prompts, budget {report['budget']}).",
        f"Base: {report['base']}; max_new_tokens {report['max_new_tokens']}; judge: {report['judge']}; "
        f"split {report['split']:g} (seed {report['seed']}), stratified by kind: tuning {report['n_prompts']['tuning']}, "
        f"held-out {report['n_prompts']['held_out']}.",
        "",
        "| model | prompts | refusal (unsafe) | compliance (safe) | compliance (ordinary) |",
        "| --- | --- | --- | --- | --- |",
        "| chosen: " + eta_text(chosen["eta"]) + " | held-out | " + " | ".join(cells(chosen["held_out"])) + " |",
        "| chosen: " + eta_text(chosen["eta"]) + " | tuning | " + " | ".join(cells(chosen["tuning"])) + " |",
    ]
    for name, entry in report["compare"].items():
        lines.append(f"| {name} ×{entry['weight']:g} | held-out | " + " | ".join(cells(entry["held_out"])) + " |")
        lines.append(f"| {name} ×{entry['weight']:g} | tuning | " + " | ".join(cells(entry["tuning"])) + " |")
    lines += ["", "Rates: Wilson 95% intervals and n. Files: adapter/ (the chosen mix), frontier.png, report.json.", ""]
    return "\n".join(lines)
