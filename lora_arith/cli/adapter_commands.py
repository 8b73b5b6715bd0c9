"""Commands that work on adapter files alone, without loading a model: combine, extract,
inspect, similarity, interference."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import click

from lora_arith.cli.options import force_option, option_group, output_option, progress_wanted
from lora_arith._internal.devices import DTYPE_NAMES
from lora_arith._internal.provenance import METHODS
from lora_arith._internal.wording import plural
from lora_arith.lora.specs import AdapterSpec, parse_specs

__all__ = ["combine", "extract", "inspect", "similarity", "interference", "convert"]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


_compression_options = option_group(
    click.option(
        "--method",
        type=click.Choice(METHODS),
        default="cat",
        show_default=True,
        help="cat: exact sum by concatenating factors (ranks add up). svd: optimal rank reduction by QR + SVD of a small core.",
    ),
    click.option(
        "--rank",
        type=int,
        default=None,
        help="With --method svd: rank of every output module (default: the largest input rank).",
    ),
    click.option(
        "--energy",
        type=float,
        default=None,
        help="With --method svd: per module, the smallest rank keeping at least this fraction (0-1] of the squared Frobenius norm.",
    ),
    click.option(
        "--dtype",
        type=click.Choice(DTYPE_NAMES),
        default=None,
        help="Output dtype (default: the inputs' dtype).",
    ),
    click.option("--allow-base-mismatch", is_flag=True, help="Combine adapters that name different base models."),
    force_option(),
    output_option(
        "Output: a directory (PEFT adapter) or a file ending in .safetensors (single-file form).",
        required=True,
        type=click.Path(path_type=Path),
    ),
)
"""The options of combine and extract: how the sum is made and written."""


def _run_combination(specs: list[AdapterSpec], output, method, rank, energy, dtype, allow_base_mismatch, force) -> None:
    from lora_arith._internal.provenance import hash_ahead

    hash_ahead(spec.weights_file for spec in specs)  # the recipe's hashes, computed while torch imports
    from lora_arith.lora.adapter_io import adapter_sources, output_kind
    from lora_arith._internal.atomic import check_output
    from lora_arith.lora.combine import combine

    # Checked before the work, against the local inputs; Combination.save does not check again.
    output = check_output(
        output, force=force, kind=output_kind(output), inputs=[p for s in specs for p in adapter_sources(s.path)]
    )
    result = combine(
        specs,
        method=method,
        rank=rank,
        energy=energy,
        dtype=dtype,
        allow_base_mismatch=allow_base_mismatch,
        progress=progress_wanted(),
    )
    written = result.save(output)

    ranks = Counter(m.rank for m in result.modules)
    rank_text = ", ".join(f"{r}×{n}" for r, n in sorted(ranks.items()))
    click.echo(f"combined {_sum_text((s.weight, s.path) for s in specs)}")
    click.echo(f"  method {method}; {len(result.modules)} modules; ranks (rank×modules): {rank_text}")
    if result.max_relative_error is not None:
        errors = [m.relative_error for m in result.modules]
        click.echo(f"  relative error per module: max {max(errors):.3e}, mean {sum(errors) / len(errors):.3e}")
    if result.partial_modules:
        click.echo(f"  {len(result.partial_modules)} modules are missing from some inputs and count as zero there")
    click.echo(f"  wrote {written} ({_human(_size(written))}, {str(result.dtype).removeprefix('torch.')})")


@click.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@_compression_options
def combine(specs, output, method, rank, energy, dtype, allow_base_mismatch, force) -> None:
    """Write the weighted sum Σ wᵢ·ΔWᵢ of adapters as a new adapter.

    Each SPEC is PATH[:WEIGHT]: a PEFT adapter directory, an adapter_model.safetensors
    with its adapter_config.json beside it, or a single self-describing .safetensors
    file. WEIGHT defaults to 1.0 and may be negative; the last colon splits path and
    weight. The base model is never loaded.

    \b
    Example:
      lora-arith combine adapters/helpful:0.8 adapters/harmless:0.5 -o mix/
    """
    _run_combination(parse_specs(specs), output, method, rank, energy, dtype, allow_base_mismatch, force)


@click.command()
@click.argument("positive", metavar="POS")
@click.argument("negative", metavar="NEG")
@_compression_options
def extract(positive, negative, output, method, rank, energy, dtype, allow_base_mismatch, force) -> None:
    """Write the preference vector φ = ΔW(POS) − ΔW(NEG).

    POS is the adapter trained on the preference pairs, NEG the one trained on the same
    pairs with chosen and rejected swapped. The difference is exact by default
    (--method cat, rank = rank(POS) + rank(NEG)).
    """
    from lora_arith.lora.combine import extract_specs

    _run_combination(extract_specs(positive, negative), output, method, rank, energy, dtype, allow_base_mismatch, force)


@click.command()
@click.argument("adapter", metavar="ADAPTER")
def inspect(adapter) -> None:
    """Show an adapter's modules, shapes, ranks, dtype, scaling, norms and base model."""
    from lora_arith.lora.adapter_io import open_adapter
    from lora_arith.lora.analysis import module_norms

    opened = open_adapter(adapter)
    norms = module_norms(opened)
    click.echo(f"adapter     {opened.label}")
    click.echo(f"base model  {opened.base_model or 'unknown'}")
    click.echo(f"modules     {len(opened.modules)}; dtype {str(opened.dtype).removeprefix('torch.')}")
    click.echo(
        f"rsLoRA      {bool(opened.config.get('use_rslora'))}; fan_in_fan_out {bool(opened.config.get('fan_in_fan_out'))}"
    )
    click.echo(f"total norm  {sum(n * n for n in norms.values()) ** 0.5:.4g}")
    if opened.ignored_keys:
        click.echo(f"ignored     {len(opened.ignored_keys)} saved base-layer weights (not deltas)")
    recipe = opened.recipe
    if recipe:
        parts = _sum_text((item["weight"], item["path"]) for item in recipe.get("inputs", []))
        click.echo(f"recipe      {recipe.get('method')}: {parts}")
    for number, line in enumerate(_training_lines(opened.training)):
        click.echo(("training    " if number == 0 else " " * 12) + line)
    width = max(len(name) for name in opened.modules)
    click.echo("")
    click.echo(f"{'module'.ljust(width)}  {'kind':9}  {'shape':>13}  {'rank':>4}  {'scaling':>8}  {'norm':>10}")
    # layers in their order (layers.2 before layers.10), as the model holds them
    ordered = sorted(opened.modules.items(), key=lambda item: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", item[0])])
    for name, info in ordered:
        shape = f"{info.shape[0]}×{info.shape[1]}"
        click.echo(
            f"{name.ljust(width)}  {info.kind:9}  {shape:>13}  {info.rank:>4}  {info.scaling:>8.4g}  {norms[name]:>10.4g}"
        )


def _training_lines(training) -> list[str]:
    """One line per recorded DPO run: its name, data files, pairs, steps and final loss."""
    from lora_arith._internal.privacy import public_data_spec
    from lora_arith.sharing.model_card import training_runs

    def part(record, key):
        return record.get(key) if isinstance(record, dict) else None

    lines = []
    for name, run in training_runs(training or {}):
        names = [public_data_spec(item) for item in run.get("data") or [] if isinstance(item, dict)]
        pairs, steps = part(part(run, "pairs"), "used"), part(part(run, "training"), "steps")
        loss = part(part(run, "final_metrics"), "loss")
        facts = [plural(pairs, "pair") if isinstance(pairs, int) else None, plural(steps, "step") if isinstance(steps, int) else None]
        facts.append(f"final loss {loss:.4g}" if isinstance(loss, (int, float)) else None)
        parts = [", ".join(str(n) for n in names if n), ", ".join(fact for fact in facts if fact)]
        swapped = " (swapped)" if run.get("swap") else ""
        lines.append(f"{name or 'run'}{swapped}: " + "; ".join(p for p in parts if p))
    return lines


def _sum_text(terms) -> str:
    """A weighted sum as read aloud: ``1·helpful − 1·harmless`` (not ``+ -1·``)."""
    text = ""
    for weight, name in terms:
        sign = ("− " if text else "−") if weight < 0 else ("+ " if text else "")
        text += (" " if text else "") + f"{sign}{abs(weight):g}·{name}"
    return text


def _number(value: float, spec: str) -> str:
    """``value`` formatted by ``spec``; ``n/a`` for an undefined figure (NaN: a zero delta)."""
    return "n/a" if math.isnan(value) else format(value, spec)


def _zero_note(labels: list[str], zero: list[bool]) -> list[str]:
    """A line for each adapter whose delta is zero, which is why its figures read n/a."""
    return [f"{label}: its delta is zero (an untrained adapter?), so cosines with it are n/a" for label, z in zip(labels, zero) if z]


def _matrix_lines(labels: list[str], matrix) -> list[str]:
    width = max(len(label) for label in labels)
    header = " " * width + "".join(f"  {i:>7}" for i in range(1, len(labels) + 1))
    rows = [header]
    for i, label in enumerate(labels):
        rows.append(label.ljust(width) + "".join(f"  {_number(float(matrix[i, j]), '.4f'):>7}" for j in range(len(labels))))
    return rows


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="A B [C...]")
def similarity(adapters) -> None:
    """Cosine similarity of the adapters' deltas, overall and per module type.

    Computed exactly from the factors: ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ).
    """
    from lora_arith.lora.analysis import similarity as compute_similarity

    result = compute_similarity(adapters, progress=progress_wanted())
    labels = [f"{i}: {label}" for i, label in enumerate(result.labels, 1)]
    click.echo("overall")
    click.echo("\n".join(_matrix_lines(labels, result.overall)))
    for module_type, matrix in result.by_module_type.items():
        click.echo(f"\n{module_type}")
        click.echo("\n".join(_matrix_lines(labels, matrix)))
    notes = _zero_note(result.labels, [math.isnan(float(d)) for d in result.overall.diagonal()])
    if notes:
        click.echo("\n" + "\n".join(notes))


