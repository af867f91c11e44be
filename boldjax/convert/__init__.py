"""Importers of published PyTorch checkpoints (state_dicts as numpy arrays)."""
