"""learning-from-brains LSTM autoencoder (L1 over valid frames).

`python -m boldjax.main --config=configs/autoencoder.py`.
"""

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, _ = base_config("autoencoder", arg)
  c.model.embedding_dim = 128
  c.model.dropout = 0.2
  c.model.teacher_forcing_ratio = 0.5
  c.optim.lr = 2e-4
  return c
