"""Run a config's sweep: `python -m launch.sweep --config=configs/gpt_small.py`.

The config file's `sweep()` yields override dicts ({"optim.lr": 1e-3, ...}). Each point
runs one after another here, in its own workdir under --workdir_root; with --print the
commands are printed instead (for sbatch or a TPU pod: --launcher=slurm|tpu).
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

from absl import app, flags

from boldjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file (path[:args]).", required=True)
_ROOT = flags.DEFINE_string("workdir_root", "runs/sweep", "Parent of the per-point workdirs.")
_PRINT = flags.DEFINE_bool("print", False, "Print the commands instead of running them.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm", "tpu"], "Command style.")


def _points(config_arg: str) -> list[dict]:
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise app.UsageError(f"{path} defines no sweep() generator")
  return list(module.sweep())


def command(config_arg: str, overrides: dict, workdir: str, launcher: str) -> list[str]:
  args = [f"--config={config_arg}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  base = ["python", "-m", "boldjax.main", *args]
  if launcher == "slurm":
    return ["sbatch", "launch/slurm.sbatch", *args]
  if launcher == "tpu":
    return ["bash", "launch/tpu_pod.sh", *args]
  return base


def main(argv) -> None:
  del argv
  points = _points(_CONFIG.value)
  for i, overrides in enumerate(points):
    name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or f"point{i}"
    cmd = command(_CONFIG.value, overrides, f"{_ROOT.value}/{name}", _LAUNCHER.value)
    if _PRINT.value:
      print(shlex.join(cmd))
      continue
    print(f"[sweep {i + 1}/{len(points)}] {shlex.join(cmd)}", flush=True)
    cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
  cli.run_absl("python -m launch.sweep", main)
