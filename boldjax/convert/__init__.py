"""Importers of published PyTorch checkpoints (state_dicts as numpy arrays).

Each family module registers its Converter as ("converter", name); a new family is a new
module and one line here.
"""

from boldjax.convert import (  # noqa: F401  (registration)
  bddn,
  boldgpt,
  fmri2img,
  lfb,
  semantoks,
  vae,
  vision,
)
