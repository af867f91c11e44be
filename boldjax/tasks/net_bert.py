"""Network-BERT (learning-from-brains): whole networks masked across all time points + NSP.

The original draws one uniform per (row, parcel) and masks the parcels with
u >= 1 - masking_rate at every valid time point (its "networks" are the DiFuMo components);
a masked entry (b, t, p) becomes the learned scalar msk_embed[t]. Here the draw is per
(row, network) with info.networks (R,) mapping parcels to networks, so a network's parcels
are masked together; config.task.network_masking='parcels' restores the original's
one-draw-per-parcel (identical when every parcel is its own network).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax import registry
from boldjax.tasks.seq_bert import SeqBertTask

UNITS = ("networks", "parcels")


@registry.register("task", "net_bert")
class NetBertTask(SeqBertTask):
  style = "netbert"
  name = "net_bert"

  def __init__(self, config: Any, info: Any, num_classes: int = 0):
    super().__init__(config, info, num_classes)
    self.unit = config.task.get("network_masking", "networks")
    if self.unit not in UNITS:
      raise ValueError(f"config.task.network_masking: expected one of {UNITS}, found {self.unit!r}")
    R = int(info.num_parcels)
    if self.unit == "networks":
      networks = np.asarray(getattr(info, "networks", None))
      if networks is None or networks.shape != (R,):
        raise ValueError(
          f"net_bert info.networks: expected ({R},) network index per parcel, "
          f"found {None if networks is None else networks.shape}"
        )
      num = int(getattr(info, "num_networks", networks.max() + 1))
      if networks.min() < 0 or networks.max() >= num:
        raise ValueError(
          f"net_bert info.networks: expected indices in [0, {num}) (info.num_networks), "
          f"found range [{networks.min()}, {networks.max()}]"
        )
      self.networks, self.num_networks = networks.astype(np.int32), num
    else:
      self.networks, self.num_networks = np.arange(R, dtype=np.int32), R

  def draw_mask(self, rng: jax.Array, attention_mask: jax.Array, num_parcels: int) -> jax.Array:
    """(B, S, R) bool: the parcels of ~masking_rate of the networks, at every valid frame."""
    B = attention_mask.shape[0]
    u = jax.random.uniform(rng, (B, self.num_networks))
    parcels = jnp.take(u >= 1.0 - self.masking_rate, jnp.asarray(self.networks), axis=1)
    return parcels[:, None, :] & attention_mask[..., None]
