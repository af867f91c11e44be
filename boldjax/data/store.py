"""A boldjax dataset directory on disk, for every data kind: TFDS ArrayRecord splits under
DIR/tfds/<builder>/<version>/, meta.json and whatever files the kind adds, written
atomically (a sibling tmp folder renamed into place), read back as random-access split
sources for grain.

A data kind (records.py: flat maps; bold_records.py: parcellated runs) declares its TFDS
features and validates its examples; the writing, the empty-split rule, the cleanup and
the reading are here once.
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

SPLITS = ("train", "val", "test")


class Progress:
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


def json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"meta.json: cannot serialise {type(obj).__name__}: {obj!r}")


def write_json(path: str, obj: Any, **kwargs: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, default=json_default, **kwargs)


# ------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------
_BUILDERS: dict[str, type] = {}


def _builder_class(name: str, version: str) -> type:
  """One TFDS builder class per dataset kind, defined lazily (importing TFDS costs ~1 s) and
  once (TFDS registers builder names globally)."""
  if name in _BUILDERS:
    return _BUILDERS[name]
  import tensorflow_datasets as tfds

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the splits handed to it, in order; never downloads anything."""

    VERSION = tfds.core.Version(version)

    def __init__(self, *, examples_by_split, features, description, shuffle, **kwargs):
      self._examples_by_split = examples_by_split
      self._features, self._description, self._shuffle = features, description, shuffle
      # TFDS's DatasetInfo.initialize_from_bucket leaves an empty /tmp/tmp*tfds dir behind
      pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
      before = set(glob.glob(pattern))
      super().__init__(**kwargs)
      for leaked in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):
          os.rmdir(leaked)  # only ever removes an empty directory

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=self._description,
        features=tfds.features.FeaturesDict(self._features),
        disable_shuffling=not self._shuffle,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self._examples_by_split}

    def _generate_examples(self, split):
      yield from enumerate(self._examples_by_split[split])

  Builder.name = name
  _BUILDERS[name] = Builder
  return Builder


def check_new_dir(out_dir: str, overwrite: bool, who: str) -> str:
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{who}: {out_dir} exists and is not empty")
  return out_dir


def nonempty_splits(
  examples_by_split: Mapping[str, Iterable[Any]], who: str, name: str
) -> dict[str, tuple[Any, Iterator[Any]]]:
  """split -> (first example, the whole stream) for the splits that have one.

  TFDS cannot write an empty split: those are recorded in meta.json only.
  """
  bad = [s for s in examples_by_split if s not in SPLITS]
  if bad:
    raise ValueError(f"{who}: split names must be in {SPLITS}, found {bad}")
  out = {}
  for split, examples in examples_by_split.items():
    it = iter(examples)
    first = next(it, None)
    if first is not None:
      out[split] = (first, itertools.chain([first], it))
  if not out:
    raise ValueError(f"{who}: {name}: every split is empty")
  return out


def write_dataset(
  out_dir: str,
  *,
  builder: tuple[str, str],
  features: Mapping[str, Any],
  examples_by_split: Mapping[str, Iterable[dict[str, Any]]],
  finish: Callable[[str, dict[str, int]], None],
  description: str,
  shuffle: bool = True,
) -> str:
  """Write the TFDS splits into a tmp sibling of out_dir, let `finish(tmp, written)` add
  meta.json and the kind's files (written: examples per split), then rename into place.

  builder: (TFDS builder name, version), the reader's path under DIR/tfds. Nothing is left
  behind on failure; an existing out_dir is replaced only once the new one is complete.
  """
  import tensorflow_datasets as tfds

  tmp = f"{out_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    name, version = builder
    writer = _builder_class(name, version)(
      examples_by_split=dict(examples_by_split),
      features=dict(features),
      description=description,
      shuffle=shuffle,
      data_dir=os.path.join(tmp, "tfds"),
      file_format="array_record",
    )
    tfds.disable_progress_bar()  # we print our own rows/s
    try:
      writer.download_and_prepare(
        download_dir=os.path.join(tmp, "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    finally:
      tfds.enable_progress_bar()
    shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
    written = {s: int(writer.info.splits[s].num_examples) for s in examples_by_split}
    finish(tmp, written)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


# ------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------
def read_meta(
  path: str, *, what: str, version: int, files: tuple[str, ...] = (), needs: str | None = None
) -> tuple[str, dict[str, Any]]:
  """(absolute path, meta.json) of a dataset directory of one kind: meta.json and `files`
  present, the kind's format_version (and meta field `needs`, when given)."""
  path = os.path.abspath(path)
  meta_path = os.path.join(path, "meta.json")
  for p in (meta_path, *(os.path.join(path, f) for f in files)):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p}: missing; is {path} a boldjax {what} dataset?")
  with open(meta_path) as f:
    meta = json.load(f)
  found = meta.get("format_version")
  if found != version or (needs is not None and needs not in meta):
    raise ValueError(
      f"{meta_path}: field 'format_version' expected {version} (a {what} dataset), found {found!r}"
    )
  return path, meta


_OPEN_LOCK = threading.Lock()


class SplitSource:
  """Random-access split of a dataset directory's TFDS ArrayRecord files.

  Picklable: the TFDS data source is reopened lazily in each process. Subclasses name
  their builder and decode examples in __getitem__.
  """

  builder_name = ""
  builder_version = ""

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

  def __getstate__(self):
    return {"path": self.path, "split": self.split, "_source": None, "_len": self._len}

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r}, {self.split!r})"


class EmptySource:
  """A split with no examples (TFDS cannot store one)."""

  def __init__(self, split: str):
    self.split = split

  def __len__(self) -> int:
    return 0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    raise IndexError(f"split {self.split!r} is empty")
