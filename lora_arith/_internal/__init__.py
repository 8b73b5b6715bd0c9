"""Private helpers shared by every layer: atomic outputs, errors, privacy, provenance and devices."""
