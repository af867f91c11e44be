"""The 'vae' task (boldjax/tasks/vae.py) on fixed batches: loss terms recomputed by hand,
padding rows ignored, KL zero at the prior, features equal to the model's own
encode / decode, a few optimizer steps lower the loss, and bad configs refused in one line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax.cli import InputError
from boldjax.models import vae
from boldjax.tasks.vae import VAETask, psnr, vae_config

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def make_task(kl_weight: float = 0.5, size: int = 16, **model) -> VAETask:
  cfg = ml_collections.ConfigDict(
    {
      "model": {"name": "vae", "preset": "small", "dtype": "float32", **{**TINY, **model}},
      "task": {"name": "vae", "kl_weight": kl_weight, "init_from": ""},
    }
  )

  @dataclasses.dataclass
  class Info:
    image_size: int = size

  return VAETask(cfg, Info())


def batch(n: int = 4, size: int = 16, valid=None, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  images = np.tanh(rng.normal(size=(n, size, size, 3))).astype(np.float32)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  return {"image": jnp.asarray(images), "valid": jnp.asarray(valid)}


@pytest.fixture(scope="module")
def setup():
  task = make_task()
  b = batch()
  params, extra = task.init(jax.random.key(0), b)
  return task, params, extra, b


def test_config_is_the_preset_with_overrides() -> None:
  task = make_task()
  assert task.vae_config == dataclasses.replace(vae.PRESETS["small"], **TINY)
  assert task.vae_config.downsample_factor == 2
  small = vae.PRESETS["small"]
  assert small.downsample_factor == 4 and small.latent_channels == 4  # 64x64 -> 16x16x4


def test_loss_is_mse_plus_weighted_per_pixel_kl_over_valid_rows(setup) -> None:
  task, params, extra, _ = setup
  b = batch(valid=[True, True, False, True])
  rng = jax.random.key(7)
  loss, m = task.loss(params, extra, b, rng)
  out = task.model.apply({"params": params}, b["image"], sample_rng=rng)
  x = np.asarray(b["image"])
  mse = np.mean((np.asarray(out["recon"]) - x) ** 2, axis=(1, 2, 3))
  mean, logvar = np.asarray(out["mean"]), np.asarray(out["logvar"])
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  keep = np.asarray(b["valid"])
  want = np.mean((mse + 0.5 * kl / x[0].size)[keep])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["recon_mse"]), mse[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["kl"]), kl[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["psnr"]), np.mean(10 * np.log10(4 / mse[keep])), rtol=1e-5)
  # A padding row's content does not matter.
  b2 = {**b, "image": b["image"].at[2].set(0.9)}
  np.testing.assert_allclose(float(task.loss(params, extra, b2, rng)[0]), float(loss), rtol=1e-6)
  # Eval decodes the posterior mean (no sampling): the key does not matter.
  e1 = task.loss(params, extra, b, jax.random.key(1), train=False)[0]
  e2 = task.loss(params, extra, b, jax.random.key(2), train=False)[0]
  assert float(e1) == float(e2)


def test_kl_is_zero_at_the_prior_and_psnr_of_known_errors() -> None:
  z = jnp.zeros((3, 4, 4, 4))
  np.testing.assert_array_equal(np.asarray(vae.kl_divergence(z, z)), np.zeros(3))
  np.testing.assert_allclose(float(vae.kl_divergence(z + 1.0, z)[0]), 0.5 * 64, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(psnr(jnp.asarray([4.0, 0.04]))), [0.0, 20.0], atol=1e-5)


def test_features_are_the_posterior_mean_and_its_clipped_decoding(setup) -> None:
  task, params, _, b = setup
  f = task.features(params, b)
  mean, _ = vae.encode(params, b["image"], task.vae_config)
  recon = vae.decode(params, mean, task.vae_config)
  assert f["mean"].shape == (4, 8, 8, 4) and f["recon"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(f["mean"]), np.asarray(mean))
  np.testing.assert_array_equal(np.asarray(f["recon"]), np.clip(np.asarray(recon), -1, 1))
  # The module-level helpers need only their half of the params.
  dec = vae.decode(vae.decoder_params(params), mean, task.vae_config)
  np.testing.assert_array_equal(np.asarray(dec), np.asarray(recon))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(setup) -> None:
  task, params, extra, b = setup
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, i):
    grad_fn = jax.value_and_grad(lambda p: task.loss(p, extra, b, jax.random.key(i))[0])
    loss, g = grad_fn(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for i in range(30):
    params, opt, loss = step(params, opt, i)
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses  # noise images: ~0.64x


def test_bad_configs_and_batches_are_one_line_errors() -> None:
  with pytest.raises(InputError, match=r"^config.model.norm_num_groups: .*does not divide"):
    make_task(norm_num_groups=3)
  with pytest.raises(InputError, match=r"^config.model.widths: not a VAE field"):
    vae_config(ml_collections.ConfigDict({"name": "vae", "preset": "small", "widths": 3}))
  with pytest.raises(InputError, match=r"^config.model.preset: .*expected one of"):
    vae_config(ml_collections.ConfigDict({"name": "vae", "preset": "sd21"}))
  with pytest.raises(InputError, match=r"^info.image_size \(config.data\): expected a multiple"):
    make_task(size=15)
  with pytest.raises(InputError, match=r"^config.model.dtype"):
    make_task(dtype="float16")
  task = make_task()
  with pytest.raises(ValueError, match=r"image expected \(B, H, W, 3\)"):
    task.init(jax.random.key(0), {"image": jnp.zeros((2, 16, 16, 1))})