def _percent(value: float) -> str:
    return _number(100 * value, ".1f") + ("" if math.isnan(value) else "%")


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="V1 V2 [V3...]")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True, help="Modules listed per pair.")
@output_option("Also write the figures as JSON to this file.", type=click.Path(path_type=Path), default=None)
@force_option()
def interference(adapters, top, output, force) -> None:
    """How much each pair of vectors overlaps, before you mix them.

    For each pair X, Y: the cosine overall and per module type; the share of X's energy
    (squared Frobenius norm) inside Y's column space (output side) and row space (input side),
    and the reverse, beside the share expected by chance for subspaces of the same rank; and the
    modules that contribute most to the cosine. All from the factors (QR of B and Aᵀ, SVD of a
    small core per module), never a dense matrix.

    \b
    Example:
      lora-arith interference adapters/helpful adapters/harmless adapters/concise
    """
    import json

    from lora_arith.lora.adapter_io import adapter_sources, open_adapter
    from lora_arith.lora.analysis import interference as compute_interference
    from lora_arith._internal.atomic import atomic_output, check_output

    if output is not None:
        inputs = [source for adapter in adapters for source in adapter_sources(adapter)]
        output = check_output(output, force=force, inputs=inputs, kind="file")
    opened = [open_adapter(path) for path in adapters]  # their labels name the pairs in the JSON
    pairs = compute_interference(opened, top=top, progress=progress_wanted())
    for number, pair in enumerate(pairs):
        x, y = pair.first, pair.second
        if number:
            click.echo("")
        click.echo(f"{x} × {y}")
        click.echo(f"  cosine {_number(pair.cosine, '+.4f')}")
        types = "  ".join(f"{t} {_number(c, '+.4f')}" for t, c in pair.cosine_by_module_type.items())
        click.echo(f"  by module type: {types}")
        for side, share, chance in (
            ("column (output) space", pair.column_share, pair.chance_column),
            ("row (input) space", pair.row_share, pair.chance_row),
        ):
            click.echo(
                f"  energy in the other's {side}: {x} in {y} {_percent(share[0])}, "
                f"{y} in {x} {_percent(share[1])} (chance {_percent(chance[0])}, {_percent(chance[1])})"
            )
        if pair.top_modules and not math.isnan(pair.cosine):  # with a zero delta no module overlaps more
            click.echo("  overlap most in (module: part of the cosine, cosine within the module):")
            for module in pair.top_modules:
                click.echo(f"    {module.name}: {_number(module.contribution, '+.4f')}, {_number(module.cosine, '+.4f')}")
    zero = {label for p in pairs for label, share in zip((p.first, p.second), p.column_share) if math.isnan(share)}
    notes = _zero_note([o.label for o in opened], [o.label in zero for o in opened])
    if notes:
        click.echo("\n" + "\n".join(notes))
    if output is not None:
        shared = {o.label: Path(a).name for o, a in zip(opened, adapters)}  # basenames: no local paths
        rows = [{**p.to_dict(), "first": shared[p.first], "second": shared[p.second]} for p in pairs]
        record = {"adapters": [Path(a).name for a in adapters], "pairs": rows}
        with atomic_output(output) as temporary:
            temporary.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        click.echo(f"\nwrote {output}")


@click.command()
@click.argument("adapter", metavar="IN")
@output_option(
    "OUT: a file ending in .safetensors (single-file form) or a folder (PEFT adapter).",
    required=True,
    type=click.Path(path_type=Path),
)
@force_option()
def convert(adapter, output, force) -> None:
    """Convert an adapter between the PEFT folder and the single-file form, losslessly.

    OUT ending in .safetensors gets the single-file form (config in the safetensors metadata);
    anything else a PEFT folder that PeftModel.from_pretrained and vLLM load. Tensors and the
    LoRA config are kept exactly; local paths in the recorded recipe are reduced to basenames.

    \b
    Example:
      lora-arith convert adapters/helpful -o helpful.safetensors
    """
    from lora_arith.lora.adapter_io import convert_adapter

    written = convert_adapter(adapter, output, force=force)
    form = "single file" if written.suffix == ".safetensors" else "PEFT folder"
    click.echo(f"wrote {written} ({form}, {_human(_size(written))})")
