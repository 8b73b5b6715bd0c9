"""``lora-arith train``: train one preference as a LoRA adapter with DPO."""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path

import click

from lora_arith.cli.options import device_option, force_option, four_bit_option, output_option, progress_wanted
from lora_arith.training.data import LABELS
from lora_arith._internal.devices import DTYPE_NAMES
from lora_arith._internal.errors import LoraArithError
from lora_arith._internal.wording import plural
from lora_arith._internal.provenance import METHODS
from lora_arith.training.train import TrainConfig, TrainResult, train_preference

__all__ = ["train_command", "vector_command", "train_options"]

def _help(name: str) -> str:
    """An option's help: the matching :class:`TrainConfig` field's help text."""
    return TrainConfig.help(name)


def _option(item: Field):
    """The click option of one :class:`TrainConfig` field: ``--NAME`` with its type, default and help."""
    name = item.name
    flag = "--" + name.replace("_", "-")
    if name == "data":
        return click.option(flag, name, multiple=True, required=True, metavar="SPEC", help=_help(name) + " Repeatable.")
    if name == "dpo_arg":
        return click.option(flag, name, multiple=True, metavar="KEY=VALUE", help=_help(name) + " Repeatable.")
    if name == "label":
        return click.option(flag, type=click.Choice(sorted(LABELS)), default=None, help=_help(name))
    if name == "quantize_4bit":
        return four_bit_option(
            item.default, "Load the base in 4-bit NF4 (QLoRA); --no-4bit loads it unquantized (fp32 on CPU, bf16 on CUDA)."
        )
    if name == "device":
        return device_option()
    if name == "epochs":  # None: the default, unless --max-steps is given
        return click.option(flag, type=float, default=None, help=f"{_help(name)}  [default: {item.default:g}]")
    if item.type == "bool | None":
        return click.option(f"{flag}/--no-{flag[2:]}", default=None, help=_help(name) + "  [default: auto]")
    if item.type == "bool":
        return click.option(flag, is_flag=True, help=_help(name))
    kind = {"int": int, "float": float, "str": str}.get(item.type.removesuffix(" | None"))
    if kind is None:
        raise TypeError(f"no click option for TrainConfig.{name}: {item.type}")
    return click.option(flag, type=kind, default=item.default, show_default=item.default is not None, help=_help(name))


def train_options(command):
    """Attach one click option per :class:`TrainConfig` field (the options of ``train`` and ``vector``)."""
    for item in reversed(fields(TrainConfig)):
        command = _option(item)(command)
    return command


def _config(options: dict) -> TrainConfig:
    """A :class:`TrainConfig` from the parsed training options."""
    options = dict(options)
    if options["epochs"] is not None and options["max_steps"] is not None:
        raise LoraArithError("give either --epochs or --max-steps, not both")
    if options["double_quant"] and not options["quantize_4bit"]:
        raise LoraArithError("--double-quant needs the 4-bit base; drop --no-4bit")
    if options["epochs"] is None:
        del options["epochs"]
    return TrainConfig(**options)


@click.command("train")
@train_options
@output_option("Folder to write the adapter, training log and metadata to.", required=True, type=click.Path(path_type=Path))
@click.option("--swap", is_flag=True, help="Exchange chosen and rejected (the negative run).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from its last checkpoint in OUTPUT.checkpoints/ (see --save-steps); "
    "the other settings must be the same.",
)
@force_option(
    "Replace the output folder if it is empty or holds an earlier adapter; discard the checkpoints of an "
    "interrupted run."
)
def train_command(output: Path, swap: bool, resume: bool, force: bool, **options) -> None:
    """Train a preference as a LoRA adapter with DPO on the (4-bit) base.

    Train each preference twice, on the pairs and with --swap, to make a preference vector
    from the two adapters (or let `lora-arith vector` do all three steps). Writes the PEFT
    adapter, its single-file form OUTPUT/NAME.safetensors, training_log.json and
    training_metadata.json to OUTPUT.

    Runs unchanged as several processes: `accelerate launch -m lora_arith train ...` (every
    process prints a line; the main one writes the output).
    """
    run = train_preference(_config(options), output, swap=swap, force=force, resume=resume, progress=progress_wanted())
    click.echo(_summary(run))


@click.command("vector")
@train_options
@output_option(
    "The preference vector: a .safetensors file (single-file form) or a PEFT folder.",
    required=True,
    type=click.Path(path_type=Path),
)
@click.option("--keep-runs", type=click.Path(path_type=Path), help="Keep the two DPO adapters in this folder.")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="cat",
    show_default=True,
    help="cat: exact difference (rank 2r). svd: compress it to --vector-rank.",
)
@click.option("--vector-rank", type=click.IntRange(min=1), default=None, help="With --method svd: the vector's rank (default: --rank).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default=None,
    help="Dtype of the written vector (default: the adapters').",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted vector: skip a finished run, resume the other from its last checkpoint "
    "(in OUTPUT.checkpoints/, see --save-steps).",
)
@force_option(
    "Replace the output (and --keep-runs) if they exist and are earlier outputs of this command; discard "
    "the checkpoints of an interrupted vector."
)
def vector_command(output: Path, keep_runs, method, vector_rank, dtype, resume, force, **options) -> None:
    """Run the whole recipe for one preference: DPO on the pairs (θ+), DPO on the pairs with
    chosen and rejected swapped (θ−), then write φ = Δ+ − Δ−.

    \b
    Example:
      lora-arith vector --data pairs.jsonl --max-steps 30 -o harmless.safetensors
    """
    from lora_arith.training.vector import train_vector

    if vector_rank is not None and method != "svd":
        raise LoraArithError("--vector-rank needs --method svd")
    config = _config(options)
    rank = (config.rank if vector_rank is None else vector_rank) if method == "svd" else None
    written = train_vector(
        config, output, keep_runs=keep_runs, method=method, rank=rank, dtype=dtype, force=force, resume=resume,
        progress=progress_wanted(),
    )  # fmt: skip
    if written is not None:
        click.echo(f"wrote preference vector {written.path}")


def _summary(run: TrainResult) -> str:
    """One line about a finished run, from its metadata and log (on the main process), or about
    this process's part in it (on the others, under ``accelerate launch``)."""
    info, last = run.metadata, run.final_metrics
    processes = info["training"]["processes"]
    if run.rank != 0:
        return f"rank {run.rank} of {processes}: trained {plural(info['training']['steps'], 'step')}; rank 0 writes {run.path}"
    skipped = sum(entry["skipped"] for entry in info["data"])
    parts = [
        plural(info["pairs"]["used"], "pair") + (f" ({plural(skipped, 'row')} skipped)" if skipped else ""),
        plural(info["training"]["steps"], "step"),
        f"final loss {last.get('loss', float('nan')):.4f}",
        f"reward accuracy {last.get('rewards/accuracies', float('nan')):.2f}",
        f"{info['wall_time_s']:.0f} s",
    ]
    if processes > 1:
        parts.append(f"rank 0 of {processes} processes")
    evaluation = info["training"].get("eval")
    if evaluation:
        parts.append(f"eval loss {evaluation['eval_loss']:.4f}")
    return f"wrote {run.path}: " + ", ".join(parts)
