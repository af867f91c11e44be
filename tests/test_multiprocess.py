"""Two processes (2 CPU devices each) on localhost train, checkpoint, restore and match
the same run in one process."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from boldjax import workdir

REPO = Path(__file__).resolve().parents[1]
ARGS = [
  "--config=configs/gpt_small.py:runlocal",
  "--config.total_steps=6",
  "--config.checkpoint_every=2",
  "--config.keep_checkpoints=5",
]


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(run_dir) -> None:
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "boldjax.main",
        *ARGS,
        f"--workdir={run_dir}",
        f"--coordinator=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "2 process(es)" in outs[0] and "mesh {'data': 4" in outs[0]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
  single = tmp_path / "single"
  subprocess.run(
    [sys.executable, "-m", "boldjax.main", *ARGS, f"--workdir={single}"],
    cwd=REPO,
    env=_env(4),
    check=True,
    capture_output=True,
  )

  multi = tmp_path / "multi"
  _two_processes(multi)
  ref = workdir.load_run(str(single))
  run = workdir.load_run(str(multi))
  assert run.step == ref.step == 6
  close = lambda a, b: np.testing.assert_allclose(
    np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
  )
  jax.tree.map(close, run.state.params, ref.state.params)

  # Lose the last two checkpoints and resume from step 2 with two processes again.
  for step in ("4", "6"):
    shutil.rmtree(multi / "checkpoints" / step)
  _two_processes(multi)
  resumed = workdir.load_run(str(multi))
  assert resumed.step == 6
  jax.tree.map(close, resumed.state.params, ref.state.params)
