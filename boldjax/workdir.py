"""Rebuild a trained run from its workdir alone (config.json + checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from boldjax import checkpoint, optim, registry, sharding
from boldjax import state as state_lib
from boldjax.data import pipeline_for


@dataclasses.dataclass
class LoadedRun:
  config: ml_collections.ConfigDict
  info: Any
  task: Any
  state: state_lib.TrainState
  step: int
  mesh: Mesh
  rules: tuple


@dataclasses.dataclass
class RunSpec:
  """What a config's checkpoint restores into: data info, task, optimizer, sharded state."""

  config: ml_collections.ConfigDict
  info: Any
  task: Any
  tx: Any
  spec: state_lib.StateSpec
  mesh: Mesh
  rules: tuple


def run_spec(config: ml_collections.ConfigDict, rng: jax.Array | None = None) -> RunSpec:
  """The run a config describes, data-parallel over every local device (not initialised)."""
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
  rules = sharding.logical_rules(config.sharding.rules)
  data = pipeline_for(config.data)
  info = data.prepare(config.data)
  task = registry.get("task", config.task.name)(config, info)
  local = next(
    iter(
      data.make_dataset(
        config.data, info, split="train", train=True, seed=config.seed,
        batch_size=jax.device_count() // jax.process_count(),
      )
    )
  )  # fmt: skip
  example = state_lib.global_example(local)
  tx, _ = optim.make_optimizer(
    config.optim, config.total_steps, state_lib.trainable_mask(task, example)
  )
  rng = jax.random.key(0) if rng is None else rng
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = state_lib.make_state_spec(task, tx, example, rng, mesh, rules)
  return RunSpec(config, info, task, tx, spec, mesh, rules)


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
  """Config, data info, task and the restored train state (latest step by default)."""
  config = checkpoint.load_config(workdir)
  run = run_spec(config)
  manager = checkpoint.make_manager(workdir, every_steps=1, keep=config.keep_checkpoints)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    restored, restored_step = checkpoint.restore(manager, run.spec.abstract, None, step)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint found under {workdir}/checkpoints")
  return LoadedRun(config, run.info, run.task, restored, restored_step, run.mesh, run.rules)
