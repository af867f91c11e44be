"""One way to build a run from its config: mesh -> rules -> pipeline -> example -> task ->
optimizer -> sharded state spec -> jitted train step.

Training, reloading a workdir, conversion, the benchmarks and the tests all call
`build_run`, so a change to how a run is put together is made here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from boldjax import optim, registry, sharding
from boldjax import state as state_lib
from boldjax.cli import InputError
from boldjax.data import pipeline_for

# Reloading a run for sampling, evaluation or conversion: data-parallel over every local
# device, whatever mesh it was trained on (the checkpoint restores onto any mesh).
DATA_PARALLEL = (("data", -1), ("fsdp", 1), ("tensor", 1))


@dataclasses.dataclass
class Run:
  """What a config's run is made of; `train_step` is traced on first call in `context()`."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple
  batch_sharding: NamedSharding
  data: Any  # the registered pipeline of config.data.source
  info: Any  # data.prepare(config.data): layout, sizes, tokenizer ...
  task: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  spec: state_lib.StateSpec
  init_rng: jax.Array
  step_rng: jax.Array
  train_step: Callable  # jitted, donated (state, global batch) -> (state, metrics)

  @property
  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.spec.abstract.params))

  def context(self) -> contextlib.ExitStack:
    """The mesh and logical-axis rules every traced function of the run needs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def train_dataset(self, batch_size: int | None = None) -> Any:
    """This process's shard of the train split (batch_size: this process's batch)."""
    return train_dataset(self.data, self.config, self.info, batch_size)


def train_dataset(data: Any, config: ml_collections.ConfigDict, info: Any, batch_size=None):
  if batch_size is None:
    batch_size = config.data.batch_size // jax.process_count()
  return data.make_dataset(
    config.data,
    info,
    split="train",
    train=True,
    seed=config.seed,
    batch_size=batch_size,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = config.data.batch_size
  if batch % data_ways or batch % jax.process_count():
    raise InputError(
      f"config.data.batch_size: expected a multiple of the data-parallel devices "
      f"({data_ways}) and of the process count ({jax.process_count()}), found {batch}"
    )


def build_run(
  config: ml_collections.ConfigDict,
  *,
  mesh_axes: Sequence[tuple[str, int]] | None = None,
  example: Any = None,
) -> Run:
  """The run `config` describes, not yet initialised (`run.spec.init(run.init_rng)`).

  mesh_axes: None for config.mesh (training: the batch must split over it), or e.g.
  DATA_PARALLEL to reload a run on this machine's devices. example: a host-local batch to
  shape the state from (default: the first train batch, one example per device when
  mesh_axes is given).
  """
  mesh = sharding.make_mesh(config.mesh if mesh_axes is None else mesh_axes)
  if mesh_axes is None:
    check_batch_size(config, mesh)
  rules = sharding.logical_rules(config.sharding.rules)
  data = pipeline_for(config.data)
  info = data.prepare(config.data)
  if example is None:
    per_process = None if mesh_axes is None else jax.device_count() // jax.process_count()
    example = next(iter(train_dataset(data, config, info, per_process)))
  example = state_lib.global_example(example)
  task = registry.get("task", config.task.name)(config, info)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init, init_rng, example)  # traced once: mask and spec
    trainable = task.trainable(state_lib.strip_boxes(boxed[0]))
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, trainable)
    spec = state_lib.make_state_spec(task, tx, example, init_rng, mesh, rules, boxed=boxed)
  batch_sharding = sharding.batch_sharding(mesh)
  step = state_lib.make_train_step(task, tx, schedule, step_rng, config.optim.accum_steps)
  train_step = jax.jit(
    step,
    in_shardings=(spec.shardings, batch_sharding),
    out_shardings=(spec.shardings, None),
    donate_argnums=0,
  )
  return Run(
    config, mesh, rules, batch_sharding, data, info, task, tx, schedule, spec,
    init_rng, step_rng, train_step,
  )  # fmt: skip
