"""Next-patch prediction (boldGPT): k-means token cross-entropy or masked-pixel MSE.

Batches (from boldjax.data.pipeline) hold patches (B, N, D) float32 already in the
(possibly shuffled) order, tokens (B, N) int32 in the same order, order (B, N) int32,
subject_id (B,) int32 and, for padded eval batches, valid (B,) bool.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.models.patch_gpt import PatchGPT, size_kwargs
from boldjax.tasks.base import PyTree, Task, row_weights, weighted_mean

TARGETS = ("categorical", "continuous")
# config.model fields read here; None means "take the size preset / data default".
MODEL_FIELDS = (
  "name",
  "size",
  "embed_dim",
  "depth",
  "num_heads",
  "mlp_ratio",
  "num_registers",
  "num_subjects",
  "with_sub_embed",
  "with_next_pos",
  "drop_rate",
  "sub_drop_rate",
  "proj_drop_rate",
  "attn_drop_rate",
  "drop_path_rate",
  "layer_norm_eps",
  "gelu_approximate",
  "dtype",
)


def model_from_config(model_cfg: Any, info: Any, target: str, source: str = "config") -> PatchGPT:
  """Build PatchGPT from config.model (+ sizes from the data info)."""
  if model_cfg is None:
    cfg: dict[str, Any] = {}
  else:
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise KeyError(f"{source}.model: unknown fields {unknown}; known: {sorted(MODEL_FIELDS)}")
  if cfg.get("name") not in (None, "patch_gpt"):
    raise ValueError(
      f"{source}.model.name: expected 'patch_gpt' for next_patch, found {cfg['name']!r}"
    )
  if target not in TARGETS:
    raise ValueError(f"{source}.task.target: expected one of {TARGETS}, found {target!r}")
  kwargs: dict[str, Any] = size_kwargs(cfg["size"]) if cfg.get("size") else {}
  for field in MODEL_FIELDS[2:]:
    if cfg.get(field) is not None:
      kwargs[field] = cfg[field]
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  kwargs.setdefault("num_subjects", int(info.num_subjects))
  layout = info.layout
  kwargs.update(num_patches=layout.num_patches, patch_dim=layout.patch_dim)
  kwargs["categorical"] = target == "categorical"
  if kwargs["categorical"]:
    if getattr(info, "tokenizer", None) is None:
      raise ValueError(f"{source}.task.target='categorical' needs a tokenizer in the data info")
    kwargs["vocab_size"] = int(info.tokenizer.vocab_size)
  return PatchGPT(**kwargs)


def categorical_loss(
  logits: jax.Array, tokens: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy averaged over all B*N positions (boldGPT), rows weighted by `weights`."""
  logits = logits.astype(jnp.float32)
  B = logits.shape[0]
  weights = jnp.ones((B,), jnp.float32) if weights is None else weights
  # One max serves logsumexp and the accuracy: argmax is a variadic (value, index) reduce
  # that XLA:CPU runs ~2x slower than the whole loss (issue #6). target >= max differs from
  # argmax == token only on exact ties.
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  logz = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce = (logz - target).mean(axis=1)
  correct = (target >= top).astype(jnp.float32).mean(axis=1)
  loss = weighted_mean(ce, weights)
  return loss, {"loss": loss, "accuracy": weighted_mean(correct, weights)}


