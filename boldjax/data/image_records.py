"""Image-stimulus datasets on disk ("stimulus" kind): one example per image, shared by the
encoding-model and fMRI-to-image families.

Layout of a dataset directory::

  DIR/meta.json                               kind, image_size, split_sizes, source, response
  DIR/index.json                              per split: the image_ids in record order
  DIR/vertices.npz                            coords (N, 3), fsaverage_index (N,), hemisphere (N,)
  DIR/tfds/boldjax_stimuli/1.0.0/*.array_record

An example holds image (H, W, 3) uint8 (one size per dataset), image_id int64 (a stable
index into the source: file rank, NSD brick index) and, when the dataset has responses,
response (N,) float32: one subject's fMRI for that image. vertices.npz says where the N
responses sit: fsaverage_index indexes the fsaverage mesh of its hemisphere (0 left,
1 right; -1 = not a surface vertex), so maps can be drawn on fsaverage5 through the first
10,242 vertices (icosahedral meshes nest). Splits are image-level (a seeded permutation);
records of a split are in source order, so index.json position i is record i.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from boldjax.cli import InputError
from boldjax.data import store
from boldjax.data.store import SPLITS

KIND = "stimulus"
FORMAT_VERSION = 1
BUILDER_NAME = "boldjax_stimuli"
BUILDER_VERSION = "1.0.0"
INDEX_FILE = "index.json"
VERTEX_FILE = "vertices.npz"
VERTEX_FIELDS = ("coords", "fsaverage_index", "hemisphere")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
RESAMPLE = "center square crop (non-square sources), then PIL bicubic (antialiased)"
_RESERVED = ("meta.json", INDEX_FILE, VERTEX_FILE, "tfds")


# ------------------------------------------------------------------------------------------
# Helpers the importers share.
# ------------------------------------------------------------------------------------------
def split_assignment(
  n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> np.ndarray:
  """(n,) split index (0 train, 1 val, 2 test) per image: a seeded permutation; val and test
  get round(fraction * n) images each, train the rest."""
  fr = np.asarray(fractions, np.float64)
  if fr.shape != (3,) or not np.all(np.isfinite(fr)) or fr.min() < 0 or abs(fr.sum() - 1) > 1e-6:
    raise InputError(
      f"split fractions: field 'fractions' expected 3 non-negative numbers (train, val, test) "
      f"summing to 1, found {np.atleast_1d(fr).tolist()}"
    )
  n_val, n_test = round(fr[1] * n), round(fr[2] * n)
  n_val = min(n_val, n)
  n_test = min(n_test, n - n_val)
  rank = np.random.default_rng([int(seed), 0x1A6E]).permutation(n)
  out = np.zeros(n, np.int8)
  out[rank < n_val] = 1
  out[(rank >= n_val) & (rank < n_val + n_test)] = 2
  return out


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3): a non-square image is cropped to its centred square
  first (stimuli are square; ViTs want square inputs), then PIL bicubic (antialiased)."""
  from PIL import Image

  h, w = image.shape[:2]
  if h != w:
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top : top + s, left : left + s]
  if image.shape[0] == size:
    return np.ascontiguousarray(image)
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def check_vertices(vertices: Mapping[str, Any], n: int, where: str) -> dict[str, np.ndarray]:
  """coords (N, 3) finite float32, fsaverage_index (N,) int64 >= -1, hemisphere (N,) int8 in
  {0, 1}; (hemisphere, index) pairs unique."""
  missing = [k for k in VERTEX_FIELDS if k not in vertices]
  if missing:
    raise InputError(f"{where}: vertices missing fields {missing}; expected {VERTEX_FIELDS}")
  coords = np.asarray(vertices["coords"])
  if coords.shape != (n, 3) or coords.dtype.kind not in "iuf" or not np.isfinite(coords).all():
    raise InputError(
      f"{where}: vertices field 'coords' expected finite ({n}, 3) numbers, found "
      f"{coords.dtype} {coords.shape}"
    )
  index = np.asarray(vertices["fsaverage_index"])
  hemi = np.asarray(vertices["hemisphere"])
  for key, arr in (("fsaverage_index", index), ("hemisphere", hemi)):
    if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
      raise InputError(
        f"{where}: vertices field {key!r} expected ({n},) integers, found {arr.dtype} {arr.shape}"
      )
  if n and index.min() < -1:
    raise InputError(
      f"{where}: vertices field 'fsaverage_index' expected >= -1, found {int(index.min())}"
    )
  if n and not np.isin(hemi, (0, 1)).all():
    raise InputError(
      f"{where}: vertices field 'hemisphere' expected 0 (left) or 1 (right), found "
      f"{sorted(set(hemi.tolist()) - {0, 1})[:5]}"
    )
  on = index >= 0
  pairs = hemi[on].astype(np.int64) * (1 << 40) + index[on]
  if len(np.unique(pairs)) != int(on.sum()):
    raise InputError(
      f"{where}: vertices field 'fsaverage_index' expected each (hemisphere, index) once, "
      "found repeats"
    )
  return {
    "coords": coords.astype(np.float32),
    "fsaverage_index": index.astype(np.int64),
    "hemisphere": hemi.astype(np.int8),
  }


