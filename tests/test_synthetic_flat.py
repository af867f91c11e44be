"""The embedded synthetic flat maps: deterministic, bounded, smooth, with a class signal."""

import dataclasses

import numpy as np
import pytest

from boldjax.data.synthetic_flat import SyntheticFlatSpec, generate_flat_maps

SPEC = SyntheticFlatSpec(height=64, num_subjects=3, trials_per_subject=80, num_classes=4)


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
  assert not np.allclose(next(other)["activity"], maps[0])
  assert [e["subject_id"] for e in examples] == [s for s in range(3) for _ in range(80)]


def test_values_bounded_and_zero_outside_mask(data):
  resampler, _, maps = data
  assert np.isfinite(maps).all()
  assert (maps[:, ~resampler.mask] == 0).all()
  assert maps.min() >= -2.5 and maps.max() <= 2.5
  assert 0.5 < maps[:, resampler.mask].std() < 1.5


def test_classes_are_decodable_and_shuffled_labels_are_not(data):
  resampler, examples, maps = data
  x = maps[:, resampler.mask]
  y = np.array([e["label"] for e in examples])
  assert np.bincount(y).tolist() == [60] * 4  # balanced per subject

  def ncm_accuracy(labels):
    train = np.arange(len(labels)) % 2 == 0
    means = np.stack([x[train & (labels == k)].mean(0) for k in range(4)])
    scores = x[~train] @ means.T - 0.5 * (means**2).sum(1)
    return (scores.argmax(1) == labels[~train]).mean()

  assert ncm_accuracy(y) > 0.5  # chance is 0.25
  shuffled = np.random.default_rng(0).permutation(y)
  assert ncm_accuracy(shuffled) < 0.4


def test_maps_are_spatially_smooth(data):
  resampler, _, maps = data
  m = resampler.mask
  both = m[:, :-1] & m[:, 1:]
  left, right = maps[:, :, :-1][:, both], maps[:, :, 1:][:, both]
  r = np.corrcoef(left.ravel(), right.ravel())[0, 1]
  assert r > 0.5
