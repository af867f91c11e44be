"""grain transforms for flat maps: dequantise, patchify, order, tokenise, pad.

Module-level classes holding only numpy state, so grain can pickle them into
multiprocessing workers. Examples are dicts of numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from boldjax.data.patching import PatchLayout
from boldjax.data.records import VALUE_RANGE, dequantize
from boldjax.data.tokenizer import KMeansTokenizer

PER_PATCH_KEYS = ("patches", "tokens")


class Dequantize(grain.transforms.Map):
  """activity uint8 -> float32 (hi - lo) * q / 255 + lo (boldGPT), times the mask.

  float16/float32 activity (unquantised datasets) is only cast and masked.
  """

  def __init__(self, mask: np.ndarray, value_range: tuple[float, float] = VALUE_RANGE):
    self.mask = np.asarray(mask, bool)
    self.value_range = (float(value_range[0]), float(value_range[1]))

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    act = np.asarray(element["activity"])
    if act.dtype == np.uint8:
      act = dequantize(act, self.value_range)
    else:
      act = act.astype(np.float32)
    return {**element, "activity": act * self.mask}


class Patchify(grain.transforms.Map):
  """activity (H, W) -> patches (N, D) float32 in the layout's order; drops activity."""

  def __init__(self, layout: PatchLayout, keep_activity: bool = False):
    self.layout = layout
    self.keep_activity = keep_activity

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    act = out["activity"] if self.keep_activity else out.pop("activity")
    out["patches"] = self.layout.patchify(act).astype(np.float32)
    return out


class PatchOrder(grain.transforms.RandomMap):
  """Attach 'order' (N,) int32 and permute the per-patch arrays into that order.

  ordering="fixed": order = arange(N) (the layout's raster/radial/... order).
  ordering="random": a fresh permutation per example from grain's per-element rng, so it
  is reproducible and resumable. Position t then holds layout patch order[t], as boldGPT's
  take_along_dim(patches, order).
  """

  def __init__(
    self, num_patches: int, ordering: str = "fixed", keys: Sequence[str] = PER_PATCH_KEYS
  ):
    if ordering not in ("fixed", "random"):
      raise ValueError(f"PatchOrder: ordering must be 'fixed' or 'random', found {ordering!r}")
    self.num_patches = int(num_patches)
    self.ordering = ordering
    self.keys = tuple(keys)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.ordering == "random":
      order = rng.permutation(self.num_patches).astype(np.int32)
    else:
      order = np.arange(self.num_patches, dtype=np.int32)
    out = dict(element)
    for key in self.keys:
      if key in out:
        value = np.asarray(out[key])
        if value.shape[0] != self.num_patches:
          raise ValueError(
            f"PatchOrder: {key!r} must have {self.num_patches} patches on axis 0, "
            f"found shape {value.shape}"
          )
        out[key] = value[order]
    out["order"] = order
    return out


class Tokenize(grain.transforms.Map):
  """patches (..., N, D) -> tokens (..., N) int32 (runs per example or per batch)."""

  def __init__(self, tokenizer: KMeansTokenizer):
    self.tokenizer = tokenizer

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, "tokens": self.tokenizer.encode(element["patches"])}


class SelectKeys(grain.transforms.Map):
  """Keep only the batch keys the tasks use (int64 ids would not fit jax's int32)."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {k: element[k] for k in self.keys if k in element}


class IndexedSource:
  """A source viewed through an index list; index -1 gives a padding example (valid=False).

  Eval shards are padded this way to the same whole number of batches on every process.
  """

  def __init__(self, source: Any, indices: np.ndarray, pad_example: dict[str, np.ndarray]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.pad_example = pad_example

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = int(self.indices[index])
    if i < 0:
      return {**self.pad_example, "valid": np.bool_(False)}
    return {**self.source[i], "valid": np.bool_(True)}
