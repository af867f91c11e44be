"""Entry point: `python -m boldjax.main --config=configs/gpt_small.py --workdir=DIR`."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from boldjax import cli, distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumes.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{config.get('name', 'run')}"
  train.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run_absl("python -m boldjax.main", main)
