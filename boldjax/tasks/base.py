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

  def finalize_metrics(self, metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """A split's metrics from their example-weighted means (keys may carry `prefix`): the
    place for metrics that are not means (balanced accuracy); default: unchanged."""
    del prefix
    return metrics

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
    Default: with config.task.init_from naming a workdir (a trained run or one written by
    `python -m boldjax.convert`), every param is taken from its latest checkpoint; each
    must be there with the same shape, so a new run starts exactly from those weights.
    """
    init_from = self.config.task.get("init_from", None) if "task" in self.config else None
    if not init_from:
      return params
    return graft_pretrained(params, init_from)

  def load_pretrained_extra(self, params: PyTree, extra: PyTree) -> PyTree:
    """Fresh extra (after load_pretrained gave `params`) -> extra of the pretrained start.

    Default: unchanged. Tasks whose extra holds model weights (an EMA teacher) override it
    so that a fine-tuned run starts from the pretrained teacher too.
    """
    del params
    return extra


def pretrained_extra(workdir: str) -> PyTree:
  """Host copy of TrainState.extra of the latest checkpoint in `workdir`."""
  import flax.linen as nn

  from boldjax import workdir as workdir_lib

  return jax.device_get(nn.unbox(workdir_lib.load_run(workdir).state.extra))


def pretrained_params(workdir: str) -> tuple[PyTree, Any]:
  """(host params, config) of the latest checkpoint in `workdir`."""
  import flax.linen as nn

  from boldjax import workdir as workdir_lib

  run = workdir_lib.load_run(workdir)
  return jax.device_get(nn.unbox(run.state.params)), run.config


def graft_pretrained(
  params: PyTree,
  workdir: str,
  *,
  keep_fresh: tuple[str, ...] = (),
  pretrained: PyTree | None = None,
  source: str | None = None,
) -> PyTree:
  """params with every leaf whose path names none of `keep_fresh` taken from `workdir`.

  Raises InputError naming each missing param and shape mismatch (config.task.init_from).
  """
  import numpy as np

  from boldjax.cli import InputError

  if pretrained is None:
    pretrained, config = pretrained_params(workdir)
    source = source or f"{workdir} (task {config.task.name!r})"
  source = source or workdir
  keystr = jax.tree_util.keystr
  flat_new = {keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat_old = {keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(pretrained)}
  fresh = lambda key: any(name in key for name in keep_fresh)
  problems = []
  for key, value in flat_new.items():
    if fresh(key):
      continue
    if key not in flat_old:
      problems.append(f"{key}: missing")
    elif np.shape(flat_old[key]) != np.shape(value):
      problems.append(f"{key}: expected {np.shape(value)}, found {np.shape(flat_old[key])}")
  if problems:
    raise InputError(
      f"config.task.init_from: {source} does not fit this model: {problems[:8]}"
      + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
    )

  def pick(path, value):
    key = keystr(path)
    return value if fresh(key) else np.asarray(flat_old[key], dtype=np.asarray(value).dtype)

  return jax.tree_util.tree_map_with_path(pick, params)


def row_weights(batch: dict[str, Any], batch_size: int) -> jax.Array:
  """(B,) float32 weights: batch['valid'] when present (padded eval rows get 0), else ones."""
  if "valid" not in batch:
    return jnp.ones((batch_size,), jnp.float32)
  return jnp.asarray(batch["valid"]).astype(jnp.float32).reshape(batch_size)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over rows (0 when every row is padding)."""
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)
