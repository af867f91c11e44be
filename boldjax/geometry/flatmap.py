"""Flat-map resampling: vertex values <-> pixels of a regular grid over a flat surface.

Both directions are precomputed sparse matrices, so resampling thousands of maps is one
sparse matmul. Pixels are linear (barycentric) interpolations of the vertices of the
triangle that covers their centre; the mask is the set of covered pixels. Row 0 is the
top of the image (largest y).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from boldjax.geometry.surfaces import FlatSurface


@dataclasses.dataclass(eq=False)
class FlatMapResampler:
  height: int
  width: int
  extent: tuple[float, float, float, float]  # xmin, xmax, ymin, ymax
  mask: np.ndarray  # (H, W) bool
  num_vertices: int
  _to_pixels: sp.csr_matrix  # (H*W, V)
  _to_vertices: sp.csr_matrix  # (V, H*W)

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
    """Grid over `extent` (default: cortex bounding box + one pixel) of square pixels."""
    xy = surface.coords[surface.cortex]
    if extent is None:
      xmin, ymin = xy.min(axis=0)
      xmax, ymax = xy.max(axis=0)
    else:
      xmin, xmax, ymin, ymax = map(float, extent)
    if pixel_size is None:
      if height is None and width is None:
        raise ValueError("FlatMapResampler.fit: give pixel_size, height or width")
      pixel_size = (ymax - ymin) / (height - 2) if height else (xmax - xmin) / (width - 2)
    if extent is None:  # one pixel of margin on every side
      xmin, xmax, ymin, ymax = (
        xmin - pixel_size,
        xmax + pixel_size,
        ymin - pixel_size,
        ymax + pixel_size,
      )
    height = height or int(np.ceil((ymax - ymin) / pixel_size))
    width = width or int(np.ceil((xmax - xmin) / pixel_size))
    # Centre the grid on the extent.
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    xmin, xmax = cx - width * pixel_size / 2, cx + width * pixel_size / 2
    ymin, ymax = cy - height * pixel_size / 2, cy + height * pixel_size / 2

    to_pixels, mask = _pixel_weights(surface, height, width, (xmin, ymax), pixel_size)
    to_vertices = _vertex_weights(surface, mask, (xmin, ymax), pixel_size)
    return cls(
      height, width, (xmin, xmax, ymin, ymax), mask, surface.num_vertices, to_pixels, to_vertices
    )

  @property
  def pixel_size(self) -> float:
    return (self.extent[1] - self.extent[0]) / self.width

  def to_pixels(self, values: np.ndarray) -> np.ndarray:
    """(..., V) vertex values -> (..., H, W) float32 images, 0 outside the mask."""
    values = np.asarray(values, np.float32)
    self._check(values.shape[-1], self.num_vertices, "vertex values")
    flat = values.reshape(-1, self.num_vertices)
    out = (self._to_pixels @ flat.T).T
    return np.asarray(out, np.float32).reshape(*values.shape[:-1], self.height, self.width)

  def to_vertices(self, image: np.ndarray) -> np.ndarray:
    """(..., H, W) images -> (..., V) float32 vertex values (0 off the cortex)."""
    image = np.asarray(image, np.float32)
    if image.shape[-2:] != (self.height, self.width):
      raise ValueError(
        f"to_vertices: images must end in ({self.height}, {self.width}), found {image.shape}"
      )
    flat = image.reshape(-1, self.height * self.width)
    out = (self._to_vertices @ flat.T).T
    return np.asarray(out, np.float32).reshape(*image.shape[:-2], self.num_vertices)

  def save(self, path: str) -> None:
    np.savez_compressed(
      path,
      height=self.height,
      width=self.width,
      extent=np.asarray(self.extent),
      mask=self.mask,
      num_vertices=self.num_vertices,
      **_csr_fields("p", self._to_pixels),
      **_csr_fields("v", self._to_vertices),
    )

  @classmethod
  def load(cls, path: str) -> FlatMapResampler:
    with np.load(path) as z:
      return cls(
        int(z["height"]),
        int(z["width"]),
        tuple(float(e) for e in z["extent"]),
        z["mask"],
        int(z["num_vertices"]),
        _csr_from(z, "p"),
        _csr_from(z, "v"),
      )

  @staticmethod
  def _check(found: int, expected: int, what: str) -> None:
    if found != expected:
      raise ValueError(f"{what}: expected last dimension {expected}, found {found}")


def _pixel_weights(surface, height, width, origin, px):
  """Barycentric weights (H*W, V) of the triangle covering each pixel centre."""
  x0, y0 = origin
  tri = surface.coords[surface.faces]  # (F, 3, 2)
  # Candidate pixel ranges per triangle: columns j with centre x = x0 + (j + .5) px.
  jlo = np.ceil((tri[..., 0].min(1) - x0) / px - 0.5).astype(np.int64)
  jhi = np.floor((tri[..., 0].max(1) - x0) / px - 0.5).astype(np.int64)
  ilo = np.ceil((y0 - tri[..., 1].max(1)) / px - 0.5).astype(np.int64)
  ihi = np.floor((y0 - tri[..., 1].min(1)) / px - 0.5).astype(np.int64)
  nj, ni = np.maximum(jhi - jlo + 1, 0), np.maximum(ihi - ilo + 1, 0)
  count = nj * ni
  t = np.repeat(np.arange(len(tri)), count)
  k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
  j = jlo[t] + k % nj[t]
  i = ilo[t] + k // nj[t]
  keep = (i >= 0) & (i < height) & (j >= 0) & (j < width)
  t, i, j = t[keep], i[keep], j[keep]
  p = np.stack([x0 + (j + 0.5) * px, y0 - (i + 0.5) * px], axis=1)
  a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]
  v0, v1, v2 = b - a, c - a, p - a
  den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
  ok = np.abs(den) > 1e-12
  den = np.where(ok, den, 1.0)
  w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
  w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
  w0 = 1.0 - w1 - w2
  eps = 1e-9
  inside = ok & (w0 >= -eps) & (w1 >= -eps) & (w2 >= -eps)
  t, i, j, w = t[inside], i[inside], j[inside], np.stack([w0, w1, w2], 1)[inside]
  pix = i * width + j
  # A pixel on a shared edge (or under overlapping triangles) keeps its first triangle.
  pix, first = np.unique(pix, return_index=True)
  t, w = t[first], np.clip(w[first], 0.0, 1.0)
  w /= w.sum(axis=1, keepdims=True)
  rows = np.repeat(pix, 3)
  cols = surface.faces[t].ravel()
  mat = sp.csr_matrix((w.ravel(), (rows, cols)), shape=(height * width, surface.num_vertices))
  mask = np.zeros(height * width, bool)
  mask[pix] = True
  return mat, mask.reshape(height, width)


def _vertex_weights(surface, mask, origin, px):
  """Bilinear weights (V, H*W) over in-mask pixels; nearest in-mask pixel as a fallback."""
  x0, y0 = origin
  height, width = mask.shape
  verts = np.flatnonzero(surface.cortex)
  xy = surface.coords[verts]
  fj = (xy[:, 0] - x0) / px - 0.5
  fi = (y0 - xy[:, 1]) / px - 0.5
  j0, i0 = np.floor(fj).astype(np.int64), np.floor(fi).astype(np.int64)
  dj, di = fj - j0, fi - i0
  rows, cols, vals = [], [], []
  total = np.zeros(len(verts))
  corners = [
    (0, 0, (1 - di) * (1 - dj)),
    (0, 1, (1 - di) * dj),
    (1, 0, di * (1 - dj)),
    (1, 1, di * dj),
  ]
  for ii, jj, w in corners:
    i, j = i0 + ii, j0 + jj
    valid = (i >= 0) & (i < height) & (j >= 0) & (j < width)
    valid[valid] = mask[i[valid], j[valid]]
    valid &= w > 0
    rows.append(np.flatnonzero(valid))
    cols.append(i[valid] * width + j[valid])
    vals.append(w[valid])
    np.add.at(total, rows[-1], w[valid])
  rows, cols, vals = map(np.concatenate, (rows, cols, vals))
  vals = vals / total[rows]
  orphans = np.flatnonzero(total == 0)
  if len(orphans):
    pix = np.flatnonzero(mask.ravel())
    centres = np.stack([x0 + (pix % width + 0.5) * px, y0 - (pix // width + 0.5) * px], 1)
    _, nearest = cKDTree(centres).query(xy[orphans])
    rows = np.concatenate([rows, orphans])
    cols = np.concatenate([cols, pix[nearest]])
    vals = np.concatenate([vals, np.ones(len(orphans))])
  return sp.csr_matrix((vals, (verts[rows], cols)), shape=(surface.num_vertices, height * width))


def _csr_fields(prefix: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
  return {
    f"{prefix}_data": m.data,
    f"{prefix}_indices": m.indices,
    f"{prefix}_indptr": m.indptr,
    f"{prefix}_shape": np.asarray(m.shape),
  }


def _csr_from(z, prefix: str) -> sp.csr_matrix:
  shape = tuple(int(s) for s in z[f"{prefix}_shape"])
  return sp.csr_matrix(
    (z[f"{prefix}_data"], z[f"{prefix}_indices"], z[f"{prefix}_indptr"]), shape=shape
  )
