"""Rebuild a trained run from its workdir alone (config.json + checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from jax.sharding import Mesh

from boldjax import build, checkpoint
from boldjax import state as state_lib


@dataclasses.dataclass
class LoadedRun:
  """A built run (data-parallel on this machine's devices) and its restored state."""

  run: build.Run
  state: state_lib.TrainState
  step: int

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  @property
  def info(self) -> Any:
    return self.run.info

  @property
  def task(self) -> Any:
    return self.run.task

  @property
  def mesh(self) -> Mesh:
    return self.run.mesh

  @property
  def rules(self) -> tuple:
    return self.run.rules


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
  """Config, data info, task and the restored train state (latest step by default)."""
  config = checkpoint.load_config(workdir)
  run = build.build_run(config, mesh_axes=build.DATA_PARALLEL)
  manager = checkpoint.make_manager(workdir, every_steps=1, keep=config.keep_checkpoints)
  with run.context():
    restored, restored_step = checkpoint.restore(manager, run.spec.abstract, None, step)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint found under {workdir}/checkpoints")
  return LoadedRun(run, restored, restored_step)
