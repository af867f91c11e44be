"""The Task interface: what the one train loop needs from an objective.

A task owns its model and loss; train.py only calls init / loss / update_extra, evaluators
and colabs call features / reference_metrics. Everything family-specific stays behind it.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any


class Task(abc.ABC):
  """Base class for objectives registered as registry.register("task", name)."""

  def __init__(self, config: ml_collections.ConfigDict, info: Any):
    """config: the whole experiment config; info: the data info from data.pipeline.prepare."""
    self.config = config
    self.info = info

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    """(params, extra). params may carry nn.Partitioned boxes (the loop unboxes them)."""

  @abc.abstractmethod
  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, scalar metrics). Rows with batch['valid'] == False must not count."""

  def update_extra(self, params: PyTree, extra: PyTree, step: jax.Array) -> PyTree:
    """Post-step update of non-optimised state (EMA teachers, centres); default: unchanged."""
    del params, step
    return extra

  def feature_params(self, params: PyTree, extra: PyTree) -> PyTree:
    """What features() runs on: the params by default; a distilled task's EMA teacher."""
    del extra
    return params

  @abc.abstractmethod
  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Representations for probes and maps ('cls', 'tokens', ...) from feature_params(...)."""

  def reference_metrics(self) -> dict[str, float]:
    """Baselines printed next to eval metrics (e.g. a unigram loss); default none."""
    return {}

  def trainable(self, params: PyTree) -> PyTree | None:
    """Bool tree: which params the optimizer updates (frozen fine-tuning); None = all."""
    del params
    return None

  def load_pretrained(self, params: PyTree) -> PyTree:
    """Fresh params -> params with pretrained parts grafted in (host-side, numpy ok).

    Called once by the train loop after initialisation of a new run (never on resume).
    """
    return params


def row_weights(batch: dict[str, Any], batch_size: int) -> jax.Array:
  """(B,) float32 weights: batch['valid'] when present (padded eval rows get 0), else ones."""
  if "valid" not in batch:
    return jnp.ones((batch_size,), jnp.float32)
  return jnp.asarray(batch["valid"]).astype(jnp.float32).reshape(batch_size)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over rows (0 when every row is padding)."""
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)
