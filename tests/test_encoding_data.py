"""Encoding-family data: the token cache, the planted synthetic answer, the ridge baseline."""

import os

import jax
import numpy as np
import pytest

from boldjax.data import backbones, synthetic_encoding, token_cache
from boldjax.evals import encoding as enc_eval
from boldjax.models import factortopy


class ArraySource:
  def __init__(self, images, ids):
    self.images, self.ids = images, ids

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "image_id": self.ids[i]}


def _splits(n=10, size=32, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return {
    "train": ArraySource(images[:6], np.arange(6)),
    "val": ArraySource(images[6:8], np.arange(6, 8)),
    "test": ArraySource(images[8:], np.arange(8, n)),
  }, images


def _tiny():
  import dataclasses

  from boldjax.models import vit

  config = dataclasses.replace(vit.PRESETS["tiny"], image_size=32, patch_size=8, layers=2)
  params = vit.init_params(config, jax.random.key(0))
  return config, params


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_token_cache_round_trips_the_backbone_tokens_and_is_reused(tmp_path, dtype, capsys):
  from boldjax.models import vit

  config, params = _tiny()
  splits, images = _splits()
  bb = backbones.Backbone("tiny32", config, 32, params, "random:0", [])
  fn = backbones.token_fn(bb, (3, 3), token_cache.IMAGENET_MEAN, token_cache.IMAGENET_STD, 4)
  spec = token_cache.CacheSpec("tiny32", {"layers": 2}, "random:0", grid=(3, 3), dtype=dtype)
  calls = []

  def make():
    calls.append(1)
    return fn

  cache = token_cache.cached_tokens(str(tmp_path), splits, spec, make, batch_size=4)
  # Direct computation: ImageNet-normalised images, backbone, torch-style bilinear 4x4 -> 3x3.
  x = (images.astype(np.float32) / 255 - np.array(token_cache.IMAGENET_MEAN)) / np.array(
    token_cache.IMAGENET_STD
  )
  local, global_ = vit.get_tokens(params, x.astype(np.float32), config)
  b, num_layers, h, w, c = local.shape
  local = factortopy.resize_bilinear(local.reshape(b * num_layers, h, w, c), (3, 3))
  local = np.asarray(local).reshape(b, num_layers, 3, 3, c)
  tol = 1e-3 if dtype == "float16" else 1e-2  # 16-bit storage, relative
  k = 0
  for name in ("train", "val", "test"):
    src = cache.split(name)
    assert len(src) == len(splits[name])
    for i in range(len(src)):
      ex = src[i]
      assert int(ex["image_id"]) == k
      got_l = np.asarray(ex["local"], np.float32)
      got_g = np.asarray(ex["global"], np.float32)
      np.testing.assert_allclose(got_l, local[k], rtol=tol, atol=tol * np.abs(local).max())
      np.testing.assert_allclose(got_g, global_[k], rtol=tol, atol=tol * np.abs(global_).max())
      k += 1
  assert cache.num_layers == 2 and cache.grid == (3, 3) and cache.width == config.width
  again = token_cache.cached_tokens(str(tmp_path), splits, spec, make, batch_size=4)
  assert again.path == cache.path and len(calls) == 1  # reused, not recomputed
  assert "reusing" in capsys.readouterr().out
  # Anything the tokens depend on gives another folder.
  other = token_cache.CacheSpec("tiny32", {"layers": 2}, "random:1", grid=(3, 3), dtype=dtype)
  assert other.key("x") != spec.key("x")
  images[0, 0, 0, 0] ^= 1
  changed, _ = _splits()
  assert token_cache.images_sha256(changed) != token_cache.images_sha256(splits)


def test_planted_sampling_equals_grid_sample():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  x = rng.uniform(-1.1, 1.1, 40).astype(np.float32)
  y = rng.uniform(-1.1, 1.1, 40).astype(np.float32)
  corners = synthetic_encoding.bilinear_weights(x, y, 5, 7)
  ours = sum(wt[None, :, None] * maps[:, r, c] for r, c, wt in corners)
  ref = factortopy.grid_sample_bilinear(maps, np.stack([x, y], -1))
  np.testing.assert_allclose(ours, np.asarray(ref).reshape(ours.shape), atol=1e-5)


def test_noise_gives_the_stated_noise_ceiling():
  rng = np.random.default_rng(0)
  signal = rng.normal(size=(20000, 3)) * np.array([1.0, 5.0, 0.1]) + 3
  for nc in (0.3, 0.7):
    y = synthetic_encoding.with_noise(signal, nc, rng)
    z = (signal - signal.mean(0)) / signal.std(0)
    r2 = enc_eval.r2_per_vertex(z, y)  # the noiseless signal predicts nc of the variance
    np.testing.assert_allclose(r2, nc, atol=0.02)


def test_planted_answer_is_a_posterior_to_anterior_gradient():
  v = synthetic_encoding.occipital_vertices(0.05)
  p = synthetic_encoding.planted_answer(v, 4)
  assert np.bincount(p["layer"]).min() >= len(p["layer"]) // 4 - 2  # equal-size bands
  assert enc_eval.spearman(p["layer"], v["r"]) > 0.95
  assert np.abs(p["x"]).max() <= 0.75 and np.abs(p["y"]).max() <= 0.75
  for hemi in (0, 1):
    assert np.sum(v["hemisphere"] == hemi) > 100
  # Right hemisphere shifted in +x so the two never overlap (as the seed).
  assert v["coords"][v["hemisphere"] == 1, 0].min() > v["coords"][v["hemisphere"] == 0, 0].max()


def test_ridge_baseline_picks_the_layer_that_explains_each_vertex():
  rng = np.random.default_rng(0)

  def split(n):
    g = rng.normal(size=(n, 3, 16)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(16, 6))
    layer_of = np.array([0, 0, 1, 1, 2, 2])
    y = np.stack([g[:, layer_of[v]] @ w[:, v] for v in range(6)], 1)
    return g, y + 0.5 * rng.normal(size=y.shape)

  out = enc_eval.ridge_baseline(split(300), split(100), split(100))
  np.testing.assert_array_equal(out["layer"], [0, 0, 1, 1, 2, 2])
  assert np.all(out["r2"] > 0.9)


def test_planted_recovery_scores_a_perfect_and_a_shuffled_answer():
  rng = np.random.default_rng(0)
  planted = {
    "layer": rng.integers(0, 4, 200),
    "x": rng.uniform(-0.7, 0.7, 200),
    "y": rng.uniform(-0.7, 0.7, 200),
    "scale": rng.uniform(0.1, 0.6, 200),
  }
  perfect = {
    "sel_layer": np.eye(4)[planted["layer"]] * 5,
    "sel_space": np.stack([planted["x"], planted["y"]], 1),
    "sel_scale": planted["scale"][:, None],
  }
  got = enc_eval.planted_recovery(perfect, planted)
  assert got["layer_spearman"] == pytest.approx(1.0) and got["layer_within1"] == 1.0
  assert got["x_corr"] == pytest.approx(1.0) and got["y_corr"] == pytest.approx(1.0)
  perm = rng.permutation(200)
  shuffled = {k: v[perm] for k, v in perfect.items()}
  bad = enc_eval.planted_recovery(shuffled, planted)
  assert abs(bad["layer_spearman"]) < 0.2 and abs(bad["x_corr"]) < 0.2


def test_r2_per_vertex_matches_the_definition():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(50, 4))
  p = t + 0.3 * rng.normal(size=t.shape)
  want = [
    1 - np.sum((t[:, j] - p[:, j]) ** 2) / np.sum((t[:, j] - t[:, j].mean()) ** 2) for j in range(4)
  ]
  np.testing.assert_allclose(enc_eval.r2_per_vertex(p, t), want, rtol=1e-12)
  assert os.environ.get("BOLDJAX_CACHE")  # tests never write the user's cache


