"""Two-view (Brain-Semantoks) mode: crops, augmentations, masks, resampling, eval, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from boldjax.data import bold_pipeline as bp
from boldjax.data import bold_records
from boldjax.data import views as V

SYNTH = dict(
  num_parcels=16,
  num_subjects=6,
  val_subjects=1,
  test_subjects=1,
  rest_runs=1,
  task_runs=1,
  run_seconds=100.0,  # 50 frames at TR 2 s, 139 at 0.72 s
)
L, PATCH = 40, 10
OFF = V.AugmentSpec(roi_dropout=False, time_block=False, noise=False, scale=False)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = bp.default_config()
  c.cache_dir = str(tmp_path_factory.mktemp("views_cache"))
  c.synthetic.update(SYNTH)
  c.mode = "views"
  c.crop_length = L
  c.patch_size = PATCH
  return c


@pytest.fixture(scope="module")
def info(cfg):
  return bp.prepare(cfg)


def _runs(info, split="train"):
  """Every run of a split z-scored as the pipeline does, with its subject id and TR."""
  src = bold_records.open_bold_dataset(info.path).split(split)
  out = []
  for i in range(len(src)):
    ex = src[i]
    out.append((bp.normalize_run(ex, "run", False, "t"), int(ex["subject_id"]), float(ex["tr"])))
  return out


def _first(c, info, **kw):
  kw = dict(dict(split="train", train=True, seed=0, batch_size=4), **kw)
  return next(iter(bp.make_dataset(c, info, **kw)))


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_keys_and_crops_equal_zscored_slices(cfg, info):
  c = cfg.copy_and_resolve_references()
  c.augment = (0, 0, 0, 0)
  b = _first(c, info, batch_size=6)
  n_patch = L // PATCH
  assert b["views"].shape == (6, 2, 16, L) and b["views"].dtype == np.float32
  assert b["masks"].shape == (6, 2, info.num_networks, n_patch) and b["masks"].dtype == bool
  assert b["subject_id"].dtype == np.int32 and (b["label"] == -1).all()
  assert b["label"].dtype == np.int32 and "valid" not in b
  runs = _runs(info)
  for i in range(6):
    for v in range(2):
      s = int(b["view_starts"][i, v])
      hits = [
        run
        for run, sub, _ in runs
        if sub == b["subject_id"][i]
        and s + L <= len(run)
        and np.array_equal(run[s : s + L].T, b["views"][i, v])
      ]
      assert len(hits) == 1, (i, v)
  # z-scored BEFORE cropping: a crop is not itself zero-mean
  assert np.abs(b["views"].mean(-1)).max() > 0.05


def test_starts_uniform_and_independent():
  rng = np.random.default_rng(0)
  starts = np.stack([V.crop_starts(rng, 60, 40) for _ in range(4000)])
  assert starts.min() == 0 and starts.max() == 20
  counts = np.bincount(starts.ravel(), minlength=21)
  assert counts.min() > 0.6 * counts.mean()
  assert abs(np.corrcoef(starts[:, 0], starts[:, 1])[0, 1]) < 0.05


def test_roi_dropout_counts():
  x = np.random.default_rng(1).standard_normal((457, 100)).astype(np.float32) + 3
  spec = V.AugmentSpec(time_block=False, noise=False, scale=False)
  counts = []
  for seed in range(300):
    y = V.augment_crop(x, np.random.default_rng(seed), spec)
    zero = (y == 0).all(1)
    counts.append(int(zero.sum()))
    np.testing.assert_array_equal(y[~zero], x[~zero])  # other ROIs untouched
    assert (y[zero] == 0).all() and (y != 0).sum() == (~zero).sum() * 100
  # max(1, int(457 * U(0, .1))): 1..45, spread over the range
  assert min(counts) >= 1 and max(counts) <= 45 and max(counts) >= 40 and min(counts) <= 5


def test_time_block_is_one_contiguous_block():
  x = np.random.default_rng(2).standard_normal((30, 100)).astype(np.float32) + 3
  spec = V.AugmentSpec(roi_dropout=False, noise=False, scale=False)
  lengths = []
  for seed in range(300):
    y = V.augment_crop(x, np.random.default_rng(seed), spec)
    zero = np.flatnonzero((y == 0).all(0))
    assert len(zero) >= 1 and np.array_equal(zero, np.arange(zero[0], zero[-1] + 1))
    keep = np.ones(100, bool)
    keep[zero] = False
    np.testing.assert_array_equal(y[:, keep], x[:, keep])
    lengths.append(len(zero))
  assert 1 <= min(lengths) and max(lengths) <= 29 and max(lengths) >= 26


def test_scale_noise_and_order():
  x = np.full((50, 100), 5.0, np.float32)
  only_scale = V.AugmentSpec(roi_dropout=False, time_block=False, noise=False)
  factors = []
  for seed in range(100):
    y = V.augment_crop(x, np.random.default_rng(seed), only_scale)
    assert np.unique(y).size == 1
    factors.append(float(y[0, 0]) / 5)
  assert 0.8 <= min(factors) < 0.85 and 1.15 < max(factors) <= 1.2
  only_noise = V.AugmentSpec(roi_dropout=False, time_block=False, scale=False)
  y = V.augment_crop(x, np.random.default_rng(0), only_noise)
  assert abs(float((y - 5).std()) - 0.1) < 0.005 and abs(float((y - 5).mean())) < 0.005
  # all on: zeroed ROIs / frames hold noise only (zeroing precedes noise), the rest ~ 5 * U(.8,1.2)
  y = V.augment_crop(x, np.random.default_rng(3), V.AugmentSpec())
  low = np.abs(y) < 1.5
  assert low.any() and (np.abs(y[low]) < 0.6).all() and (y[low] != 0).all()
  assert ((y[~low] > 3.4) & (y[~low] < 6.6)).all()
  assert np.array_equal(V.augment_crop(x, np.random.default_rng(4), OFF), x)


def _classify(m):
  """'network' (whole rows) or 'temporal' (contiguous columns across all rows) and count."""
  rows, cols = m.all(1), m.all(0)
  if m.any() and (m == rows[:, None]).all() and not cols.all():
    return "network", int(rows.sum())
  idx = np.flatnonzero(cols)
  assert (m == cols[None, :]).all() and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
  return "temporal", len(idx)


@pytest.mark.parametrize(
  "n, p, net_counts, time_counts", [(9, 5, {5, 6}, {3, 4}), (7, 4, {4}, {2, 3})]
)
def test_slice_masker_matches_original_rule(n, p, net_counts, time_counts):
  seen = {"network": set(), "temporal": set()}
  kinds = []
  for seed in range(400):
    kind, count = _classify(V.slice_masker(np.random.default_rng(seed), n, p, (0.65, 0.85)))
    seen[kind].add(count)
    kinds.append(kind == "network")
  # network_masker: k ~ U{max(1,int(N*.65)) .. min(N,int(N*.85))-1}; temporal: ceil(U*P) - 1
  assert seen["network"] == net_counts and seen["temporal"] == time_counts
  assert 0.42 < np.mean(kinds) < 0.58
  # the masked fraction of the original rule (not a draw from mask_ratio itself)
  ratios = {c / n for c in net_counts} | {c / p for c in time_counts}
  assert all(0.5 <= r <= 0.8 for r in ratios)


def test_resample_linear_ramp_is_exact():
  t = np.arange(50, dtype=np.float64)
  ramp = np.stack([3 * t - 7, -0.5 * t + 2], 1).astype(np.float32)
  up = V.resample_run(ramp, 1.0, 0.5)  # grid k * 0.5 s: 100 frames, last one extrapolated
  k = np.arange(100) / 2
  np.testing.assert_array_equal(up, np.stack([3 * k - 7, -0.5 * k + 2], 1).astype(np.float32))
  down = V.resample_run(ramp, 1.0, 2.0)
  np.testing.assert_array_equal(down, ramp[::2])
  odd = V.resample_run(ramp, 0.72, 2.0)
  assert len(odd) == V.resampled_length(50, 0.72, 2.0) == int(50 * 0.36) == 18
  k = np.arange(18) * (2.0 / 0.72)
  np.testing.assert_allclose(odd[:, 0], 3 * k - 7, rtol=0, atol=2e-5)
  assert V.resample_run(ramp, 2.0, None) is not None
  np.testing.assert_array_equal(V.resample_run(ramp, 2.0, 2.0), ramp)


def test_views_tr_pipeline(cfg, info):
  c = cfg.copy_and_resolve_references()
  c.augment = (0, 0, 0, 0)
  c.views_tr = 2.0
  c.crop_length = 50  # every run lasts 100 s = 50 frames at 2 s
  b = _first(c, info, batch_size=4)
  assert (b["view_starts"] == 0).all()
  runs = _runs(info)
  for i in range(4):
    hits = [
      run
      for run, sub, tr in runs
      if sub == b["subject_id"][i]
      and np.array_equal(V.resample_run(run, tr, 2.0).T, b["views"][i, 0])
    ]
    assert len(hits) == 1


def test_too_short_runs_raise_named_errors(cfg, info):
  c = cfg.copy_and_resolve_references()
  c.crop_length = 60  # TR 2 s runs have 50 frames
  with pytest.raises(
    ValueError,
    match=r"record \d+ \(run 'run-\d+'.*'crop_length' expected <= the run's 50 frames, found 60",
  ):
    bp.prepare(c)
  c.crop_length = 40
  c.views_tr = 3.0  # 100 s at 3 s: 33 frames
  with pytest.raises(ValueError, match=r"resampled to views_tr 3 s\), found 40"):
    bp.prepare(c)
  mv = V.MakeViews(
    crop_length=40, patch_size=10, num_networks=7, spec=OFF, ratio=(0.65, 0.85), where="d/train"
  )
  el = {"bold": np.ones((30, 4), np.float32), "tr": np.float32(1.0), "record": np.int64(3)}
  el.update(subject_id=np.int32(0), label=np.int32(-1))
  with pytest.raises(
    ValueError,
    match=r"d/train record 3: field 'crop_length' expected <= the run's 30 frames, found 40",
  ):
    mv.random_map(el, np.random.default_rng(0))


def test_bad_views_config(cfg):
  for key, value, match in [
    ("augment", (1, 1, 2, 1), "field 'augment' expected 4 switches"),
    ("augment", (1, 1, 1), "field 'augment'"),
    ("mask_ratio", (0.9, 0.5), "field 'mask_ratio'"),
    ("patch_size", 50, "field 'patch_size'"),
  ]:
    c = cfg.copy_and_resolve_references()
    c[key] = value
    with pytest.raises(ValueError, match=match):
      info = bp.prepare(c)
      bp.make_dataset(c, info, split="train", train=True, seed=0, batch_size=2)


def test_same_seed_same_batch_and_resume(cfg, info):
  a, b = _first(cfg, info, seed=7), _first(cfg, info, seed=7)
  _equal(a, b)
  assert not np.array_equal(a["views"], _first(cfg, info, seed=8)["views"])
  ds = bp.make_dataset(cfg, info, split="train", train=True, seed=3, batch_size=4)
  it = iter(ds)
  for _ in range(4):  # past one epoch (8 train runs)
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = iter(bp.make_dataset(cfg, info, split="train", train=True, seed=3, batch_size=4))
  it2.set_state(state)
  for x, y in zip(want, [next(it2) for _ in range(2)], strict=True):
    _equal(x, y)


def test_shards_partition_the_global_stream(cfg, info):
  whole = bp.make_dataset(cfg, info, split="train", train=True, seed=2, batch_size=4)
  (b,) = [next(iter(whole))]
  parts = [
    next(
      iter(
        bp.make_dataset(
          cfg, info, split="train", train=True, seed=2, batch_size=2, shard_index=s, shard_count=2
        )
      )
    )
    for s in range(2)
  ]
  np.testing.assert_array_equal(parts[0]["views"], b["views"][0::2])
  np.testing.assert_array_equal(parts[1]["masks"], b["masks"][1::2])


def test_eval_deterministic_padded_and_shard_independent(cfg, info):
  def rows(shard_count, batch_size):
    out = {}
    for s in range(shard_count):
      kw = dict(split="train", train=False, seed=5, batch_size=batch_size)
      for b in bp.make_dataset(cfg, info, shard_index=s, shard_count=shard_count, **kw):
        for i in range(len(b["valid"])):
          if b["valid"][i]:
            key = (
              int(b["subject_id"][i]),
              int(b["view_starts"][i, 0]),
              int(b["view_starts"][i, 1]),
            )
            out.setdefault(key, []).append((b["views"][i], b["masks"][i]))
          else:  # padding: well-formed zero views, a real mask
            assert (b["views"][i] == 0).all() and b["label"][i] == -1
            assert b["masks"][i].any(axis=(1, 2)).all()
    return out

  one = rows(1, 3)  # 8 train runs -> 9 rows, 1 of them padding
  assert sum(len(v) for v in one.values()) == info.split_sizes["train"] == 8
  again, split = rows(1, 3), rows(2, 5)
  assert one.keys() == again.keys() == split.keys()
  for k in one:
    for (va, ma), (vb, mb), (vc, mc) in zip(one[k], again[k], split[k], strict=True):
      np.testing.assert_array_equal(va, vb)
      np.testing.assert_array_equal(va, vc)
      np.testing.assert_array_equal(ma, mb)
      np.testing.assert_array_equal(ma, mc)


def test_probe_crops_linspace_truncated():
  run = np.arange(137 * 3, dtype=np.float32).reshape(137, 3)
  crops = V.probe_crops(run, 100, 8)
  starts = np.linspace(0, 37, 8).astype(int)
  assert starts.tolist() == [0, 5, 10, 15, 21, 26, 31, 37]
  assert crops.shape == (8, 3, 100) and crops.dtype == np.float32
  for c, s in zip(crops, starts, strict=True):
    np.testing.assert_array_equal(c, run[s : s + 100].T)
  exact = V.probe_crops(run[:100], 100, 8)
  assert all(np.array_equal(c, run[:100].T) for c in exact)
  with pytest.raises(ValueError, match=r"sub-01: field 'crop_length' expected <= the run's 90"):
    V.probe_crops(run[:90], 100, where="sub-01")
  padded = V.probe_crops(run[:90], 100, 2, pad_short=True)
  np.testing.assert_array_equal(padded[1, :, :90], run[:90].T)
  assert (padded[:, :, 90:] == 0).all() and math.isclose(padded.sum() * 0.5, run[:90].sum())
