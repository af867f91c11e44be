"""The embedded default data: synthetic single-trial flat maps on real cortical geometry.

Each trial is built on the cortex vertices of the surface (fsLR-32k by default) and
resampled onto the flat-map grid:

  activity = network components: smooth fields that each live inside one Yeo-7 network
             (fsaverage5: one k-means cluster), with random weights per trial
           + evoked response: amplitude * (evoked_scale * a shared visual response
             + class_scale * the pattern of the trial's stimulus class), K fixed smooth
             patterns strongest in the visual network: what probes decode
           + subject: a fixed smooth offset per subject
           + trial noise: a fresh smooth random field (high-rank, so a linear probe cannot
             simply project it out) and white vertex noise,

then z-scored over the in-mask pixels and clipped to +-2.5, like NSD-Flat betas. Smooth
fields are sums of Gaussian bumps on the area-scaled sphere (a fine scale, FWHM
smoothness_mm, and a coarse one three times wider) held as sparse matrices, so every trial
costs a few small matmuls. Each trial draws from its own generator seeded by
(seed, subject, trial), so any example can be regenerated alone (`SyntheticFlat.example`;
equal to the streamed one up to float32 rounding of batched matmuls).

Defaults: at height 100 (fsLR-32k, 13,363 in-mask pixels, 3.7 mm pixels) a nearest-class-
mean classifier on raw pixels reaches ~0.84 and PCA+logistic ~0.94 for 8 classes (chance
0.125); class_scale=1.0 makes both ~1.0, too easy to tell models apart.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from boldjax.geometry import FlatMapResampler, FlatSurface, load_flat_surface, network_labels

CLIP = 2.5
_FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))
_COARSE = 3.0  # the coarse scale, in multiples of smoothness_mm
_LABEL_STREAM = 104729  # extra seed word that separates the label draw from trial draws


@dataclasses.dataclass(frozen=True)
class SyntheticFlatSpec:
  """What to generate. Scales are relative to unit-variance fields.

  Image size: `height` (width keeps the flat map's aspect) or `pixel_size` in mm.
  """

  space: str = "fsLR32k"
  height: int | None = 100
  width: int | None = None
  pixel_size: float | None = None
  num_subjects: int = 8
  trials_per_subject: int = 400
  trials_per_session: int = 100
  num_classes: int = 8
  num_components: int = 16
  component_scale: float = 1.0
  class_scale: float = 0.3
  evoked_scale: float = 1.0
  amplitude_jitter: float = 0.3
  subject_scale: float = 0.5
  smooth_noise: float = 1.0
  noise: float = 0.5
  smoothness_mm: float = 8.0
  seed: int = 0


def _check(spec: SyntheticFlatSpec) -> None:
  where = "SyntheticFlatSpec"
  for name, low in (
    ("num_subjects", 1),
    ("trials_per_subject", 1),
    ("trials_per_session", 1),
    ("num_classes", 2),
    ("num_components", 1),
  ):
    value = getattr(spec, name)
    if not isinstance(value, int | np.integer) or value < low:
      raise ValueError(f"{where}: field {name!r} expected an integer >= {low}, found {value!r}")
  for name in (
    "component_scale",
    "class_scale",
    "evoked_scale",
    "amplitude_jitter",
    "subject_scale",
    "smooth_noise",
    "noise",
  ):
    value = getattr(spec, name)
    if not value >= 0:
      raise ValueError(f"{where}: field {name!r} expected >= 0, found {value!r}")
  if not spec.smoothness_mm > 0:
    raise ValueError(f"{where}: field 'smoothness_mm' expected > 0, found {spec.smoothness_mm!r}")


def bump_basis(surface: FlatSurface, fwhm_mm: float) -> sp.csr_matrix:
  """(Vc, M) sparse Gaussian bumps over the cortex vertices, one per ~sigma-sized cell.

  Bump centres are one cortex vertex per cube of side sigma on the area-scaled sphere, so
  random weights give a close to stationary smooth field; bumps stay in their hemisphere
  and are cut at 3 sigma.
  """
  sigma = float(fwhm_mm) * _FWHM_TO_SIGMA
  cortex = np.flatnonzero(surface.cortex)
  xyz = surface.sphere[cortex]
  hemi = surface.hemisphere[cortex]
  rows, cols, vals = [], [], []
  num_centres = 0
  for h in (0, 1):
    idx = np.flatnonzero(hemi == h)
    pts = xyz[idx]
    _, first = np.unique(np.floor(pts / sigma).astype(np.int64), axis=0, return_index=True)
    centres = pts[np.sort(first)]
    # "ndarray" output keeps the zero distances (each centre to itself).
    pairs = cKDTree(pts).sparse_distance_matrix(
      cKDTree(centres), 3.0 * sigma, output_type="ndarray"
    )
    rows.append(idx[pairs["i"]])
    cols.append(num_centres + pairs["j"])
    vals.append(np.exp(-0.5 * (pairs["v"] / sigma) ** 2))
    num_centres += len(centres)
  out = sp.csr_matrix(
    (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
    shape=(len(cortex), num_centres),
  )
  out.sum_duplicates()
  return out


def _unit(x: np.ndarray) -> np.ndarray:
  """Zero mean, unit std along the last axis."""
  x = x - x.mean(axis=-1, keepdims=True)
  return x / np.maximum(x.std(axis=-1, keepdims=True), 1e-12)


@functools.cache
def _bases(space: str, fwhm_mm: float) -> tuple[sp.csr_matrix, sp.csr_matrix]:
  surface = load_flat_surface(space)
  return bump_basis(surface, fwhm_mm).astype(np.float32), bump_basis(
    surface, _COARSE * fwhm_mm
  ).astype(np.float32)


class SyntheticFlat:
  """The generator for one spec: fixed patterns, per-trial draws, flat-map resampling.

  Everything is linear in the vertex values up to the final z-scoring, so the fixed
  patterns and the bump bases are resampled to the in-mask pixels once, and per-trial work
  happens on pixels (and the white vertex noise goes through the sparse resampler).
  """

  def __init__(self, spec: SyntheticFlatSpec):
    _check(spec)
    self.spec = spec
    surface = load_flat_surface(spec.space)
    self.resampler = FlatMapResampler.fit(
      surface, height=spec.height, width=spec.width, pixel_size=spec.pixel_size
    )
    self.cortex = np.flatnonzero(surface.cortex)
    labels, names = network_labels(spec.space)
    self.network_names = names
    fine, coarse = _bases(spec.space, float(spec.smoothness_mm))
    # Pixel <- cortex-vertex operator restricted to the mask.
    mask_rows = np.flatnonzero(self.resampler.mask.ravel())
    to_px = self.resampler.pixels_from_vertices[mask_rows][:, self.cortex].tocsr()
    self._to_px = to_px
    rng = np.random.default_rng([spec.seed, 7919])

    def field(scale_fine: float = 0.5) -> np.ndarray:
      wc = rng.standard_normal(coarse.shape[1]).astype(np.float32)
      wf = rng.standard_normal(fine.shape[1]).astype(np.float32)
      return _unit(coarse @ wc) + scale_fine * _unit(fine @ wf)

    net = labels[self.cortex]
    networks = [n for n in range(1, len(names)) if np.any(net == n)]
    # Soft network membership: the network indicator blurred at the fine scale.
    ones = fine @ (fine.T @ np.ones(len(net), np.float32)) + 1e-6
    member = {n: fine @ (fine.T @ (net == n).astype(np.float32)) / ones for n in networks}
    self.component_networks = [networks[c % len(networks)] for c in range(spec.num_components)]
    components = np.stack([_unit(field() * member[n]) for n in self.component_networks])
    visual = next((n for n in networks if names[n].lower().startswith("vis")), networks[0])
    self.visual_network = visual
    emphasis = 0.2 + 0.8 * member[visual]
    evoked = _unit(np.abs(field()) * member[visual])
    classes = np.stack([_unit(field() * emphasis) for _ in range(spec.num_classes)])
    subjects = np.stack([_unit(field()) for _ in range(spec.num_subjects)])
    # (n, Vc) -> (n, Pm) for the fixed patterns.
    self.components = ((to_px @ components.T).T / np.sqrt(spec.num_components)).astype(np.float32)
    self.class_patterns = (to_px @ classes.T).T
    self.evoked_pattern = to_px @ evoked
    self.subject_patterns = (to_px @ subjects.T).T
    # Per-trial smooth noise bases on pixels, scaled to unit mean variance on vertices.
    self._noise_bases = [
      ((to_px @ b) / np.sqrt(b.multiply(b).sum(axis=1).mean())).astype(np.float32).tocsr()
      for b in (fine, coarse)
    ]

  def labels(self, subject: int) -> np.ndarray:
    """Balanced, shuffled stimulus classes of one subject's trials."""
    spec = self.spec
    rng = np.random.default_rng([spec.seed, subject, _LABEL_STREAM])
    return rng.permutation(np.arange(spec.trials_per_subject) % spec.num_classes)

  def pixel_activity(self, subject: int, trials: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, Pm) float32 in-mask activity before normalisation."""
    spec = self.spec
    n = len(trials)
    fine, coarse = self._noise_bases
    weights = np.empty((n, spec.num_components), np.float32)
    amplitude = np.empty((n, 1), np.float32)
    w_fine = np.empty((n, fine.shape[1]), np.float32)
    w_coarse = np.empty((n, coarse.shape[1]), np.float32)
    noise = np.empty((n, len(self.cortex)), np.float32)
    for i, trial in enumerate(trials):
      rng = np.random.default_rng([spec.seed, subject, int(trial)])
      weights[i] = rng.standard_normal(spec.num_components, dtype=np.float32)
      amplitude[i] = 1.0 + spec.amplitude_jitter * rng.standard_normal()
      rng.standard_normal(out=w_fine[i], dtype=np.float32)
      rng.standard_normal(out=w_coarse[i], dtype=np.float32)
      rng.standard_normal(out=noise[i], dtype=np.float32)
    x = spec.component_scale * (weights @ self.components)
    evoked = (
      spec.evoked_scale * self.evoked_pattern + spec.class_scale * self.class_patterns[labels]
    )
    x += amplitude * evoked
    x += spec.subject_scale * self.subject_patterns[subject]
    smooth = (fine @ w_fine.T + coarse @ w_coarse.T).T
    x += (spec.smooth_noise / np.sqrt(2.0)) * smooth
    x += spec.noise * (self._to_px @ noise.T).T
    return x

  def maps(self, subject: int, trials: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((n, H, W) float32 activity, (n,) labels) for some trials of one subject."""
    trials = np.asarray(trials, np.int64)
    bad = (trials < 0) | (trials >= self.spec.trials_per_subject)
    if not 0 <= subject < self.spec.num_subjects or bad.any():
      raise ValueError(
        f"SyntheticFlat.maps: expected subject in [0, {self.spec.num_subjects}) and trials in "
        f"[0, {self.spec.trials_per_subject}); found subject {subject}, trials {trials[bad]}"
      )
    labels = self.labels(subject)[trials]
    inside = self.pixel_activity(subject, trials, labels)
    inside -= inside.mean(axis=1, keepdims=True)
    inside /= np.maximum(inside.std(axis=1, keepdims=True), 1e-12)
    mask = self.resampler.mask
    maps = np.zeros((len(trials), *mask.shape), np.float32)
    maps[:, mask] = np.clip(inside, -CLIP, CLIP)
    return maps, labels

  def example(self, subject: int, trial: int) -> dict:
    """One trial as the iterator yields it."""
    maps, labels = self.maps(subject, np.array([trial]))
    return self._dict(maps[0], subject, int(labels[0]), trial)

  def _dict(self, activity: np.ndarray, subject: int, label: int, trial: int) -> dict:
    return {
      "activity": activity,
      "subject_id": int(subject),
      "label": int(label),
      "trial_id": int(trial),
      "session": int(trial) // self.spec.trials_per_session,
    }

  def __iter__(self) -> Iterator[dict]:
    """Every subject's trials in order (subject-major)."""
    chunk = 128
    for subject in range(self.spec.num_subjects):
      for start in range(0, self.spec.trials_per_subject, chunk):
        trials = np.arange(start, min(start + chunk, self.spec.trials_per_subject))
        maps, labels = self.maps(subject, trials)
        for i, trial in enumerate(trials):
          yield self._dict(maps[i], subject, int(labels[i]), int(trial))


def generate_flat_maps(spec: SyntheticFlatSpec) -> tuple[FlatMapResampler, Iterator[dict]]:
  """(resampler, iterator over every subject's trials as example dicts).

  Example dicts: activity (H, W) float32 in [-2.5, 2.5], 0 outside the mask; subject_id;
  label in [0, num_classes); trial_id (within subject); session.
  """
  gen = SyntheticFlat(spec)
  return gen.resampler, iter(gen)
