"""End-to-end: the train loop on the runlocal config, checkpoints, and exact resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from boldjax import checkpoint, train, workdir
from boldjax.metrics import read_jsonl
from tests.run_helpers import gpt_runlocal

REPO = Path(__file__).resolve().parents[1]


_config = gpt_runlocal


class _Crash(Exception):
  pass


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  config = _config(total_steps=6, checkpoint_every=2)
  full = train.run(config, str(tmp_path / "full"))
  assert np.isfinite(full["val/loss"])

  real_save = checkpoint.save

  def crashing_save(manager, step, state, data_iter, *, force=False):
    if step == 4:  # dies after step 4's update, before its checkpoint: step 2 survives
      manager.wait_until_finished()
      raise _Crash
    return real_save(manager, step, state, data_iter, force=force)

  monkeypatch.setattr(train.checkpoint, "save", crashing_save)
  with pytest.raises(_Crash):
    train.run(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train.checkpoint, "save", real_save)
  assert (
    checkpoint.make_manager(str(tmp_path / "resumed"), every_steps=2, keep=3).latest_step() == 2
  )
  train.run(config, str(tmp_path / "resumed"))

  a = workdir.load_run(str(tmp_path / "full"))
  b = workdir.load_run(str(tmp_path / "resumed"))
  assert a.step == b.step == 6
  jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
  jax.tree.map(np.testing.assert_array_equal, a.state.opt_state, b.state.opt_state)

  rows = read_jsonl(os.path.join(tmp_path / "full", "metrics.jsonl"))
  logged = [r["step"] for r in rows if "train/loss" in r]
  assert logged == [2, 4, 6]


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=configs/gpt_small.py:runlocal", "--config.model.dept=2"],
      'Did you mean "depth" instead of "dept"?',
    ),
    (
      ["--config=configs/gpt_small.py:runlocl"],
      "config argument 'runlocl' is unknown; known arguments: ['ordering', 'runlocal'",
    ),
  ],
)
def test_command_line_typos_are_errors_that_suggest(args, message, tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "boldjax.main", f"--workdir={tmp_path}", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert out.returncode != 0
  assert message in out.stderr


def _main(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "boldjax.main",
    "--config=configs/gpt_small.py:runlocal",
    "--config.total_steps=10",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    f"--workdir={workdir}",
    *extra,
  ]


@pytest.mark.slow
def test_kill_9_then_restart_matches_uninterrupted(tmp_path):
  """A real SIGKILL mid-run; the restarted run ends with the uninterrupted run's params."""
  env = {**os.environ, "XLA_FLAGS": ""}
  subprocess.run(_main(tmp_path / "full"), check=True, cwd=REPO, env=env, capture_output=True)

  victim = tmp_path / "killed"
  proc = subprocess.Popen(
    _main(victim), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpts = victim / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if any(int(p.name) >= 4 for p in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert killed_at < 10

  out = subprocess.run(_main(victim), check=True, cwd=REPO, env=env, capture_output=True, text=True)
  assert "resumed from" in out.stdout
  a = workdir.load_run(str(tmp_path / "full"))
  b = workdir.load_run(str(victim))
  assert a.step == b.step == 10
  jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)
