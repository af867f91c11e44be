"""Image-stimulus importers (`python -m boldjax.prepare images | nsd_images | synthetic_images`)
-> stimulus datasets (image_records).

  images DIR            a folder of PNG/JPEG, sorted by name; image_id = rank
  nsd_images FILE.hdf5  NSD's brick (`imgBrick`, (73000, 425, 425, 3) uint8); image_id = row
  synthetic_images      the embedded synthetic images (synthetic_images.py)

Every image is stored at --size (default 224; 0 keeps the source size, which must then be
one size) and split image-level with a seed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import image_records

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NSD_KEY = "imgBrick"
DEFAULT_SIZE = 224
CHUNK = 64  # brick rows per read


def add_stimulus_arguments(parser: argparse.ArgumentParser, size: int = DEFAULT_SIZE) -> None:
  """The flags every stimulus importer shares."""
  parser.add_argument("--out", required=True, help="output dataset directory")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument(
    "--size", type=int, default=size, help=f"stored image side (default {size}; 0 = as found)"
  )
  parser.add_argument("--val-fraction", type=float, default=0.1, help="of images")
  parser.add_argument("--test-fraction", type=float, default=0.1, help="of images")
  parser.add_argument("--split-seed", type=int, default=0)
  parser.add_argument("--name", default=None, help="dataset name in meta.json")


def write_options(args: argparse.Namespace, default_name: str) -> dict[str, Any]:
  """write_stimulus_dataset keyword arguments from the shared flags."""
  if args.size < 0:
    raise InputError(f"--size: field 'size' expected pixels >= 0 (0 = as found), found {args.size}")
  val, test = args.val_fraction, args.test_fraction
  if not (0 <= val and 0 <= test and val + test <= 1):
    raise InputError(
      f"--val-fraction/--test-fraction: field 'fractions' expected two fractions >= 0 with a sum "
      f"<= 1, found {val} and {test}"
    )
  return {
    "size": args.size or None,
    "split_seed": args.split_seed,
    "fractions": (round(1.0 - val - test, 12), val, test),
    "overwrite": args.overwrite,
    "meta": {"name": args.name or default_name},
  }


# ------------------------------------------------------------------------------------------
# A folder of PNG / JPEG files.
# ------------------------------------------------------------------------------------------
def list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
  """Paths of the image files in `folder` (not recursive), sorted by name; other files are
  counted in a printed note."""
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: field 'folder' expected a directory of images, found none")
  names = sorted(os.listdir(folder))
  keep = [n for n in names if n.lower().endswith(tuple(extensions)) and not n.startswith(".")]
  other = [n for n in names if n not in keep]
  if not keep:
    raise InputError(
      f"{folder}: field 'images' expected files ending in {list(extensions)}, found none "
      f"({len(names)} other entries)"
    )
  if other:
    print(
      f"[prepare] {folder}: {len(keep)} images; ignoring {len(other)} other entries "
      f"(e.g. {other[0]!r})",
      flush=True,
    )
  return [os.path.join(folder, n) for n in keep]


def load_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 of a PNG/JPEG: grey, palette and RGBA converted to RGB (alpha dropped),
  16-bit grey scaled to 8 bits."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L"):
        x = np.asarray(img, np.uint16).astype(np.float64)
        grey = np.round(x / 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
      if img.mode in ("I", "F"):
        raise InputError(
          f"{path}: field 'mode' expected an 8- or 16-bit image, found PIL mode {img.mode!r}"
        )
      return np.asarray(img.convert("RGB"), np.uint8)
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: field 'image' expected a readable PNG/JPEG, found {e}") from e


class ImageFiles(Sequence):
  """Random access to image files, decoded on demand."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
    return load_image(self.paths[int(index)])


def file_table_writer(paths: Sequence[str], ids: Sequence[int]) -> Any:
  """extra_files writer of image_files.json: [[image_id, file name], ...]."""

  def write(path: str) -> None:
    rows = [[int(i), os.path.basename(p)] for i, p in zip(ids, paths, strict=True)]
    with open(path, "w") as f:
      json.dump(rows, f)

  return write


