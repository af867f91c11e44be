"""Evaluator: the task's own loss and metrics over a held-out split."""

from __future__ import annotations

from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from boldjax import registry, sharding
from boldjax.data import pipeline_for


@registry.register("evaluator", "loss")
class LossEvaluator:
  """Averages task.loss(train=False) metrics over every real (non-padding) example."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, *, task, info, config, mesh, rules):
    self.name = name
    self.every_steps = cfg.every_steps
    self.split = cfg.split
    self.max_batches = cfg.get("max_batches", None)
    self._task, self._info, self._config = task, info, config
    self._mesh, self._rules = mesh, rules
    self._batch_sh = sharding.batch_sharding(mesh)
    self._rng = jax.random.key(config.seed + 1)

    def eval_step(params, extra, batch):
      _, metrics = task.loss(params, extra, batch, self._rng, train=False)
      count = jnp.sum(batch["valid"]).astype(jnp.float32)
      return {k: v * count for k, v in metrics.items()}, count

    self._eval_step = jax.jit(eval_step)

  def run(self, state, step: int) -> Iterator[tuple[str, float]]:
    cfg = self._config
    batch_size = cfg.data.eval_batch_size // jax.process_count()
    ds = pipeline_for(cfg.data).make_dataset(
      cfg.data,
      self._info,
      split=self.split,
      train=False,
      seed=cfg.seed,
      batch_size=batch_size,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
    sums: dict[str, float] = {}
    total = 0.0
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
      for i, batch in enumerate(ds):
        if self.max_batches is not None and i >= self.max_batches:
          break
        batch = sharding.to_global(batch, self._batch_sh)
        weighted, count = self._eval_step(state.params, state.extra, batch)
        for k, v in weighted.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        total += float(count)
    if total == 0:
      raise ValueError(f"evaluator {self.name!r}: split {self.split!r} yielded no examples")
    means = {k: sums[k] / total for k in sorted(sums)}
    means = self._task.finalize_metrics(means)  # split-level metrics that are not means
    for k in sorted(means):
      yield f"{self.name}/{k}", means[k]
