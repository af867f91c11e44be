"""Multi-process start-up: cluster auto-detection, explicit flags, or a single process."""

from __future__ import annotations

import logging
import os

import jax

_CLUSTER_ENV = (
  "SLURM_JOB_ID",  # SLURM (srun)
  "TPU_WORKER_HOSTNAMES",  # Cloud TPU VM pods
  "OMPI_COMM_WORLD_SIZE",  # Open MPI
  "JOBSET_NAME",  # Kubernetes JobSet
)


def maybe_initialize(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """Initialises jax.distributed when more than one process takes part; else does nothing.

  Explicit flags win; otherwise a known cluster environment with more than one task is
  auto-detected by jax itself; otherwise this is a single-process run.
  """
  if coordinator or (num_processes and num_processes > 1):
    if coordinator is None or num_processes is None or process_id is None:
      raise ValueError(
        "--coordinator, --num_processes and --process_id must be given together; got "
        f"coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}"
      )
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _cluster_size() > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _cluster_size() -> int:
  if "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ:
    return int(os.environ["SLURM_NTASKS"])
  if "OMPI_COMM_WORLD_SIZE" in os.environ:
    return int(os.environ["OMPI_COMM_WORLD_SIZE"])
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    return len(os.environ["TPU_WORKER_HOSTNAMES"].split(","))
  if "JOBSET_NAME" in os.environ:
    return 2  # jax reads the real size from the Kubernetes API
  return 1
