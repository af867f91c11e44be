"""Flat-map datasets on disk: a TFDS ArrayRecord dataset + meta.json + mask.npy.

Layout of a dataset directory::

  DIR/meta.json                           name, source, height, width, value_range, ...
  DIR/mask.npy                            (H, W) bool
  DIR/tfds/flat_maps/1.0.0/*.array_record TFDS dataset (file_format="array_record")

Examples hold activity (H, W) (uint8 quantised like NSD-Flat, or float16), subject_id,
label (-1 = none), trial_id, session_id and nsd_id (-1 = none). TFDS serialises and reads
ArrayRecord without TensorFlow; the activity tensor is zlib-compressed (flat-map
backgrounds are constant, and TFDS would otherwise upcast uint8 to int64).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from boldjax.data import store
from boldjax.data.store import SPLITS  # noqa: F401  (the split names, for callers)

FORMAT_VERSION = 1
VALUE_RANGE = (-2.5, 2.5)
QUANTIZATIONS = ("uint8", "float16")
BUILDER_NAME = "boldjax_flat_maps"
BUILDER_VERSION = "1.0.0"
# field -> (numpy dtype, default when an example omits it; None = required)
_SCALARS: dict[str, tuple[type, int | None]] = {
  "subject_id": (np.int32, None),
  "label": (np.int32, -1),
  "trial_id": (np.int64, None),
  "session_id": (np.int32, -1),
  "nsd_id": (np.int64, -1),
}
_FIELDS = ("activity", *_SCALARS)


def quantize(x: np.ndarray, value_range: tuple[float, float] = VALUE_RANGE) -> np.ndarray:
  """Float map -> uint8 exactly like NSD-Flat's generate_dataset.quantize (truncation)."""
  lo, hi = value_range
  x = np.clip(np.asarray(x, np.float32), lo, hi)
  x = (x - np.float32(lo)) / np.float32(hi - lo)
  return (np.float32(255) * x).astype(np.uint8)


def dequantize(q: np.ndarray, value_range: tuple[float, float] = VALUE_RANGE) -> np.ndarray:
  """uint8 -> float32 as boldGPT's ActivityTransform: (hi - lo) * (q / 255) + lo."""
  lo, hi = value_range
  x = np.asarray(q).astype(np.float32) / np.float32(255.0)
  return np.float32(hi - lo) * x + np.float32(lo)


def _validated(
  examples: Iterable[dict[str, Any]],
  *,
  where: str,
  shape: tuple[int, int],
  quantization: str,
  value_range: tuple[float, float],
  stats: dict[str, Any],
) -> Iterator[dict[str, Any]]:
  """Check and normalise each example; count subjects and labels for meta.json."""
  progress = store.Progress(where)
  for i, ex in enumerate(examples):
    unknown = set(ex) - set(_FIELDS)
    if unknown:
      raise ValueError(
        f"{where}: example {i} has unknown fields {sorted(unknown)}; expected {_FIELDS}"
      )
    if "activity" not in ex:
      raise ValueError(f"{where}: example {i} has no field 'activity'")
    act = np.asarray(ex["activity"])
    if act.shape != shape:
      raise ValueError(
        f"{where}: example {i} field 'activity' must have shape {shape}, found {act.shape}"
      )
    if np.issubdtype(act.dtype, np.floating) and not np.all(np.isfinite(act)):
      raise ValueError(f"{where}: example {i} field 'activity' has non-finite values")
    if quantization == "uint8":
      if act.dtype != np.uint8:
        if not np.issubdtype(act.dtype, np.floating):
          raise ValueError(
            f"{where}: example {i} field 'activity' must be uint8 or float, found {act.dtype}"
          )
        act = quantize(act, value_range)
    else:
      if not np.issubdtype(act.dtype, np.floating):
        raise ValueError(
          f"{where}: example {i} field 'activity' must be float for float16 storage, "
          f"found {act.dtype}"
        )
      act = act.astype(np.float16)
    out = {"activity": act}
    for key, (dtype, default) in _SCALARS.items():
      value = ex.get(key, default)
      if value is None:
        raise ValueError(f"{where}: example {i} has no field {key!r}")
      if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise ValueError(
          f"{where}: example {i} field {key!r} must be an integer scalar, found {value!r}"
        )
      out[key] = dtype(value)
    if out["subject_id"] < 0:
      raise ValueError(
        f"{where}: example {i} field 'subject_id' must be >= 0, found {out['subject_id']}"
      )
    stats["max_subject"] = max(stats["max_subject"], int(out["subject_id"]))
    stats["max_label"] = max(stats["max_label"], int(out["label"]))
    progress.tick()
    yield out
  progress.report()


