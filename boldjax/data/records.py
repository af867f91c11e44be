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

import contextlib
import glob
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

FORMAT_VERSION = 1
VALUE_RANGE = (-2.5, 2.5)
SPLITS = ("train", "val", "test")
QUANTIZATIONS = ("uint8", "float16")
_BUILDER_NAME = "boldjax_flat_maps"
_BUILDER_VERSION = "1.0.0"
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


def _make_builder_class():
  """Define the TFDS builder lazily: importing TFDS costs ~1 s and registers a name."""
  import tensorflow_datasets as tfds

  class BoldjaxFlatMaps(tfds.core.GeneratorBasedBuilder):
    """Writes the splits handed to it; never downloads anything."""

    name = _BUILDER_NAME
    VERSION = tfds.core.Version(_BUILDER_VERSION)

    def __init__(self, *, examples_by_split, height, width, activity_dtype, **kwargs):
      self._examples_by_split = examples_by_split
      self._shape = (height, width)
      self._activity_dtype = activity_dtype
      # TFDS's DatasetInfo.initialize_from_bucket leaves an empty /tmp/tmp*tfds dir behind
      pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
      before = set(glob.glob(pattern))
      super().__init__(**kwargs)
      for leaked in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):
          os.rmdir(leaked)  # only ever removes an empty directory

    def _info(self):
      scalars = {k: tfds.features.Scalar(dtype=dt) for k, (dt, _) in _SCALARS.items()}
      activity = tfds.features.Tensor(
        shape=self._shape, dtype=self._activity_dtype, encoding=tfds.features.Encoding.ZLIB
      )
      return tfds.core.DatasetInfo(
        builder=self,
        description="boldjax flat maps",
        features=tfds.features.FeaturesDict({"activity": activity, **scalars}),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(name) for name in self._examples_by_split}

    def _generate_examples(self, split):
      yield from enumerate(self._examples_by_split[split])

  return BoldjaxFlatMaps


_BUILDER_CLASS = None


def _builder_class():
  global _BUILDER_CLASS
  if _BUILDER_CLASS is None:
    _BUILDER_CLASS = _make_builder_class()
  return _BUILDER_CLASS