def import_image_folder(folder: str, out: str, **options: Any) -> str:
  """A folder of PNG/JPEG files -> a stimulus dataset; image_id = rank of the sorted name."""
  paths = list_images(folder)
  ids = np.arange(len(paths), dtype=np.int64)
  meta = dict(options.pop("meta", {}))
  meta.setdefault("name", os.path.basename(os.path.normpath(folder)))
  meta["source"] = {"importer": "images", "input": os.path.abspath(folder), "count": len(paths)}
  return image_records.write_stimulus_dataset(
    out,
    ImageFiles(paths),
    ids,
    meta=meta,
    extra_files={"image_files.json": file_table_writer(paths, ids)},
    **options,
  )


@registry.register("importer", "images")
class ImageFolderImporter:
  help = "a folder of PNG/JPEG images (sorted names; image_id = rank) -> stimulus dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a folder of .png / .jpg / .jpeg files")
    add_stimulus_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    name = os.path.basename(os.path.normpath(args.input))
    return import_image_folder(args.input, args.out, **write_options(args, name))


# ------------------------------------------------------------------------------------------
# NSD's HDF5 brick.
# ------------------------------------------------------------------------------------------
def parse_indices(text: str, n: int, where: str) -> np.ndarray:
  """--indices: comma-separated ints and a:b ranges, or a .npy / .txt file of ints; each in
  0..n-1, no repeats; returned sorted (records are stored in brick order)."""
  if os.path.exists(text):
    try:
      raw = np.load(text) if text.endswith(".npy") else np.loadtxt(text, ndmin=1)
    except (OSError, ValueError) as e:
      raise InputError(f"{text}: field '--indices' expected integers, found {e}") from e
    values = np.asarray(raw).reshape(-1)
    if values.size and (values.dtype.kind not in "iuf" or np.any(values != np.round(values))):
      raise InputError(f"{text}: field '--indices' expected integers, found {values.dtype}")
  else:
    parts = []
    for item in (p.strip() for p in text.split(",")):
      try:
        if ":" in item:
          lo, hi = item.split(":", 1)
          parts.extend(range(int(lo), int(hi)))
        elif item:
          parts.append(int(item))
      except ValueError as e:
        raise InputError(
          f"{where}: field '--indices' expected ints, a:b ranges or a .npy/.txt file, found "
          f"{item!r}"
        ) from e
    values = np.asarray(parts)
  values = values.astype(np.int64)
  if values.size == 0:
    raise InputError(f"{where}: field '--indices' expected at least one index, found none")
  if values.min() < 0 or values.max() >= n:
    raise InputError(
      f"{where}: field '--indices' expected rows in 0..{n - 1}, found "
      f"{int(values.min())}..{int(values.max())}"
    )
  uniq = np.unique(values)
  if len(uniq) != len(values):
    raise InputError(f"{where}: field '--indices' expected each row once, found repeats")
  return uniq


class BrickImages(Sequence):
  """Rows of an HDF5 image brick (N, H, W, 3) uint8; iter_positions reads CHUNK rows per
  HDF5 call (the writer streams each split through it)."""

  def __init__(self, path: str, key: str, rows: np.ndarray, chunk: int = CHUNK):
    self.path, self.key, self.rows, self.chunk = path, key, np.asarray(rows, np.int64), chunk
    self._file = None

  def _data(self) -> Any:
    import h5py

    if self._file is None:
      self._file = h5py.File(self.path, "r")
    return self._file[self.key]

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
    with _read_errors(self.path, self.key):
      return np.asarray(self._data()[int(self.rows[int(index)])])

  def iter_positions(self, positions: np.ndarray) -> Iterator[np.ndarray]:
    data = self._data()
    for start in range(0, len(positions), self.chunk):
      rows = self.rows[np.asarray(positions[start : start + self.chunk])]
      with _read_errors(self.path, self.key):
        if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice
          block = np.asarray(data[int(rows[0]) : int(rows[-1]) + 1])
        else:
          block = np.asarray(data[rows.tolist()])  # increasing rows (parse_indices sorts)
      yield from block

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class _read_errors:
  """h5py's errors on a damaged brick as an InputError naming the file and field."""

  def __init__(self, path: str, key: str):
    self.path, self.key = path, key

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, tb) -> bool:
    if error is not None and isinstance(error, OSError | KeyError | RuntimeError):
      raise InputError(
        f"{self.path}: field {self.key!r} expected readable image rows, found "
        f"{type(error).__name__}: {' '.join(str(error).split())}"
      ) from error
    return False