def test_an_algonauts_subject_feeds_the_encoding_pipeline(tmp_path):
  from boldjax import prepare
  from boldjax.cli import InputError
  from boldjax.data import encoding_pipeline, image_records
  from tests.test_algonauts import _subject

  subj, sphere, data = _subject(tmp_path, n=12)
  out = prepare.main(
    ["algonauts", str(subj), f"--sphere={sphere}", f"--out={tmp_path / 'ds'}", "--size=32"]
  )
  cfg = encoding_pipeline.default_config()
  cfg.source, cfg.path, cfg.cache_dir = "stimulus", out, str(tmp_path / "cache")
  cfg.tokens.batch_size = 4
  info = encoding_pipeline.prepare(cfg)
  assert info.num_vertices == 15 and info.num_layers == 4 and info.grid == (8, 8)
  ds = image_records.open_stimulus(out)
  np.testing.assert_array_equal(info.coords, ds.vertices()["coords"])
  batches = list(
    encoding_pipeline.make_dataset(cfg, info, split="train", train=False, seed=0, batch_size=4)
  )
  fmri = np.concatenate([b["fmri"][b["valid"]] for b in batches])
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
  responses = np.concatenate([data["lh"]["fmri"], data["rh"]["fmri"]], axis=1)
  np.testing.assert_array_equal(fmri, responses[ids])
  np.testing.assert_array_equal(ids, ds.image_ids("train"))
  # Images without responses are refused by the encoding family, naming the field.
  images_only = prepare.main(
    ["images", str(subj / "training_split" / "training_images"), f"--out={tmp_path / 'im'}",
     "--size=16"]
  )  # fmt: skip
  cfg.path = images_only
  with pytest.raises(InputError, match="meta.json: field 'response'"):
    encoding_pipeline.prepare(cfg)