class _Progress:
  """Prints rows and rows/s every `every` seconds (long imports must show life)."""

  def __init__(self, label: str, every: float = 10.0):
    self.label, self.every = label, every
    self.start = self.last = None
    self.count = 0

  def tick(self) -> None:
    now = time.monotonic()
    if self.start is None:
      self.start = self.last = now
    self.count += 1
    if now - self.last >= self.every:
      self.last = now
      self.report()

  def report(self) -> None:
    dt = max(time.monotonic() - (self.start or time.monotonic()), 1e-9)
    print(f"[{self.label}] {self.count} rows, {self.count / dt:.0f} rows/s", flush=True)


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
  progress = _Progress(where)
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
  import tensorflow_datasets as tfds

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"build_flat_dataset: {out_dir} exists and is not empty")
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
  bad = [s for s in examples_by_split if s not in SPLITS]
  if bad:
    raise ValueError(f"build_flat_dataset: split names must be in {SPLITS}, found {bad}")
  value_range = tuple(float(v) for v in meta.get("value_range", VALUE_RANGE))
  shape = tuple(int(s) for s in shape)
  stats = {"max_subject": -1, "max_label": -1}
  name = meta["name"]
  # TFDS cannot write an empty split: peek at the raw streams, keep the non-empty ones
  # (empty splits are recorded in meta.json only).
  nonempty = {}
  for split, examples in examples_by_split.items():
    it = iter(examples)
    first = next(it, None)
    if first is not None:
      nonempty[split] = _validated(
        itertools.chain([first], it),
        where=f"{name}/{split}",
        shape=shape,
        quantization=quantization,
        value_range=value_range,
        stats=stats,
      )
  if not nonempty:
    raise ValueError(f"build_flat_dataset: {name}: every split is empty")
  tmp = f"{out_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    builder = _builder_class()(
      examples_by_split=nonempty,
      height=shape[0],
      width=shape[1],
      activity_dtype=np.uint8 if quantization == "uint8" else np.float16,
      data_dir=os.path.join(tmp, "tfds"),
      file_format="array_record",
    )
    with _quiet_tfds(tfds):
      builder.download_and_prepare(
        download_dir=os.path.join(tmp, "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
    split_sizes = {
      s: int(builder.info.splits[s].num_examples) if s in nonempty else 0 for s in examples_by_split
    }
    full_meta = dict(meta)
    full_meta.update(
      format_version=FORMAT_VERSION,
      height=shape[0],
      width=shape[1],
      value_range=list(value_range),
      quantization=quantization,
      split_sizes=split_sizes,
    )
    mask = np.asarray(mask_fn() if mask_fn is not None else mask)
    if mask.shape != shape:
      raise ValueError(f"build_flat_dataset: mask shape expected {shape}, found {mask.shape}")
    mask = mask > 0
    full_meta["mask_pixels"] = int(mask.sum())
    full_meta.setdefault("num_subjects", stats["max_subject"] + 1)
    full_meta.setdefault("num_classes", stats["max_label"] + 1)
    np.save(os.path.join(tmp, "mask.npy"), mask)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(full_meta, f, indent=2, sort_keys=True, default=_json_default)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


@contextlib.contextmanager
def _quiet_tfds(tfds):
  """Silence TFDS's tqdm bars while building (we print our own rows/s)."""
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"meta.json: cannot serialise {type(obj).__name__}: {obj!r}")


_OPEN_LOCK = threading.Lock()


class TfdsSplitSource:
  """Random-access split of a dataset directory's TFDS ArrayRecord files.

  Picklable: the TFDS data source is reopened lazily in each process. Subclasses name
  their builder and decode examples in __getitem__.
  """

  builder_name = _BUILDER_NAME
  builder_version = _BUILDER_VERSION

  def __init__(self, path: str, split: str):
    self.path, self.split = path, split
    self._source = None
    self._len = None

  def _open(self):
    if self._source is not None:
      return self._source
    # One opener at a time: grain's prefetch threads call this concurrently, and two threads
    # importing tensorflow_datasets (lazy etils modules) at once deadlock on Python 3.11.
    with _OPEN_LOCK:
      if self._source is not None:
        return self._source
      import tensorflow_datasets as tfds

      tfds_dir = os.path.join(self.path, "tfds", self.builder_name, self.builder_version)
      builder = tfds.builder_from_directory(tfds_dir)
      if self.split not in builder.info.splits:
        raise KeyError(f"{self.path}: no split {self.split!r}; found {sorted(builder.info.splits)}")
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    if self._len is None:
      self._len = len(self._open())
    return self._len


class FlatSource(TfdsSplitSource):
  """Flat-map split (getitem -> dict of numpy arrays) for grain.MapDataset.source."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._open()[index]
    out = {"activity": np.asarray(ex["activity"])}
    for key, (dtype, _) in _SCALARS.items():
      out[key] = np.asarray(ex[key], dtype)
    return out

  def __getstate__(self):
    return {"path": self.path, "split": self.split, "_source": None, "_len": self._len}

  def __repr__(self) -> str:
    return f"FlatSource({self.path!r}, {self.split!r})"


class EmptySource:
  """A split with no examples (TFDS cannot store one)."""

  def __init__(self, split: str):
    self.split = split

  def __len__(self) -> int:
    return 0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    raise IndexError(f"split {self.split!r} is empty")


class FlatDataset:
  """An opened flat-map dataset directory: mask, meta and random-access splits."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    meta_path = os.path.join(self.path, "meta.json")
    mask_path = os.path.join(self.path, "mask.npy")
    for p in (meta_path, mask_path):
      if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: missing; is {self.path} a boldjax flat-map dataset?")
    with open(meta_path) as f:
      self.meta: dict[str, Any] = json.load(f)
    version = self.meta.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(
        f"{meta_path}: field 'format_version' expected {FORMAT_VERSION}, found {version!r}"
      )
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
      return EmptySource(name)
    return FlatSource(self.path, name)


def open_flat_dataset(path: str) -> FlatDataset:
  """Open a directory written by build_flat_dataset."""
  return FlatDataset(path)
