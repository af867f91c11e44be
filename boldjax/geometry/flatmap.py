"""Vertex <-> flat-map image resampling as two precomputed sparse matrices.

Fitting does the geometry once (which triangle covers each pixel centre, where each vertex
falls between pixel centres); applying to a batch of maps is then one sparse matmul, fast
enough for building datasets of many thousands of maps.

Image convention: row 0 is the top of the image (largest y), column 0 the left (smallest
x); pixel (i, j) has centre (xmin + (j + 0.5) dx, ymax - (i + 0.5) dy).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from boldjax.geometry.surfaces import FlatSurface

_FORMAT_VERSION = 1
# Barycentric tolerance: pixel centres on a shared edge count as inside.
_EDGE_EPS = 1e-9


class FlatMapResampler:
  """Linear maps between per-vertex values (..., V) and flat images (..., H, W).

  Build with `FlatMapResampler.fit(surface, ...)` or `FlatMapResampler.load(path)`.
  """

  def __init__(
    self,
    *,
    mask: np.ndarray,
    extent: tuple[float, float, float, float],
    num_vertices: int,
    pixels_from_vertices: sp.csr_matrix,
    vertices_from_pixels: sp.csr_matrix,
    surface_name: str = "",
  ):
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
      raise ValueError(f"FlatMapResampler: mask must be (H, W); found shape {mask.shape}")
    self.mask = mask
    self.height, self.width = (int(n) for n in mask.shape)
    self.extent = tuple(float(e) for e in extent)
    self.num_vertices = int(num_vertices)
    self.surface_name = str(surface_name)
    npix = self.height * self.width
    if pixels_from_vertices.shape != (npix, self.num_vertices):
      raise ValueError(
        f"FlatMapResampler: pixels_from_vertices shape expected {(npix, self.num_vertices)}, "
        f"found {pixels_from_vertices.shape}"
      )
    if vertices_from_pixels.shape != (self.num_vertices, npix):
      raise ValueError(
        f"FlatMapResampler: vertices_from_pixels shape expected {(self.num_vertices, npix)}, "
        f"found {vertices_from_pixels.shape}"
      )
    self.pixels_from_vertices = sp.csr_matrix(pixels_from_vertices, dtype=np.float32)
    self.vertices_from_pixels = sp.csr_matrix(vertices_from_pixels, dtype=np.float32)

  # ---------------------------------------------------------------- properties

  @property
  def pixel_size(self) -> tuple[float, float]:
    """(dx, dy) in surface units (mm)."""
    xmin, xmax, ymin, ymax = self.extent
    return (xmax - xmin) / self.width, (ymax - ymin) / self.height

  @property
  def num_pixels(self) -> int:
    """Number of pixels inside the mask."""
    return int(self.mask.sum())

  def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) x and y coordinates of the pixel centres."""
    return _pixel_centres(self.extent, self.height, self.width)

  def __repr__(self) -> str:
    dx, dy = self.pixel_size
    return (
      f"FlatMapResampler({self.surface_name or 'surface'}, {self.height}x{self.width}, "
      f"pixel {dx:.3g}x{dy:.3g}, {self.num_pixels} in mask, V={self.num_vertices})"
    )

  # ---------------------------------------------------------------- fitting

  @classmethod
  def fit(
    cls,
    surface: FlatSurface,
    *,
    height: int | None = None,
    width: int | None = None,
    pixel_size: float | None = None,
    extent: tuple[float, float, float, float] | None = None,
  ) -> FlatMapResampler:
    """Fit the resampler for `surface` on an image grid.

    Give either `pixel_size` or `height` and/or `width` (a missing one keeps square pixels).
    `extent` = (xmin, xmax, ymin, ymax) is the outer edge of the image; by default the
    bounding box of the placed cortex vertices plus a margin of one pixel, centred.
    """
    extent, height, width = _grid(surface, height, width, pixel_size, extent)
    xs, ys = _pixel_centres(extent, height, width)
    pix, tri, bary = _cover(surface.coords, surface.faces, extent, height, width)
    verts = surface.faces[tri]  # (P, 3)
    npix = height * width
    p2v = sp.csr_matrix(
      (bary.ravel(), (np.repeat(pix, 3), verts.ravel())), shape=(npix, surface.num_vertices)
    )
    p2v.sum_duplicates()
    mask = np.zeros(npix, bool)
    mask[pix] = True
    mask = mask.reshape(height, width)
    v2p = _bilinear(surface, mask, extent)
    return cls(
      mask=mask,
      extent=extent,
      num_vertices=surface.num_vertices,
      pixels_from_vertices=p2v,
      vertices_from_pixels=v2p,
      surface_name=surface.name,
    )

  # ---------------------------------------------------------------- applying

  def to_pixels(self, values: np.ndarray) -> np.ndarray:
    """(..., V) per-vertex values -> (..., H, W) float32 images; 0 outside the mask."""
    values = np.asarray(values)
    if values.ndim < 1 or values.shape[-1] != self.num_vertices:
      raise ValueError(
        f"FlatMapResampler.to_pixels: values last axis expected {self.num_vertices} "
        f"vertices, found shape {values.shape}"
      )
    lead = values.shape[:-1]
    flat = values.reshape(-1, self.num_vertices).astype(np.float32, copy=False)
    out = (self.pixels_from_vertices @ flat.T).T
    return np.ascontiguousarray(out, np.float32).reshape(*lead, self.height, self.width)

  def to_vertices(self, image: np.ndarray) -> np.ndarray:
    """(..., H, W) images -> (..., V) float32 per-vertex values; 0 off cortex."""
    image = np.asarray(image)
    if image.ndim < 2 or image.shape[-2:] != (self.height, self.width):
      raise ValueError(
        f"FlatMapResampler.to_vertices: image last axes expected {(self.height, self.width)}, "
        f"found shape {image.shape}"
      )
    lead = image.shape[:-2]
    flat = image.reshape(-1, self.height * self.width).astype(np.float32, copy=False)
    out = (self.vertices_from_pixels @ flat.T).T
    return np.ascontiguousarray(out, np.float32).reshape(*lead, self.num_vertices)

  # ---------------------------------------------------------------- io

  def save(self, path: str | os.PathLike) -> None:
    """Write everything to one .npz (exact round trip with `load`)."""
    arrays = {
      "format_version": np.int64(_FORMAT_VERSION),
      "mask": self.mask,
      "extent": np.asarray(self.extent, np.float64),
      "num_vertices": np.int64(self.num_vertices),
      "surface_name": np.asarray(self.surface_name),
    }
    for key, mat in (("p2v", self.pixels_from_vertices), ("v2p", self.vertices_from_pixels)):
      arrays[f"{key}_data"] = mat.data
      arrays[f"{key}_indices"] = mat.indices
      arrays[f"{key}_indptr"] = mat.indptr
      arrays[f"{key}_shape"] = np.asarray(mat.shape, np.int64)
    with open(path, "wb") as f:
      np.savez_compressed(f, **arrays)

  @classmethod
  def load(cls, path: str | os.PathLike) -> FlatMapResampler:
    """Read a resampler written by `save`."""
    with np.load(path, allow_pickle=False) as z:
      version = int(z["format_version"]) if "format_version" in z else None
      if version != _FORMAT_VERSION:
        raise ValueError(
          f"{os.fspath(path)}: field 'format_version' expected {_FORMAT_VERSION}, found {version}"
        )
      mats = {}
      for key in ("p2v", "v2p"):
        shape = tuple(int(n) for n in z[f"{key}_shape"])
        mats[key] = sp.csr_matrix(
          (z[f"{key}_data"], z[f"{key}_indices"], z[f"{key}_indptr"]), shape=shape
        )
      return cls(
        mask=z["mask"],
        extent=tuple(z["extent"].tolist()),
        num_vertices=int(z["num_vertices"]),
        pixels_from_vertices=mats["p2v"],
        vertices_from_pixels=mats["v2p"],
        surface_name=str(z["surface_name"]),
      )


