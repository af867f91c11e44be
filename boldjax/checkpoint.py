"""Orbax checkpoints of the train state together with the grain iterator state.

Saving both means a resumed run sees exactly the batches the uninterrupted run would
have seen. The config is stored next to the checkpoints so sampling and evaluation can
rebuild the run from the workdir alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import warnings

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


def make_manager(workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
  """CheckpointManager with a 'state' item (train state) and a 'data_iter' item (grain)."""
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=every_steps,
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")),
    options=options,
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data_iter": grain.checkpoint.CheckpointHandler(),
    },
  )


def save(manager, step: int, state, data_iter, *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state):
  """ShapeDtypeStructs carrying the shardings of `state`, the restore target."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
  )


def restore(manager, abstract_state, data_iter=None, step: int | None = None):
  """Restores (state, step); the iterator is restored in place.

  With step=None the latest checkpoint is tried first; one that cannot be read (partial
  or corrupt files) is skipped with a warning in favour of the one before it.
  """
  candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not candidates:
    return None, None
  errors = []
  for candidate in candidates:
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      if step is not None:
        raise
      message = f"checkpoint at step {candidate} in {manager.directory} is unreadable ({e!r:.300})"
      warnings.warn(message + "; falling back to the previous one", stacklevel=2)
      logging.warning(message)
      errors.append(message)
      continue
    logging.info("restored checkpoint at step %d", candidate)
    return restored["state"], candidate
  raise RuntimeError("no readable checkpoint: " + "; ".join(errors))


class StopSignal:
  """Remembers a SIGTERM (cluster preemption) so the loop can checkpoint and stop."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.received = False
    self.signal_name = ""
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be installed from the main thread
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = True
    self.signal_name = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=_jsonable)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {workdir!r} is not a boldjax workdir (train with "
      "`python -m boldjax.main --workdir=...` first)"
    )
  with open(path) as f:
    raw = json.load(f)
  return ml_collections.ConfigDict(_tuples(raw))


def _jsonable(x):
  if isinstance(x, tuple | list):
    return list(x)
  return str(x)


def _tuples(x):
  """JSON lists back to tuples: configs use tuples for sequences."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x
