"""Model modules (flax.linen); importing this package registers them."""

from boldjax.models import (
  lfb,  # noqa: F401  (registers "lfb")
  patch_gpt,  # noqa: F401  (registers "patch_gpt")
)
