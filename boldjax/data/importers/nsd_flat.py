"""NSD-Flat importer: HF parquet / arrow (clane9/NSD-Flat layout) -> boldjax flat-map dataset.

Input: a parquet file, a directory of parquet shards (searched recursively, e.g. the hub's
data/train-*.parquet + data/test-*.parquet), or an HF `save_to_disk` directory of *.arrow
files. Needed columns: subject_id, trial_id, session_id, nsd_id, shared1000 and activity
(an HF Image struct {bytes, path} holding a 215x200 mode-L PNG, or plain PNG bytes).

Splits (boldGPT's convention): test = the last 3 sessions of each subject present in the
input; val = shared1000 rows among the rest; train = everything else. Importing only the
hub's train shards therefore carves "test" out of them: import train and test together.

Mask: --mask (e.g. boldGPT's resources/nsd_flat_mask.npy), else the pixels that are not
127 (NSD-Flat's background: quantised 0) in at least one imported map. A voxel whose value
quantises to 127 in every map would be lost, which needs very few maps to rule out.
Activity is stored as the PNG's uint8 values, dequantised later as x/255*5-2.5.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import records
from boldjax.data.importers.common import add_flag

HEIGHT, WIDTH = 215, 200
BACKGROUND = 127
TEST_SESSIONS = 3
INDEX_COLUMNS = ("subject_id", "trial_id", "session_id", "nsd_id", "shared1000")
COLUMNS = (*INDEX_COLUMNS, "activity")


def list_input_files(path: str) -> list[str]:
  """Parquet file(s) or HF arrow files under `path`, sorted (the row order of the import)."""
  if os.path.isfile(path):
    if not path.endswith((".parquet", ".arrow")):
      raise ValueError(f"{path}: expected a .parquet or .arrow file")
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  for ext in ("parquet", "arrow"):
    files = sorted(glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
    if files:
      return files
  raise FileNotFoundError(f"{path}: no *.parquet or *.arrow files found (searched recursively)")


def _check_columns(path: str, names: list[str], columns: tuple[str, ...]) -> None:
  missing = [c for c in columns if c not in names]
  if missing:
    raise InputError(
      f"{path}: row n/a, missing column(s) {missing}; NSD-Flat needs {list(COLUMNS)}, found {names}"
    )


def iter_batches(path: str, columns: tuple[str, ...], batch_size: int = 512) -> Iterator[Any]:
  """pyarrow RecordBatches with just `columns` (parquet reads only those columns); a
  corrupt or truncated file is an InputError naming it, wherever the damage is."""
  try:
    yield from _batches(path, columns, batch_size)
  except InputError:
    raise
  except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ...
    raise InputError(
      f"{path}: field 'file': expected a readable {os.path.splitext(path)[1][1:]} file, found "
      f"{type(e).__name__}: {' '.join(str(e).split())}"
    ) from e


def _batches(path: str, columns: tuple[str, ...], batch_size: int) -> Iterator[Any]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  if path.endswith(".parquet"):
    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow.names, columns)
    yield from pf.iter_batches(batch_size=batch_size, columns=list(columns))
    return
  source = pa.memory_map(path)
  try:
    reader = pa.ipc.open_stream(source)  # HF datasets writes the arrow stream format
  except pa.ArrowInvalid:
    reader = pa.ipc.open_file(pa.memory_map(path))
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
  else:
    batches = iter(reader)
  first = True
  for batch in batches:
    if first:
      _check_columns(path, batch.schema.names, columns)
      first = False
    yield batch.select(list(columns))


def _index(files: list[str], limit: int | None) -> dict[str, np.ndarray]:
  """The index columns of every imported row, in import order (first `limit` rows)."""
  cols: dict[str, list[np.ndarray]] = {c: [] for c in INDEX_COLUMNS}
  total = 0
  for path in files:
    for batch in iter_batches(path, INDEX_COLUMNS, batch_size=65536):
      n = batch.num_rows if limit is None else min(batch.num_rows, limit - total)
      for c in INDEX_COLUMNS:
        col = batch.column(c)
        if col.null_count:
          row = total + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
          raise ValueError(f"{path}: row {row}, field {c!r}: expected a value, found null")
        cols[c].append(_index_column(path, c, col.to_numpy(zero_copy_only=False)[:n], total))
      total += n
      if limit is not None and total >= limit:
        return {c: np.concatenate(v) for c, v in cols.items()}
  return {c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()}


# Index column -> (lowest, highest) value stored (subject_id is an int32 id >= 0).
_INDEX_RANGE = {
  "subject_id": (0, 2**31 - 1),
  "trial_id": (-(2**63), 2**63 - 1),
  "session_id": (-1, 2**31 - 1),
  "nsd_id": (-(2**63), 2**63 - 1),
  "shared1000": (0, 1),
}


def _index_column(path: str, name: str, values: np.ndarray, row0: int) -> np.ndarray:
  """An index column as int64 (shared1000 as bool): integers (or integral floats, or bools
  for shared1000) in the stored range, else an InputError naming the file, row and field."""
  lo, hi = _INDEX_RANGE[name]
  kinds = "iub" if name == "shared1000" else "iuf"
  where = f"{path}: row {row0}, field {name!r}"
  if values.dtype.kind not in kinds:
    raise InputError(
      f"{where}: expected {'booleans' if name == 'shared1000' else 'integers'}, found "
      f"{values.dtype} values like {values[:1].tolist()}"
    )
  if values.dtype.kind == "f":
    bad = ~np.isfinite(values) | (values != np.round(values))
    bad |= (values < lo) | (values > min(hi, 2.0**53))
  elif values.dtype.kind == "u":
    bad = values > np.uint64(hi)
  else:
    bad = (values < lo) | (values > hi)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise InputError(
      f"{path}: row {row0 + i}, field {name!r}: expected an integer in {lo}..{hi}, found "
      f"{values[i]!r}"
    )
  return values.astype(bool if name == "shared1000" else np.int64)


def assign_splits(
  subject_id: np.ndarray,
  session_id: np.ndarray,
  shared1000: np.ndarray,
  test_sessions: int = TEST_SESSIONS,
) -> np.ndarray:
  """Per row 'train' / 'val' / 'test' (boldGPT): last sessions per subject, then shared1000."""
  subject_id = np.asarray(subject_id)
  session_id = np.asarray(session_id)
  split = np.where(np.asarray(shared1000, bool), "val", "train").astype(object)
  for sub in np.unique(subject_id):
    rows = subject_id == sub
    last = np.unique(session_id[rows])[-test_sessions:] if test_sessions > 0 else []
    split[rows & np.isin(session_id, last)] = "test"
  return split


def decode_activity(cell: Any, where: str, base_dir: str = "") -> np.ndarray:
  """PNG (HF Image struct {bytes, path} or raw bytes) -> (215, 200) uint8, or a clear error."""
  from PIL import Image

  data = cell
  if isinstance(cell, dict):
    data = cell.get("bytes")
    if data is None and cell.get("path"):
      path = cell["path"]
      path = path if os.path.isabs(path) else os.path.join(base_dir, path)
      if not os.path.exists(path):
        raise ValueError(f"{where}, field 'activity': no PNG bytes and no file at {path}")
      with open(path, "rb") as f:
        data = f.read()
  if not isinstance(data, bytes | bytearray):
    raise ValueError(f"{where}, field 'activity': expected PNG bytes, found {type(data).__name__}")
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises several types for corrupt/truncated data
    raise ValueError(f"{where}, field 'activity': corrupt or unreadable PNG ({e})") from e
  if img.format != "PNG" or img.mode != "L" or img.size != (WIDTH, HEIGHT):
    raise ValueError(
      f"{where}, field 'activity': expected a {HEIGHT}x{WIDTH} (HxW) mode 'L' PNG, found "
      f"{img.size[1]}x{img.size[0]} mode {img.mode!r} format {img.format!r}"
    )
  return np.asarray(img, dtype=np.uint8)


def _examples(
  files: list[str], split_of_row: np.ndarray, split: str, seen: dict[str, np.ndarray]
) -> Iterator[dict[str, Any]]:
  """Decode and yield the rows of one split (other rows are skipped before decoding)."""
  row, n = 0, len(split_of_row)
  for path in files:
    base = os.path.dirname(path)
    file_row = 0
    for batch in iter_batches(path, COLUMNS):
      if row >= n:
        return
      picked = np.flatnonzero(split_of_row[row : row + batch.num_rows] == split)
      if len(picked):
        data = batch.take(picked).to_pydict()
        for k, j in enumerate(picked):
          act = decode_activity(data["activity"][k], f"{path}: row {file_row + j}", base)
          seen["any"] |= act != BACKGROUND
          yield {
            "activity": act,
            "subject_id": int(data["subject_id"][k]),
            "trial_id": int(data["trial_id"][k]),
            "session_id": int(data["session_id"][k]),
            "nsd_id": int(data["nsd_id"][k]),
            "label": -1,
          }
      row += batch.num_rows
      file_row += batch.num_rows


def _load_mask(path: str) -> np.ndarray:
  """A (H, W) .npy mask (never a pickle); an unreadable file is an InputError naming it."""
  try:
    mask = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise InputError(
      f"{path}: field 'mask': expected a (215, 200) bool .npy file, found {e}"
    ) from e
  if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biuf":
    raise InputError(
      f"{path}: field 'mask': expected a bool .npy array, found {type(mask).__name__}"
    )
  return mask


def import_nsd_flat(
  input_path: str,
  out_dir: str,
  *,
  mask: str | np.ndarray | None = None,
  limit: int | None = None,
  test_sessions: int = TEST_SESSIONS,
  overwrite: bool = False,
) -> str:
  """Import NSD-Flat rows into a boldjax flat-map dataset at out_dir; returns out_dir."""
  files = list_input_files(input_path)
  print(f"[nsd_flat] indexing {len(files)} file(s) under {input_path}", flush=True)
  index = _index(files, limit)
  if len(index["subject_id"]) == 0:
    raise InputError(f"{input_path}: expected at least one row to import, found none")
  split_of_row = assign_splits(
    index["subject_id"], index["session_id"], index["shared1000"], test_sessions
  )
  counts = {s: int((split_of_row == s).sum()) for s in records.SPLITS}
  print(f"[nsd_flat] {len(split_of_row)} rows: {counts}", flush=True)
  if mask is not None:
    mask_arr = _load_mask(mask) if isinstance(mask, str) else np.asarray(mask)
    if mask_arr.shape != (HEIGHT, WIDTH):
      raise ValueError(
        f"{mask if isinstance(mask, str) else 'mask'}: shape expected {(HEIGHT, WIDTH)}, "
        f"found {mask_arr.shape}"
      )
  seen = {"any": np.zeros((HEIGHT, WIDTH), bool)}
  meta = {
    "name": "nsd_flat",
    "source": {"input": os.path.abspath(input_path), "files": len(files), "limit": limit},
    "height": HEIGHT,
    "width": WIDTH,
    "value_range": list(records.VALUE_RANGE),
    "quantization": "uint8",
    "num_subjects": int(index["subject_id"].max()) + 1,
    "num_classes": 0,
    "split_rule": f"test: last {test_sessions} sessions per subject; val: shared1000",
    "mask_source": "file" if mask is not None else "pixels != 127 in any imported map",
  }
  examples = {s: _examples(files, split_of_row, s, seen) for s in records.SPLITS}
  return records.build_flat_dataset(
    out_dir,
    examples,
    mask_arr if mask is not None else (lambda: seen["any"]),
    meta,
    overwrite=overwrite,
  )


@registry.register("importer", "nsd_flat")
class NsdFlatImporter:
  """`python -m boldjax.prepare nsd_flat INPUT --out=DIR [--mask=mask.npy] [--limit=N]`."""

  help = "NSD-Flat (HF clane9/NSD-Flat parquet or arrow) -> flat-map ArrayRecord dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="parquet file, directory of parquet shards or arrow dir")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--mask", default=None, help="(215, 200) bool .npy mask")
    parser.add_argument("--limit", type=int, default=None, help="import the first N rows")
    add_flag(parser, "--test-sessions", "--test_sessions", type=int, default=TEST_SESSIONS)
    parser.add_argument("--overwrite", action="store_true")

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_nsd_flat(
      args.input,
      args.out,
      mask=args.mask,
      limit=args.limit,
      test_sessions=args.test_sessions,
      overwrite=args.overwrite,
    )
