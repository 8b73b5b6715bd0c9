"""``lora-arith train``: train one preference as a LoRA adapter with DPO."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_arith.cli import device_option, force_option, four_bit_option, main, output_option
from lora_arith.data import LABELS
from lora_arith.errors import LoraArithError
from lora_arith.train import (
    TRAINING_LOG,
    TRAINING_METADATA,
    TrainConfig,
    train_preference,
)

_DEFAULTS = TrainConfig(data=[], output="")


def _help(name: str) -> str:
    """An option's help: the matching :class:`TrainConfig` field's help text."""
    return TrainConfig.help(name)


_TRAIN_OPTIONS = [
    click.option("--data", "data", multiple=True, required=True, metavar="SPEC", help=_help("data") + " Repeatable."),
    click.option("--base", default=None, help=_help("base")),
    click.option("--label", type=click.Choice(sorted(LABELS)), default=None, help=_help("label")),
    click.option("--skip-invalid", is_flag=True, help=_help("skip_invalid")),
    click.option("--rank", type=int, default=_DEFAULTS.rank, show_default=True, help=_help("rank")),
    click.option("--alpha", type=float, default=_DEFAULTS.alpha, show_default=True, help=_help("alpha")),
    click.option("--targets", default=_DEFAULTS.targets, show_default=True, help=_help("targets")),
    click.option("--dropout", type=float, default=_DEFAULTS.dropout, show_default=True, help=_help("dropout")),
    click.option("--beta", type=float, default=_DEFAULTS.beta, show_default=True, help=_help("beta")),
    click.option(
        "--sft-weight", type=float, default=_DEFAULTS.sft_weight, show_default=True, help=_help("sft_weight")
    ),
    click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help=_help("lr")),
    click.option("--epochs", type=float, default=None, help=f"{_help('epochs')}  [default: {_DEFAULTS.epochs:g}]"),
    click.option("--max-steps", type=int, default=None, help=_help("max_steps")),
    click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True, help=_help("batch_size")),
    click.option("--grad-accum", type=int, default=_DEFAULTS.grad_accum, show_default=True, help=_help("grad_accum")),
    click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True, help=_help("max_length")),
    click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help=_help("seed")),
    four_bit_option(True, "Load the base in 4-bit NF4 (QLoRA); --no-4bit loads it unquantized (fp32 on CPU, bf16 on CUDA)."),
    device_option(),
    click.option("--double-quant", is_flag=True, help=_help("double_quant")),
    click.option("--bf16/--no-bf16", default=None, help=_help("bf16") + "  [default: auto]"),
]


def _train_options(command):
    """Attach the DPO training options shared by ``train`` and ``vector``."""
    for option in reversed(_TRAIN_OPTIONS):
        command = option(command)
    return command


def _config(output: Path, swap: bool, force: bool, options: dict) -> TrainConfig:
    """A :class:`TrainConfig` from the parsed training options."""
    if options["epochs"] is not None and options["max_steps"] is not None:
        raise LoraArithError("give either --epochs or --max-steps, not both")
    if options["double_quant"] and not options["quantize_4bit"]:
        raise LoraArithError("--double-quant needs the 4-bit base; drop --no-4bit")
    options = dict(options)
    options["data"] = list(options["data"])
    options["epochs"] = _DEFAULTS.epochs if options["epochs"] is None else options["epochs"]
    return TrainConfig(output=str(output), swap=swap, overwrite=force, **options)


@main.command("train")
@_train_options
@output_option(_help("output"), required=True, type=click.Path(path_type=Path))
@click.option("--swap", is_flag=True, help=_help("swap"))
@force_option("Replace the output folder if it is empty or holds an earlier adapter.")
def train_command(output: Path, swap: bool, force: bool, **options) -> None:
    """Train a preference as a LoRA adapter with DPO on the (4-bit) base.

    Train each preference twice, on the pairs and with --swap, to make a preference vector
    from the two adapters (or let `lora-arith vector` do all three steps). Writes the PEFT
    adapter, its single-file form OUTPUT/NAME.safetensors, training_log.json and
    training_metadata.json to OUTPUT.

    Runs unchanged on several GPUs: `accelerate launch -m lora_arith train ...`.
    """
    written = train_preference(_config(output, swap, force, options))
    click.echo(_summary(written))


@main.command("vector")
@_train_options
@output_option(
    "The preference vector: a .safetensors file (single-file form) or a PEFT folder.",
    required=True,
    type=click.Path(path_type=Path),
)
@click.option("--keep-runs", type=click.Path(path_type=Path), help="Keep the two DPO adapters in this folder.")
@click.option(
    "--method",
    type=click.Choice(["cat", "svd"]),
    default="cat",
    show_default=True,
    help="cat: exact difference (rank 2r). svd: compress it to --vector-rank.",
)
@click.option("--vector-rank", type=int, default=None, help="With --method svd: the vector's rank (default: --rank).")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Dtype of the written vector (default: the adapters').",
)
@force_option("Replace the output (and --keep-runs) if they exist and are earlier outputs of this command.")
def vector_command(output: Path, keep_runs, method, vector_rank, dtype, force, **options) -> None:
    """Run the whole recipe for one preference: DPO on the pairs (θ+), DPO on the pairs with
    chosen and rejected swapped (θ−), then write φ = Δ+ − Δ−.

    \b
    Example:
      lora-arith vector --data pairs.jsonl --max-steps 30 -o harmless.safetensors
    """
    from lora_arith.recipe import train_vector

    if vector_rank is not None and method != "svd":
        raise LoraArithError("--vector-rank needs --method svd")
    config = _config(Path("unused"), False, False, options)
    rank = (vector_rank or config.rank) if method == "svd" else None
    written = train_vector(config, output, keep_runs=keep_runs, method=method, rank=rank, dtype=dtype, force=force)
    click.echo(f"wrote preference vector {written}")


def _summary(folder: Path) -> str:
    """One line about a finished run, read from its metadata and log."""
    info = json.loads((folder / TRAINING_METADATA).read_text(encoding="utf-8"))
    steps = json.loads((folder / TRAINING_LOG).read_text(encoding="utf-8"))
    last = steps[-1] if steps else {}
    skipped = sum(entry["skipped"] for entry in info["data"])
    parts = [
        f"{info['pairs']['used']} pairs" + (f" ({skipped} rows skipped)" if skipped else ""),
        f"{info['training']['steps']} steps",
        f"final loss {last.get('loss', float('nan')):.4f}",
        f"reward accuracy {last.get('rewards/accuracies', float('nan')):.2f}",
        f"{info['wall_time_s']:.0f} s",
    ]
    return f"Wrote {folder}: " + ", ".join(parts)
