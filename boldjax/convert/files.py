"""Read published checkpoint files into flat {torch name: numpy array} state_dicts.

Formats: `.safetensors` (parsed here: an 8-byte little-endian header length, a JSON header,
raw little-endian bytes; no torch, no extra package) and `.npz` (numpy, allow_pickle=False)
are read as data. Torch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) can run code when loaded,
so they are only read with allow_pickle=True and torch installed, through
`torch.load(weights_only=True)`. `unwrap` then takes off what published files hold around
the weights: a nested 'state_dict' / 'model_state_dict' / 'model' / 'module' dict and
`module.` / `_orig_mod.` prefixes (DataParallel, torch.compile).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from boldjax.cli import InputError

SAFETENSORS = (".safetensors",)
NUMPY = (".npz",)
PICKLES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
PREFIXES = ("module.", "_orig_mod.")

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file as numpy arrays (BF16 widened to float32), without torch."""
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise InputError(f"{path}: not a safetensors file (expected an 8-byte header length)")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > len(raw) - 8:
    raise InputError(f"{path}: safetensors header length {n} exceeds the file size {len(raw)}")
  try:
    header = json.loads(raw[8 : 8 + n])
  except ValueError as e:
    raise InputError(f"{path}: safetensors header is not JSON ({e})") from e
  data = memoryview(raw)[8 + n :]
  out: dict[str, np.ndarray] = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    if end > len(data) or start > end:
      raise InputError(f"{path}: tensor {name!r}: data_offsets {[start, end]} out of the file")
    buf = data[start:end]
    if dtype == "BF16":
      bits = np.frombuffer(buf, "<u2").astype(np.uint32) << 16
      out[name] = bits.view(np.float32).reshape(shape)
      continue
    if dtype not in _ST_DTYPES:
      raise InputError(
        f"{path}: tensor {name!r}: dtype expected one of {sorted(_ST_DTYPES) + ['BF16']}, "
        f"found {dtype!r}"
      )
    arr = np.frombuffer(buf, np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
    out[name] = arr.reshape(shape).astype(_ST_DTYPES[dtype])
  return out


def write_safetensors(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """numpy arrays -> .safetensors (the inverse of read_safetensors; used by tests)."""
  header: dict[str, Any] = {}
  chunks, offset = [], 0
  for name, value in arrays.items():
    a = np.ascontiguousarray(value)
    if a.dtype not in _ST_NAMES:
      raise ValueError(f"write_safetensors: {name}: unsupported dtype {a.dtype}")
    b = a.astype(a.dtype.newbyteorder("<")).tobytes()
    header[name] = {
      "dtype": _ST_NAMES[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(b)],
    }
    chunks.append(b)
    offset += len(b)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:  # object arrays need pickle: refused
    raise InputError(f"{path}: cannot read without unpickling ({e})") from e


def read_torch(path: str, allow_pickle: bool) -> Any:
  """torch.load(weights_only=True) of a pickle, only when the user opted in."""
  if not allow_pickle:
    raise InputError(
      f"{path}: is a torch pickle ({os.path.splitext(path)[1]}); loading a pickle can run "
      "arbitrary code, so it is refused unless you pass --allow-pickle (with torch installed; "
      "it is then read with torch.load(weights_only=True)), or convert the file to "
      ".safetensors / .npz first"
    )
  try:
    import torch
  except ImportError as e:
    raise InputError(
      f"{path}: reading a torch pickle needs torch installed (pip install torch), found none"
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - unpickling errors of any kind are bad input
    raise InputError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
  return _to_numpy(obj, torch)


def _to_numpy(obj: Any, torch: Any) -> Any:
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      t = t.float()
    return t.numpy()
  if isinstance(obj, Mapping):
    return {k: _to_numpy(v, torch) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return type(obj)(_to_numpy(v, torch) for v in obj)
  return obj


def read_checkpoint(path: str, *, allow_pickle: bool = False) -> Any:
  """The raw content of a checkpoint file (dicts of numpy arrays), chosen by suffix."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: checkpoint file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in SAFETENSORS:
    return read_safetensors(path)
  if ext in NUMPY:
    return read_npz(path)
  if ext in PICKLES:
    return read_torch(path, allow_pickle)
  raise InputError(
    f"{path}: checkpoint format expected one of {list(SAFETENSORS + NUMPY + PICKLES)}, "
    f"found {ext or 'no suffix'!r}"
  )


def unwrap(obj: Any, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """(flat state_dict, notes on what was taken off) from a loaded checkpoint."""
  notes: list[str] = []
  while isinstance(obj, Mapping):
    inner = [k for k in WRAPPERS if isinstance(obj.get(k), Mapping)]
    arrays = [k for k, v in obj.items() if isinstance(v, np.ndarray)]
    if inner and not arrays:
      notes.append(f"took the nested {inner[0]!r} dict")
      obj = obj[inner[0]]
      continue
    break
  if not isinstance(obj, Mapping):
    raise InputError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
  flat: dict[str, np.ndarray] = {}
  _flatten(obj, "", flat, source)
  if not flat:
    raise InputError(f"{source}: no tensors found")
  for prefix in PREFIXES:
    if all(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix) :]: v for k, v in flat.items()}
      notes.append(f"stripped the {prefix!r} prefix")
  return flat, notes


def _flatten(obj: Mapping[str, Any], prefix: str, out: dict[str, np.ndarray], source: str) -> None:
  for k, v in obj.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      _flatten(v, name + ".", out, source)
    elif isinstance(v, np.ndarray):
      out[name] = v
    elif isinstance(v, bool | int | float | np.generic):
      out[name] = np.asarray(v)
    else:
      raise InputError(
        f"{source}: entry {name!r}: expected a tensor, found {type(v).__name__} (pass the "
        "file's weights dict, e.g. its 'state_dict')"
      )


def load_state_dict(
  path: str, *, allow_pickle: bool = False
) -> tuple[dict[str, np.ndarray], list[str]]:
  """read_checkpoint + unwrap: the flat torch-named state_dict of a file, and notes."""
  return unwrap(read_checkpoint(path, allow_pickle=allow_pickle), path)