# ------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------
def _features(shape: tuple[int, int, int], num_vertices: int | None) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  f = tfds.features
  out = {
    "image": f.Tensor(shape=shape, dtype=np.uint8, encoding=f.Encoding.ZLIB),
    "image_id": f.Scalar(dtype=np.int64),
  }
  if num_vertices is not None:
    out["response"] = f.Tensor(shape=(num_vertices,), dtype=np.float32)
  return out


def _check_image(image: Any, where: str) -> np.ndarray:
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
    raise InputError(
      f"{where}: field 'image' expected (H, W, 3) uint8, found {arr.dtype} {arr.shape}"
    )
  return arr


def _check_response(row: Any, n: int, where: str) -> np.ndarray:
  arr = np.asarray(row)
  if arr.shape != (n,) or arr.dtype.kind not in "iuf":
    raise InputError(
      f"{where}: field 'response' expected ({n},) numbers, found {arr.dtype} {arr.shape}"
    )
  with np.errstate(over="ignore", invalid="ignore"):
    out = arr.astype(np.float32)
  bad = np.flatnonzero(~np.isfinite(out))
  if len(bad):
    raise InputError(
      f"{where}: field 'response' expected finite float32 values, found {out[bad[0]]} at "
      f"vertex {int(bad[0])} ({len(bad)} non-finite)"
    )
  return out


