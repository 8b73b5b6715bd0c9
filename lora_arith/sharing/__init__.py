"""Sharing adapters: Hub references, uploads with model cards, and exports for serving engines."""
