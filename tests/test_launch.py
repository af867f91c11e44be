"""Sweeps: a config's sweep() turns into one command per point."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sweep_prints_one_command_per_point():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.sweep",
      "--config=configs/gpt_small.py",
      "--print",
      "--launcher=slurm",
      "--workdir_root=/runs",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert len(out) == 4
  assert out[0] == (
    "sbatch launch/slurm.sbatch --config=configs/gpt_small.py "
    "--workdir=/runs/target=categorical_lr=0.0003 --config.task.target=categorical "
    "--config.optim.lr=0.0003"
  )
  assert out[3].endswith("--config.task.target=continuous --config.optim.lr=0.001")
