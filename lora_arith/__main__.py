"""``python -m lora_arith`` runs the CLI."""

from lora_arith.cli import run

run()
