"""Causal sequence modelling (learning-from-brains GPT) and the shared LfB task plumbing.

Batches (parcellated pipeline): bold (B, T, R) float32 zero-padded, t_sec (B, T) seconds
from chunk start, mask (B, T) bool, length (B,) int32, valid (B,) bool in eval.

CSM as the original: one frame i ~ U{1..len-1} per row becomes the MSK token, attention is
cut to 0..i, later frames are zeroed; L1 between the output AT i and frame i (mean over
parcels, then over rows). Rows shorter than 2 frames (or padded eval rows) do not count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.models.lfb import LfbModel
from boldjax.tasks.base import PyTree, Task, row_weights, weighted_mean

# config.model field -> LfbModel kwarg (names follow the original's train.py flags).
MODEL_FIELDS = {
  "embedding_dim": "embed_dim",
  "num_hidden_layers": "num_layers",
  "num_attention_heads": "num_heads",
  "intermediate_dim_factor": "intermediate_factor",
  "n_positions": "n_positions",
  "dropout": "dropout",
  "tr_precision": "tr_precision",
  "tr_max": "tr_max",
  "num_hidden_layers_embedding_model": "embed_layers",
  "num_hidden_layers_unembedding_model": "unembed_layers",
  "hidden_activation": "hidden_activation",
  "decode_pooling": "decode_pooling",
  "dtype": "dtype",
}
OTHER_MODEL_FIELDS = ("name", "teacher_forcing_ratio")


def model_from_config(
  model_cfg: Any, info: Any, style: str, num_classes: int = 0, source: str = "config"
) -> LfbModel:
  """LfbModel from config.model; the input width is info.num_parcels."""
  cfg = (
    {}
    if model_cfg is None
    else dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  )
  unknown = sorted(set(cfg) - set(MODEL_FIELDS) - set(OTHER_MODEL_FIELDS))
  if unknown:
    raise KeyError(
      f"{source}.model: unknown fields {unknown}; known: "
      f"{sorted(set(MODEL_FIELDS) | set(OTHER_MODEL_FIELDS))}"
    )
  if cfg.get("name") not in (None, "lfb"):
    raise ValueError(f"{source}.model.name: expected 'lfb', found {cfg['name']!r}")
  kwargs: dict[str, Any] = {MODEL_FIELDS[k]: v for k, v in cfg.items() if k in MODEL_FIELDS}
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return LfbModel(style=style, in_dim=int(info.num_parcels), num_classes=num_classes, **kwargs)


def l1_rows(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean |pred - target| over the last axis, averaged over weighted rows (CSM loss)."""
  per_row = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return weighted_mean(per_row, weights)


