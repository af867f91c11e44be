"""Negative controls for the end-to-end value checks: `pytest --control=NAME`.

A value check ("the probe beats chance by a margin") is only worth something if it fails
when the signal it claims to measure is removed. Tests marked
`@pytest.mark.value_check("shuffled_labels", ...)` run under `--control=NAME` with that
signal removed and are expected to fail their value assertion (strict xfail: an XPASS is a
failure of the suite). Tests not marked for the control are skipped.

- shuffled_labels: the synthetic generators keep their signal but write labels unrelated
  to it (flat maps: each subject's classes permuted across its trials; parcellated runs:
  each run's states relabelled by a random permutation, so blocks stay blocks but the
  state names no longer match the patterns across runs and subjects; encoding stimuli: the
  planted responses are permuted across images).
- untrained: the model the value is read from never learns: `config.task.init_from` grafts
  nothing and the optimizer makes no updates, so it stays at its random init. Only for
  runs long enough for training to matter.

The controls write their datasets to a private cache, never to the one other tests share.
"""

from __future__ import annotations

import numpy as np
import pytest

CONTROLS = ("shuffled_labels", "untrained")
_SEED = 20261203


def _shuffle_flat_labels(monkeypatch) -> None:
  from boldjax.data import synthetic_flat

  original = synthetic_flat.SyntheticFlat.maps

  def maps(self, subject, trials):
    activity, labels = original(self, subject, trials)
    rng = np.random.default_rng([_SEED, subject, *np.asarray(trials, np.int64)[:1]])
    return activity, rng.permutation(labels)

  monkeypatch.setattr(synthetic_flat.SyntheticFlat, "maps", maps)


def _shuffle_bold_states(monkeypatch) -> None:
  from boldjax.data import synthetic_bold

  original = synthetic_bold.SyntheticBold.run

  def run(self, subject, run_index):
    record = original(self, subject, run_index)
    perm = np.random.default_rng([_SEED, subject, run_index]).permutation(self.spec.num_states)
    frames = record["frame_labels"]
    record["frame_labels"] = np.where(frames >= 0, perm[np.maximum(frames, 0)], frames).astype(
      frames.dtype
    )
    record["block_label"] = perm[record["block_label"]].astype(record["block_label"].dtype)
    return record

  monkeypatch.setattr(synthetic_bold.SyntheticBold, "run", run)


def _shuffle_encoding_responses(monkeypatch) -> None:
  from boldjax.data import synthetic_encoding

  original = synthetic_encoding.with_noise

  def with_noise(signal, noise_ceiling, rng):
    responses = original(signal, noise_ceiling, rng)
    return responses[np.random.default_rng(_SEED).permutation(len(responses))]

  monkeypatch.setattr(synthetic_encoding, "with_noise", with_noise)


def _untrained(monkeypatch) -> None:
  import optax

  from boldjax import optim
  from boldjax.tasks import base, decode, dino

  def graft_nothing(params, *args, **kwargs):
    return params

  for module in (base, decode, dino):
    monkeypatch.setattr(module, "graft_pretrained", graft_nothing)
  make_optimizer = optim.make_optimizer

  def no_updates(*args, **kwargs):
    _, schedule = make_optimizer(*args, **kwargs)
    return optax.set_to_zero(), schedule

  monkeypatch.setattr(optim, "make_optimizer", no_updates)


def apply(name: str, monkeypatch, tmp_path_factory) -> None:
  """Remove the signal `name` stands for, for the rest of one test."""
  monkeypatch.setenv("BOLDJAX_CACHE", str(tmp_path_factory.mktemp(f"control-{name}-cache")))
  if name == "shuffled_labels":
    _shuffle_flat_labels(monkeypatch)
    _shuffle_bold_states(monkeypatch)
    _shuffle_encoding_responses(monkeypatch)
  elif name == "untrained":
    _untrained(monkeypatch)
  else:
    raise ValueError(f"--control: expected one of {CONTROLS}, found {name!r}")


def mark_items(control: str, items) -> None:
  """Expect the marked value checks to fail their assertion; skip the rest."""
  for item in items:
    marker = item.get_closest_marker("value_check")
    if marker is None or control not in marker.args:
      item.add_marker(pytest.mark.skip(reason=f"--control={control}: not a value check for it"))
    else:
      item.add_marker(
        pytest.mark.xfail(
          strict=True, raises=AssertionError, reason=f"--control={control} removes the signal"
        )
      )
