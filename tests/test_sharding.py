"""Parallelism strategies give the same training, and FSDP really splits the state."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from run_helpers import gpt_runlocal

from boldjax import build, sharding, train, workdir

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
  "dp": (("data", -1), ("fsdp", 1), ("tensor", 1)),
  "fsdp": (("data", 1), ("fsdp", -1), ("tensor", 1)),
  "dp_x_tp": (("data", -1), ("fsdp", 1), ("tensor", 2)),
  "fsdp_x_tp": (("data", 2), ("fsdp", -1), ("tensor", 2)),
}


def _config(mesh):
  return gpt_runlocal(**{
    "mesh": mesh, "total_steps": 3, "checkpoint_every": 3,
    "model.num_heads": 4,  # divisible by the tensor axis
    "evals.val.every_steps": 3,
  })  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for name, mesh in STRATEGIES.items():
    run_dir = tmp_path_factory.mktemp(name)
    metrics = train.run(_config(mesh), str(run_dir))
    out[name] = (metrics, workdir.load_run(str(run_dir)))
  # The same run on ONE device, in a process of its own.
  run_dir = tmp_path_factory.mktemp("single")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "boldjax.main",
      "--config=configs/gpt_small.py:runlocal",
      "--config.total_steps=3",
      "--config.checkpoint_every=3",
      "--config.model.num_heads=4",
      "--config.evals.val.every_steps=3",
      f"--workdir={run_dir}",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
  )
  out["single"] = (None, workdir.load_run(str(run_dir)))
  return out


@pytest.mark.slow
def test_data_parallel_matches_one_device(runs):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
    runs["dp"][1].state.params,
    runs["single"][1].state.params,
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "dp_x_tp", "fsdp_x_tp"])
def test_strategies_match_data_parallel(runs, name):
  ref_metrics, ref = runs["dp"]
  metrics, run = runs[name]
  np.testing.assert_allclose(metrics["val/loss"], ref_metrics["val/loss"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
    run.state.params,
    ref.state.params,
  )


def test_fsdp_holds_an_eighth_of_the_state_per_device():
  per_device = {}
  for name in ("dp", "fsdp"):
    config = _config(STRATEGIES[name])
    run = build.build_run(config)
    with run.context():
      state = run.spec.init(run.init_rng)
    tree = (state.params, state.opt_state)
    per_device[name] = sharding.bytes_per_device(tree)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device[name + "_total"] = total
  dp, fsdp = per_device["dp"], per_device["fsdp"]
  assert set(dp.values()) == {per_device["dp_total"]}  # DP: every device holds everything
  # FSDP: about 1/8 each; vectors/small leaves that do not split stay replicated.
  assert max(fsdp.values()) < 0.2 * per_device["fsdp_total"]
  assert sum(fsdp.values()) < 1.6 * per_device["fsdp_total"]


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch(tmp_path):
  """2 microbatches of 8 per update == batches of 16 (same examples, same schedule)."""
  runs = {}
  for name, batch, accum, steps in (("large", 16, 1, 2), ("accum", 8, 2, 4)):
    config = _config(STRATEGIES["dp"])
    config.unlock()
    config.data.batch_size = batch
    config.optim.accum_steps = accum
    config.total_steps = steps
    config.checkpoint_every = steps
    config.evals.val.every_steps = steps
    config.lock()
    train.run(config, str(tmp_path / name))
    runs[name] = workdir.load_run(str(tmp_path / name))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
    runs["accum"].state.params,
    runs["large"].state.params,
  )
