"""Masked patchify of 2-D flat maps, bit-compatible with boldGPT's MaskedPatchify.

A map (H, W) is zero-padded to a multiple of the patch size (padding split like boldGPT:
``pad // 2`` before, the rest after), cut into p x p patches in raster order of the padded
grid, and only the patches touching the mask are kept, in a fixed priority order. Each
kept patch is flattened row-major (boldGPT's ``(c p1 p2)`` with c = 1) and multiplied by its
in-mask pixels. Pure numpy: it runs in grain workers and in converters alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import BinaryIO

import numpy as np

ORDERINGS = ("raster", "radial", "reverse_radial")


def infer_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
  """(left, right, top, bottom) zero padding to a multiple of patch_size, as boldGPT."""
  pad_h = patch_size * math.ceil(height / patch_size) - height
  pad_w = patch_size * math.ceil(width / patch_size) - width
  return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def distance_map(mask: np.ndarray) -> np.ndarray:
  """Float32 Euclidean distance of every pixel to the mask centroid (boldGPT's priority).

  The centroid is averaged in float64 and rounded to float32 (torch sums float32 with a
  cascade, which is within an ulp of that); the distance itself is float32 like torch.
  """
  mask = np.asarray(mask, bool)
  rows, cols = np.meshgrid(
    np.arange(mask.shape[0], dtype=np.float32),
    np.arange(mask.shape[1], dtype=np.float32),
    indexing="ij",
  )
  coords = np.stack([rows, cols], axis=-1)
  centroid = coords[mask].astype(np.float64).mean(axis=0).astype(np.float32)
  diff = coords - centroid
  return np.sqrt(np.sum(diff * diff, axis=-1, dtype=np.float32)).astype(np.float32)


def _to_grid_patches(x: np.ndarray, patch_size: int, padding: tuple[int, int, int, int]):
  """(..., H, W) -> (..., G, p*p): zero-pad then cut into raster-ordered patches."""
  left, right, top, bottom = padding
  pad = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
  x = np.pad(x, pad)
  *lead, hp, wp = x.shape
  p = patch_size
  x = x.reshape(*lead, hp // p, p, wp // p, p)
  x = np.moveaxis(x, -3, -2)  # (..., gh, gw, p, p)
  return x.reshape(*lead, (hp // p) * (wp // p), p * p)


@dataclasses.dataclass(frozen=True, eq=False)
class PatchLayout:
  """Which patches of an (H, W) map are kept, in which order, and their in-mask pixels.

  patch_indices index the raster-ordered grid of the padded map and are stored already in
  the sequence order (like boldGPT's ``patch_indices`` buffer), so position t of a patch
  sequence is grid patch ``patch_indices[t]``.
  """

  mask: np.ndarray  # (H, W) bool
  patch_size: int
  patch_indices: np.ndarray  # (N,) int64
  patch_mask: np.ndarray  # (N, p*p) bool
  padding: tuple[int, int, int, int]  # left, right, top, bottom

  @classmethod
  def from_mask(
    cls, mask: np.ndarray, patch_size: int, ordering: str | np.ndarray = "radial"
  ) -> PatchLayout:
    """Keep the patches touching the mask and order them.

    ordering: "raster" (grid order), "radial" (increasing mean distance of the patch's
    p*p pixels, zero padding included, to the mask centroid), "reverse_radial" (negated
    distance), or an (H, W) priority map (same per-patch mean, ascending). Ties are
    broken by raster position (stable argsort; torch.argsort is unstable, so boldGPT's
    order for exactly tied patches is arbitrary: import its buffers with from_buffers).
    The per-patch mean is taken in float64 of the float32 priority map.
    """
    mask = _check_mask(mask)
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
      raise ValueError(f"PatchLayout: patch_size must be a positive int, found {patch_size!r}")
    patch_size = int(patch_size)
    padding = infer_padding(*mask.shape, patch_size)
    grid_mask = _to_grid_patches(mask, patch_size, padding)
    raster = np.flatnonzero(grid_mask.any(axis=-1)).astype(np.int64)
    if isinstance(ordering, str):
      if ordering == "raster":
        priority = None
      elif ordering == "radial":
        priority = distance_map(mask)
      elif ordering == "reverse_radial":
        priority = -distance_map(mask)
      else:
        raise ValueError(
          f"PatchLayout: unknown ordering {ordering!r}; expected one of {ORDERINGS} "
          "or an (H, W) priority map"
        )
    else:
      priority = np.asarray(ordering, np.float32)
      if priority.shape != mask.shape:
        raise ValueError(
          f"PatchLayout: priority map shape must equal the mask shape {mask.shape}, "
          f"found {priority.shape}"
        )
    if priority is None:
      order = np.arange(len(raster))
    else:
      means = _to_grid_patches(priority, patch_size, padding)[raster].astype(np.float64)
      order = np.argsort(means.mean(axis=-1), kind="stable")
    indices = raster[order]
    return cls(mask, patch_size, indices, grid_mask[indices], padding)

  @classmethod
  def from_buffers(
    cls,
    mask: np.ndarray,
    patch_size: int,
    patch_indices: np.ndarray,
    patch_mask: np.ndarray,
    source: str = "buffers",
  ) -> PatchLayout:
    """Rebuild a layout from stored buffers (e.g. boldGPT's patchify.* state_dict entries).

    Checks that the buffers are consistent with the mask, so a mask/buffer mix-up fails
    loudly instead of silently mis-patching.
    """
    mask = _check_mask(mask, source)
    patch_size = int(patch_size)
    padding = infer_padding(*mask.shape, patch_size)
    grid_mask = _to_grid_patches(mask, patch_size, padding)
    indices = np.asarray(patch_indices).astype(np.int64)
    pmask = np.asarray(patch_mask).astype(bool)
    if indices.ndim != 1 or pmask.shape != (len(indices), patch_size**2):
      raise ValueError(
        f"{source}: patch_indices (N,) and patch_mask (N, {patch_size**2}) expected, "
        f"found {indices.shape} and {pmask.shape}"
      )
    if len(np.unique(indices)) != len(indices) or indices.min(initial=0) < 0:
      raise ValueError(f"{source}: patch_indices must be distinct and >= 0")
    if indices.max(initial=0) >= len(grid_mask):
      raise ValueError(
        f"{source}: patch_indices must be < {len(grid_mask)} (grid size), found max {indices.max()}"
      )
    if not np.array_equal(grid_mask[indices], pmask):
      raise ValueError(f"{source}: patch_mask does not match the mask at patch_indices")
    touching = set(np.flatnonzero(grid_mask.any(axis=-1)).tolist())
    if set(indices.tolist()) != touching:
      raise ValueError(
        f"{source}: patch_indices must be exactly the {len(touching)} patches touching "
        f"the mask, found {len(indices)}"
      )
    return cls(mask, patch_size, indices, pmask, padding)

  @property
  def num_patches(self) -> int:
    return len(self.patch_indices)

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2

  @property
  def grid_shape(self) -> tuple[int, int]:
    """(rows, cols) of the padded patch grid."""
    left, right, top, bottom = self.padding
    h, w = self.mask.shape
    return (h + top + bottom) // self.patch_size, (w + left + right) // self.patch_size

  def patchify(self, x: np.ndarray) -> np.ndarray:
    """(..., H, W) -> (..., N, p*p) patches in sequence order, zero outside the mask."""
    x = np.asarray(x)
    if x.shape[-2:] != self.mask.shape:
      raise ValueError(
        f"patchify: maps must end in the mask shape {self.mask.shape}, found {x.shape}"
      )
    patches = _to_grid_patches(x, self.patch_size, self.padding)
    return patches[..., self.patch_indices, :] * self.patch_mask

  def unpatchify(self, patches: np.ndarray) -> np.ndarray:
    """(..., N, p*p) -> (..., H, W), zero outside the mask (boldGPT's inverse)."""
    patches = np.asarray(patches)
    if patches.shape[-2:] != (self.num_patches, self.patch_dim):
      raise ValueError(
        f"unpatchify: patches must end in ({self.num_patches}, {self.patch_dim}), "
        f"found {patches.shape}"
      )
    gh, gw = self.grid_shape
    p = self.patch_size
    lead = patches.shape[:-2]
    grid = np.zeros((*lead, gh * gw, p * p), patches.dtype)
    grid[..., self.patch_indices, :] = patches
    grid = grid.reshape(*lead, gh, gw, p, p)
    img = np.moveaxis(grid, -2, -3).reshape(*lead, gh * p, gw * p)
    left, _, top, _ = self.padding
    h, w = self.mask.shape
    return img[..., top : top + h, left : left + w] * self.mask

  def patch_mean(self, values: np.ndarray) -> np.ndarray:
    """(..., H, W) -> (..., N) float64 mean over each kept patch's p*p pixels (padding 0).

    With distance_map(mask) this is the radial priority, non-decreasing along the sequence.
    """
    grid = _to_grid_patches(np.asarray(values), self.patch_size, self.padding)
    return grid[..., self.patch_indices, :].astype(np.float64).mean(axis=-1)

  def interior(self) -> np.ndarray:
    """(N,) bool: patches lying entirely inside the mask (boldGPT's interior_mask)."""
    return self.patch_mask.all(axis=-1)

  def centres(self) -> np.ndarray:
    """(N, 2) float (row, col) patch centres in map pixel coordinates, for plots."""
    _, gw = self.grid_shape
    p = self.patch_size
    left, _, top, _ = self.padding
    rows = (self.patch_indices // gw) * p + (p - 1) / 2 - top
    cols = (self.patch_indices % gw) * p + (p - 1) / 2 - left
    return np.stack([rows, cols], axis=-1).astype(np.float64)

  def save(self, path: str | os.PathLike | BinaryIO) -> None:
    """Write an .npz (path used verbatim, or an open binary file); load() reads it back."""
    with _open_for_write(path) as f:
      np.savez(
        f,
        mask=self.mask,
        patch_size=np.int64(self.patch_size),
        patch_indices=self.patch_indices,
        patch_mask=self.patch_mask,
        padding=np.asarray(self.padding, np.int64),
      )

  @classmethod
  def load(cls, path: str | os.PathLike) -> PatchLayout:
    with np.load(path) as z:
      missing = {"mask", "patch_size", "patch_indices", "patch_mask"} - set(z.files)
      if missing:
        raise ValueError(f"{path}: missing fields {sorted(missing)} in a PatchLayout file")
      return cls.from_buffers(
        z["mask"], int(z["patch_size"]), z["patch_indices"], z["patch_mask"], str(path)
      )


def _check_mask(mask: np.ndarray, source: str = "mask") -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"{source}: mask must be 2-D (H, W), found shape {mask.shape}")
  mask = mask > 0
  if not mask.any():
    raise ValueError(f"{source}: mask has no True pixel")
  return mask


@contextlib.contextmanager
def _open_for_write(path):
  if hasattr(path, "write"):
    yield path
  else:
    with open(path, "wb") as f:
      yield f
