"""The embedded synthetic flat maps: deterministic, bounded, smooth, with a real class signal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from boldjax.data.synthetic_flat import (
  CLIP,
  SyntheticFlat,
  SyntheticFlatSpec,
  bump_basis,
  generate_flat_maps,
)
from boldjax.geometry import load_flat_surface, network_labels

K = 4
SPEC = SyntheticFlatSpec(
  height=64, num_subjects=3, trials_per_subject=80, trials_per_session=20, num_classes=K
)


@pytest.fixture(scope="module")
def data():
  resampler, it = generate_flat_maps(SPEC)
  examples = list(it)
  maps = np.stack([e["activity"] for e in examples])
  return resampler, examples, maps


def test_deterministic_and_seed_dependent(data):
  _, examples, maps = data
  _, again = generate_flat_maps(SPEC)
  np.testing.assert_array_equal(np.stack([e["activity"] for e in again]), maps)
  _, other = generate_flat_maps(dataclasses.replace(SPEC, seed=1))
  other = np.stack([next(other)["activity"] for _ in range(3)])
  assert np.abs(other - maps[:3]).mean() > 0.5


def test_examples_regenerate_alone(data):
  _, examples, maps = data
  gen = SyntheticFlat(SPEC)
  for i in (0, 37, 80 + 79, 2 * 80 + 5):
    ex = gen.example(examples[i]["subject_id"], examples[i]["trial_id"])
    assert {k: v for k, v in ex.items() if k != "activity"} == {
      k: v for k, v in examples[i].items() if k != "activity"
    }
    np.testing.assert_allclose(ex["activity"], maps[i], atol=1e-5)


def test_fields(data):
  _, examples, _ = data
  assert [e["subject_id"] for e in examples] == [s for s in range(3) for _ in range(80)]
  assert [e["trial_id"] for e in examples] == list(range(80)) * 3
  assert [e["session"] for e in examples] == [t // 20 for t in range(80)] * 3
  for s in range(3):
    labels = np.array([e["label"] for e in examples if e["subject_id"] == s])
    np.testing.assert_array_equal(np.bincount(labels), [80 // K] * K)  # balanced
  first = np.array([e["label"] for e in examples[:80]])
  second = np.array([e["label"] for e in examples[80:160]])
  assert (first != second).any()  # shuffled per subject


def test_values_bounded_zscored_and_zero_outside_mask(data):
  resampler, _, maps = data
  assert maps.dtype == np.float32 and maps.shape[1:] == resampler.mask.shape
  assert np.isfinite(maps).all()
  assert (maps[:, ~resampler.mask] == 0).all()
  inside = maps[:, resampler.mask]
  assert inside.min() >= -CLIP and inside.max() <= CLIP
  assert np.abs(inside.mean(axis=1)).max() < 0.05
  std = inside.std(axis=1)
  assert std.min() > 0.8 and std.max() <= 1.0 + 1e-5  # clipping only shrinks
  assert 0.001 < (np.abs(inside) == CLIP).mean() < 0.05  # some clipping, like NSD-Flat


def test_class_signal_is_decodable_and_shuffle_is_not(data):
  resampler, examples, maps = data
  x = maps[:, resampler.mask].astype(np.float64)
  y = np.array([e["label"] for e in examples])
  train = np.arange(len(y)) % 2 == 0

  def ncm_accuracy(labels: np.ndarray) -> float:
    means = np.stack([x[train & (labels == k)].mean(axis=0) for k in range(K)])
    dist = ((x[~train, None, :] - means[None]) ** 2).sum(-1)
    return float((dist.argmin(axis=1) == y[~train]).mean())

  assert ncm_accuracy(y) > 2 / K
  shuffled = np.random.default_rng(0).permutation(y)
  assert ncm_accuracy(shuffled) < 1 / K + 0.12


def test_neighbouring_pixels_correlate(data):
  resampler, _, maps = data
  m = resampler.mask
  both = m[:, :-1] & m[:, 1:]
  a, b = maps[:, :, :-1][:, both], maps[:, :, 1:][:, both]
  a, b = a - a.mean(0), b - b.mean(0)
  corr = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
  assert np.median(corr) > 0.5
  # pixels half the mask apart (mostly other hemisphere) much less
  half = a.shape[1] // 2
  c, d = a[:, :half], b[:, half : 2 * half]
  far = (c * d).sum(0) / np.sqrt((c * c).sum(0) * (d * d).sum(0))
  assert np.median(np.abs(far)) < 0.25


def test_evoked_response_is_strongest_in_visual_network():
  gen = SyntheticFlat(dataclasses.replace(SPEC, height=48))
  labels, names = network_labels(SPEC.space)
  pixel_net = np.rint(gen.resampler.to_pixels(labels.astype(np.float32)))[gen.resampler.mask]
  visual = pixel_net == names.index("Visual")
  for pattern in [gen.evoked_pattern, *gen.class_patterns]:
    assert np.abs(pattern[visual]).mean() > 2 * np.abs(pattern[~visual]).mean()


def test_bump_basis_is_smooth_and_local():
  surface = load_flat_surface("fsaverage5")
  basis = bump_basis(surface, 20.0)
  assert basis.shape[0] == int(surface.cortex.sum())
  assert basis.max() == pytest.approx(1.0)  # each centre is on a vertex
  sigma = 20.0 / np.sqrt(8 * np.log(2))
  assert basis.data.min() >= np.exp(-4.5) - 1e-12  # cut at 3 sigma
  # every cortex vertex is covered by several bumps
  assert np.diff(basis.indptr).min() >= 3
  assert 100 < basis.shape[1] < 4 * 2 * 4 * np.pi * 80**2 / sigma**2


def test_fsaverage5_space_works():
  spec = dataclasses.replace(SPEC, space="fsaverage5", trials_per_subject=8, num_subjects=1)
  resampler, it = generate_flat_maps(spec)
  maps = np.stack([e["activity"] for e in it])
  assert maps.shape == (8, 64, resampler.width) and resampler.surface_name == "fsaverage5"
  assert (maps[:, ~resampler.mask] == 0).all() and np.isfinite(maps).all()


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("num_classes", 1, "'num_classes' expected an integer >= 2, found 1"),
    ("noise", -1.0, "'noise' expected >= 0, found -1.0"),
    ("smoothness_mm", 0.0, "'smoothness_mm' expected > 0"),
  ],
)
def test_bad_spec(field, value, match):
  with pytest.raises(ValueError, match=match):
    generate_flat_maps(dataclasses.replace(SPEC, **{field: value}))


def test_bad_trial():
  gen = SyntheticFlat(dataclasses.replace(SPEC, height=32))
  with pytest.raises(ValueError, match=r"trials in \[0, 80\)"):
    gen.maps(0, np.array([80]))
