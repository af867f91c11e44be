"""Seq-BERT (learning-from-brains): masked-frame L1 + next-sequence prediction (BCE), summed.

Batches come with data.pairs=True: bold / t_sec / mask / length for seq_a and *_next for
seq_b, plus next_is_consecutive (B,) bool. The pair is packed back to back as the original
BERTDataset does ([a | b | zeros], token types 0 / 1, TR times restarting at 0 for b) and
the NSP target keeps the original's inverted convention: is_next = 1 means b does NOT
follow a. Each valid frame is masked with probability config.task.masking_rate
(torch.rand >= 1 - rate) and replaced by the MSK token; the loss reads the outputs shifted
by +1 (see LfbModel.bert).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from boldjax import registry
from boldjax.tasks.base import PyTree, row_weights, weighted_mean
from boldjax.tasks.csm import LfbTask, l1_masked


def pack_pair(
  a: jax.Array, ta: jax.Array, la: jax.Array, b: jax.Array, tb: jax.Array, lb: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """[a[:la] | b[:lb] | zeros] -> inputs (B, Ta+Tb, R), t, attention_mask, token_type_ids."""
  Ta, Tb = a.shape[1], b.shape[1]
  j = jnp.arange(Ta + Tb)[None, :]
  la, lb = la.astype(jnp.int32)[:, None], lb.astype(jnp.int32)[:, None]
  from_a, from_b = j < la, (j >= la) & (j < la + lb)
  ia, ib = jnp.clip(j, 0, Ta - 1), jnp.clip(j - la, 0, Tb - 1)
  x = jnp.where(
    from_a[..., None],
    jnp.take_along_axis(a, ia[..., None], axis=1),
    jnp.where(from_b[..., None], jnp.take_along_axis(b, ib[..., None], axis=1), 0.0),
  )
  t = jnp.where(
    from_a,
    jnp.take_along_axis(ta, ia, axis=1),
    jnp.where(from_b, jnp.take_along_axis(tb, ib, axis=1), 0.0),
  )
  return x, t, from_a | from_b, from_b.astype(jnp.int32)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise torch BCEWithLogitsLoss (numerically stable form)."""
  z = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  return jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))


def bert_losses(
  out: dict[str, jax.Array], inputs: jax.Array, is_next: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
  """masking_loss (L1 over masked entries), is_next_loss (BCE mean) and their sum."""
  masking = l1_masked(out["frame_predictions"], inputs, out["modelling_mask"], weights)
  nsp = weighted_mean(bce_with_logits(out["is_next_logits"].reshape(-1), is_next), weights)
  correct = ((out["is_next_logits"].reshape(-1) > 0) == (is_next > 0)).astype(jnp.float32)
  return {
    "loss": masking + nsp,
    "masking_loss": masking,
    "is_next_loss": nsp,
    "is_next_accuracy": weighted_mean(correct, weights),
  }


@registry.register("task", "seq_bert")
class SeqBertTask(LfbTask):
  """Seq-BERT: BERT backbone, frame masking + NSP."""

  style = "bert"
  name = "seq_bert"
  extra_positions = 3  # two SEPs and the CLS

  def positions_needed(self, seq_max: int) -> int:
    return 2 * seq_max + self.extra_positions

  def __init__(self, config: Any, info: Any, num_classes: int = 0):
    super().__init__(config, info, num_classes)
    rate = config.task.get("masking_rate", 0.2)
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"config.task.masking_rate: expected a value in [0, 1], found {rate}")
    self.masking_rate = float(rate)

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    x, t, mask, _ = self._frames(batch)
    if "bold_next" in batch:
      xb, tb, mb, _ = self._frames(batch, "_next")
      x, t, mask = (jnp.concatenate(p, axis=1) for p in ((x, xb), (t, tb), (mask, mb)))
    variables = self.model.init({"params": rng, "dropout": rng}, x, t, mask)
    return variables["params"], {}

  def draw_mask(self, rng: jax.Array, attention_mask: jax.Array, num_parcels: int) -> jax.Array:
    """(B, S, R) bool: whole frames masked with probability masking_rate."""
    u = jax.random.uniform(rng, attention_mask.shape)
    frames = (u >= 1.0 - self.masking_rate) & attention_mask
    return jnp.broadcast_to(frames[..., None], attention_mask.shape + (num_parcels,))

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
    if "bold_next" not in batch or "next_is_consecutive" not in batch:
      raise ValueError(
        f"{self.name} batch: needs 'bold_next' ... and 'next_is_consecutive' "
        "(set config.data.pairs=True)"
      )
    a, ta, _, la = self._frames(batch)
    b, tb, _, lb = self._frames(batch, "_next")
    x, t, am, tt = pack_pair(a, ta, la, b, tb, lb)
    is_next = 1 - jnp.asarray(batch["next_is_consecutive"]).astype(jnp.int32)
    mask_rng, drop_rng = jax.random.split(rng)
    mm = self.draw_mask(mask_rng, am, x.shape[-1])
    out = self.model.apply(
      {"params": params},
      x,
      t,
      am,
      tt,
      mm,
      deterministic=not train,
      rngs={"dropout": drop_rng} if train else None,
      method="bert",
    )
    metrics = bert_losses(out, x, is_next, row_weights(batch, x.shape[0]))
    return metrics["loss"], metrics
