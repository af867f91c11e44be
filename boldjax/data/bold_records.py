"""Parcellated BOLD datasets on disk: one TFDS ArrayRecord example per run (or trial).

Layout of a dataset directory::

  DIR/meta.json                               num_parcels, atlas, networks, classes, subjects
  DIR/index.json                              per split: length, tr, subject_id, label, blocks
  DIR/tfds/bold_runs/1.0.0/*.array_record     TFDS dataset (file_format="array_record")

A record holds bold (T, R) float16 (or float32), tr (s), subject (string) + subject_id,
run/task/dataset strings, frame_labels (T,) int32 (-1 = none), label (a whole-record class,
-1 = none; learning-from-brains downstream samples), blocks (stimulus onset/duration in
seconds + class, not shifted for the HRF), and optional mean/std (R,) (has_stats).
Splits are subject-wise: build_bold_dataset refuses a subject that appears in two splits.
index.json repeats the small fields so pipelines can plan chunks and decoding examples
without reading any bold; TFDS shuffling is disabled, so index position i is record i.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from boldjax.cli import InputError
from boldjax.data import store
from boldjax.data.store import SPLITS  # noqa: F401  (the split names, for callers)

FORMAT_VERSION = 1
BOLD_DTYPES = ("float16", "float32")
BUILDER_NAME = "bold_runs"
BUILDER_VERSION = "1.0.0"
_STRINGS = ("subject", "run", "task", "dataset")
_BLOCKS = ("block_onset_s", "block_duration_s", "block_label")
FIELDS = (
  "bold",
  "tr",
  *_STRINGS,
  "subject_id",
  "label",
  "frame_labels",
  *_BLOCKS,
  "mean",
  "std",
  "has_stats",
)
_OPTIONAL_INPUT = {"where", *FIELDS}
# Labels are class indices (-1 = none). A larger value is an id or a measurement, not a
# class, and would make meta.json list that many class names.
MAX_LABEL = 100_000


def subject_splits(
  subjects: Iterable[str],
  *,
  val_fraction: float = 0.1,
  test_fraction: float = 0.1,
  seed: int = 0,
  val_count: int | None = None,
  test_count: int | None = None,
) -> dict[str, str]:
  """subject -> split name; a seeded permutation of the sorted unique subjects.

  Counts default to round(fraction * n), at least 1 each when n >= 3 and the fraction > 0,
  so small imports still get held-out subjects; train keeps the rest (at least one).
  """
  subs = sorted(set(subjects))
  n = len(subs)

  def count(explicit, fraction):
    if explicit is not None:
      return int(explicit)
    if fraction <= 0:
      return 0
    return max(1, round(fraction * n)) if n >= 3 else 0

  n_val, n_test = count(val_count, val_fraction), count(test_count, test_fraction)
  if n_val + n_test >= n and n > 0:
    raise ValueError(
      f"subject_splits: {n} subjects cannot give {n_val} val + {n_test} test subjects and "
      "keep at least one for train"
    )
  rank = np.random.default_rng([int(seed), 0x5B]).permutation(n)
  out = {}
  for s, r in zip(subs, rank, strict=True):
    out[s] = "val" if r < n_val else "test" if r < n_val + n_test else "train"
  return out


def _int_vector(value: Any, where: str, field: str, length: int | None = None) -> np.ndarray:
  arr = _array(value, where, field)
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{where}: field {field!r} expected a 1-D integer array, found {arr.dtype}")
  if length is not None and len(arr) != length:
    raise ValueError(f"{where}: field {field!r} expected length {length}, found {len(arr)}")
  if arr.size and (arr.min() < -1 or arr.max() > MAX_LABEL):
    raise InputError(
      f"{where}: field {field!r} expected class indices in -1..{MAX_LABEL}, found "
      f"{int(arr.min())}..{int(arr.max())}"
    )
  return arr.astype(np.int32)


def _array(value: Any, where: str, field: str, dtype: Any = None) -> np.ndarray:
  """np.asarray(value, dtype), its conversion errors named by where and field."""
  try:
    return np.asarray(value, dtype)
  except (TypeError, ValueError, OverflowError) as e:
    want = f" of {np.dtype(dtype).name}" if dtype is not None else ""
    raise InputError(f"{where}: field {field!r} expected an array{want}, found {e}") from e


def _scalar(value: Any, where: str, field: str, lo: float, hi: float) -> float:
  """One finite real number in lo..hi, else an InputError naming where and the field."""
  arr = _array(value, where, field)
  if arr.size != 1 or arr.dtype.kind not in "iubf":
    raise InputError(f"{where}: field {field!r} expected a number, found {value!r}")
  x = float(arr.reshape(-1)[0])
  if not (np.isfinite(x) and lo <= x <= hi):
    raise InputError(f"{where}: field {field!r} expected a number in {lo:g}..{hi:g}, found {x}")
  return x


def _index_scalar(value: Any, where: str, field: str, lo: int, hi: int) -> np.int32:
  x = _scalar(value, where, field, lo, hi)
  if x != round(x):
    raise InputError(f"{where}: field {field!r} expected an integer, found {x}")
  return np.int32(x)


def validate_record(
  ex: Mapping[str, Any],
  *,
  where: str,
  num_parcels: int | None,
  seq_min: int = 1,
  bold_dtype: str = "float16",
) -> dict[str, Any]:
  """Check one input record and return it in stored form; errors name where and the field."""
  where = str(ex.get("where", where))
  unknown = set(ex) - _OPTIONAL_INPUT
  if unknown:
    raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected some of {FIELDS}")
  for key in ("bold", "tr", "subject"):
    if key not in ex:
      raise ValueError(f"{where}: missing field {key!r}")
  bold = _array(ex["bold"], where, "bold")
  if bold.ndim != 2 or not np.issubdtype(bold.dtype, np.floating):
    raise ValueError(
      f"{where}: field 'bold' expected a float (T, R) array, found {bold.dtype} {bold.shape}"
    )
  t, r = bold.shape
  if r == 0:
    raise InputError(f"{where}: field 'bold' expected R >= 1 parcels, found shape {bold.shape}")
  if num_parcels is not None and r != num_parcels:
    raise ValueError(f"{where}: field 'bold' expected R={num_parcels} parcels, found R={r}")
  if t < seq_min:
    raise ValueError(f"{where}: field 'bold' expected T >= seq_min={seq_min} frames, found T={t}")
  bad = ~np.isfinite(bold).all(axis=1)
  if bad.any():
    frames = np.flatnonzero(bad)
    raise ValueError(
      f"{where}: field 'bold' expected finite values, found NaN/Inf in {len(frames)} "
      f"frame(s), first at frame {int(frames[0])}"
    )
  with np.errstate(over="ignore"):
    stored = bold.astype(bold_dtype)
  if not np.isfinite(stored).all():
    raise ValueError(
      f"{where}: field 'bold' overflows {bold_dtype} (max |x| {float(np.abs(bold).max()):.3g}); "
      "use float32 storage or rescale"
    )
  tr = _scalar(ex["tr"], where, "tr", -np.inf, np.inf)
  if not np.isfinite(tr) or tr <= 0 or tr > np.finfo(np.float32).max:
    raise ValueError(f"{where}: field 'tr' expected a positive number of seconds, found {tr}")
  out: dict[str, Any] = {"bold": stored, "tr": np.float32(tr)}
  for key in _STRINGS:
    out[key] = str(ex.get(key, ""))
  if not out["subject"]:
    raise ValueError(f"{where}: field 'subject' expected a non-empty id, found ''")
  out["subject_id"] = _index_scalar(ex.get("subject_id", -1), where, "subject_id", -1, 2**31 - 1)
  out["label"] = _index_scalar(ex.get("label", -1), where, "label", -1, MAX_LABEL)
  fl = ex.get("frame_labels")
  if fl is None:
    out["frame_labels"] = np.full(t, -1, np.int32)
  else:
    out["frame_labels"] = _int_vector(fl, where, "frame_labels", t)
  onset = _array(ex.get("block_onset_s", []), where, "block_onset_s", np.float32).reshape(-1)
  duration = _array(ex.get("block_duration_s", []), where, "block_duration_s", np.float32)
  duration = duration.reshape(-1)
  blabel = _int_vector(
    _array(ex.get("block_label", []), where, "block_label", np.int64), where, "block_label"
  )
  if not (len(onset) == len(duration) == len(blabel)):
    raise ValueError(
      f"{where}: fields {_BLOCKS} expected equal lengths, found "
      f"{len(onset)}, {len(duration)}, {len(blabel)}"
    )
  if len(onset) and not (np.isfinite(onset).all() and (duration > 0).all()):
    raise ValueError(f"{where}: fields block_onset_s/block_duration_s must be finite and > 0")
  out.update(block_onset_s=onset, block_duration_s=duration, block_label=blabel)
  has_stats = ex.get("mean") is not None or ex.get("std") is not None
  if has_stats:
    for key in ("mean", "std"):
      if ex.get(key) is None:
        raise ValueError(f"{where}: field {key!r} missing (mean and std come together)")
    mean = _array(ex["mean"], where, "mean", np.float32).reshape(-1)
    std = _array(ex["std"], where, "std", np.float32).reshape(-1)
    for key, v in (("mean", mean), ("std", std)):
      if v.shape != (r,):
        raise ValueError(f"{where}: field {key!r} expected shape ({r},), found {v.shape}")
      if not np.isfinite(v).all():
        raise ValueError(f"{where}: field {key!r} expected finite values")
  else:
    mean, std = np.zeros(r, np.float32), np.ones(r, np.float32)
  out.update(mean=mean, std=std, has_stats=np.bool_(has_stats))
  return out


def _validated(
  examples: Iterable[Mapping[str, Any]],
  *,
  split: str,
  name: str,
  state: dict[str, Any],
  seq_min: int,
  bold_dtype: str,
  subject_ids: Mapping[str, int] | None,
) -> Iterator[dict[str, Any]]:
  """Validate, assign subject ids, enforce subject-wise splits, fill index.json columns."""
  progress = store.Progress(f"{name}/{split}")
  index = state["index"].setdefault(
    split,
    {
      "length": [],
      "tr": [],
      "subject_id": [],
      "label": [],
      "run": [],
      "task": [],
      **{k: [] for k in _BLOCKS},
    },
  )
  for i, ex in enumerate(examples):
    out = validate_record(
      ex,
      where=f"{name}/{split} record {i}",
      num_parcels=state["num_parcels"],
      seq_min=seq_min,
      bold_dtype=bold_dtype,
    )
    state["num_parcels"] = out["bold"].shape[1]
    sub = out["subject"]
    other = state["split_of_subject"].setdefault(sub, split)
    if other != split:
      raise ValueError(
        f"{ex.get('where', f'{name}/{split} record {i}')}: field 'subject' {sub!r} is in "
        f"split {other!r} already; splits must be subject-wise, found it again in {split!r}"
      )
    if subject_ids is not None:
      if sub not in subject_ids:
        raise ValueError(f"{name}: subject {sub!r} missing from the subject id table")
      out["subject_id"] = np.int32(subject_ids[sub])
    elif out["subject_id"] < 0:
      raise ValueError(f"{name}/{split} record {i}: field 'subject_id' missing or negative")
    state["id_of_subject"][sub] = int(out["subject_id"])
    state["trs"].add(round(float(out["tr"]), 6))
    labels = [int(out["label"]), *out["block_label"].tolist(), *out["frame_labels"].tolist()]
    state["max_label"] = max(state["max_label"], *labels)
    col = index
    col["length"].append(int(out["bold"].shape[0]))
    col["tr"].append(float(out["tr"]))
    col["subject_id"].append(int(out["subject_id"]))
    col["label"].append(int(out["label"]))
    col["run"].append(out["run"])
    col["task"].append(out["task"])
    for k in _BLOCKS:
      col[k].append(out[k].tolist())
    progress.tick()
    yield out
  progress.report()


def build_bold_dataset(
  out_dir: str,
  examples_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
  meta: Mapping[str, Any],
  *,
  bold_dtype: str = "float16",
  seq_min: int = 1,
  subject_ids: Mapping[str, int] | None = None,
  overwrite: bool = False,
) -> str:
  """Write a parcellated dataset directory atomically (tmp dir + rename). Returns out_dir.

  meta needs 'name' and 'source'; optional: 'atlas', 'num_parcels' (else from the data),
  'network_of_parcel' (R ints, default all 0), 'network_names', 'class_names' (default
  str(i) up to the largest label), 'bold_is_zscored', 'parcel_names'. subject_ids maps
  subject strings to ids (default: each record's subject_id field). Records shorter than
  seq_min frames are refused.
  """
  out_dir = store.check_new_dir(out_dir, overwrite, "build_bold_dataset")
  for key in ("name", "source"):
    if key not in meta:
      raise ValueError(f"build_bold_dataset: meta needs field {key!r}, found {sorted(meta)}")
  if bold_dtype not in BOLD_DTYPES:
    raise ValueError(
      f"build_bold_dataset: bold_dtype expected one of {BOLD_DTYPES}, found {bold_dtype!r}"
    )
  name = str(meta["name"])
  num_parcels = meta.get("num_parcels")
  state: dict[str, Any] = {
    "num_parcels": None if num_parcels is None else int(num_parcels),
    "split_of_subject": {},
    "id_of_subject": {},
    "trs": set(),
    "max_label": -1,
    "index": {},
  }
  nonempty = {}
  for split, (first, stream) in store.nonempty_splits(
    examples_by_split, "build_bold_dataset", name
  ).items():
    if state["num_parcels"] is None:  # TFDS needs R before writing
      state["num_parcels"] = int(np.shape(first["bold"])[-1])
    nonempty[split] = _validated(
      stream,
      split=split,
      name=name,
      state=state,
      seq_min=int(seq_min),
      bold_dtype=bold_dtype,
      subject_ids=subject_ids,
    )
  r = state["num_parcels"]

  def finish(tmp: str, written: dict[str, int]) -> None:
    full = dict(meta)
    networks = np.asarray(full.get("network_of_parcel", np.zeros(r, np.int64)), np.int64)
    if networks.shape != (r,):
      raise ValueError(
        f"{name}: meta field 'network_of_parcel' expected shape ({r},), found {networks.shape}"
      )
    num_networks = int(networks.max()) + 1 if r else 0
    names = list(full.get("network_names", [f"network_{i}" for i in range(num_networks)]))
    if len(names) < num_networks or networks.min() < 0:
      raise ValueError(
        f"{name}: meta field 'network_names' expected >= {num_networks} names for network "
        f"ids 0..{num_networks - 1}, found {len(names)}"
      )
    classes = list(full.get("class_names", [str(i) for i in range(state["max_label"] + 1)]))
    if len(classes) <= state["max_label"]:
      raise ValueError(
        f"{name}: meta field 'class_names' expected > {state['max_label']} names (largest "
        f"label), found {len(classes)}"
      )
    ids = state["id_of_subject"]
    subjects = [""] * (max(ids.values()) + 1 if ids else 0)
    if subject_ids is not None:
      subjects = [""] * (max(subject_ids.values()) + 1)
      for s, k in subject_ids.items():
        subjects[k] = s
    for s, k in ids.items():
      subjects[k] = s
    full.update(
      format_version=FORMAT_VERSION,
      num_parcels=r,
      network_of_parcel=networks.tolist(),
      network_names=names,
      num_networks=len(names),
      class_names=classes,
      num_classes=len(classes),
      subjects=subjects,
      num_subjects=len(subjects),
      subjects_per_split={
        s: sorted(k for k, v in state["split_of_subject"].items() if v == s)
        for s in examples_by_split
      },
      trs=sorted(state["trs"]),
      bold_dtype=bold_dtype,
      seq_min=int(seq_min),
      split_sizes={s: len(state["index"].get(s, {}).get("length", [])) for s in examples_by_split},
    )
    full.setdefault("atlas", "")
    full.setdefault("bold_is_zscored", False)
    for s, count in written.items():
      if count != full["split_sizes"][s]:
        raise RuntimeError(f"{name}/{s}: wrote {count} records, indexed {full['split_sizes'][s]}")
    store.write_json(os.path.join(tmp, "meta.json"), full, indent=2, sort_keys=True)
    store.write_json(os.path.join(tmp, "index.json"), state["index"])

  return store.write_dataset(
    out_dir,
    builder=(BUILDER_NAME, BUILDER_VERSION),
    features=_features(r, np.dtype(bold_dtype).type),
    examples_by_split=nonempty,
    finish=finish,
    description="boldjax parcellated BOLD runs",
    shuffle=False,  # index.json position i is record i
  )


def _features(r: int, bold_dtype: Any) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  f = tfds.features
  return {
    "bold": f.Tensor(shape=(None, r), dtype=bold_dtype),
    "tr": f.Scalar(dtype=np.float32),
    **{k: f.Text() for k in _STRINGS},
    "subject_id": f.Scalar(dtype=np.int32),
    "label": f.Scalar(dtype=np.int32),
    "frame_labels": f.Tensor(shape=(None,), dtype=np.int32),
    "block_onset_s": f.Tensor(shape=(None,), dtype=np.float32),
    "block_duration_s": f.Tensor(shape=(None,), dtype=np.float32),
    "block_label": f.Tensor(shape=(None,), dtype=np.int32),
    "mean": f.Tensor(shape=(r,), dtype=np.float32),
    "std": f.Tensor(shape=(r,), dtype=np.float32),
    "has_stats": f.Scalar(dtype=np.bool_),
  }


class BoldSource(store.SplitSource):
  """Split of runs (getitem -> dict of numpy; strings come back as str) for grain."""

  builder_name = BUILDER_NAME
  builder_version = BUILDER_VERSION

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._open()[int(index)])
    for key in _STRINGS:
      value = ex[key]
      ex[key] = value.decode() if isinstance(value, bytes) else str(value)
    ex["tr"] = np.float32(ex["tr"])
    for key in ("subject_id", "label"):
      ex[key] = np.int32(ex[key])
    ex["has_stats"] = np.bool_(ex["has_stats"])
    return ex


class BoldDataset:
  """An opened parcellated dataset directory: meta, index and random-access splits."""

  def __init__(self, path: str):
    self.path, self.meta = store.read_meta(
      path, what="parcellated", version=FORMAT_VERSION, files=("index.json",), needs="num_parcels"
    )
    with open(os.path.join(self.path, "index.json")) as f:
      self.index: dict[str, dict[str, list]] = json.load(f)

  @property
  def splits(self) -> dict[str, int]:
    return dict(self.meta["split_sizes"])

  @property
  def num_parcels(self) -> int:
    return int(self.meta["num_parcels"])

  def split_index(self, name: str) -> dict[str, list]:
    """index.json columns for one split (empty columns for an empty split)."""
    if name not in self.meta["split_sizes"]:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(self.splits)}")
    return self.index.get(name, {"length": [], "tr": [], "subject_id": [], "label": []})

  def split(self, name: str) -> BoldSource | store.EmptySource:
    if name not in self.meta["split_sizes"]:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(self.splits)}")
    if self.meta["split_sizes"][name] == 0:
      return store.EmptySource(name)
    return BoldSource(self.path, name)


def open_bold_dataset(path: str) -> BoldDataset:
  """Open a directory written by build_bold_dataset."""
  return BoldDataset(path)


def split_streams(
  records: Iterable[Mapping[str, Any]], split_of_subject: Mapping[str, str], splits: Sequence[str]
) -> dict[str, Iterator[Mapping[str, Any]]]:
  """Route a record stream into per-split streams by subject (buffers only other splits)."""
  from boldjax.data.flat_builder import _Demux

  def tagged():
    for rec in records:
      sub = str(rec["subject"])
      if sub not in split_of_subject:
        raise ValueError(f"{rec.get('where', '?')}: subject {sub!r} has no split assignment")
      yield split_of_subject[sub], rec

  demux = _Demux(tagged(), tuple(splits))
  return {s: demux.stream(s) for s in splits}
