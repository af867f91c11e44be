"""Model modules (flax.linen); importing this package registers them."""

from boldjax.models import patch_gpt  # noqa: F401  (registers "patch_gpt")
