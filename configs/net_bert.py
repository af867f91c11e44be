"""learning-from-brains Network-BERT (whole networks masked across time + NSP).

`python -m boldjax.main --config=configs/net_bert.py`.
"""

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, _ = base_config("net_bert", arg)
  c.data.pairs = True
  c.data.seq_min, c.data.seq_max = 15, 54
  c.task.masking_rate = 0.1
  c.optim.lr = 1e-4
  return c
