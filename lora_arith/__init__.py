"""lora-arith: preference vectors as LoRA adapters, combined exactly on their low-rank factors."""

__version__ = "0.1.0"
