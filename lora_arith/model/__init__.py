"""Work on the base model: loading it, generating, mixing adapters at run time and merging them in."""

from lora_arith._internal.quiet import quiet_dependencies

quiet_dependencies()
