"""Brain-Semantoks HDF5 (`python -m boldjax.prepare hdf5`).

timeseries/<atlas> (N, R, T) NaN-tail padded, long_subject_id (N,), labels (labels/<name>
or top level, all kept), a tr attribute (else --tr, else 2 s); by default the 457-ROI
Semantoks input in 9 networks (semantoks_layout).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import bold_records, semantoks_layout
from boldjax.data.importers.common import (
  ImportOptions,
  add_common_arguments,
  file_stem,
  import_options,
  write_dataset,
)

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
          "dataset": file_stem(path),
        }
        if labels is not None:
          rec["label"] = int(labels[i])
        yield rec

  source = {"importer": "hdf5", "input": path, "label_key": label_key}
  meta: dict[str, Any] = {"name": file_stem(path), "source": source, "num_parcels": num_parcels}
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
  return write_dataset(opts, subjects, records, meta)


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
    add_common_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_hdf5(
      args.input,
      import_options(args),
      atlas=args.atlas,
      label_key=args.label_key,
      subject_key=args.subject_key,
      tr=args.tr,
    )
