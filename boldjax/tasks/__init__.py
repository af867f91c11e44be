"""Objectives (Task subclasses); importing this package registers them."""

from boldjax.tasks import next_patch  # noqa: F401  (registers "next_patch")