def l1_masked(pred: jax.Array, target: jax.Array, mask: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(m |pred - target|) / sum(m) over (B, ...) entries, rows weighted (masked_select L1)."""
  m = mask.astype(jnp.float32) * weights.reshape((-1,) + (1,) * (mask.ndim - 1))
  err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(m * err) / jnp.maximum(jnp.sum(m), 1.0)


class LfbTask(Task):
  """Shared plumbing of the learning-from-brains objectives (model, batch checks, features)."""

  style: ClassVar[str] = "csm"
  name: ClassVar[str] = "lfb"
  extra_positions: ClassVar[int] = 1  # CLS in decoding mode

  def __init__(self, config: ml_collections.ConfigDict, info: Any, num_classes: int = 0):
    super().__init__(config, info)
    self.model = model_from_config(config.get("model"), info, self.style, num_classes)
    seq_max = getattr(info, "seq_max", None)
    if seq_max is not None and self.model.architecture != "autoencoder":
      need = self.positions_needed(int(seq_max))
      if need > self.model.n_positions:
        raise ValueError(
          f"config.model.n_positions: {self.name} with info.seq_max={seq_max} needs at least "
          f"{need} positions, found {self.model.n_positions}"
        )

  def positions_needed(self, seq_max: int) -> int:
    return seq_max + self.extra_positions

  def _frames(self, batch: dict[str, Any], suffix: str = "") -> tuple[Any, Any, Any, Any]:
    """bold, t_sec, mask, length of the batch (or of its *_next half), shape-checked."""
    bold = batch["bold" + suffix]
    R = int(self.info.num_parcels)
    if bold.ndim != 3 or bold.shape[-1] != R:
      raise ValueError(
        f"{self.name} batch['bold{suffix}']: expected (B, T, {R}) (info.num_parcels), "
        f"found {tuple(bold.shape)}"
      )
    B, T = bold.shape[:2]
    for key, shape in (("t_sec", (B, T)), ("mask", (B, T))):
      if tuple(batch[key + suffix].shape) != shape:
        raise ValueError(
          f"{self.name} batch['{key}{suffix}']: expected {shape}, "
          f"found {tuple(batch[key + suffix].shape)}"
        )
    mask = jnp.asarray(batch["mask" + suffix]).astype(bool)
    length = batch.get("length" + suffix)
    length = jnp.sum(mask, axis=1).astype(jnp.int32) if length is None else jnp.asarray(length)
    t = batch["t_sec" + suffix]
    if isinstance(t, np.ndarray) and t.size and t.max() >= self.model.tr_max:
      raise ValueError(
        f"{self.name} batch['t_sec{suffix}']: times must stay below config.model.tr_max="
        f"{self.model.tr_max} s (the TR embedding table), found {t.max()}"
      )
    return jnp.asarray(bold, jnp.float32), jnp.asarray(t, jnp.float32), mask, length

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    x, t, mask, _ = self._frames(batch)
    variables = self.model.init({"params": rng, "dropout": rng}, x, t, mask)
    return variables["params"], {}

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """cls (B, D): the hidden state the decoding head pools (GPT: CLS after the last frame;
    BERT: index 0 as the original; LSTM: encoder hidden); pooled (B, D): after the pooler;
    mean (B, D): mean hidden state over the real frames; tokens (B, T, D) + token_mask
    (B, T): the per-frame hidden states (for the attentive probe; padding frames masked)."""
    x, t, mask, _ = self._frames(batch)
    out = self.model.apply({"params": params}, x, t, mask, method="encode")
    h = out["hidden_states"]
    if self.model.architecture == "autoencoder":
      cls = out["pooler_outputs"]
    else:
      cls = jnp.take_along_axis(h, out["cls_index"][:, None, None], axis=1)[:, 0]
      if self.model.architecture == "bert":
        cls = h[:, 0]
    T = mask.shape[1]
    m = mask.astype(h.dtype)[..., None]
    mean = jnp.sum(h[:, :T] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    feats = {"cls": cls, "pooled": out["pooler_outputs"], "mean": mean}
    if h.ndim == 3 and h.shape[1] >= T:
      feats["tokens"], feats["token_mask"] = h[:, :T], mask
    return feats


def draw_masking_i(rng: jax.Array, length: jax.Array) -> jax.Array:
  """i ~ U{1..len-1} per row (torch.randint(1, len)); rows with len < 2 get i = 1."""
  n = jnp.maximum(length.astype(jnp.int32) - 1, 1)
  u = jax.random.uniform(rng, length.shape)
  return 1 + jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


@registry.register("task", "csm")
class CsmTask(LfbTask):
  """learning-from-brains causal sequence modelling with a GPT-2 backbone."""

  style = "csm"
  name = "csm"

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
    x, t, _, length = self._frames(batch)
    mask_rng, drop_rng = jax.random.split(rng)
    i = draw_masking_i(mask_rng, length)
    out = self.model.apply(
      {"params": params},
      x,
      t,
      i,
      deterministic=not train,
      rngs={"dropout": drop_rng} if train else None,
      method="csm",
    )
    target = jnp.take_along_axis(x, i[:, None, None], axis=1)[:, 0]
    weights = row_weights(batch, x.shape[0]) * (length >= 2).astype(jnp.float32)
    loss = l1_rows(out["masked_predictions"], target, weights)
    return loss, {"loss": loss, "masking_loss": loss}
