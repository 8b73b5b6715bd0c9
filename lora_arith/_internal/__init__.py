"""Private helpers shared by every layer: atomic outputs, errors, privacy, provenance, devices and
quieting dependencies."""
