"""The Brain-Semantoks input layout: 457 ROIs in 9 networks, TR 2 s.

Brain-Semantoks (SamGijsen/Brain-Semantoks, data/dataset.py + network_mapping.npz) trains on
three atlases concatenated in this order:

  schaefer400  400 cortical ROIs in Schaefer's 7-network order (left hemisphere then right;
               each hemisphere Vis, SomMot, DorsAttn, SalVentAttn, Limbic, Cont, Default),
               7 networks of 61/77/46/47/26/52/91 ROIs
  tian3         50 subcortical ROIs (Tian S3), one network
  buckner7       7 cerebellar ROIs (Buckner 7), one network

The network map is written out here (run lengths of `network_map_schaefer400_7n`) so that
importing a file needs neither the original repository nor its .npz. A file without tian3
and/or buckner7 keeps the 9-network layout: those parcels are stored as zeros and their
networks listed in meta 'missing_networks'; the Semantoks encoder replaces their tokens by
its mask embedding after the tokenizer (the original README's advice), so the zeros never
reach the transformer and a model keeps one parameter layout for every dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TR_S = 2.0  # the original's preprocessing (README: TR 2.0 s, band-pass 0.01-0.1 Hz)
ATLASES = ("schaefer400", "tian3", "buckner7")
ATLAS_ROIS = {"schaefer400": 400, "tian3": 50, "buckner7": 7}
NUM_ROIS = sum(ATLAS_ROIS.values())  # 457
SCHAEFER_NETWORKS = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")
NETWORK_NAMES = (*SCHAEFER_NETWORKS, "Subcortex (tian3)", "Cerebellum (buckner7)")
NUM_NETWORKS = len(NETWORK_NAMES)  # 9
# Runs of network ids along Schaefer-400's 7-network ROI order (left, then right hemisphere).
_SCHAEFER_RUNS = (
  (0, 31), (1, 37), (2, 23), (3, 22), (4, 13), (5, 22), (6, 52),
  (0, 30), (1, 40), (2, 23), (3, 25), (4, 13), (5, 30), (6, 39),
)  # fmt: skip
SCHAEFER_NETWORK_SIZES = (61, 77, 46, 47, 26, 52, 91)


def atlas_slices() -> dict[str, slice]:
  """Parcel range of each atlas in the concatenated 457-ROI input."""
  out, start = {}, 0
  for name in ATLASES:
    out[name] = slice(start, start + ATLAS_ROIS[name])
    start += ATLAS_ROIS[name]
  return out


def network_of_parcel() -> np.ndarray:
  """(457,) int network id per ROI: Schaefer 7n (0..6), Tian (7), Buckner (8)."""
  schaefer = np.concatenate([np.full(n, k, np.int64) for k, n in _SCHAEFER_RUNS])
  return np.concatenate(
    [schaefer, np.full(ATLAS_ROIS["tian3"], 7, np.int64), np.full(ATLAS_ROIS["buckner7"], 8)]
  )


def atlas_networks(name: str) -> list[int]:
  """Network ids an atlas's ROIs belong to."""
  return sorted({int(n) for n in network_of_parcel()[atlas_slices()[name]]})


def missing_networks(present: Sequence[str]) -> list[int]:
  """Networks whose atlas is absent from the data (their tokens are masked)."""
  return sorted(n for a in ATLASES if a not in present for n in atlas_networks(a))
