"""Probes on arrays whose answer is known: separable -> 1.0, noise -> chance, crop logits
averaged, attention pooling equal to plain multi-head attention, subject-wise splits."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from boldjax.evals import heads as heads_lib
from boldjax.evals import probe_evaluator, probes

FAST = probes.ProbeOptions(
  linear_epochs=20, head_steps=150, head_lrs=(1e-3, 1e-2), logistic_cs=(0.1, 1.0)
)


def _subjects(n_sub: int, per: int) -> np.ndarray:
  return np.repeat(np.arange(n_sub), per)


def _data(x, y, subjects, seed=0):
  split = probes.subject_splits(subjects, seed)
  idx = probes.split_indices(subjects, split)
  take = lambda a, i: jax.tree.map(lambda v: np.asarray(v)[i], a)
  return {k: (take(x, i), y[i]) for k, i in idx.items()}


def test_balanced_accuracy_matches_sklearn():
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
  assert probes.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
  assert probes.balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5


@pytest.mark.parametrize("protocol", ["linear", "logistic", "mlp"])
def test_separable_vectors_reach_one(protocol):
  rng = np.random.default_rng(1)
  subjects = _subjects(10, 24)
  y = np.tile(np.arange(3), 80)
  centres = 4.0 * rng.standard_normal((3, 16))
  x = (centres[y] + 0.1 * rng.standard_normal((240, 16)))[:, None].astype(np.float32)
  res = probes.PROTOCOLS[protocol](_data(x, y, subjects), 3, 0, FAST)
  assert res.test == 1.0
  assert res.val == 1.0


def test_separable_tokens_attentive_reaches_one():
  rng = np.random.default_rng(2)
  n, t, d = 240, 12, 16
  subjects, y = _subjects(12, 20), np.tile(np.arange(2), 120)
  tokens = rng.standard_normal((n, t, d)).astype(np.float32)
  where = rng.integers(0, t, n)  # the class lives in one token at a random position
  tokens[np.arange(n), where, :4] += np.where(y[:, None] == 1, 3.0, -3.0)
  tokens[np.arange(n), where, 4] = 8.0  # and is marked, so one query can find it
  mask = np.ones((n, t), bool)
  x = (tokens[:, None].astype(np.float16), mask[:, None])
  opts = probes.ProbeOptions(head_steps=300, head_lrs=(3e-3, 1e-2))
  res = probes.attentive_probe(_data(x, y, subjects), 2, 0, opts)
  assert res.test == 1.0


@pytest.mark.parametrize("protocol", ["linear", "logistic"])
def test_label_independent_noise_is_near_chance(protocol):
  rng = np.random.default_rng(3)
  subjects = _subjects(12, 30)
  y = rng.integers(0, 4, 360)
  x = rng.standard_normal((360, 1, 24)).astype(np.float32)
  out = probe_evaluator.run_benchmark(
    [probe_evaluator.FeatureRow("noise", "vector", x)],
    y,
    subjects,
    protocols=[protocol],
    repeats=3,
    options=FAST,
    log=None,
  )
  cell = out["rows"]["noise"][protocol]
  assert out["chance"] == 0.25
  assert abs(cell["mean"] - 0.25) < 0.08, cell
  assert len(cell["test"]) == 3 and all(0 <= v <= 1 for v in cell["test"])


def test_crop_average_is_logit_average_not_vote():
  # Two crops vote class 0 mildly, one votes class 1 strongly: the mean logit says 1.
  logits = np.array([[[2.0, 0.0], [2.0, 0.0], [-10.0, 0.0]]])
  np.testing.assert_allclose(probes.crop_average(logits), [[-2.0, 0.0]])
  assert probes.score(logits, np.array([1])) == 1.0
  assert probes.score(logits, np.array([0])) == 0.0
  assert probes.score(np.full((1, 1, 2), np.nan), np.array([0])) == -1.0


def test_probe_predictions_average_per_crop_logits():
  rng = np.random.default_rng(4)
  n, k, f = 40, 3, 8
  x = rng.standard_normal((n, k, f)).astype(np.float32)
  head = heads_lib.LinearHead(4)
  params, state = head.init(jax.random.key(0), jnp.asarray(x[:1, 0]))
  params = jax.tree.map(lambda a: a[None] + 0.3 * rng.standard_normal(a.shape), params)
  state = {"mean": jnp.asarray(rng.standard_normal((1, f))), "var": jnp.ones((1, f)) * 2.0}
  per_crop = heads_lib.predict_logits(head, params, state, x)[0]  # (n, K, C)
  for c in range(k):
    alone = heads_lib.predict_logits(head, params, state, x[:, c : c + 1])[0][:, 0]
    np.testing.assert_allclose(per_crop[:, c], alone, rtol=1e-5, atol=1e-5)
  expected = np.stack([x[:, c] for c in range(k)], 1)
  z = (expected - np.asarray(state["mean"][0])) / np.sqrt(2.0 + 1e-5)
  manual = z * np.asarray(params["bn"]["scale"][0]) + np.asarray(params["bn"]["bias"][0])
  manual = manual @ np.asarray(params["fc"]["w"][0]) + np.asarray(params["fc"]["b"][0])
  np.testing.assert_allclose(per_crop, manual, rtol=1e-4, atol=1e-4)
  y = np.argmax(manual.mean(axis=1), axis=-1)
  assert probes.score(per_crop, y) == 1.0


def test_batchnorm_ignores_padding_rows_and_updates_like_torch():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  w = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
  p, s = heads_lib._bn_init(3)
  y, new = heads_lib._batchnorm(p, s, x, w, True)
  real = np.asarray(x[:4])
  z = (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y[:4]), z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new["mean"]), 0.1 * real.mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new["var"]), 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)


def test_attentive_head_equals_plain_multi_head_attention():
  rng = np.random.default_rng(6)
  b, n, d, h = 3, 7, 8, 2
  head = heads_lib.AttentiveHead(num_classes=3, num_heads=h)
  tokens = rng.standard_normal((b, n, d)).astype(np.float32)
  mask = np.ones((b, n), bool)
  mask[1, 4:] = False
  params, _ = head.init(jax.random.key(1), (jnp.asarray(tokens), jnp.asarray(mask)))
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape), params)
  got = np.asarray(head.apply(params, {}, (tokens, mask), None, False)[0])
  garbage = tokens.copy()
  garbage[~mask] = 1e3  # masked tokens must not matter
  again = np.asarray(head.apply(params, {}, (garbage, mask), None, False)[0])
  np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)

  p = jax.tree.map(np.asarray, params)
  mu = tokens.mean(-1, keepdims=True)
  ln = (tokens - mu) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
  ln = ln * p["ln"]["scale"] + p["ln"]["bias"]
  dh = d // h
  outs = []
  for i in range(b):
    heads = []
    for j in range(h):
      keys = ln[i] @ p["wk"][j]  # (n, dh): every token projected, as nn.MultiheadAttention
      vals = ln[i] @ p["wv"][j]
      s = keys @ p["query"][j] / math.sqrt(dh)
      s = np.where(mask[i], s, -np.inf)
      a = np.exp(s - s.max())
      a /= a.sum()
      heads.append(a @ vals)
    o = np.concatenate(heads) @ p["out"]["w"] + p["out"]["b"]
    outs.append(o @ p["fc"]["w"] + p["fc"]["b"])
  np.testing.assert_allclose(got, np.stack(outs), rtol=1e-4, atol=1e-4)


def test_subject_splits_are_disjoint_and_sized():
  subjects = _subjects(12, 5)
  seen = set()
  for seed in range(4):
    s = probes.subject_splits(subjects, seed)
    assert [len(s[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    parts = [set(s[k].tolist()) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(12))
    idx = probes.split_indices(subjects, s)
    for a in ("train", "val", "test"):
      for b in ("train", "val", "test"):
        if a < b:
          assert not set(subjects[idx[a]]) & set(subjects[idx[b]])
    assert sum(len(v) for v in idx.values()) == len(subjects)
    seen.add(tuple(s["test"].tolist()))
  assert len(seen) > 1  # seeds give different splits
  six = probes.subject_splits(_subjects(6, 2), 0)
  assert [len(six[k]) for k in ("train", "val", "test")] == [3, 1, 2]
  with pytest.raises(ValueError, match="at least 3 subjects"):
    probes.subject_splits(_subjects(2, 4), 0)


def test_subject_splits_stratify_subject_level_labels():
  subjects = _subjects(20, 3)
  trait = np.repeat(np.arange(20) % 2, 3)  # one label per subject
  for seed in range(3):
    s = probes.subject_splits(subjects, seed, labels=trait)
    test_traits = [int(trait[subjects == i][0]) for i in s["test"]]
    assert sorted(test_traits) == [0, 0, 1, 1]


def test_subject_splits_keep_few_training_subjects():
  subjects = _subjects(20, 3)
  for seed in range(3):
    full = probes.subject_splits(subjects, seed)
    few = probes.subject_splits(subjects, seed, train_subjects=2)
    assert len(few["train"]) == 2 and set(few["train"]) <= set(full["train"])
    np.testing.assert_array_equal(few["val"], full["val"])
    np.testing.assert_array_equal(few["test"], full["test"])
  for bad in (0, len(full["train"]) + 1):
    with pytest.raises(ValueError, match="train_subjects: expected 1..12"):
      probes.subject_splits(subjects, 0, train_subjects=bad)


def test_logistic_refit_on_val_is_optional():
  # val (5x the train examples) is labelled the other way round: the refit on train + val
  # learns val's rule, a fit on train alone keeps train's (which test shares).
  rng = np.random.default_rng(3)

  def split(n, flip):
    y = np.tile(np.arange(2), n // 2)
    x = np.where(y == 1, 3.0, -3.0)[:, None] + 0.1 * rng.standard_normal((n, 4))
    return x[:, None].astype(np.float32), (1 - y if flip else y)

  data = {"train": split(20, False), "val": split(100, True), "test": split(20, False)}
  kept = probes.logistic_probe(data, 2, 0, FAST)
  alone = probes.logistic_probe(data, 2, 0, dataclasses.replace(FAST, logistic_refit_on_val=False))
  assert alone.test == 1.0
  assert kept.test == 0.0


def test_run_benchmark_marks_inapplicable_cells():
  rng = np.random.default_rng(7)
  subjects, y = _subjects(6, 10), np.tile([0, 1], 30)
  rows = [
    probe_evaluator.FeatureRow("vec", "vector", rng.standard_normal((60, 1, 4)).astype(np.float32)),
    probe_evaluator.FeatureRow("fc", "vector", None, "no time axis"),
  ]
  out = probe_evaluator.run_benchmark(
    rows, y, subjects, protocols=["logistic", "attentive"], repeats=1, options=FAST, log=None
  )
  assert "na" in out["rows"]["vec"]["attentive"]
  assert out["rows"]["fc"]["logistic"] == {"na": "no time axis"}
  assert 0 <= out["rows"]["vec"]["logistic"]["mean"] <= 1
  assert out["splits"][0]["examples"] == {"train": 30, "val": 10, "test": 20}
  with pytest.raises(KeyError, match="unknown protocols"):
    probe_evaluator.run_benchmark(rows, y, subjects, protocols=["ridge"], log=None)
