"""Dataset folders on object stores (gs://, s3://, ...): staged through local disk.

ArrayRecord files are read through local file handles, so a remote `data.path` is copied
once into the cache (keyed by the path; a `.complete` marker makes the copy all-or-nothing),
and `prepare --out=gs://...` builds in a local temporary folder and uploads it whole.
Local paths pass through unchanged (made absolute).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from etils import epath

from boldjax.cli import InputError

COMPLETE = ".complete"


def setting(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg[key] from a ConfigDict, dict or object; `default` when missing or None."""
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def cache_dir(data_cfg: Any) -> str:
  """Where built and staged datasets go: data.cache_dir, else $BOLDJAX_CACHE, else
  ~/.cache/boldjax."""
  default = os.environ.get("BOLDJAX_CACHE", "~/.cache/boldjax")
  return os.path.abspath(os.path.expanduser(setting(data_cfg, "cache_dir", default)))


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def readable_dataset(path: str, cache_dir: str) -> str:
  """A local folder holding the dataset at `path` (copied from an object store once)."""
  if not is_remote(path):
    return os.path.abspath(os.path.expanduser(path))
  source = epath.Path(path)
  if not source.exists():
    raise InputError(f"{path}: field 'data.path': expected a dataset folder, found nothing")
  key = hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:12]
  local = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "remote", key)
  if os.path.exists(os.path.join(local, COMPLETE)):
    return local
  print(f"[boldjax.data] copying {path} to {local}", flush=True)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=os.path.dirname(local))
  try:
    _copy_tree(source, epath.Path(tmp))
    epath.Path(tmp, COMPLETE).write_text(path)
    shutil.rmtree(local, ignore_errors=True)
    os.rename(tmp, local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local


def upload_dataset(local: str, out: str, *, overwrite: bool = False) -> str:
  """Copy a finished local dataset folder to `out` on an object store; returns out."""
  check_new_output(out, overwrite)
  _copy_tree(epath.Path(local), epath.Path(out))
  return out


def check_new_output(out: str, overwrite: bool) -> None:
  """Refuse a non-empty remote --out before any work is done."""
  target = epath.Path(out)
  if not overwrite and target.exists() and any(target.iterdir()):
    raise InputError(f"{out}: field '--out': expected an empty or new folder, found files")


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
  target.mkdir(parents=True, exist_ok=True)
  for child in source.iterdir():
    if child.is_dir():
      _copy_tree(child, target / child.name)
    else:
      (target / child.name).write_bytes(child.read_bytes())