def continuous_loss(
  pred: jax.Array, patches: jax.Array, mask: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum(m * (pred - x)^2) / sum(m) over in-mask pixels of valid rows; also R^2."""
  pred = pred.astype(jnp.float32)
  B = pred.shape[0]
  weights = jnp.ones((B,), jnp.float32) if weights is None else weights
  m = jnp.broadcast_to(mask.astype(jnp.float32), pred.shape) * weights[:, None, None]
  denom = jnp.maximum(jnp.sum(m), 1e-12)
  loss = jnp.sum(m * (pred - patches) ** 2) / denom
  mean = jnp.sum(m * patches) / denom
  variance = jnp.sum(m * (patches - mean) ** 2) / denom
  r2 = 1.0 - loss / jnp.maximum(variance, 1e-12)
  return loss, {"loss": loss, "mse": loss, "r2": r2}


@registry.register("task", "next_patch")
class NextPatchTask(Task):
  """boldGPT next-patch objective over flat-map patches (config.task.target picks the head)."""

  def __init__(self, config: ml_collections.ConfigDict, info: Any):
    super().__init__(config, info)
    self.target = config.task.target
    self.model = model_from_config(config.get("model"), info, self.target)
    data_cfg = config.get("data")
    shuffles = data_cfg is not None and bool(data_cfg.get("shuffle_order", False))
    if shuffles and not self.model.with_next_pos:
      raise ValueError(
        "config.model.with_next_pos=False cannot learn config.data.shuffle_order=True: the "
        "model would not know which patch comes next"
      )
    self.patch_mask = np.asarray(info.layout.patch_mask, bool)

  @property
  def categorical(self) -> bool:
    return self.target == "categorical"

  def _inputs(self, batch: dict[str, Any]) -> tuple[jax.Array, Any, Any]:
    patches = batch["patches"]
    N, D = self.model.num_patches, self.model.patch_dim
    if patches.ndim != 3 or tuple(patches.shape[1:]) != (N, D):
      raise ValueError(
        f"next_patch batch['patches']: expected (B, {N}, {D}), found {patches.shape}"
      )
    B = patches.shape[0]
    for key, shape in (("order", (B, N)), ("tokens", (B, N)), ("subject_id", (B,))):
      if key in batch and tuple(batch[key].shape) != shape:
        raise ValueError(f"next_patch batch[{key!r}]: expected {shape}, found {batch[key].shape}")
    if self.categorical and "tokens" not in batch:
      raise ValueError("next_patch batch: 'tokens' is required for target='categorical'")
    subject = batch.get("subject_id") if self.model.with_sub_embed else None
    order = batch.get("order") if self.model.with_next_pos else None
    return patches, subject, order

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    patches, subject, order = self._inputs(batch)
    if subject is not None and not isinstance(subject, jax.core.Tracer):
      ids = np.asarray(subject)
      if ids.size and (ids.min() < 0 or ids.max() >= self.model.num_subjects):
        raise ValueError(
          f"next_patch batch['subject_id']: expected ids in [0, {self.model.num_subjects}) "
          f"(config.model.num_subjects), found range [{ids.min()}, {ids.max()}]"
        )
    variables = self.model.init({"params": rng, "dropout": rng}, patches, subject, order)
    return variables["params"], {}

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
    patches, subject, order = self._inputs(batch)
    out = self.model.apply(
      {"params": params},
      patches,
      subject,
      order,
      deterministic=not train,
      rngs={"dropout": rng} if train else None,
    )
    weights = row_weights(batch, patches.shape[0])
    if self.categorical:
      return categorical_loss(out, batch["tokens"], weights)
    mask = jnp.asarray(self.patch_mask)
    mask = mask[None] if batch.get("order") is None else jnp.take(mask, batch["order"], axis=0)
    return continuous_loss(out, patches, mask, weights)

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """cls (B, D): last position (seen the whole map); mean (B, D); tokens (B, N, D) put
    back in the layout's canonical patch order (undoing batch['order']); token_mask (B, N):
    all True (every layout patch touches the cortex mask)."""
    patches, subject, order = self._inputs(batch)
    feats = self.model.apply({"params": params}, patches, subject, order, method="features")
    if batch.get("order") is not None:
      ranking = jnp.argsort(batch["order"], axis=1)
      feats["tokens"] = jnp.take_along_axis(feats["tokens"], ranking[..., None], axis=1)
    feats["token_mask"] = jnp.ones(feats["tokens"].shape[:2], bool)
    return feats

  def reference_metrics(self) -> dict[str, float]:
    """Unigram baseline: val CE of the add-one-smoothed train token distribution, and the
    val accuracy of always predicting the most frequent train token."""
    counts = getattr(self.info, "token_counts", None)
    if not self.categorical or counts is None:
      return {}
    return unigram_baseline(counts["train"], counts["val"])


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray) -> dict[str, float]:
  """{'unigram_loss': -sum_v q_val(v) log p_train(v), 'unigram_accuracy': q_val(argmax)}."""
  train = np.asarray(train_counts, np.float64)
  val = np.asarray(val_counts, np.float64)
  if train.shape != val.shape or train.ndim != 1:
    raise ValueError(
      f"token_counts: train and val must be (V,) histograms, found {train.shape} and {val.shape}"
    )
  if val.sum() <= 0:
    raise ValueError("token_counts['val']: empty histogram")
  p_train = (train + 1.0) / (train.sum() + len(train))
  q_val = val / val.sum()
  return {
    "unigram_loss": float(-np.sum(q_val * np.log(p_train))),
    "unigram_accuracy": float(q_val[np.argmax(train)]),
  }
