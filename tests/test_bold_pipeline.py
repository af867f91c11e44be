"""Parcellated pipeline: chunks, z-scoring, pairs, decode blocks, eval padding, resume."""

from __future__ import annotations

import time

import numpy as np
import pytest

from boldjax import registry
from boldjax.data import bold_pipeline as bp
from boldjax.data import bold_records

SYNTH = dict(
  num_parcels=16,
  num_subjects=6,
  val_subjects=1,
  test_subjects=1,
  rest_runs=1,
  task_runs=2,
  run_seconds=120.0,
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = bp.default_config()
  c.cache_dir = str(tmp_path_factory.mktemp("bold_cache"))
  c.synthetic.update(SYNTH)
  return c


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_registered():
  assert registry.get("pipeline", "parcellated") is bp.BoldPipeline
  assert registry.get("pipeline", "synthetic_parcellated") is bp.BoldPipeline


def test_prepare_info(cfg):
  info = bp.prepare(cfg)
  assert info.num_parcels == 16 and info.networks.shape == (16,) and info.num_networks == 7
  assert set(info.networks.tolist()) == set(range(7)) and info.num_subjects == 6
  assert info.num_classes == 5 and info.split_sizes == {"train": 12, "val": 3, "test": 3}
  assert info.trs == [0.72, 1.0, 1.5, 2.0] and (info.seq_min, info.seq_max) == (10, 49)


def test_sample_chunk_matches_lfb_rule():
  rng = np.random.default_rng(0)
  for t in (5, 30, 200):
    for _ in range(200):
      start, length = bp.sample_chunk(rng, t, 10, 49)
      if t <= 10:
        assert (start, length) == (0, t)
        continue
      assert 10 <= length <= min(49, t) and start % length == 0
      assert start + length <= t and (length == t or start < t - length)


def test_pretrain_batches_values(cfg):
  info = bp.prepare(cfg)
  (b,) = _take(bp.make_dataset(cfg, info, split="train", train=True, seed=0, batch_size=8), 1)
  assert b["bold"].shape == (8, 49, 16) and b["bold"].dtype == np.float32
  ar = np.arange(49)
  np.testing.assert_array_equal(b["mask"], ar[None] < b["length"][:, None])
  np.testing.assert_allclose(b["t_sec"], ar[None] * b["tr"][:, None] * b["mask"], rtol=1e-6)
  assert (b["bold"][~b["mask"]] == 0).all() and (b["label"] == -1).all()
  assert ((b["length"] >= 10) & (b["length"] <= 49)).all()
  assert set(np.round(b["tr"].astype(np.float64), 2).tolist()) <= {0.72, 1.0, 1.5, 2.0}
  # every real chunk is a contiguous, z-scored piece of one of its subject's runs
  ds = bold_records.open_bold_dataset(info.path)
  src, idx = ds.split("train"), ds.split_index("train")
  for i in range(8):
    n, chunk = b["length"][i], b["bold"][i, : b["length"][i]]
    found = False
    for r in np.flatnonzero(np.asarray(idx["subject_id"]) == b["subject_id"][i]):
      run = bp.normalize_run(src[int(r)], "run", False, "test")
      for s in range(0, len(run) - n + 1, n):
        found |= np.array_equal(run[s : s + n], chunk)
    assert found, i


def test_zscore_policies(cfg):
  info = bp.prepare(cfg)
  rec = bold_records.open_bold_dataset(info.path).split("train")[0]
  z = bp.normalize_run(rec, "run", False, "x")
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1, atol=1e-4)
  np.testing.assert_array_equal(bp.normalize_run(rec, "none", False, "x"), rec["bold"])
  with pytest.raises(ValueError, match="zscore='stored' needs fields 'mean'/'std'"):
    bp.normalize_run(rec, "stored", False, "x")
  stats = dict(rec, mean=np.full(16, 2.0, np.float32), std=np.full(16, 4.0, np.float32))
  stats["has_stats"] = True
  np.testing.assert_allclose(
    bp.normalize_run(stats, "stored", False, "x"), (rec["bold"].astype(np.float32) - 2) / 4
  )
  with pytest.raises(ValueError, match="zscore"):
    bp.prepare(dict(cfg.to_dict(), zscore="stored"))


