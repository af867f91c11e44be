"""webdataset tar shards of parcellated BOLD (`python -m boldjax.prepare webdataset`).

learning-from-brains keys: <key>.bold.pyd, .t_r.pyd and a label .pyd (pickles: refused
unless --allow-pickle). CortexMAE keys: bold.npy, meta.json, events.json, mean.npy,
std.npy (already z-scored, so bold_is_zscored=True).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import bold_records
from boldjax.data.importers.common import (
  ImportOptions,
  add_common_arguments,
  file_stem,
  import_options,
  parse_json,
  subject_of,
  write_dataset,
)

LFB_LABEL_KEYS = ("label_across_tasks", "task_label")


def list_tars(inputs: Sequence[str]) -> list[str]:
  """Tar files given directly or found (sorted) in given directories."""
  out = []
  for path in inputs:
    if os.path.isdir(path):
      found = sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".tar", ".tar.gz", ".tgz"))
      )
      if not found:
        raise FileNotFoundError(f"{path}: no *.tar files found")
      out.extend(found)
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise FileNotFoundError(f"{path}: no such file or directory")
  return out


def iter_tar_samples(
  path: str, want: Callable[[str], bool] = lambda ext: True
) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {ext: bytes}) per webdataset sample; key = member name up to the basename's first
  dot. Only members whose ext passes `want` are read. Truncated tars raise ValueError."""
  try:
    tar = tarfile.open(path, "r:*")
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f"{path}: field 'tar': expected a readable tar archive, found {e}") from e
  key, group = None, {}
  try:
    with tar:
      for member in tar:
        if not member.isfile():
          continue
        d, base = os.path.split(member.name)
        if "." not in base:
          continue
        stem, ext = base.split(".", 1)
        k = os.path.join(d, stem)
        if k != key and key is not None:
          yield key, group
          group = {}
        key = k
        if want(ext):
          f = tar.extractfile(member)
          data = f.read() if f is not None else b""
          if len(data) != member.size:
            raise EOFError(f"member {member.name} has {len(data)} of {member.size} bytes")
          group[ext] = data
        else:
          group.setdefault(ext, None)
      end = tar.offset
    if key is not None:
      yield key, group
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(
      f"{path}: field 'tar': expected a complete tar archive, found a truncated or corrupt "
      f"one ({e})"
    ) from e
  if not path.endswith((".gz", ".tgz")) and end + 1024 > os.path.getsize(path):
    raise ValueError(
      f"{path}: field 'tar': expected the end-of-archive blocks after the last member at byte "
      f"{end}, found a file of {os.path.getsize(path)} bytes (truncated tar)"
    )


def _unpickle(path: str, key: str, ext: str, data: bytes, allow_pickle: bool) -> Any:
  if not allow_pickle:
    raise ValueError(
      f"{path}: sample {key!r} field {ext!r} is a Python pickle (.pyd); unpickling can run "
      "arbitrary code, so it is refused. Pass --allow-pickle (allow_pickle=True) only for "
      "files you trust."
    )
  try:
    return pickle.loads(data)
  except Exception as e:  # noqa: BLE001 - a corrupt pickle raises almost anything
    raise InputError(
      f"{path}: sample {key!r} field {ext!r}: expected a readable pickle, found "
      f"{type(e).__name__}: {e}"
    ) from e


def _npy(path: str, key: str, ext: str, data: bytes) -> np.ndarray:
  try:
    return np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise InputError(f"{path}: sample {key!r} field {ext!r}: expected a plain .npy, {e}") from e


def _json_object(path: str, key: str, ext: str, data: bytes) -> dict[str, Any]:
  value = parse_json(path, key, ext, data)
  if not isinstance(value, dict):
    raise InputError(
      f"{path}: sample {key!r} field {ext!r}: expected a JSON object, found {type(value).__name__}"
    )
  return value


def _number(where: str, field: str, value: Any, *, positive: bool = False) -> float:
  """A finite real number (a Python or numpy scalar, or a 0-d array), else an InputError
  naming where and the field."""
  try:
    arr = np.asarray(value)
    ok = arr.ndim == 0 and arr.dtype.kind in "iuf"
    x = float(arr) if ok else math.nan
  except (TypeError, ValueError, OverflowError):
    ok, x = False, math.nan
  if not ok or not math.isfinite(x) or (positive and x <= 0):
    want = "a number > 0" if positive else "a finite number"
    raise InputError(f"{where}: field {field!r} expected {want}, found {_short(value)}")
  return x


def _integer(where: str, field: str, value: Any, lo: int, hi: int) -> int:
  """An integer in lo..hi (integral floats too), else an InputError naming the field."""
  x = _number(where, field, value)
  if x != round(x) or not lo <= x <= hi:
    raise InputError(
      f"{where}: field {field!r} expected an integer in {lo}..{hi}, found {_short(value)}"
    )
  return int(x)