def write_stimulus_dataset(
  out_dir: str,
  images: Sequence[np.ndarray],
  image_ids: Sequence[int] | np.ndarray,
  responses: Sequence[np.ndarray] | np.ndarray | None = None,
  vertices: Mapping[str, np.ndarray] | None = None,
  *,
  size: int | None = None,
  split_seed: int = 0,
  fractions: Sequence[float] = DEFAULT_FRACTIONS,
  assignment: Sequence[int] | np.ndarray | None = None,
  response_space: str = "",
  extra_files: Mapping[str, Callable[[str], None]] | None = None,
  meta: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> str:
  """Write a stimulus dataset directory atomically (tmp dir + rename). Returns out_dir.

  images: random access (an array or a lazy sequence) of (H, W, 3) uint8; image_ids one
  unique int >= 0 each. size: every image is resized to (size, size) (resize_image), else all
  must share one shape. responses: random access of (N,) rows, one per image (and
  `vertices`, check_vertices, when they sit on a surface); response_space (default: meta
  'space') names their space in meta 'response'. Splits: `assignment` (0/1/2 per image)
  or split_assignment(fractions, split_seed).
  A lazy `images` may offer iter_positions(positions) -> the images at those increasing
  positions, one per split (read in chunks). extra_files: file name -> writer(path), run in
  the tmp dir. meta: extra fields ('name', 'source', ...).
  """
  out_dir = store.check_new_dir(out_dir, overwrite, "write_stimulus_dataset")
  meta = dict(meta or {})
  name = str(meta.get("name", os.path.basename(out_dir.rstrip("/")) or "stimulus"))
  n = len(images)
  if n == 0:
    raise InputError(f"{name}: field 'images' expected at least one image, found none")
  ids = np.asarray(image_ids)
  if ids.shape != (n,) or ids.dtype.kind not in "iu":
    raise InputError(
      f"{name}: field 'image_ids' expected ({n},) integers (one per image), found "
      f"{ids.dtype} {ids.shape}"
    )
  if ids.min() < 0 or len(np.unique(ids)) != n:
    raise InputError(
      f"{name}: field 'image_ids' expected unique integers >= 0, found repeats or < 0"
    )
  ids = ids.astype(np.int64)
  num_vertices = None
  if responses is not None:
    if len(responses) != n:
      raise InputError(
        f"{name}: field 'responses' expected one row per image ({n}), found {len(responses)}"
      )
    num_vertices = int(np.shape(responses[0])[-1]) if np.ndim(responses[0]) == 1 else -1
    if num_vertices < 1:
      raise InputError(
        f"{name}: field 'responses' expected (N,) rows, found shape {np.shape(responses[0])}"
      )
  verts = None
  if vertices is not None:
    if responses is None:
      raise InputError(f"{name}: field 'vertices' given without responses")
    verts = check_vertices(vertices, num_vertices, name)
  for fname in extra_files or {}:
    if fname in _RESERVED or os.path.basename(fname) != fname or fname in ("", ".", ".."):
      raise ValueError(f"{name}: extra file {fname!r} must be a plain name, not one of {_RESERVED}")
  if assignment is None:
    assign = split_assignment(n, fractions, split_seed)
    split_rule = f"image-level: fractions {[float(f) for f in fractions]}, seed {split_seed}"
  else:
    assign = np.asarray(assignment)
    if assign.shape != (n,) or not np.isin(assign, (0, 1, 2)).all():
      raise InputError(f"{name}: field 'assignment' expected ({n},) values in 0 (train), 1, 2")
    split_rule = "given by the caller"
  if size is not None:
    size = int(size)
    if size < 1:
      raise InputError(f"{name}: field 'size' expected a positive number of pixels, found {size}")
    shape = (size, size, 3)
  else:
    shape = tuple(int(s) for s in _check_image(images[0], f"{name} image 0").shape)
  original_sizes: collections.Counter = collections.Counter()
  index: dict[str, list[int]] = {}

  def examples(split: int, positions: np.ndarray) -> Iterator[dict[str, Any]]:
    label = f"{name}/{SPLITS[split]}"
    progress = store.Progress(label)
    read = getattr(images, "iter_positions", None)
    stream = read(positions) if read is not None else (images[int(p)] for p in positions)
    for pos, image in zip(positions.tolist(), stream, strict=True):
      where = f"{label} image {pos} (image_id {ids[pos]})"
      img = _check_image(image, where)
      original_sizes[f"{img.shape[0]}x{img.shape[1]}"] += 1
      if size is not None:
        img = resize_image(img, size)
      elif img.shape != shape:
        raise InputError(
          f"{where}: field 'image' expected shape {shape} like image 0 (pass a size to resize), "
          f"found {img.shape}"
        )
      ex = {"image": img, "image_id": ids[pos]}
      if num_vertices is not None:
        ex["response"] = _check_response(responses[pos], num_vertices, where)
      progress.tick()
      yield ex
    progress.report()

  by_split = {}
  for k, split in enumerate(SPLITS):
    positions = np.flatnonzero(assign == k)
    index[split] = ids[positions].tolist()
    by_split[split] = examples(k, positions) if len(positions) else []
  nonempty = {
    s: stream
    for s, (_, stream) in store.nonempty_splits(by_split, "write_stimulus_dataset", name).items()
  }

  def finish(tmp: str, written: dict[str, int]) -> None:
    for split, count in written.items():
      if count != len(index[split]):
        raise RuntimeError(f"{name}/{split}: wrote {count} images, indexed {len(index[split])}")
    full = dict(meta)
    full.update(
      kind=KIND,
      format_version=FORMAT_VERSION,
      name=name,
      image_size=list(shape[:2]),
      num_images=n,
      split_sizes={s: len(index[s]) for s in SPLITS},
      split_rule=split_rule,
      original_sizes=dict(sorted(original_sizes.items())),
      resample=RESAMPLE if size is not None else "none",
      response=None
      if num_vertices is None
      else {
        "num_vertices": num_vertices,
        "space": response_space or str(meta.get("space", "")),
        "dtype": "float32",
        "has_vertices": verts is not None,
      },
    )
    full.setdefault("source", {})
    store.write_json(os.path.join(tmp, "meta.json"), full, indent=2, sort_keys=True)
    store.write_json(os.path.join(tmp, INDEX_FILE), index)
    if verts is not None:
      np.savez(os.path.join(tmp, VERTEX_FILE), **verts)
    for fname, writer in (extra_files or {}).items():
      writer(os.path.join(tmp, fname))

  return store.write_dataset(
    out_dir,
    builder=(BUILDER_NAME, BUILDER_VERSION),
    features=_features(shape, num_vertices),
    examples_by_split=nonempty,
    finish=finish,
    description="boldjax image stimuli",
    shuffle=False,  # index.json position i is record i
  )


# ------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------
class StimulusSource(store.SplitSource):
  """A split of images (getitem -> image, image_id [, response]) for grain."""

  builder_name = BUILDER_NAME
  builder_version = BUILDER_VERSION

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._open()[int(index)]
    out = {"image": np.asarray(ex["image"], np.uint8), "image_id": np.int64(ex["image_id"])}
    if "response" in ex:
      out["response"] = np.asarray(ex["response"], np.float32)
    return out


class StimulusDataset:
  """An opened stimulus dataset directory: meta, per-split image ids, splits, vertices."""

  def __init__(self, path: str):
    self.path, self.meta = store.read_meta(
      path, what=KIND, version=FORMAT_VERSION, files=(INDEX_FILE,), needs="image_size"
    )
    if self.meta.get("kind") != KIND:
      raise ValueError(
        f"{self.path}/meta.json: field 'kind' expected {KIND!r}, found {self.meta.get('kind')!r}"
      )
    with open(os.path.join(self.path, INDEX_FILE)) as f:
      self.index: dict[str, list[int]] = json.load(f)

  @property
  def splits(self) -> dict[str, int]:
    return dict(self.meta["split_sizes"])

  @property
  def image_size(self) -> tuple[int, int]:
    h, w = self.meta["image_size"]
    return int(h), int(w)

  @property
  def num_vertices(self) -> int | None:
    response = self.meta.get("response")
    return None if response is None else int(response["num_vertices"])

  def _check_split(self, name: str) -> None:
    if name not in self.meta["split_sizes"]:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(self.splits)}")

  def split(self, name: str) -> StimulusSource | store.EmptySource:
    self._check_split(name)
    if self.meta["split_sizes"][name] == 0:
      return store.EmptySource(name)
    return StimulusSource(self.path, name)

  def image_ids(self, split: str) -> np.ndarray:
    """(n,) int64 image ids of a split, in record order."""
    self._check_split(split)
    return np.asarray(self.index.get(split, []), np.int64)

  def images(self, split: str) -> np.ndarray:
    """(n, H, W, 3) uint8: every image of a split, in record order (reads them all)."""
    src = self.split(split)
    out = np.empty((len(src), *self.image_size, 3), np.uint8)
    for i in range(len(src)):
      out[i] = src[i]["image"]
    return out

  def responses(self, split: str) -> np.ndarray:
    """(n, N) float32 responses of a split, in record order."""
    if self.num_vertices is None:
      raise ValueError(f"{self.path}/meta.json: field 'response' is null: no responses stored")
    src = self.split(split)
    out = np.empty((len(src), self.num_vertices), np.float32)
    for i in range(len(src)):
      out[i] = src[i]["response"]
    return out

  def vertices(self) -> dict[str, np.ndarray]:
    """coords (N, 3) float32, fsaverage_index (N,) int64, hemisphere (N,) int8."""
    path = os.path.join(self.path, VERTEX_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing; this dataset stores no vertex positions")
    with np.load(path) as z:
      return {k: np.asarray(z[k]) for k in VERTEX_FIELDS}


def open_stimulus(path: str) -> StimulusDataset:
  """Open a directory written by write_stimulus_dataset."""
  return StimulusDataset(path)
