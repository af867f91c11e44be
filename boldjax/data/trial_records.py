"""Trial datasets on disk ("trials" kind): fMRI betas per trial plus the images they show.

The fMRI-to-image family learns voxels -> image, so an example is one trial: its voxel
betas and the id of the image shown. Repeats of an image stay separate trials (training
sees each); evaluation averages them per image. Splits are by image: a trial belongs to
its image's split, so no test image is ever seen in training.

Layout of a dataset directory::

  DIR/meta.json          kind, image_size, num_voxels, split_sizes (trials), split_images,
                         source, zscore (how the betas were standardised)
  DIR/images/            a stimulus dataset (image_records) holding every image, same splits
  DIR/voxels.npz         ijk (V, 3), affine (4, 4), volume_shape (3,), mean (V,), std (V,), ...
  DIR/trial_index.npz    per split: image_id, trial, repeat of each record, in record order
  DIR/tfds/boldjax_trials/1.0.0/*.array_record

Per-voxel z-scoring uses the TRAIN trials only (mean and std stored in voxels.npz), so
nothing about held-out trials leaks into training (the fmri2img seed z-scores with its test
trials included). Z-scored betas are stored as float16 (half the bytes; its 3-digit
precision is far below fMRI noise), raw betas as float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from boldjax.cli import InputError
from boldjax.data import image_records, store
from boldjax.data.store import SPLITS

KIND = "trials"
FORMAT_VERSION = 1
BUILDER_NAME = "boldjax_trials"
BUILDER_VERSION = "1.0.0"
IMAGES_DIR = "images"
VOXEL_FILE = "voxels.npz"
INDEX_FILE = "trial_index.npz"
VOXEL_FIELDS = ("ijk", "affine", "volume_shape")
_RESERVED = ("meta.json", IMAGES_DIR, VOXEL_FILE, INDEX_FILE, "tfds")
_CHUNK_BYTES = 1 << 26  # rows read at once from an array of betas (64 MB)


# ------------------------------------------------------------------------------------------
# Checks.
# ------------------------------------------------------------------------------------------
def check_voxels(voxels: Mapping[str, Any], num_voxels: int, where: str) -> dict[str, np.ndarray]:
  """ijk (V, 3) int inside volume_shape (3,) positive ints, affine (4, 4) finite; other
  fields (ROI labels, ...) kept as given when they have one row per voxel."""
  missing = [k for k in VOXEL_FIELDS if k not in voxels]
  if missing:
    raise InputError(f"{where}: voxels missing fields {missing}; expected {VOXEL_FIELDS}")
  shape = np.asarray(voxels["volume_shape"])
  if shape.shape != (3,) or shape.dtype.kind not in "iu" or shape.min() < 1:
    raise InputError(
      f"{where}: voxels field 'volume_shape' expected 3 positive integers, found "
      f"{shape.dtype} {shape.tolist()}"
    )
  ijk = np.asarray(voxels["ijk"])
  if ijk.shape != (num_voxels, 3) or (ijk.size and ijk.dtype.kind not in "iu"):
    raise InputError(
      f"{where}: voxels field 'ijk' expected ({num_voxels}, 3) integers (one row per voxel of "
      f"the betas), found {ijk.dtype} {ijk.shape}"
    )
  if ijk.size and (ijk.min() < 0 or (ijk >= shape[None]).any()):
    bad = int(np.flatnonzero(((ijk < 0) | (ijk >= shape[None])).any(1))[0])
    raise InputError(
      f"{where}: voxels field 'ijk' expected indices inside volume_shape {shape.tolist()}, "
      f"found {ijk[bad].tolist()} at voxel {bad}"
    )
  if len(np.unique(ijk, axis=0)) != num_voxels:
    raise InputError(f"{where}: voxels field 'ijk' expected each voxel once, found repeats")
  affine = np.asarray(voxels["affine"])
  if affine.shape != (4, 4) or affine.dtype.kind not in "iuf" or not np.isfinite(affine).all():
    raise InputError(
      f"{where}: voxels field 'affine' expected a finite (4, 4) matrix, found "
      f"{affine.dtype} {affine.shape}"
    )
  out = {
    "ijk": ijk.astype(np.int32),
    "affine": affine.astype(np.float64),
    "volume_shape": shape.astype(np.int64),
  }
  for key, value in voxels.items():
    if key in out:
      continue
    if key in ("mean", "std"):
      raise InputError(f"{where}: voxels field {key!r} is reserved (the z-scoring statistics)")
    arr = np.asarray(value)
    if arr.ndim < 1 or arr.shape[0] != num_voxels:
      raise InputError(
        f"{where}: voxels field {key!r} expected one row per voxel ({num_voxels}), found "
        f"shape {arr.shape}"
      )
    out[key] = arr
  return out


def _check_row(row: Any, num_voxels: int, where: str) -> np.ndarray:
  arr = np.asarray(row)
  if arr.shape != (num_voxels,) or arr.dtype.kind not in "iuf":
    raise InputError(
      f"{where}: field 'betas' expected ({num_voxels},) numbers, found {arr.dtype} {arr.shape}"
    )
  return arr


def _check_finite(rows: np.ndarray, trials: np.ndarray, where: str) -> None:
  bad = ~np.isfinite(rows)
  if bad.any():
    r, v = np.argwhere(bad)[0]
    raise InputError(
      f"{where}: field 'betas' expected finite values, found {rows[r, v]} at trial "
      f"{int(trials[r])}, voxel {int(v)} ({int(bad.sum())} non-finite in this chunk)"
    )


def _read_rows(
  betas: Any, positions: np.ndarray, num_voxels: int, where: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(trial positions, (k, V) float64 rows) in chunks: numpy/h5py arrays sliced, other
  sequences read per row; a lazy source may offer iter_positions(positions) -> the rows at
  those increasing positions (e.g. one beta file per session, read once)."""
  chunk = max(1, _CHUNK_BYTES // (8 * max(num_voxels, 1)))
  read = getattr(betas, "iter_positions", None)
  rows_iter = read(positions) if read is not None else None
  # numpy arrays / memmaps and h5py datasets are read a chunk of rows at a time
  array_like = rows_iter is None and (
    isinstance(betas, np.ndarray) or type(betas).__module__.startswith("h5py")
  )
  if array_like and (len(betas.shape) != 2 or np.dtype(betas.dtype).kind not in "iuf"):
    raise InputError(
      f"{where}: field 'betas' expected (T, {num_voxels}) numbers, found {betas.dtype} "
      f"{tuple(betas.shape)}"
    )
  for lo in range(0, len(positions), chunk):
    pos = positions[lo : lo + chunk]
    if array_like:  # positions increase, as h5py needs
      block = np.asarray(betas[pos], np.float64)
    else:
      raw = (
        [next(rows_iter) for _ in pos] if rows_iter is not None else [betas[int(p)] for p in pos]
      )
      block = np.stack(
        [
          _check_row(r, num_voxels, f"{where} trial {int(p)}")
          for r, p in zip(raw, pos, strict=True)
        ]
      ).astype(np.float64)
    if block.shape != (len(pos), num_voxels):
      raise InputError(
        f"{where}: field 'betas' expected ({num_voxels},) values per trial, found rows of "
        f"shape {block.shape[1:]}"
      )
    _check_finite(block, pos, where)
    yield pos, block


def repeat_numbers(trial_image_ids: np.ndarray) -> np.ndarray:
  """(T,) how many earlier trials showed the same image (0 for the first showing)."""
  ids = np.asarray(trial_image_ids)
  order = np.argsort(ids, kind="stable")
  sorted_ids = ids[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
  group_start = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
  out = np.empty(len(ids), np.int32)
  out[order] = np.arange(len(ids)) - group_start
  return out


# ------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------
def _features(num_voxels: int, dtype: str) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  f = tfds.features
  return {
    "betas": f.Tensor(shape=(num_voxels,), dtype=np.dtype(dtype)),
    "image_id": f.Scalar(dtype=np.int64),
    "trial": f.Scalar(dtype=np.int64),
    "repeat": f.Scalar(dtype=np.int32),
  }


def zscore_stats(
  betas: Any, positions: np.ndarray, num_voxels: int, where: str
) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-voxel mean and std (population, float64 sums) over the trials at `positions`;
  a constant voxel gets std 1 (returned count), so it stays constant rather than NaN."""
  total = np.zeros(num_voxels, np.float64)
  square = np.zeros(num_voxels, np.float64)
  shift = None  # first row: keeps the sums of squares well conditioned for raw betas
  for _, rows in _read_rows(betas, positions, num_voxels, where):
    if shift is None:
      shift = rows[0].copy()
    d = rows - shift
    total += d.sum(0)
    square += (d * d).sum(0)
  n = len(positions)
  mean_d = total / n
  var = np.maximum(square / n - mean_d**2, 0.0)
  std = np.sqrt(var)
  mean = mean_d + shift
  constant = std <= 1e-8 * np.maximum(1.0, np.abs(mean))
  std[constant] = 1.0
  return mean, std, int(constant.sum())


def write_trial_dataset(
  out_dir: str,
  images: Sequence[np.ndarray] | np.ndarray,
  image_ids: Sequence[int] | np.ndarray,
  betas: Any,
  trial_image_ids: Sequence[int] | np.ndarray,
  *,
  image_split: Sequence[int] | np.ndarray,
  voxels: Mapping[str, Any],
  size: int | None = None,
  zscore: bool = True,
  betas_dtype: str | None = None,
  meta: Mapping[str, Any] | None = None,
  extra_files: Mapping[str, Callable[[str], None]] | None = None,
  overwrite: bool = False,
) -> str:
  """Write a trials dataset directory atomically (tmp dir + rename). Returns out_dir.

  images: random access of (H, W, 3) uint8 (lazy sequences as in write_stimulus_dataset);
  image_ids: (n,) unique ints >= 0; betas: random access (T, V) (an array, an h5py/memmap
  view, or a sequence of rows; a lazy one may offer iter_positions); trial_image_ids: (T,)
  ids among image_ids; image_split: (n,) 0/1/2 (train/val/test) per image, which every
  trial of the image follows; voxels: check_voxels fields. zscore: standardise each voxel
  with the train trials' mean/std. betas_dtype: stored dtype (default float16 when
  z-scored, float32 when raw). extra_files: file name -> writer(path), run in the tmp dir.
  """
  meta = dict(meta or {})
  out_abs = store.check_new_dir(out_dir, overwrite, "write_trial_dataset")
  name = str(meta.get("name", os.path.basename(out_abs.rstrip("/")) or "trials"))
  n = len(images)
  ids = np.asarray(image_ids)
  if ids.shape != (n,) or ids.dtype.kind not in "iu":
    raise InputError(
      f"{name}: field 'image_ids' expected ({n},) integers (one per image), found "
      f"{ids.dtype} {ids.shape}"
    )
  ids = ids.astype(np.int64)
  split_of_image = np.asarray(image_split)
  if split_of_image.shape != (n,) or not np.isin(split_of_image, (0, 1, 2)).all():
    raise InputError(
      f"{name}: field 'image_split' expected ({n},) values 0 (train), 1 (val), 2 (test), "
      f"found {split_of_image.dtype} {split_of_image.shape}"
    )
  trial_ids = np.asarray(trial_image_ids)
  num_trials = len(betas)
  if trial_ids.shape != (num_trials,) or (trial_ids.size and trial_ids.dtype.kind not in "iu"):
    raise InputError(
      f"{name}: field 'trial_image_ids' expected ({num_trials},) integers (one per row of "
      f"betas), found {trial_ids.dtype} {trial_ids.shape}"
    )
  if num_trials == 0:
    raise InputError(f"{name}: field 'betas' expected at least one trial, found none")
  trial_ids = trial_ids.astype(np.int64)
  sorter = np.argsort(ids, kind="stable")
  where_ids = np.searchsorted(ids, trial_ids, sorter=sorter)
  where_ids = sorter[np.minimum(where_ids, n - 1)] if n else where_ids
  found = (ids[where_ids] == trial_ids) if n else np.zeros(num_trials, bool)
  if not found.all():
    t = int(np.flatnonzero(~found)[0])
    raise InputError(
      f"{name}: field 'trial_image_ids' expected ids among the {n} image_ids, found "
      f"{int(trial_ids[t])} at trial {t} ({int((~found).sum())} trials point to missing images)"
    )
  first = betas[0]
  if np.ndim(first) != 1 or np.shape(first)[0] < 1:
    raise InputError(
      f"{name}: field 'betas' expected (T, V) values, found rows of shape {np.shape(first)}"
    )
  num_voxels = int(np.shape(first)[0])
  verts = check_voxels(voxels, num_voxels, name)
  for fname in extra_files or {}:
    if fname in _RESERVED or os.path.basename(fname) != fname or fname in ("", ".", ".."):
      raise ValueError(f"{name}: extra file {fname!r} must be a plain name, not one of {_RESERVED}")
  dtype = str(betas_dtype or ("float16" if zscore else "float32"))
  if dtype not in ("float16", "float32"):
    raise InputError(f"{name}: field 'betas_dtype' expected float16 or float32, found {dtype!r}")

  trial_split = split_of_image[where_ids].astype(np.int8)
  repeats = repeat_numbers(trial_ids)
  positions = {s: np.flatnonzero(trial_split == k) for k, s in enumerate(SPLITS)}
  if zscore:
    if len(positions["train"]) < 2:
      raise InputError(
        f"{name}: field 'image_split' expected train images with at least 2 trials to "
        f"z-score from, found {len(positions['train'])} train trials"
      )
    mean, std, constant = zscore_stats(betas, positions["train"], num_voxels, f"{name}/train")
  else:
    mean, std, constant = np.zeros(num_voxels), np.ones(num_voxels), 0
  mean32, std32 = mean.astype(np.float32), std.astype(np.float32)

  def examples(split: str) -> Iterator[dict[str, Any]]:
    label = f"{name}/{split}"
    progress = store.Progress(label)
    for pos, rows in _read_rows(betas, positions[split], num_voxels, label):
      values = ((rows - mean) / std).astype(dtype) if zscore else rows.astype(dtype)
      if not np.isfinite(values).all():  # float16 overflow of a raw beta
        _check_finite(values.astype(np.float64), pos, f"{label} (as {dtype})")
      for j, p in enumerate(pos.tolist()):
        progress.tick()
        yield {
          "betas": values[j],
          "image_id": trial_ids[p],
          "trial": np.int64(p),
          "repeat": repeats[p],
        }
    progress.report()

  by_split = {s: examples(s) if len(positions[s]) else [] for s in SPLITS}
  nonempty = {
    s: stream
    for s, (_, stream) in store.nonempty_splits(by_split, "write_trial_dataset", name).items()
  }
  image_meta = {"name": f"{name}/images", "source": meta.get("source", {})}

  def finish(tmp: str, written: dict[str, int]) -> None:
    for split, count in written.items():
      if count != len(positions[split]):
        raise RuntimeError(
          f"{name}/{split}: wrote {count} trials, expected {len(positions[split])}"
        )
    image_records.write_stimulus_dataset(
      os.path.join(tmp, IMAGES_DIR), images, ids, size=size, assignment=split_of_image,
      meta=image_meta,
    )  # fmt: skip
    stim = image_records.open_stimulus(os.path.join(tmp, IMAGES_DIR))
    np.savez(os.path.join(tmp, VOXEL_FILE), **verts, mean=mean32, std=std32)
    index = {}
    for split in SPLITS:
      pos = positions[split]
      index[f"{split}_image_id"] = trial_ids[pos]
      index[f"{split}_trial"] = pos.astype(np.int64)
      index[f"{split}_repeat"] = repeats[pos]
    np.savez(os.path.join(tmp, INDEX_FILE), **index)
    full = dict(meta)
    full.update(
      kind=KIND,
      format_version=FORMAT_VERSION,
      name=name,
      image_size=list(stim.image_size),
      num_images=n,
      num_trials=num_trials,
      num_voxels=num_voxels,
      split_sizes={s: len(positions[s]) for s in SPLITS},
      split_images={s: len(np.unique(trial_ids[positions[s]])) for s in SPLITS},
      images_without_trials=int(n - len(np.unique(trial_ids))),
      max_repeats=int(repeats.max()) + 1,
      betas_dtype=dtype,
      split_rule="by image: a trial follows its image's split (image_split)",
      zscore={
        "applied": bool(zscore),
        "statistics": "train trials only" if zscore else None,
        "train_trials": int(len(positions["train"])),
        "constant_voxels": constant,  # std 1 instead of 0
        "stored": f"voxels.npz mean/std; records hold (beta - mean) / std as {dtype}"
        if zscore
        else f"raw betas as {dtype}",
      },
    )
    full.setdefault("source", {})
    store.write_json(os.path.join(tmp, "meta.json"), full, indent=2, sort_keys=True)
    for fname, writer in (extra_files or {}).items():
      writer(os.path.join(tmp, fname))

  return store.write_dataset(
    out_abs,
    builder=(BUILDER_NAME, BUILDER_VERSION),
    features=_features(num_voxels, dtype),
    examples_by_split=nonempty,
    finish=finish,
    description="boldjax fMRI trials (betas per trial, image ids)",
    shuffle=False,  # trial_index.npz position i is record i
  )


# ------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------
class TrialSource(store.SplitSource):
  """A split of trials (getitem -> betas (V,) float32, image_id, trial, repeat) for grain."""

  builder_name = BUILDER_NAME
  builder_version = BUILDER_VERSION

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._open()[int(index)]
    return {
      "betas": np.asarray(ex["betas"], np.float32),
      "image_id": np.int64(ex["image_id"]),
      "trial": np.int64(ex["trial"]),
      "repeat": np.int32(ex["repeat"]),
    }


class TrialDataset:
  """An opened trials directory: meta, images (a StimulusDataset), splits, voxels."""

  def __init__(self, path: str):
    path = os.path.abspath(path)
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
      import json

      with open(meta_path) as f:
        kind = json.load(f).get("kind")
      if kind != KIND:
        raise InputError(
          f"{meta_path}: field 'kind' expected {KIND!r} (a trials dataset), found {kind!r}"
        )
    try:
      self.path, self.meta = store.read_meta(
        path,
        what=KIND,
        version=FORMAT_VERSION,
        files=(VOXEL_FILE, INDEX_FILE, os.path.join(IMAGES_DIR, "meta.json")),
        needs="num_voxels",
      )
    except FileNotFoundError as e:
      raise InputError(str(e)) from e
    self.images = image_records.open_stimulus(os.path.join(self.path, IMAGES_DIR))
    with np.load(os.path.join(self.path, INDEX_FILE)) as z:
      self._index = {k: np.asarray(z[k]) for k in z.files}

  @property
  def splits(self) -> dict[str, int]:
    """Trials per split."""
    return dict(self.meta["split_sizes"])

  @property
  def num_voxels(self) -> int:
    return int(self.meta["num_voxels"])

  @property
  def image_size(self) -> tuple[int, int]:
    h, w = self.meta["image_size"]
    return int(h), int(w)

  def _check_split(self, name: str) -> None:
    if name not in self.meta["split_sizes"]:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(self.splits)}")

  def split(self, name: str) -> TrialSource | store.EmptySource:
    self._check_split(name)
    if self.meta["split_sizes"][name] == 0:
      return store.EmptySource(name)
    return TrialSource(self.path, name)

  def index(self, split: str) -> dict[str, np.ndarray]:
    """image_id (T,) int64, trial (T,) int64, repeat (T,) int32 of a split's records."""
    self._check_split(split)
    return {k: self._index[f"{split}_{k}"] for k in ("image_id", "trial", "repeat")}

  def betas(self, split: str) -> np.ndarray:
    """(T, V) float32 betas of a split in record order (reads them all)."""
    src = self.split(split)
    out = np.empty((len(src), self.num_voxels), np.float32)
    for i in range(len(src)):
      out[i] = src[i]["betas"]
    return out

  def voxels(self) -> dict[str, np.ndarray]:
    """ijk, affine, volume_shape, mean, std (the z-scoring statistics) and any extras."""
    with np.load(os.path.join(self.path, VOXEL_FILE)) as z:
      return {k: np.asarray(z[k]) for k in z.files}


def open_trials(path: str) -> TrialDataset:
  """Open a directory written by write_trial_dataset."""
  return TrialDataset(path)
