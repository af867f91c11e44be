"""learning-from-brains causal sequence modelling (GPT, L1 on one masked frame).

`python -m boldjax.main --config=configs/csm_gpt.py`.
"""

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, _ = base_config("csm", arg)
  c.optim.lr = 5e-4
  return c
