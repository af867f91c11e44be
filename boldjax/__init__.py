"""boldjax: a JAX/Flax training stack for fMRI foundation models."""

__version__ = "0.1.0"
