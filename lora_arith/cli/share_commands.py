"""Commands for sharing and deployment: push, export, merge."""

from __future__ import annotations

from pathlib import Path

import click

from lora_arith.cli import main


@main.command()
@click.argument("adapter")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--license", "license_", default="apache-2.0", show_default=True, help="Licence named in the model card.")
@click.option("--dry-run", is_flag=True, help="List the files and show the model card; touch no network.")
def push(adapter, repo_id, private, revision, license_, dry_run):
    """Upload ADAPTER to the Hugging Face Hub as REPO_ID, with a generated model card.

    The card names the base model, the recipe (weights and the inputs' sha256), the training
    data and metrics when recorded, the licence, and the tags peft, lora, preference-vector.
    Authentication is huggingface_hub's: HF_TOKEN or `hf auth login`.
    """
    from lora_arith.push import plan_upload
    from lora_arith.push import push as upload

    if dry_run:
        plan = plan_upload(adapter, license_)
        click.echo(f"would upload to {repo_id}{'@' + revision if revision else ''}{' (private)' if private else ''}:")
        for name in plan.names:
            click.echo(f"  {name}" + ("  (generated)" if name in plan.generated else ""))
        click.echo("\n--- README.md ---")
        click.echo(plan.generated["README.md"])
        return
    click.echo(f"uploaded: {upload(adapter, repo_id, private=private, revision=revision, license=license_)}")


@main.command()
@click.argument("adapter")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output adapter folder.")
@click.option("--for", "target", type=click.Choice(["vllm"]), default="vllm", show_default=True, help="Serving engine.")
@click.option("--max-rank", type=int, default=None, help="Cap the uniform rank (compressing larger modules optimally).")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
def export(adapter, output, target, max_rank, force):
    """Rewrite ADAPTER for a serving engine (vLLM: one rank from {8,16,32,64,128,256,320,512}).

    Smaller modules are padded with zeros (the delta is unchanged); larger ones are compressed
    by optimal SVD truncation and the error is reported. Serve it with, for example:

    \b
      vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora \\
          --lora-modules mix=OUT --max-lora-rank R
    """
    from lora_arith.export import export_for_vllm

    result = export_for_vllm(adapter, output, max_rank=max_rank, force=force)
    click.echo(f"wrote {result.path}: rank {result.rank} for every module (lora_alpha = r)")
    if result.padded:
        click.echo(f"  {len(result.padded)} modules padded with zeros (exact)")
    if result.compressed:
        click.echo(
            f"  {len(result.compressed)} modules compressed; max relative error {max(result.compressed.values()):.3e}"
        )
    click.echo(f"  serve with --max-lora-rank {result.rank} or more")


@main.command()
@click.option("--base", default=None, help="Base model folder or Hub id. Default: the embedded SmolLM2-135M-Instruct.")
@click.option(
    "--adapter", "adapters", multiple=True, required=True, metavar="SPEC", help="PATH[:WEIGHT] to merge (repeatable)."
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Saved dtype of the floating-point weights (default: the base's own; the merge is computed in fp32).",
)
@click.option("--4bit", "quantize_4bit", is_flag=True, help="Save the merged model in 4-bit NF4 (needs --requantize).")
@click.option("--requantize", is_flag=True, help="Accept the rounding loss of re-quantizing merged weights to 4-bit.")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
def merge(base, adapters, output, dtype, quantize_4bit, requantize, force):
    """Write a full model with the weighted adapter deltas merged into the base weights.

    Works one safetensors shard of the base at a time (memory about one block of rows, not the model);
    writes the shards, the index, the config and the tokenizer files (when the base has them). The result loads with transformers' AutoModelForCausalLM.from_pretrained and gives the same
    logits as the base with the adapters applied.
    """
    from lora_arith.merge import merge_adapters

    path = merge_adapters(
        base, adapters, output, dtype=dtype, quantize_4bit=quantize_4bit, requantize=requantize, force=force
    )
    click.echo(f"wrote merged model to {path}")
