"""Orbax checkpoints of the train state together with the grain iterator state.

Saving both means a resumed run sees exactly the batches the uninterrupted run would
have seen. The config is stored next to the checkpoints so sampling and evaluation can
rebuild the run from the workdir alone. Every path under a workdir is an etils.epath
Path, so `gs://bucket/run` workdirs are written to the object store, never to a local
folder named `gs:`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from boldjax.cli import InputError, one_line

CONFIG_FILE = "config.json"
FINAL_FILE = "final.json"  # the final evaluation table of a finished run
CONVERTED_FILE = "converted.json"  # marks a workdir made by `boldjax.convert`

# Config keys a resumed run may change: they decide how long and how often, not what is
# trained. A longer total_steps re-derives the schedule for the new length.
SAFE_ON_RESUME = (
  "total_steps",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "evals.*.every_steps",
)


def path(workdir: str | epath.PathLike) -> epath.Path:
  """The workdir as an epath Path; local paths made absolute (orbax needs that)."""
  p = epath.Path(workdir)
  return p if is_remote(p) else p.resolve()


def is_remote(p: str | epath.PathLike) -> bool:
  """gs://, s3://, ... : anything with a URI scheme."""
  return "://" in str(p)


def make_manager(workdir: str | epath.PathLike, *, every_steps: int, keep: int,
                 async_save: bool = True) -> ocp.CheckpointManager:  # fmt: skip
  """CheckpointManager with a 'state' item (train state) and a 'data_iter' item (grain)."""
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=every_steps,
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    path(workdir) / "checkpoints",
    options=options,
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data_iter": grain.checkpoint.CheckpointHandler(),
    },
  )


def saved_steps(workdir: str | epath.PathLike) -> list[int]:
  """Steps of the finished checkpoints under workdir, read without creating anything."""
  folder = path(workdir) / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def save(manager, step: int, state, data_iter, *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager, abstract_state, data_iter=None, step: int | None = None):
  """Restores (state, step); the iterator is restored in place.

  A checkpoint whose arrays do not fit the model (other names or shapes) is an InputError
  that lists them. With step=None the latest checkpoint is tried first; one that cannot
  be read (partial or corrupt files) is skipped with a warning in favour of the one
  before it.
  """
  candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not candidates:
    return None, None
  errors = []
  for candidate in candidates:
    check_fits(manager, candidate, abstract_state)
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


def check_fits(manager, step: int, abstract_state) -> None:
  """InputError naming the arrays where the checkpoint and the model differ.

  Only the model's own trees (params, extra) are compared: their nesting is plain dicts in
  both the checkpoint metadata and the state. Unreadable metadata is left to restore().
  """
  try:
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
  except Exception:  # noqa: BLE001 - unreadable: restore() reports and falls back
    return
  if not isinstance(saved, Mapping):
    return
  expected = {}
  for part in ("params", "extra"):
    expected.update(_shapes(getattr(abstract_state, part), (part,)))
  found = {}
  for part in ("params", "extra"):
    found.update(_shapes(saved.get(part, {}), (part,)))
  problems = [f"{k}: missing" for k in sorted(expected.keys() - found.keys())]
  problems += [f"{k}: not in the model" for k in sorted(found.keys() - expected.keys())]
  problems += [
    f"{k}: expected shape {expected[k]}, found {found[k]}"
    for k in sorted(expected.keys() & found.keys())
    if expected[k] != found[k]
  ]
  if problems:
    shown = "; ".join(problems[:6]) + (
      f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""
    )
    raise InputError(
      f"{manager.directory}/{step}: field 'state' does not match the model built from the "
      f"config ({len(problems)} arrays differ): {shown}"
    )


def _shapes(tree: Any, prefix: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  out = {}
  for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = "/".join(prefix + tuple(_key_name(k) for k in keys))
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


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


# ------------------------------------------------------------------------------------------
# Files next to the checkpoints: config, final table, converted-workdir marker.
# ------------------------------------------------------------------------------------------


def write_json(file: epath.Path, value: Any) -> None:
  """JSON to `file` in one write (a temporary sibling renamed into place on local disks)."""
  text = json.dumps(value, indent=2, default=_jsonable)
  file.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(file):
    file.write_text(text)  # an object store replaces whole objects anyway
    return
  tmp = file.parent / f".{file.name}.tmp"
  tmp.write_text(text)
  tmp.replace(file)


def read_json(file: epath.Path) -> Any:
  try:
    return json.loads(file.read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{file}: expected UTF-8 JSON, found {e}") from e


def save_config(workdir: str | epath.PathLike, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  write_json(path(workdir) / CONFIG_FILE, config.to_dict())


def load_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
  file = path(workdir) / CONFIG_FILE
  if not file.exists():
    raise InputError(
      f"{file}: not found: {str(workdir)!r} is not a boldjax workdir (train with "
      "`python -m boldjax.main --workdir=...` or make one with `python -m boldjax.convert`)"
    )
  raw = read_json(file)
  if not isinstance(raw, dict):
    raise InputError(
      f"{file}: expected a JSON object (the run's config), found {type(raw).__name__}"
    )
  try:
    return ml_collections.ConfigDict(_tuples(raw))
  except (ValueError, TypeError, KeyError) as e:  # keys ConfigDict refuses (dots, ...)
    raise InputError(f"{file}: expected a boldjax config, found {one_line(e)}") from e


def config_changes(
  saved: ml_collections.ConfigDict | Mapping, current: ml_collections.ConfigDict | Mapping
) -> tuple[list[str], list[str]]:
  """(refused, allowed): 'key: expected SAVED, found CURRENT' lines, split by SAFE_ON_RESUME."""
  old = _flat(_plain(saved))
  new = _flat(_plain(current))
  refused, allowed = [], []
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == b or _both_nan(a, b):
      continue
    line = f"{key}: expected {a!r}, found {b!r}"
    (allowed if _safe(key) else refused).append(line)
  return refused, allowed


def _both_nan(a: Any, b: Any) -> bool:
  return isinstance(a, float) and isinstance(b, float) and a != a and b != b


def _safe(key: str) -> bool:
  parts = key.split(".")
  for pattern in SAFE_ON_RESUME:
    want = pattern.split(".")
    if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts, strict=True)):
      return True
  return False


def _plain(config: ml_collections.ConfigDict | Mapping) -> Any:
  """A JSON round trip, so a saved config and a live one compare alike (tuples, numbers)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=_jsonable))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


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