def build_flat_dataset(
  out_dir: str,
  examples_by_split: Mapping[str, Iterable[dict[str, Any]]],
  mask: np.ndarray | Callable[[], np.ndarray],
  meta: Mapping[str, Any],
  *,
  overwrite: bool = False,
) -> str:
  """Write a flat-map dataset directory atomically (build in a sibling tmp dir, rename).

  meta needs 'name' and 'source'; 'value_range' (default (-2.5, 2.5)), 'quantization'
  ("uint8": float activity is quantised like NSD-Flat; or "float16"), 'num_classes'
  (default max label + 1) and 'num_subjects' (default max subject_id + 1) are optional.
  mask may be a callable evaluated after all examples are written (for masks derived from
  the data). Returns out_dir.
  """
  out_dir = store.check_new_dir(out_dir, overwrite, "build_flat_dataset")
  if callable(mask):  # computed from the data, after every example is written
    mask_fn = mask
    if "height" not in meta or "width" not in meta:
      raise ValueError("build_flat_dataset: a mask callable needs meta 'height' and 'width'")
    shape = (int(meta["height"]), int(meta["width"]))
  else:
    mask_fn, shape = None, np.shape(mask)
    if len(shape) != 2:
      raise ValueError(f"build_flat_dataset: mask must be (H, W), found shape {shape}")
  for key in ("name", "source"):
    if key not in meta:
      raise ValueError(f"build_flat_dataset: meta needs field {key!r}, found {sorted(meta)}")
  quantization = meta.get("quantization", "uint8")
  if quantization not in QUANTIZATIONS:
    raise ValueError(
      f"build_flat_dataset: meta field 'quantization' must be one of {QUANTIZATIONS}, "
      f"found {quantization!r}"
    )
  value_range = tuple(float(v) for v in meta.get("value_range", VALUE_RANGE))
  shape = tuple(int(s) for s in shape)
  stats = {"max_subject": -1, "max_label": -1}
  name = meta["name"]
  nonempty = {
    split: _validated(
      stream,
      where=f"{name}/{split}",
      shape=shape,
      quantization=quantization,
      value_range=value_range,
      stats=stats,
    )
    for split, (_, stream) in store.nonempty_splits(
      examples_by_split, "build_flat_dataset", name
    ).items()
  }

  def finish(tmp: str, written: dict[str, int]) -> None:
    full_meta = dict(meta)
    full_meta.update(
      format_version=FORMAT_VERSION,
      height=shape[0],
      width=shape[1],
      value_range=list(value_range),
      quantization=quantization,
      split_sizes={s: written.get(s, 0) for s in examples_by_split},
    )
    flat_mask = np.asarray(mask_fn() if mask_fn is not None else mask)
    if flat_mask.shape != shape:
      raise ValueError(f"build_flat_dataset: mask shape expected {shape}, found {flat_mask.shape}")
    flat_mask = flat_mask > 0
    full_meta["mask_pixels"] = int(flat_mask.sum())
    full_meta.setdefault("num_subjects", stats["max_subject"] + 1)
    full_meta.setdefault("num_classes", stats["max_label"] + 1)
    np.save(os.path.join(tmp, "mask.npy"), flat_mask)
    store.write_json(os.path.join(tmp, "meta.json"), full_meta, indent=2, sort_keys=True)

  activity_dtype = np.uint8 if quantization == "uint8" else np.float16
  return store.write_dataset(
    out_dir,
    builder=(BUILDER_NAME, BUILDER_VERSION),
    features=_features(shape, activity_dtype),
    examples_by_split=nonempty,
    finish=finish,
    description="boldjax flat maps",
  )


def _features(shape: tuple[int, int], activity_dtype: Any) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  scalars = {k: tfds.features.Scalar(dtype=dt) for k, (dt, _) in _SCALARS.items()}
  activity = tfds.features.Tensor(
    shape=shape, dtype=activity_dtype, encoding=tfds.features.Encoding.ZLIB
  )
  return {"activity": activity, **scalars}


class FlatSource(store.SplitSource):
  """Flat-map split (getitem -> dict of numpy arrays) for grain.MapDataset.source."""

  builder_name = BUILDER_NAME
  builder_version = BUILDER_VERSION

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._open()[index]
    out = {"activity": np.asarray(ex["activity"])}
    for key, (dtype, _) in _SCALARS.items():
      out[key] = np.asarray(ex[key], dtype)
    return out


class FlatDataset:
  """An opened flat-map dataset directory: mask, meta and random-access splits."""

  def __init__(self, path: str):
    self.path, self.meta = store.read_meta(
      path, what="flat-map", version=FORMAT_VERSION, files=("mask.npy",)
    )
    mask_path = os.path.join(self.path, "mask.npy")
    self.mask: np.ndarray = np.load(mask_path).astype(bool)
    expected = (self.meta["height"], self.meta["width"])
    if self.mask.shape != expected:
      raise ValueError(
        f"{mask_path}: shape expected {expected} (meta.json), found {self.mask.shape}"
      )

  @property
  def splits(self) -> dict[str, int]:
    return dict(self.meta["split_sizes"])

  @property
  def value_range(self) -> tuple[float, float]:
    lo, hi = self.meta["value_range"]
    return float(lo), float(hi)

  def split(self, name: str) -> FlatSource:
    if name not in self.meta["split_sizes"]:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(self.splits)}")
    if self.meta["split_sizes"][name] == 0:
      return store.EmptySource(name)
    return FlatSource(self.path, name)


def open_flat_dataset(path: str) -> FlatDataset:
  """Open a directory written by build_flat_dataset."""
  return FlatDataset(path)
