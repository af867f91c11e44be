"""fmri2img data: the trials kind, the planted synthetic default, the pipelines."""

import glob
import os

import numpy as np
import pytest

from boldjax.cli import InputError
from boldjax.data import fmri2img_pipeline as fp
from boldjax.data import image_records, synthetic_fmri2img, trial_records

SMALL = {
  "num_images": 240,
  "num_voxels": 300,
  "val_images": 20,
  "test_images": 40,
  "image_size": 32,
}


def _voxels(v, shape=(10, 10, 4)):
  ijk = np.stack(np.unravel_index(np.arange(v), shape), 1)
  return {"ijk": ijk, "affine": np.diag([1.8, 1.8, 1.8, 1.0]), "volume_shape": np.array(shape)}


def _layout(seed=0, n=12, v=40):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  ids = np.arange(500, 500 + n)
  split = np.array([0] * (n - 4) + [1, 1, 2, 2])
  trial_ids = np.concatenate([ids, ids[::-1], ids[: n // 2]])
  betas = rng.normal(3.0, 2.0, (len(trial_ids), v)).astype(np.float32)
  betas[np.isin(trial_ids, ids[split == 2])] += 5.0  # test trials far from the train stats
  return images, ids, split, trial_ids, betas


def _data_cfg(tmp_path, **kw):
  cfg = fp.default_config()
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.synthetic.update(SMALL)
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_trials_round_trip_zscored_with_train_trials_only(tmp_path, dtype):
  images, ids, split, trial_ids, betas = _layout()
  out = str(tmp_path / "trials")
  vox = {**_voxels(betas.shape[1]), "roi": np.arange(betas.shape[1]) % 3}
  trial_records.write_trial_dataset(
    out, images, ids, betas, trial_ids, image_split=split, voxels=vox, betas_dtype=dtype,
    meta={"source": {"kind": "test"}},
  )  # fmt: skip
  ds = trial_records.open_trials(out)
  split_of_trial = split[np.searchsorted(ids, trial_ids)]
  train = betas[split_of_trial == 0].astype(np.float64)
  mean, std = train.mean(0), train.std(0)
  v = ds.voxels()
  np.testing.assert_allclose(v["mean"], mean, rtol=1e-6)
  np.testing.assert_allclose(v["std"], std, rtol=1e-6)
  np.testing.assert_array_equal(v["ijk"], vox["ijk"])
  np.testing.assert_array_equal(v["roi"], vox["roi"])
  repeats = trial_records.repeat_numbers(trial_ids)
  assert repeats.tolist()[:12] == [0] * 12 and repeats[12:24].tolist() == [1] * 12
  for k, name in enumerate(("train", "val", "test")):
    pos = np.flatnonzero(split_of_trial == k)  # records keep the trials' order
    expected = ((betas[pos] - mean) / std).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(ds.betas(name), expected)
    idx = ds.index(name)
    np.testing.assert_array_equal(idx["trial"], pos)
    np.testing.assert_array_equal(idx["image_id"], trial_ids[pos])
    np.testing.assert_array_equal(idx["repeat"], repeats[pos])
    rec = ds.split(name)[0]
    assert (int(rec["trial"]), int(rec["image_id"])) == (pos[0], trial_ids[pos[0]])
    np.testing.assert_array_equal(ds.images.images(name), images[split == k])
    np.testing.assert_array_equal(ds.images.image_ids(name), ids[split == k])
  tr, te = ds.betas("train"), ds.betas("test")
  np.testing.assert_allclose(tr.mean(0), 0, atol=2e-3)
  np.testing.assert_allclose(tr.std(0), 1, atol=2e-3)
  assert te.mean() > 1.5  # test trials are not standardised by their own statistics
  assert ds.meta["split_sizes"] == {"train": 22, "val": 4, "test": 4}
  assert ds.meta["split_images"] == {"train": 8, "val": 2, "test": 2}
  assert ds.meta["zscore"]["statistics"] == "train trials only"
  assert ds.meta["betas_dtype"] == dtype and ds.meta["source"] == {"kind": "test"}


def _no_leftovers(tmp_path):
  return [p for p in glob.glob(str(tmp_path / "*")) if "trials" in os.path.basename(p)]


@pytest.mark.parametrize(
  "change, field",
  [
    (
      lambda a: {
        **a,
        "trial_image_ids": np.where(a["trial_image_ids"] == 503, 9999, a["trial_image_ids"]),
      },
      "'trial_image_ids'",
    ),  # noqa: E501
    (lambda a: {**a, "betas": a["betas"][:, :, None]}, "'betas'"),
    (lambda a: {**a, "trial_image_ids": a["trial_image_ids"][:-1]}, "'trial_image_ids'"),
    (lambda a: {**a, "image_split": a["image_split"][:-1]}, "'image_split'"),
    (lambda a: {**a, "voxels": {**a["voxels"], "ijk": a["voxels"]["ijk"][:-1]}}, "'ijk'"),
    (lambda a: {**a, "voxels": {**a["voxels"], "ijk": a["voxels"]["ijk"] + 20}}, "'ijk'"),
    (lambda a: {**a, "voxels": {**a["voxels"], "affine": np.eye(3)}}, "'affine'"),
  ],
)
def test_write_errors_name_the_field_and_leave_nothing(tmp_path, change, field):
  images, ids, split, trial_ids, betas = _layout()
  args = {
    "trial_image_ids": trial_ids,
    "betas": betas,
    "image_split": split,
    "voxels": _voxels(betas.shape[1]),
  }
  a = change(args)
  with pytest.raises(InputError, match=field) as e:
    trial_records.write_trial_dataset(
      str(tmp_path / "trials"), images, ids, a["betas"], a["trial_image_ids"],
      image_split=a["image_split"], voxels=a["voxels"],
    )  # fmt: skip
  assert "\n" not in str(e.value)
  assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["train", "test"])
def test_nan_betas_named_with_trial_and_voxel(tmp_path, where):
  images, ids, split, trial_ids, betas = _layout()
  t = 0 if where == "train" else int(np.flatnonzero(trial_ids == ids[split == 2][0])[0])
  betas[t, 7] = np.nan
  with pytest.raises(InputError, match=rf"'betas' expected finite.*trial {t}, voxel 7"):
    trial_records.write_trial_dataset(
      str(tmp_path / "trials"), images, ids, betas, trial_ids, image_split=split,
      voxels=_voxels(betas.shape[1]),
    )  # fmt: skip
  assert _no_leftovers(tmp_path) == []


def test_open_trials_errors(tmp_path):
  images, ids, split, *_ = _layout()
  stim = image_records.write_stimulus_dataset(str(tmp_path / "stim"), images, ids, assignment=split)
  with pytest.raises(InputError, match="field 'kind' expected 'trials'.*found 'stimulus'"):
    trial_records.open_trials(stim)
  with pytest.raises(InputError, match="meta.json: missing"):
    trial_records.open_trials(str(tmp_path / "nothing"))


def test_synthetic_planted_model_is_recoverable_and_noise_ceiling_holds():
  spec = synthetic_fmri2img.SyntheticFmri2ImgSpec(**{**SMALL, "num_images": 600})
  data = synthetic_fmri2img.generate(spec)
  signal, betas, tids = data["signal"], data["betas"], data["trial_image_ids"]
  # two repeats of a voxel correlate across images at the stated ceiling
  first = np.full(spec.num_images, -1)
  second = np.full(spec.num_images, -1)
  for t, i in enumerate(tids):
    if first[i] < 0:
      first[i] = t
    elif second[i] < 0:
      second[i] = t

  def z(a):
    return (a - a.mean(0)) / a.std(0)

  r = (z(betas[first]) * z(betas[second])).mean(0)
  assert abs(np.median(r) - spec.noise_ceiling) < 0.04, np.median(r)
  # luminance / colour voxels are linear in the pixels: a ridge recovers them on test
  x = data["images"].reshape(spec.num_images, -1).astype(np.float64) / 255
  x -= x[data["image_split"] == 0].mean(0)
  tr, te = data["image_split"] == 0, data["image_split"] == 2
  w = np.linalg.solve(x[tr].T @ x[tr] + 10 * np.eye(x.shape[1]), x[tr].T @ signal[tr])
  pred = x[te] @ w
  r2 = 1 - ((pred - signal[te]) ** 2).sum(0) / ((signal[te] - signal[te].mean(0)) ** 2).sum(0)
  linear = data["planted"]["feature"] <= len(synthetic_fmri2img.COLOUR)
  assert np.median(r2[linear]) > 0.5, np.median(r2[linear])
  # the luminance voxels' ridge weights peak at the planted receptive field
  lum = np.flatnonzero(data["planted"]["feature"] == 0)
  maps = np.abs(w[:, lum].reshape(32, 32, 3, -1).sum(2))
  peak = np.array(np.unravel_index(maps.reshape(-1, len(lum)).argmax(0), (32, 32)))
  centre = (np.stack([data["planted"]["y"][lum], data["planted"]["x"][lum]]) + 1) * 16 - 0.5
  dist = np.linalg.norm(peak - centre, axis=0)
  assert np.median(dist) < 2.0, np.median(dist)
  # Gabor energy is not linear in the pixels: the same ridge does not explain it
  assert np.median(r2[~linear]) < 0.3
  # voxels: unique cells in the volume
  vox = data["voxels"]
  assert len(np.unique(vox["ijk"], axis=0)) == spec.num_voxels
  assert (vox["ijk"] < vox["volume_shape"]).all()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fmri2img")
  cfg = _data_cfg(tmp)
  info = fp.Fmri2ImgPipeline.prepare(cfg)
  return cfg, info


def test_pipeline_train_batches(synthetic):
  cfg, info = synthetic
  assert info.num_voxels == SMALL["num_voxels"] and info.image_size == SMALL["image_size"]
  assert info.split_images == {"train": 180, "val": 20, "test": 40}
  assert info.split_sizes["train"] == 3 * 180
  np.testing.assert_allclose(info.noise_ceiling, 0.6)
  ds = fp.make_dataset(cfg, info, split="train", train=True, seed=0, batch_size=8)
  batch = next(iter(ds))
  assert batch["fmri"].shape == (8, 300) and batch["fmri"].dtype == np.float32
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["valid"].all()
  trials = trial_records.open_trials(info.path)
  stim = trials.images
  pos = {int(i): p for p, i in enumerate(stim.image_ids("train"))}
  imgs = stim.images("train")
  for b in range(8):
    img = imgs[pos[int(batch["image_id"][b])]].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(batch["image"][b], img)
  # shuffled single trials: a second epoch's first batch differs, ids repeat across epochs
  ids = np.concatenate([b["image_id"] for _, b in zip(range(70), ds, strict=False)])
  assert len(np.unique(ids[:540])) == 180  # one epoch = every train trial once


def test_pipeline_eval_averages_repeats_per_image(synthetic):
  cfg, info = synthetic
  trials = trial_records.open_trials(info.path)
  betas, idx = trials.betas("test"), trials.index("test")
  order = []
  for i in idx["image_id"].tolist():
    if i not in order:
      order.append(i)
  expected = np.stack([betas[idx["image_id"] == i].mean(0) for i in order])
  rows = {"fmri": [], "image_id": [], "valid": [], "image": []}
  for shard in range(2):
    ds = fp.make_dataset(
      cfg, info, split="test", train=False, seed=0, batch_size=16, shard_index=shard, shard_count=2
    )
    batches = list(ds)
    assert len(batches) == 2  # 20 rows per shard, padded to 2 batches of 16
    for b in batches:
      for k in rows:
        rows[k].append(b[k])
  rows = {k: np.concatenate(v) for k, v in rows.items()}
  valid = rows["valid"]
  assert valid.sum() == 40 and (rows["image_id"][~valid] == -1).all()
  got = dict(zip(rows["image_id"][valid].tolist(), rows["fmri"][valid], strict=True))
  assert sorted(got) == sorted(order)
  for i, e in zip(order, expected, strict=True):
    np.testing.assert_allclose(got[i], e, rtol=1e-6, atol=1e-6)
  # averaging 3 repeats: correlation with the planted signal rises above the single trial's
  signal = info.planted["signal"].astype(np.float32)
  v = expected - expected.mean(0)
  s = signal[order] - signal[order].mean(0)
  r = (v * s).sum(0) / np.sqrt((v * v).sum(0) * (s * s).sum(0))
  assert np.median(r) ** 2 > 0.75  # nc 0.6 per trial -> 0.82 for the mean of 3


def test_stimulus_images_reads_trials_stimulus_and_the_synthetic_default(synthetic, tmp_path):
  cfg, info = synthetic
  img_cfg = _data_cfg(tmp_path, source="stimulus_images")
  img_cfg.cache_dir = cfg.cache_dir  # the module's synthetic default, already built
  default = fp.StimulusImagesPipeline.prepare(img_cfg)
  assert default.kind == "synthetic_fmri2img" and default.split_sizes["train"] == 180
  img_cfg.path = info.path
  from_trials = fp.StimulusImagesPipeline.prepare(img_cfg)
  assert from_trials.kind == "trials" and from_trials.path == default.path
  images, ids, split, *_ = _layout()
  img_cfg.path = image_records.write_stimulus_dataset(
    str(tmp_path / "stim"), images, ids, assignment=split
  )
  stim = fp.StimulusImagesPipeline.prepare(img_cfg)
  assert stim.kind == "stimulus" and stim.image_size == 16
  b = next(
    iter(fp.make_image_dataset(img_cfg, stim, split="val", train=False, seed=0, batch_size=4))
  )
  np.testing.assert_array_equal(b["valid"], [True, True, False, False])
  np.testing.assert_array_equal(b["image"][:2], images[split == 1].astype(np.float32) / 127.5 - 1)
  img_cfg.augment = "flip"
  train = next(
    iter(fp.make_image_dataset(img_cfg, stim, split="train", train=True, seed=0, batch_size=8))
  )
  assert set(train) == {"image", "image_id", "valid"}
  ref = {int(i): images[k].astype(np.float32) / 127.5 - 1 for k, i in enumerate(ids)}
  flipped = [
    not np.array_equal(train["image"][j], ref[int(i)]) for j, i in enumerate(train["image_id"])
  ]
  for j, i in enumerate(train["image_id"]):
    want = ref[int(i)][:, ::-1] if flipped[j] else ref[int(i)]
    np.testing.assert_array_equal(train["image"][j], want)
  assert 0 < sum(flipped) < 8
  with pytest.raises(InputError, match="config.data.augment"):
    fp.Fmri2ImgPipeline.prepare(_data_cfg(tmp_path, augment="flip"))


def test_trials_source_needs_a_path(tmp_path):
  with pytest.raises(InputError, match="config.data.path: source 'trials'"):
    fp.Fmri2ImgPipeline.prepare(_data_cfg(tmp_path, source="trials"))


class _LazyBetas:
  """A lazy (T, V) source that only offers iter_positions (like per-session beta files)."""

  def __init__(self, betas):
    self.betas, self.calls = betas, 0

  def __len__(self):
    return len(self.betas)

  def __getitem__(self, i):
    if i != 0:
      raise AssertionError("rows other than the first must come through iter_positions")
    return self.betas[0]

  def iter_positions(self, positions):
    self.calls += 1
    assert (np.diff(positions) > 0).all()
    return (self.betas[p] for p in positions)


@pytest.mark.parametrize("kind", ["list", "lazy"])
def test_betas_from_sequences_and_lazy_sources_match_the_array(tmp_path, kind):
  images, ids, split, trial_ids, betas = _layout()
  vox = _voxels(betas.shape[1])
  ref = trial_records.write_trial_dataset(
    str(tmp_path / "ref"), images, ids, betas, trial_ids, image_split=split, voxels=vox
  )
  given = list(betas) if kind == "list" else _LazyBetas(betas)
  out = trial_records.write_trial_dataset(
    str(tmp_path / "out"), images, ids, given, trial_ids, image_split=split, voxels=vox
  )
  a, b = trial_records.open_trials(ref), trial_records.open_trials(out)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(a.betas(name), b.betas(name))
  if kind == "lazy":
    assert given.calls == 4  # train twice (statistics, records), then val and test