# -------------------------------------------------------------------- helpers


def _grid(
  surface: FlatSurface,
  height: int | None,
  width: int | None,
  pixel_size: float | None,
  extent: tuple[float, float, float, float] | None,
) -> tuple[tuple[float, float, float, float], int, int]:
  """Resolve (extent, height, width) from the arguments given."""
  if pixel_size is not None and (height is not None or width is not None):
    raise ValueError(
      "FlatMapResampler.fit: give pixel_size or height/width, not both; found "
      f"pixel_size={pixel_size}, height={height}, width={width}"
    )
  if pixel_size is None and height is None and width is None:
    raise ValueError("FlatMapResampler.fit: give pixel_size or height and/or width; found none")
  for name, val in (("height", height), ("width", width)):
    if val is not None and (int(val) != val or val < 2):
      raise ValueError(f"FlatMapResampler.fit: {name} expected an integer >= 2, found {val!r}")
  if pixel_size is not None and not pixel_size > 0:
    raise ValueError(f"FlatMapResampler.fit: pixel_size expected > 0, found {pixel_size!r}")

  if extent is not None:
    xmin, xmax, ymin, ymax = (float(e) for e in extent)
    if not (xmax > xmin and ymax > ymin):
      raise ValueError(
        f"FlatMapResampler.fit: extent expected (xmin, xmax, ymin, ymax) with max > min, "
        f"found {extent}"
      )
    span_x, span_y = xmax - xmin, ymax - ymin
    if pixel_size is not None:
      height = max(1, round(span_y / pixel_size))
      width = max(1, round(span_x / pixel_size))
    elif height is None:
      height = max(1, round(width * span_y / span_x))
    elif width is None:
      width = max(1, round(height * span_x / span_y))
    return (xmin, xmax, ymin, ymax), int(height), int(width)

  xy = surface.coords[np.unique(surface.faces)]
  lo, hi = xy.min(axis=0), xy.max(axis=0)
  span_x, span_y = hi - lo
  if pixel_size is None:
    # Square pixels; the box plus one pixel each side fits in the image.
    candidates = []
    if height is not None:
      candidates.append(span_y / (height - 2))
    if width is not None:
      candidates.append(span_x / (width - 2))
    pixel_size = max(candidates)
  ps = float(pixel_size)
  if height is None:
    height = int(np.ceil(span_y / ps)) + 2
  if width is None:
    width = int(np.ceil(span_x / ps)) + 2
  cx, cy = (lo + hi) / 2
  extent = (cx - width * ps / 2, cx + width * ps / 2, cy - height * ps / 2, cy + height * ps / 2)
  return tuple(float(e) for e in extent), int(height), int(width)