def _short(value: Any) -> str:
  text = " ".join(repr(value).split())
  return text if len(text) <= 80 else text[:77] + "..."


def _subject(where: str, field: str, value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise InputError(
      f"{where}: field {field!r} expected a subject id string, found {_short(value)}"
    )
  return str(value)


def _events(path: str, key: str, events: Any) -> list[tuple[float, float, str]]:
  """BIDS-like events (list of rows or dict of columns) -> (onset, duration, trial_type)."""
  field = f"{path}: sample {key!r} field 'events.json'"
  if isinstance(events, dict) and "onset" in events:
    cols = {k: events[k] for k in ("onset", "duration", "trial_type") if k in events}
    n = len(events["onset"]) if isinstance(events["onset"], list) else -1
    if n < 0 or any(not isinstance(v, list) or len(v) != n for v in cols.values()):
      raise InputError(
        f"{field}: expected columns onset, duration, trial_type as lists of equal length, "
        f"found lengths {[len(v) if isinstance(v, list) else None for v in cols.values()]}"
      )
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
  elif isinstance(events, dict) and "events" in events:
    rows = events["events"]
  else:
    rows = events
  if rows is None:
    rows = []
  if not isinstance(rows, list):
    raise InputError(f"{field}: expected a list of events, found {type(rows).__name__}")
  out = []
  for i, row in enumerate(rows):
    for name in ("onset", "duration", "trial_type"):
      if not isinstance(row, dict) or name not in row:
        raise ValueError(
          f"{path}: sample {key!r} field 'events.json' row {i}: expected keys onset, "
          f"duration, trial_type, found {_short(row)}"
        )
    onset = _number(f"{field} row {i}", "onset", row["onset"])
    duration = _number(f"{field} row {i}", "duration", row["duration"], positive=True)
    out.append((onset, duration, str(row["trial_type"])))
  return out


def _first(meta: dict, keys: Sequence[str], default: Any = None) -> Any:
  for k in keys:
    if k in meta:
      return meta[k]
  return default


def import_webdataset(
  inputs: Sequence[str],
  opts: ImportOptions,
  *,
  allow_pickle: bool = False,
  label_key: str | None = None,
  tr: float | None = None,
) -> str:
  """Tar shards (learning-from-brains or CortexMAE keys) -> a parcellated dataset."""
  tars = list_tars(inputs)
  small = ("meta.json", "events.json", "t_r.pyd", "t_r.npy")
  subjects: set[str] = set()
  classes: set[str] = set()
  layout: set[str] = set()
  for path in tars:  # scan: subjects, class names, pickle consent, layout
    for key, group in iter_tar_samples(path, lambda ext: ext in small):
      pyd = [e for e in group if e.endswith(".pyd")]
      if pyd and not allow_pickle:
        _unpickle(path, key, pyd[0], b"", False)
      if "bold.npy" in group:
        layout.add("cortexmae")
        if "meta.json" not in group:
          raise ValueError(f"{path}: sample {key!r} missing field 'meta.json' (CortexMAE layout)")
        meta = _json_object(path, key, "meta.json", group["meta.json"])
        subjects.add(_cortexmae_subject(path, key, meta))
        if group.get("events.json"):
          events = _events(path, key, parse_json(path, key, "events.json", group["events.json"]))
          classes.update(e[2] for e in events)
      elif "bold.pyd" in group:
        layout.add("lfb")
        subjects.add(subject_of(key, subject_of(path, file_stem(path))))
      else:
        raise ValueError(
          f"{path}: sample {key!r} missing field 'bold.pyd' or 'bold.npy'; found {sorted(group)}"
        )
  if len(layout) > 1:
    raise ValueError(f"{inputs}: mixes learning-from-brains and CortexMAE samples")
  class_names = sorted(classes)
  class_index = {c: i for i, c in enumerate(class_names)}

  def records() -> Iterator[dict[str, Any]]:
    for path in tars:
      for key, group in iter_tar_samples(path):
        where = f"{path}:{key}"
        if "bold.npy" in group:
          yield _cortexmae_record(path, key, group, where, class_index, tr)
        else:
          yield _lfb_record(path, key, group, where, allow_pickle, label_key, tr)

  meta: dict[str, Any] = {
    "name": file_stem(tars[0]) if len(tars) == 1 else os.path.basename(os.path.dirname(tars[0])),
    "source": {"importer": "webdataset", "inputs": tars, "layout": sorted(layout)},
    "bold_is_zscored": "cortexmae" in layout,
  }
  if class_names:
    meta["class_names"] = class_names
  return write_dataset(opts, subjects, records, meta)


def _cortexmae_subject(path: str, key: str, meta: dict[str, Any]) -> str:
  value = _first(meta, ("subject", "sub"), subject_of(key, file_stem(path)))
  return _subject(f"{path}: sample {key!r}", "meta.json:subject", value)


def _bold_array(where: str, field: str, value: Any) -> np.ndarray:
  """A (T, R) float array with R >= 1 (validate_record checks values, T and R later)."""
  try:
    bold = np.asarray(value)
  except (TypeError, ValueError) as e:
    raise InputError(f"{where}: field {field!r} expected a float (T, R) array, found {e}") from e
  if bold.ndim != 2 or bold.dtype.kind != "f":
    raise InputError(
      f"{where}: field {field!r} expected a float (T, R) array, found {bold.dtype} {bold.shape}"
    )
  return bold


def _lfb_record(path, key, group, where, allow_pickle, label_key, tr) -> dict[str, Any]:
  at = f"{path}: sample {key!r}"
  bold = _bold_array(
    at, "bold.pyd", _unpickle(path, key, "bold.pyd", group["bold.pyd"], allow_pickle)
  )
  if "t_r.pyd" in group:
    t_r = _number(at, "t_r.pyd", _unpickle(path, key, "t_r.pyd", group["t_r.pyd"], allow_pickle),
                  positive=True)  # fmt: skip
  elif tr is not None:
    t_r = float(tr)
  else:
    raise ValueError(f"{path}: sample {key!r} missing field 't_r.pyd' (or pass --tr)")
  rec: dict[str, Any] = {
    "where": where,
    "bold": bold,
    "tr": t_r,
    "subject": subject_of(key, subject_of(path, file_stem(path))),
    "run": key,
    "dataset": file_stem(path),
  }
  keys = (label_key,) if label_key else LFB_LABEL_KEYS
  for k in keys:
    ext = k if k.endswith(".pyd") else f"{k}.pyd"
    if ext in group:
      value = _unpickle(path, key, ext, group[ext], allow_pickle)
      rec["label"] = _integer(at, ext, value, -1, bold_records.MAX_LABEL)
      break
  else:
    if label_key:
      raise ValueError(
        f"{path}: sample {key!r} missing field {label_key!r} (--label-key); found {sorted(group)}"
      )
  return rec


def _cortexmae_record(path, key, group, where, class_index, tr) -> dict[str, Any]:
  at = f"{path}: sample {key!r}"
  bold = _bold_array(at, "bold.npy", _npy(path, key, "bold.npy", group["bold.npy"]))
  meta = _json_object(path, key, "meta.json", group["meta.json"])
  t_r = _first(meta, ("tr", "TR", "t_r", "repetition_time"), tr)
  if t_r is None:
    raise ValueError(f"{path}: sample {key!r} field 'meta.json': missing 'tr' (or pass --tr)")
  t_r = _number(at, "meta.json:tr", t_r, positive=True)
  n_frames = _first(meta, ("n_frames", "num_frames"))
  if n_frames is not None and _integer(at, "meta.json:n_frames", n_frames, 0, 2**62) != len(bold):
    raise ValueError(
      f"{path}: sample {key!r} field 'meta.json:n_frames' expected {bold.shape[0]} "
      f"(bold.npy frames), found {n_frames}"
    )
  rec: dict[str, Any] = {
    "where": where,
    "bold": bold,
    "tr": t_r,
    "subject": _cortexmae_subject(path, key, meta),
    "task": str(meta.get("task", "")),
    "run": key,
    "dataset": file_stem(path),
  }
  if ("mean.npy" in group) != ("std.npy" in group):
    missing = "std.npy" if "mean.npy" in group else "mean.npy"
    raise ValueError(f"{path}: sample {key!r} missing field {missing!r} (mean/std come together)")
  if "mean.npy" in group:
    for ext in ("mean.npy", "std.npy"):
      stat = _npy(path, key, ext, group[ext])
      if stat.dtype.kind not in "iuf":
        raise InputError(f"{at}: field {ext!r} expected a float array, found {stat.dtype}")
      rec[ext[:-4]] = stat.reshape(-1)
  if group.get("events.json"):
    events = _events(path, key, parse_json(path, key, "events.json", group["events.json"]))
    rec["block_onset_s"] = [e[0] for e in events]
    rec["block_duration_s"] = [e[1] for e in events]
    rec["block_label"] = [class_index[e[2]] for e in events]
  return rec


@registry.register("importer", "webdataset")
class WebdatasetImporter:
  help = "webdataset tars (learning-from-brains .pyd or CortexMAE .npy keys) -> parcellated"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help="tar files or directories of tars")
    parser.add_argument("--allow-pickle", action="store_true", help="unpickle .pyd (trusted)")
    parser.add_argument("--label-key", default=None, help="e.g. task_label")
    parser.add_argument("--tr", type=float, default=None, help="TR (s) if samples lack one")
    add_common_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_webdataset(
      args.input,
      import_options(args),
      allow_pickle=args.allow_pickle,
      label_key=args.label_key,
      tr=args.tr,
    )