def test_pairs_consecutive_and_not():
  rng = np.random.default_rng(0)
  run = rng.standard_normal((100, 4)).astype(np.float32)
  other = np.full((60, 4), 7.0, np.float32)

  class Runs:
    rows = np.asarray([[0, -1, 100, -1], [1, -1, 60, -1]])

    def __len__(self):
      return 2

    def run(self, record):
      return {"bold": [run, other][record], "tr": np.float32([1.0, 2.0][record])}

  ms = bp.MakeSequence(10, 49, pairs=True, others=Runs(), other_subjects=np.asarray([0, 1]))
  element = {
    "bold": run,
    "tr": np.float32(1.0),
    "subject_id": np.int32(0),
    "record": np.int64(0),
    "start": np.int64(-1),
    "crop": np.int64(100),
    "label": np.int32(-1),
  }
  flags = []
  for seed in range(200):
    ex = ms.random_map(element, np.random.default_rng(seed))
    n_a, n_b = ex["length"], ex["length_next"]
    assert 10 <= n_a + n_b <= 49 and abs(int(n_a) - int(n_b)) <= 1
    a, b = ex["bold"][:n_a], ex["bold_next"][:n_b]
    s = int(np.flatnonzero((run == a[0]).all(1))[0])
    np.testing.assert_array_equal(run[s : s + n_a], a)
    if ex["next_is_consecutive"]:
      np.testing.assert_array_equal(run[s + n_a : s + n_a + n_b], b)
      np.testing.assert_allclose(ex["t_sec_next"][:n_b], np.arange(n_b) * 1.0)
    else:
      assert (b == 7.0).all()
      np.testing.assert_allclose(ex["t_sec_next"][:n_b], np.arange(n_b) * 2.0)
    flags.append(bool(ex["next_is_consecutive"]))
  assert 0.4 < np.mean(flags) < 0.6


def test_pairs_pipeline_keys(cfg):
  c = cfg.copy_and_resolve_references()
  c.pairs = True
  info = bp.prepare(c)
  (b,) = _take(bp.make_dataset(c, info, split="train", train=True, seed=1, batch_size=8), 1)
  for k in ("bold_next", "t_sec_next", "mask_next", "length_next", "next_is_consecutive"):
    assert k in b
  assert b["bold_next"].shape == (8, 49, 16) and b["next_is_consecutive"].dtype == bool


def test_decode_blocks_and_train_subjects(cfg):
  c = cfg.copy_and_resolve_references()
  c.mode = "decode"
  info = bp.prepare(c)
  ds = bold_records.open_bold_dataset(info.path)
  rows = bp.plan(ds, "test", c)
  idx = ds.split_index("test")
  expect = sum(len(b) for b in idx["block_label"])
  assert len(rows) == expect == info.split_sizes["test"]
  i, start, n, label = rows[0]
  tr = idx["tr"][i]
  assert (
    start == round((idx["block_onset_s"][i][0] + 5.0) / tr) and label == idx["block_label"][i][0]
  )
  assert n == round(16.0 / tr)
  batches = list(bp.make_dataset(c, info, split="test", train=False, seed=0, batch_size=8))
  labels = np.concatenate([b["label"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(rows) and len(valid) % 8 == 0
  np.testing.assert_array_equal(labels[valid], rows[:, 3])
  lengths = np.concatenate([b["length"] for b in batches])
  np.testing.assert_array_equal(lengths[valid], rows[:, 2])
  assert (lengths[~valid] == c.seq_min).all() and (labels[~valid] == -1).all()
  # few training subjects; never a test subject in training
  c.train_subjects = 2
  info2 = bp.prepare(c)
  kept = info2.meta["train_subjects_kept"]
  assert len(kept) == 2 and info2.split_sizes["train"] < info.split_sizes["train"]
  seen = set()
  for b in _take(bp.make_dataset(c, info2, split="train", train=True, seed=0, batch_size=8), 5):
    seen |= set(b["subject_id"].tolist())
    assert (b["label"] >= 0).all()
  assert seen == set(kept)
  assert not seen & set(ds.split_index("test")["subject_id"])


def test_eval_is_deterministic_and_sharded(cfg):
  info = bp.prepare(cfg)

  def run(shard, count):
    ds = bp.make_dataset(
      cfg,
      info,
      split="val",
      train=False,
      seed=5,
      batch_size=2,
      shard_index=shard,
      shard_count=count,
    )
    return list(ds)

  a, b = run(0, 1), run(0, 1)
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert sum(int(x["valid"].sum()) for x in a) == 3
  parts = [run(s, 2) for s in range(2)]
  assert len(parts[0]) == len(parts[1]) == 1
  assert sum(int(x["valid"].sum()) for p in parts for x in p) == 3


def test_iterator_state_resumes_exactly(cfg):
  info = bp.prepare(cfg)
  ds = bp.make_dataset(cfg, info, split="train", train=True, seed=3, batch_size=4)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = iter(bp.make_dataset(cfg, info, split="train", train=True, seed=3, batch_size=4))
  it2.set_state(state)
  got = [next(it2) for _ in range(2)]
  for x, y in zip(want, got, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_bad_config(cfg):
  c = cfg.copy_and_resolve_references()
  c.mode = "bogus"
  with pytest.raises(ValueError, match="field 'mode' expected one of"):
    bp.prepare(c)
  c = cfg.copy_and_resolve_references()
  c.source = "parcellated"
  with pytest.raises(ValueError, match="field 'path' is required"):
    bp.prepare(c)


def test_throughput_batch32(cfg):
  info = bp.prepare(cfg)
  it = iter(bp.make_dataset(cfg, info, split="train", train=True, seed=0, batch_size=32))
  next(it)
  start, n = time.monotonic(), 20
  for _ in range(n):
    next(it)
  rate = n / (time.monotonic() - start)
  print(f"parcellated pipeline: {rate:.1f} batches/s at batch 32 (R=16)")
  assert rate > 1
