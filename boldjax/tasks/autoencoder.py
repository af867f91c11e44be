"""LSTM autoencoder (learning-from-brains): L1 reconstruction of every valid frame.

Teacher forcing as the original: one coin per batch with probability
config.model.teacher_forcing_ratio (default 0.5) in training, never in eval; when it comes
up, decoder step i is fed the embedded frame i.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from boldjax import registry
from boldjax.tasks.base import PyTree, row_weights
from boldjax.tasks.csm import LfbTask, l1_masked


def reconstruction_loss(
  outputs: jax.Array, inputs: jax.Array, mask: jax.Array, weights: jax.Array
) -> jax.Array:
  """L1 mean over the valid frames (all parcels) of the weighted rows."""
  full = jnp.broadcast_to(mask.astype(bool)[..., None], inputs.shape)
  return l1_masked(outputs, inputs, full, weights)


@registry.register("task", "autoencoder")
class AutoencoderTask(LfbTask):
  style = "autoencoder"
  name = "autoencoder"

  def __init__(self, config: Any, info: Any, num_classes: int = 0):
    super().__init__(config, info, num_classes)
    model_cfg = config.get("model") or {}
    ratio = model_cfg.get("teacher_forcing_ratio", 0.5)
    if not 0.0 <= ratio <= 1.0:
      raise ValueError(f"config.model.teacher_forcing_ratio: expected [0, 1], found {ratio}")
    self.teacher_forcing_ratio = float(ratio)

  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del extra
    x, t, mask, _ = self._frames(batch)
    tf_rng, drop_rng = jax.random.split(rng)
    forcing = jnp.logical_and(train, jax.random.bernoulli(tf_rng, self.teacher_forcing_ratio))
    out = self.model.apply(
      {"params": params},
      x,
      t,
      forcing,
      deterministic=not train,
      rngs={"dropout": drop_rng} if train else None,
      method="autoencode",
    )
    loss = reconstruction_loss(out["outputs"], x, mask, row_weights(batch, x.shape[0]))
    return loss, {"loss": loss, "reconstruction_loss": loss}
