"""Low-rank arithmetic on adapters, with no model loaded: the factor math, adapter files, specs,
combination and read-only analysis."""
