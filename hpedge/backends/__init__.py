"""Adapters for inference backends (each the only importer of its library)."""
