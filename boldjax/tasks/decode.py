"""Downstream mental-state decoding on a learning-from-brains backbone (Fig. 5 of the paper).

Model: the backbone named by config.task.backbone ('csm' | 'seq_bert' | 'net_bert' |
'autoencoder') in decoding mode: CLS appended after the last valid frame, pooled as the
original (GPT: the CLS; BERT: index 0; LSTM: the encoder pooler), pooler Linear+Tanh+Dropout,
then Linear(num_classes) trained with cross-entropy on batch['label'].

config.task.init_from: a pretrained workdir (its latest checkpoint is grafted in by
load_pretrained; every backbone param must be present with the same shape) or None to train
from scratch. config.task.freeze=True trains only the head (pooler + decoding_head).

Metrics: loss, accuracy and, for balanced accuracy over a whole split, per-class fractions
class_{k}_correct = #(label k & predicted k) / #rows and class_{k}_count = #(label k) / #rows.
The loss evaluator averages metrics weighted by row count, so both become split-level
fractions and `finalize_metrics` turns them into the exact split balanced accuracy (the
per-batch `balanced_accuracy` is only a training-time estimate). Rows with label < 0 or
valid == False do not count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax import registry
from boldjax.tasks.base import (
  PyTree,
  graft_pretrained,
  pretrained_params,
  row_weights,
  weighted_mean,
)
from boldjax.tasks.csm import LfbTask

BACKBONES = {"csm": "csm", "seq_bert": "bert", "net_bert": "netbert", "autoencoder": "autoencoder"}
HEAD = ("pooler", "decoding_head")


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean CE over weighted rows (torch CrossEntropyLoss, reduction='mean')."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  safe = jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1)
  target = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
  return weighted_mean(logz - target, weights)


def balanced_accuracy_from(metrics: dict[str, float], num_classes: int, prefix: str = "") -> float:
  """Mean over present classes of correct_k / count_k from (averaged) class metrics."""
  recalls = []
  for k in range(num_classes):
    count = float(metrics.get(f"{prefix}class_{k}_count", 0.0))
    if count > 0:
      recalls.append(float(metrics[f"{prefix}class_{k}_correct"]) / count)
  return float(np.mean(recalls)) if recalls else float("nan")


@registry.register("task", "decode")
class DecodeTask(LfbTask):
  name = "decode"

  def __init__(self, config: Any, info: Any):
    task = config.task
    backbone = task.get("backbone", None)
    self.init_from = task.get("init_from", None)
    if backbone is None and self.init_from:
      from boldjax import checkpoint

      backbone = checkpoint.load_config(self.init_from).task.name
    if backbone not in BACKBONES:
      raise ValueError(
        f"config.task.backbone: expected one of {sorted(BACKBONES)}, found {backbone!r}"
      )
    self.backbone = backbone
    self.style = BACKBONES[backbone]
    self.extra_positions = 1
    num_classes = int(getattr(info, "num_classes", 0) or 0)
    if num_classes < 2:
      raise ValueError(f"decode info.num_classes: expected >= 2 classes, found {num_classes}")
    self.num_classes = num_classes
    self.freeze = bool(task.get("freeze", False))
    super().__init__(config, info, num_classes)

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
    out = self.model.apply(
      {"params": params},
      x,
      t,
      mask,
      deterministic=not train,
      rngs={"dropout": rng} if train else None,
      method="decode",
    )
    labels = jnp.asarray(batch["label"]).astype(jnp.int32).reshape(-1)
    weights = row_weights(batch, x.shape[0]) * (labels >= 0).astype(jnp.float32)
    loss = cross_entropy(out["logits"], labels, weights)
    pred = jnp.argmax(out["logits"], axis=-1)
    correct = (pred == labels).astype(jnp.float32)
    metrics = {"loss": loss, "decoding_loss": loss, "accuracy": weighted_mean(correct, weights)}
    # Per-class fractions over the counted rows (see the module docstring).
    n = jnp.maximum(jnp.sum(row_weights(batch, x.shape[0])), 1.0)
    recalls, present = [], []
    for k in range(self.num_classes):
      is_k = weights * (labels == k).astype(jnp.float32)
      metrics[f"class_{k}_count"] = jnp.sum(is_k) / n
      metrics[f"class_{k}_correct"] = jnp.sum(is_k * correct) / n
      recalls.append(jnp.sum(is_k * correct) / jnp.maximum(jnp.sum(is_k), 1e-12))
      present.append((jnp.sum(is_k) > 0).astype(jnp.float32))
    recalls, present = jnp.stack(recalls), jnp.stack(present)
    metrics["balanced_accuracy"] = jnp.sum(recalls * present) / jnp.maximum(jnp.sum(present), 1.0)
    return loss, metrics

  def finalize_metrics(self, metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Split-level metrics: replace the batch-averaged balanced accuracy by the exact one."""
    out = dict(metrics)
    out[f"{prefix}balanced_accuracy"] = balanced_accuracy_from(metrics, self.num_classes, prefix)
    return out

  def reference_metrics(self) -> dict[str, float]:
    """Chance level of balanced accuracy (1 / num_classes)."""
    return {"chance_balanced_accuracy": 1.0 / self.num_classes}

  def trainable(self, params: PyTree) -> PyTree | None:
    """freeze=True: only the pooler(s) and the decoding head train."""
    if not self.freeze:
      return None

    def is_head(path, _):
      names = [getattr(k, "key", str(k)) for k in path]
      return any(n in HEAD for n in names)

    return jax.tree_util.tree_map_with_path(is_head, params)

  def load_pretrained(self, params: PyTree) -> PyTree:
    """Graft every backbone param of the init_from run (all except decoding_head)."""
    if not self.init_from:
      return params
    pretrained, config = pretrained_params(self.init_from)
    source = f"{self.init_from} (task {config.task.name!r})"
    if BACKBONES.get(config.task.name, BACKBONES.get(config.task.get("backbone"))) != self.style:
      raise ValueError(
        f"config.task.init_from: {source} is not a {self.backbone!r} run "
        f"(config.task.backbone={self.backbone!r})"
      )
    return graft_pretrained(
      params, self.init_from, keep_fresh=("decoding_head",), pretrained=pretrained, source=source
    )
