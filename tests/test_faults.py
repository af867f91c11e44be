"""Faults: preemption (SIGTERM), unreadable checkpoints, and diverging losses."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax import train, workdir
from tests.run_helpers import gpt_runlocal

REPO = Path(__file__).resolve().parents[1]


_config = gpt_runlocal


def _steps(run_dir):
  ckpts = Path(run_dir) / "checkpoints"
  return sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_checkpoints_current_step_and_exits_zero(tmp_path):
  run_dir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "boldjax.main",
    "--config=configs/gpt_small.py:runlocal",
    "--config.total_steps=100000",
    "--config.checkpoint_every=1000",
    "--config.log_every=1",
    f"--workdir={run_dir}",
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env={**os.environ, "XLA_FLAGS": ""},
  )
  lines = []
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "received SIGTERM at step" in out
  stopped_at = int(out.split("received SIGTERM at step ")[1].split(":")[0])
  assert _steps(run_dir) == [stopped_at]  # saved off-schedule (interval is 1000)
  assert stopped_at >= 3


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path):
  config = _config(total_steps=4, checkpoint_every=2)
  train.run(config, str(tmp_path / "run"))
  assert _steps(tmp_path / "run") == [2, 4]
  # Corrupt every array file of the latest checkpoint's state.
  latest = tmp_path / "run" / "checkpoints" / "4" / "state"
  corrupted = 0
  for path in latest.rglob("*"):
    if path.is_file() and path.suffix not in (".json",) and path.stat().st_size > 0:
      path.write_bytes(b"\0" * 7)
      corrupted += 1
  assert corrupted
  with pytest.warns(UserWarning, match="checkpoint at step 4 .* is unreadable"):
    run = workdir.load_run(str(tmp_path / "run"))
  assert run.step == 2


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = _config(total_steps=6, checkpoint_every=2, log_every=100)
  real_to_global = train.sharding.to_global
  calls = {"n": 0}

  def poisoned_to_global(batch, sharding):
    calls["n"] += 1
    if calls["n"] >= 4 and "patches" in batch:  # the 4th training batch onwards is NaN
      batch = {**batch, "patches": np.full_like(batch["patches"], np.nan)}
    return real_to_global(batch, sharding)

  monkeypatch.setattr(train.sharding, "to_global", poisoned_to_global)
  with pytest.raises(FloatingPointError, match="non-finite training metrics at step 4"):
    train.run(config, str(tmp_path / "run"))
  assert _steps(tmp_path / "run") == [2]
  run = workdir.load_run(str(tmp_path / "run"))
  assert int(run.state.step) == 2
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(run.state.params))
