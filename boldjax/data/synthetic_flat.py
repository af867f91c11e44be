"""The embedded default data: synthetic flat maps on real cortical geometry.

Each trial is built on the surface's vertices and resampled to the flat-map grid:

  activity = network components (smooth fields living inside one network each, random
             weights per trial)
           + a stimulus-class pattern (K fixed smooth patterns, strongest in the visual
             network, with trial-to-trial amplitude jitter): what probes should find
           + a per-subject smooth offset
           + white vertex noise,

then z-scored over the cortex and clipped to +-2.5 like NSD-Flat. Smooth fields are
combinations of Gaussian bumps on the sphere (sigma = smoothness_mm on a 100 mm sphere),
computed once, so thousands of maps take seconds. Every trial draws from its own
generator seeded by (seed, subject, trial), so any example can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from boldjax.geometry import FlatMapResampler, load_flat_surface, network_labels

CLIP = 2.5


@dataclasses.dataclass(frozen=True)
class SyntheticFlatSpec:
  space: str = "fsLR32k"
  height: int | None = 96
  width: int | None = None
  pixel_size: float | None = None
  num_subjects: int = 8
  trials_per_subject: int = 400
  num_classes: int = 8
  num_components: int = 16
  num_bumps: int = 256
  smoothness_mm: float = 14.0
  component_scale: float = 1.0
  class_scale: float = 1.0
  subject_scale: float = 0.5
  noise: float = 0.5
  trials_per_session: int = 100
  seed: int = 0


@dataclasses.dataclass
class _Patterns:
  components: np.ndarray  # (C, Vc)
  classes: np.ndarray  # (K, Vc)
  subjects: np.ndarray  # (S, Vc)


def make_resampler(spec: SyntheticFlatSpec) -> FlatMapResampler:
  surface = load_flat_surface(spec.space)
  return FlatMapResampler.fit(
    surface, height=spec.height, width=spec.width, pixel_size=spec.pixel_size
  )


def _unit(x: np.ndarray) -> np.ndarray:
  """Zero mean, unit std along the last axis."""
  x = x - x.mean(axis=-1, keepdims=True)
  return x / (x.std(axis=-1, keepdims=True) + 1e-12)


def make_patterns(spec: SyntheticFlatSpec) -> tuple[np.ndarray, _Patterns]:
  """(cortex vertex indices, smooth component/class/subject patterns over them)."""
  surface = load_flat_surface(spec.space)
  labels, names = network_labels(spec.space)
  cortex = np.flatnonzero(surface.cortex)
  rng = np.random.default_rng([spec.seed, 7919])
  xyz = surface.sphere[cortex]
  xyz = 100.0 * xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
  hemi = surface.hemisphere[cortex]
  centres = rng.choice(len(cortex), size=spec.num_bumps, replace=False)
  # Gaussian bumps; a bump never crosses to the other hemisphere.
  d2 = ((xyz[:, None, :] - xyz[None, centres, :]) ** 2).sum(-1)
  bumps = np.exp(-d2 / (2 * spec.smoothness_mm**2)) * (hemi[:, None] == hemi[None, centres])
  bumps = bumps.astype(np.float32)  # (Vc, M)

  net = labels[cortex]
  networks = [n for n in range(1, len(names)) if np.any(net == n)]
  weight = bumps.sum(axis=1) + 1e-6
  membership = {n: bumps @ (net[centres] == n).astype(np.float32) / weight for n in networks}

  components = []
  for c in range(spec.num_components):
    n = networks[c % len(networks)]
    field = bumps @ rng.normal(size=spec.num_bumps).astype(np.float32)
    components.append(_unit(field * membership[n]))
  visual = next((n for n in networks if names[n].lower().startswith("visual")), networks[0])
  emphasis = 0.25 + membership[visual]
  classes = [
    _unit((bumps @ rng.normal(size=spec.num_bumps)) * emphasis) for _ in range(spec.num_classes)
  ]
  subjects = [_unit(bumps @ rng.normal(size=spec.num_bumps)) for _ in range(spec.num_subjects)]
  return cortex, _Patterns(np.stack(components), np.stack(classes), np.stack(subjects))


def subject_labels(spec: SyntheticFlatSpec, subject: int) -> np.ndarray:
  """Balanced, shuffled stimulus classes of one subject's trials."""
  rng = np.random.default_rng([spec.seed, subject, 104729])
  labels = np.arange(spec.trials_per_subject) % spec.num_classes
  return rng.permutation(labels)


def vertex_activity(spec, patterns: _Patterns, subject: int, trials, labels) -> np.ndarray:
  """(len(trials), Vc) float32 cortex activity, z-scored and clipped."""
  out = np.empty((len(trials), patterns.components.shape[1]), np.float32)
  for row, (trial, label) in enumerate(zip(trials, labels, strict=True)):
    rng = np.random.default_rng([spec.seed, subject, int(trial)])
    weights = rng.normal(size=len(patterns.components)).astype(np.float32)
    amplitude = 1.0 + 0.25 * rng.normal()
    x = spec.component_scale * (weights @ patterns.components)
    x += spec.class_scale * amplitude * patterns.classes[label]
    x += spec.subject_scale * patterns.subjects[subject]
    x += spec.noise * rng.standard_normal(x.shape[0], dtype=np.float32)
    out[row] = x
  return np.clip(_unit(out), -CLIP, CLIP)


def generate_flat_maps(
  spec: SyntheticFlatSpec, chunk: int = 256
) -> tuple[FlatMapResampler, Iterator[dict]]:
  """(resampler, iterator over every subject's trials as example dicts)."""
  if spec.num_subjects < 1 or spec.trials_per_subject < 1 or spec.num_classes < 2:
    raise ValueError(
      "SyntheticFlatSpec: need num_subjects >= 1, trials_per_subject >= 1, num_classes >= 2; "
      f"found {spec.num_subjects}, {spec.trials_per_subject}, {spec.num_classes}"
    )
  resampler = make_resampler(spec)
  cortex, patterns = make_patterns(spec)

  def examples() -> Iterator[dict]:
    full = np.zeros((chunk, resampler.num_vertices), np.float32)
    for subject in range(spec.num_subjects):
      labels = subject_labels(spec, subject)
      for start in range(0, spec.trials_per_subject, chunk):
        trials = np.arange(start, min(start + chunk, spec.trials_per_subject))
        acts = vertex_activity(spec, patterns, subject, trials, labels[trials])
        full[: len(trials), cortex] = acts
        maps = resampler.to_pixels(full[: len(trials)])
        maps = np.clip(maps, -CLIP, CLIP) * resampler.mask
        for i, trial in enumerate(trials):
          yield {
            "activity": maps[i],
            "subject_id": subject,
            "label": int(labels[trial]),
            "trial_id": int(trial),
            "session": int(trial) // spec.trials_per_session,
          }

  return resampler, examples()
