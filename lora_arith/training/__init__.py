"""Training preferences with DPO: the pairs, one LoRA adapter per side, and the preference vector."""
