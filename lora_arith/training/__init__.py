"""Training preferences with DPO: the pairs, one LoRA adapter per side, and the preference vector."""

from lora_arith._internal.quiet import quiet_dependencies

quiet_dependencies()
