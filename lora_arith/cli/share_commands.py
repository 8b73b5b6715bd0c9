"""Commands for sharing and deployment: push, export, merge."""

from __future__ import annotations

from pathlib import Path

import click

from lora_arith.cli.options import base_option, device_option, force_option, four_bit_option, output_option
from lora_arith.cli.options import progress_wanted
from lora_arith._internal.devices import DTYPE_NAMES
from lora_arith._internal.provenance import EXPORT_TARGETS

__all__ = ["push", "export", "merge"]


@click.command()
@click.argument("adapter")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing); with --create-pr, the PR's base.")
@click.option(
    "--license",
    "license_",
    default=None,
    help="Licence named in the model card (default: the base model's, from its card; left out if unknown).",
)
@click.option(
    "--include",
    "include",
    multiple=True,
    metavar="PATTERN",
    help="Also upload the adapter folder's files matching this shell pattern (repeatable), e.g. 'training_log.json'.",
)
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload preference-vector adapter').")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--dry-run", is_flag=True, help="List the files and show the model card; touch no network.")
def push(adapter, repo_id, private, revision, license_, include, commit_message, create_pr, dry_run):
    """Upload ADAPTER to the Hugging Face Hub as REPO_ID, with a generated model card.

    Only adapter_config.json, adapter_model.safetensors and README.md are uploaded (--include
    adds more); local paths in the config, metadata and card are reduced to basenames. The card
    (built with huggingface_hub's ModelCard) has library_name peft, pipeline_tag
    text-generation, the base model and its base_model:adapter tag, Hub datasets, the licence,
    the recipe (weights and the inputs' sha256) and the training data and metrics when recorded.
    Authentication is huggingface_hub's: HF_TOKEN or `hf auth login`.
    """
    from lora_arith.sharing.push import check_repo_id, check_revision, plan_upload
    from lora_arith.sharing.push import push as upload

    if dry_run:
        check_repo_id(repo_id)
        check_revision(revision)
        plan = plan_upload(adapter, license_, include)
        where = f"{repo_id}{'@' + revision if revision else ''}{' (private)' if private else ''}"
        click.echo(f"would {'open a pull request on' if create_pr else 'upload to'} {where}:")
        for name in plan.names:
            note = "  (generated)" if name in plan.generated else "  (metadata without local paths)" if name in plan.rewritten else ""
            click.echo(f"  {name}{note}")
        click.echo("\n--- README.md ---")
        click.echo(plan.generated["README.md"])
        return
    url = upload(
        adapter,
        repo_id,
        private=private,
        revision=revision,
        license=license_,
        include=include,
        commit_message=commit_message,
        create_pr=create_pr,
    )
    click.echo(f"{'pull request' if create_pr else 'uploaded'}: {url}")


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@output_option(
    "Output adapter folder (with --mix: a folder holding one adapter folder per mix; "
    "--for llama.cpp: a folder of NAME.gguf files).",
    required=True,
    type=click.Path(path_type=Path),
)
@click.option("--for", "target", type=click.Choice(EXPORT_TARGETS), default="vllm", show_default=True, help="Serving engine.")
@click.option(
    "--max-rank",
    type=int,
    default=None,
    help="vLLM: compress modules above this rank optimally, reporting the error (default: vLLM's largest, 512).",
)
@base_option("llama.cpp: the adapters' base, for its attention heads (RoPE layout). Default: the embedded SmolLM2.")
@click.option(
    "--mix",
    "mixes",
    multiple=True,
    metavar="NAME=W1,W2,...",
    help="Write OUT/NAME, the weighted sum of the ADAPTERs with one weight each (repeatable).",
)
@force_option()
def export(adapters, output, target, max_rank, base, mixes, force):
    """Rewrite ADAPTER for a serving engine (vLLM, llama.cpp), or write one adapter per --mix of the ADAPTERs.

    --for llama.cpp writes GGUF LoRAs (OUT/NAME.gguf, one per ADAPTER, or one per --mix for ollama)
    and prints the llama-server command line and the per-request "lora" field.

    Each module keeps its rank (vLLM serves any rank up to --max-lora-rank); only modules above
    --max-rank are compressed, by optimal SVD truncation, and their error is reported. Scalings
    are folded into the factors (lora_alpha = r); embedding LoRA is kept. Prints the smallest
    --max-lora-rank that serves the result, and with --mix the vllm serve arguments. Example:

    \b
      lora-arith export adapters/helpful adapters/harmless --mix balanced=1,1 \\
          --mix safer=0.5,1 -o mixes/
      vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora \\
          --lora-modules balanced=mixes/balanced safer=mixes/safer --max-lora-rank 16
    """
    from lora_arith.sharing.export import export_adapters, export_report, parse_mixes
    from lora_arith.sharing.gguf import export_gguf_adapters, gguf_report

    parsed = parse_mixes(mixes, len(adapters)) if mixes else None
    if target == "vllm" and base is not None:
        raise click.BadOptionUsage("base", "--base applies to --for llama.cpp only (vLLM's adapters do not depend on it)")
    if target == "llama.cpp":
        if max_rank is not None:
            raise click.BadOptionUsage("max_rank", "--max-rank applies to --for vllm only (GGUF keeps every rank)")
        lines = gguf_report(export_gguf_adapters(adapters, output, mixes=parsed, base=base, force=force), mixes=bool(parsed), base=base)
    else:
        lines = export_report(export_adapters(adapters, output, mixes=parsed, max_rank=max_rank, force=force), max_rank)
    click.echo("\n".join(lines))


@click.command()
@click.option("--base", default=None, help="Base model folder or Hub id. Default: the embedded SmolLM2-135M-Instruct.")
@click.option(
    "--adapter", "adapters", multiple=True, required=True, metavar="SPEC", help="[NAME=]PATH[:WEIGHT] to merge (repeatable)."
)
@output_option("Output model folder.", required=True, type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default=None,
    help="Saved dtype of the floating-point weights (default: the base's own; the merge is computed in fp32).",
)
@four_bit_option(False, "Save the merged model in 4-bit NF4 (needs --requantize).")
@click.option("--requantize", is_flag=True, help="Accept the rounding loss of re-quantizing merged weights to 4-bit.")
@force_option()
@device_option("Device for the --4bit requantisation (the merge itself streams on the CPU): 'cpu' (default), 'cuda'.")
def merge(base, adapters, output, dtype, quantize_4bit, requantize, force, device):
    """Write a full model with the weighted adapter deltas merged into the base weights.

    Works one safetensors shard of the base at a time (memory about one block of rows, not the model);
    writes the shards, the index, the config and the tokenizer files (when the base has them).
    The result loads with transformers' AutoModelForCausalLM.from_pretrained and gives the same
    logits as the base with the adapters applied.
    """
    from lora_arith.model.merge import merge_adapters
    from lora_arith.lora.specs import named_specs

    path = merge_adapters(
        base,
        list(named_specs(adapters).values()),
        output,
        dtype=dtype,
        quantize_4bit=quantize_4bit,
        requantize=requantize,
        force=force,
        device=device,
        progress=progress_wanted(),
    )
    click.echo(f"wrote merged model to {path}")