def open_brick(path: str, key: str = NSD_KEY) -> tuple[int, tuple[int, ...]]:
  """(rows, shape) of an image brick, checked: (N, H, W, 3) uint8."""
  import h5py

  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise InputError(f"{path}: field 'file' expected an HDF5 file, found {e}") from e
  with f:
    if key not in f or not isinstance(f[key], h5py.Dataset):
      raise InputError(
        f"{path}: field {key!r} expected an (N, H, W, 3) uint8 image brick (--key), found "
        f"keys {sorted(f)}"
      )
    data = f[key]
    if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8 or 0 in data.shape:
      raise InputError(
        f"{path}: field {key!r} expected (N, H, W, 3) uint8 (NSD: (73000, 425, 425, 3)), found "
        f"{data.dtype} {data.shape}"
      )
    return int(data.shape[0]), tuple(int(s) for s in data.shape)


def import_nsd_images(
  path: str,
  out: str,
  *,
  key: str = NSD_KEY,
  indices: str | None = None,
  limit: int | None = None,
  **options: Any,
) -> str:
  """NSD's nsd_stimuli.hdf5 (or any (N, H, W, 3) uint8 brick) -> a stimulus dataset;
  image_id = brick row (NSD's 0-based 73k id). indices: parse_indices text; limit: the
  first `limit` of the selected rows."""
  n, shape = open_brick(path, key)
  rows = np.arange(n, dtype=np.int64) if indices is None else parse_indices(indices, n, path)
  if limit is not None:
    if limit < 1:
      raise InputError(f"{path}: field '--limit' expected >= 1 rows, found {limit}")
    rows = rows[:limit]
  meta = dict(options.pop("meta", {}))
  meta["source"] = {
    "importer": "nsd_images",
    "input": os.path.abspath(path),
    "key": key,
    "brick_shape": list(shape),
    "rows": "all" if len(rows) == n else f"{len(rows)} of {n}",
  }
  print(f"[prepare] nsd_images: {path}:{key} {shape}, importing {len(rows)} rows", flush=True)
  images = BrickImages(path, key, rows)
  try:
    return image_records.write_stimulus_dataset(out, images, rows, meta=meta, **options)
  finally:
    images.close()


@registry.register("importer", "nsd_images")
class NsdImagesImporter:
  help = "NSD's nsd_stimuli.hdf5 image brick (imgBrick (N,425,425,3) uint8) -> stimulus dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="nsd_stimuli.hdf5")
    parser.add_argument("--key", default=NSD_KEY, help="the brick's dataset name")
    parser.add_argument(
      "--indices",
      default=None,
      help="rows to import: comma-separated ints and a:b ranges, or a .npy/.txt file",
    )
    parser.add_argument("--limit", type=int, default=None, help="import the first N rows only")
    add_stimulus_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_nsd_images(
      args.input,
      args.out,
      key=args.key,
      indices=args.indices,
      limit=args.limit,
      **write_options(args, "nsd_stimuli"),
    )


# ------------------------------------------------------------------------------------------
# The embedded synthetic images.
# ------------------------------------------------------------------------------------------
def import_synthetic_images(out: str, *, count: int, seed: int, **options: Any) -> str:
  """synthetic_images(count, size, seed) -> a stimulus dataset; image_id = index."""
  from boldjax.data.synthetic_images import KINDS, synthetic_images

  size = options.pop("size", None) or DEFAULT_SIZE
  if count < 1:
    raise InputError(f"synthetic_images: field '--count' expected >= 1, found {count}")
  images, kinds = synthetic_images(count, size, seed, with_kinds=True)
  meta = dict(options.pop("meta", {}))
  meta["source"] = {
    "importer": "synthetic_images",
    "count": count,
    "seed": seed,
    "kinds": dict(collections.Counter(KINDS[k] for k in kinds.tolist())),
  }

  def write_kinds(path: str) -> None:
    np.savez(path, kind=kinds, kind_names=np.asarray(KINDS))

  return image_records.write_stimulus_dataset(
    out,
    images,
    np.arange(count, dtype=np.int64),
    size=None,  # drawn at that size
    meta=meta,
    extra_files={"kinds.npz": write_kinds},
    **options,
  )


@registry.register("importer", "synthetic_images")
class SyntheticImagesImporter:
  help = "synthetic natural-ish images (bundled sample photos + gratings, shapes, textures)"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    add_stimulus_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_synthetic_images(
      args.out, count=args.count, seed=args.seed, **write_options(args, "synthetic_images")
    )