def _pixel_centres(extent, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  xmin, xmax, ymin, ymax = extent
  dx, dy = (xmax - xmin) / width, (ymax - ymin) / height
  x = xmin + (np.arange(width) + 0.5) * dx
  y = ymax - (np.arange(height) + 0.5) * dy
  return np.broadcast_to(x[None, :], (height, width)), np.broadcast_to(y[:, None], (height, width))


def _cover(
  coords: np.ndarray, faces: np.ndarray, extent, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For every pixel centre inside a face: (pixel index, face index, barycentric (P, 3)).

  Each face is tested against the pixel centres of its bounding box (vectorised over all
  faces). Where faces overlap or share an edge, the face in which the centre lies deepest
  (largest minimum barycentric coordinate) wins.
  """
  xmin, xmax, ymin, ymax = extent
  dx, dy = (xmax - xmin) / width, (ymax - ymin) / height
  tri = coords[faces]  # (F, 3, 2)
  # Continuous column / row coordinates in which pixel centres sit at integers.
  col = (tri[..., 0] - xmin) / dx - 0.5
  row = (ymax - tri[..., 1]) / dy - 0.5
  c0 = np.maximum(np.ceil(col.min(axis=1)), 0).astype(np.int64)
  c1 = np.minimum(np.floor(col.max(axis=1)), width - 1).astype(np.int64)
  r0 = np.maximum(np.ceil(row.min(axis=1)), 0).astype(np.int64)
  r1 = np.minimum(np.floor(row.max(axis=1)), height - 1).astype(np.int64)
  nc = np.maximum(c1 - c0 + 1, 0)
  nr = np.maximum(r1 - r0 + 1, 0)
  counts = nc * nr
  face = np.repeat(np.arange(len(faces)), counts)
  local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  cc = c0[face] + local % nc[face]
  rr = r0[face] + local // nc[face]
  px = xmin + (cc + 0.5) * dx
  py = ymax - (rr + 0.5) * dy
  a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
  v0, v1 = b - a, c - a
  det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
  ok = np.abs(det) > 0
  det = np.where(ok, det, 1.0)
  wx, wy = px - a[:, 0], py - a[:, 1]
  l1 = (wx * v1[:, 1] - wy * v1[:, 0]) / det
  l2 = (v0[:, 0] * wy - v0[:, 1] * wx) / det
  l0 = 1.0 - l1 - l2
  bary = np.stack([l0, l1, l2], axis=1)
  depth = bary.min(axis=1)
  inside = ok & (depth >= -_EDGE_EPS)
  pix = (rr * width + cc)[inside]
  face, bary, depth = face[inside], bary[inside], depth[inside]
  order = np.lexsort((-depth, pix))
  pix, face, bary = pix[order], face[order], bary[order]
  first = np.ones(len(pix), bool)
  first[1:] = pix[1:] != pix[:-1]
  bary = np.clip(bary[first], 0.0, None)
  bary /= bary.sum(axis=1, keepdims=True)
  return pix[first], face[first], bary


def _bilinear(surface: FlatSurface, mask: np.ndarray, extent) -> sp.csr_matrix:
  """(V, H*W) bilinear sampling of the image at each cortex vertex, renormalised to the mask."""
  height, width = mask.shape
  xmin, xmax, ymin, ymax = extent
  dx, dy = (xmax - xmin) / width, (ymax - ymin) / height
  verts = np.flatnonzero(surface.cortex)
  x, y = surface.coords[verts, 0], surface.coords[verts, 1]
  col = (x - xmin) / dx - 0.5
  row = (ymax - y) / dy - 0.5
  c0, r0 = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
  fc, fr = col - c0, row - r0
  rows, cols, vals = [], [], []
  for dr, dc, w in (
    (0, 0, (1 - fr) * (1 - fc)),
    (0, 1, (1 - fr) * fc),
    (1, 0, fr * (1 - fc)),
    (1, 1, fr * fc),
  ):
    r, c = r0 + dr, c0 + dc
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    r_, c_ = np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)
    ok = inside & mask[r_, c_] & (w > 0)
    rows.append(np.flatnonzero(ok))
    cols.append(r_[ok] * width + c_[ok])
    vals.append(w[ok])
  rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
  total = np.bincount(rows, vals, minlength=len(verts))
  good = total > 1e-6
  keep = good[rows]
  rows, cols, vals = rows[keep], cols[keep], vals[keep] / total[rows[keep]]
  # Vertices with no in-mask neighbour: nearest in-mask pixel centre.
  lost = np.flatnonzero(~good)
  if len(lost) and mask.any():
    xs, ys = _pixel_centres(extent, height, width)
    in_mask = np.flatnonzero(mask.ravel())
    tree = cKDTree(np.stack([xs.ravel()[in_mask], ys.ravel()[in_mask]], axis=1))
    _, nearest = tree.query(np.stack([x[lost], y[lost]], axis=1))
    rows = np.concatenate([rows, lost])
    cols = np.concatenate([cols, in_mask[nearest]])
    vals = np.concatenate([vals, np.ones(len(lost))])
  out = sp.csr_matrix(
    (vals, (verts[rows], cols)), shape=(surface.num_vertices, height * width), dtype=np.float64
  )
  out.sum_duplicates()
  return out
