"""Objectives (Task subclasses); importing this package registers them."""

from boldjax.tasks import (
  autoencoder,  # noqa: F401  (registers "autoencoder")
  csm,  # noqa: F401  (registers "csm")
  decode,  # noqa: F401  (registers "decode")
  dino,  # noqa: F401  (registers "dino")
  encoding,  # noqa: F401  (registers "encoding")
  fmri2img,  # noqa: F401  (registers "fmri2img")
  net_bert,  # noqa: F401  (registers "net_bert")
  next_patch,  # noqa: F401  (registers "next_patch")
  seq_bert,  # noqa: F401  (registers "seq_bert")
  vae,  # noqa: F401  (registers "vae")
)
