"""learning-from-brains Seq-BERT (masked frames L1 + next-sequence BCE).

`python -m boldjax.main --config=configs/seq_bert.py`.
"""

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, _ = base_config("seq_bert", arg)
  c.data.pairs = True
  c.data.seq_min, c.data.seq_max = 15, 54
  c.task.masking_rate = 0.2
  c.optim.lr = 1e-4
  return c
