"""The fmri2img task: its objectives against a recomputation, the frozen VAE (in extra, never
optimised, never differentiated), features, and one-line errors for a bad decoder_from.

A tiny random VAE (two levels: 16x16 images -> 8x8x4 latents) stands in for a trained one;
a VAE workdir written by the vae task is used by the end-to-end test in test_fmri2img_e2e.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax import registry
from boldjax import state as state_lib
from boldjax.cli import InputError
from boldjax.models import vae as vae_lib
from boldjax.tasks.fmri2img import Fmri2ImgTask

V, IMAGE, B = 12, 16, 6
VAE = vae_lib.preset("small", block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)


def random_vae(config: vae_lib.VAEConfig, seed: int = 1) -> dict:
  """Random VAE params of `config`'s shapes (numpy: no init to compile); norm scales near 1."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    return (scale + rng.normal(0, 0.2, a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, vae_lib.abstract_params(config))


@pytest.fixture(scope="module")
def vae_params():
  return random_vae(VAE)


def make_config(**task) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "task": {
        "name": "fmri2img",
        "decoder_from": "",
        "objective": "pixel",
        "latent_weight": 0.5,
        **task,
      },  # fmt: skip
      "model": {"name": "fmri2img", "hidden": (32, 64), "latent_size": 8, "dtype": "float32"},
    }
  )


INFO = types.SimpleNamespace(num_voxels=V, image_size=IMAGE, path="fake")


def make_batch(seed: int = 0, valid: int = B) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "fmri": rng.normal(size=(B, V)).astype(np.float32),
    "image": rng.uniform(-1, 1, size=(B, IMAGE, IMAGE, 3)).astype(np.float32),
    "image_id": np.arange(B, dtype=np.int64),
    "valid": np.arange(B) < valid,
  }


def make_task(vae_params, **task) -> Fmri2ImgTask:
  return Fmri2ImgTask(make_config(**task), INFO, vae=(VAE, vae_params))


def test_registered() -> None:
  assert registry.get("task", "fmri2img") is Fmri2ImgTask


@pytest.mark.parametrize("objective", ["pixel", "latent", "pixel+latent"])
def test_loss_matches_recomputation(vae_params, objective: str) -> None:
  """The loss and metrics equal MSEs recomputed from the model's latent and the VAE's own
  decode / encode in float64 over the valid rows only (padding rows changed: no effect)."""
  task = make_task(vae_params, objective=objective)
  batch = make_batch(valid=4)
  params, extra = task.init(jax.random.key(0), batch)
  assert set(extra) == {"vae"}
  jax.tree.map(np.testing.assert_array_equal, extra["vae"], vae_params)
  poisoned = {**batch, "fmri": batch["fmri"].copy(), "image": batch["image"].copy()}
  poisoned["fmri"][4:] = 1e3
  poisoned["image"][4:] = 0.9
  with jax.default_matmul_precision("highest"):
    latent = np.asarray(task.model.apply({"params": params}, batch["fmri"])["latent"], np.float64)
    recon = np.asarray(jax.jit(task.decode_latents)(extra, latent.astype(np.float32)), np.float64)
    mean = jax.jit(task.encode_images)(extra, batch["image"])
    for train in (True, False):
      fn = jax.jit(lambda p, e, b, t=train: task.loss(p, e, b, None, train=t))
      loss, metrics = fn(params, extra, batch)
      np.testing.assert_allclose(fn(params, extra, poisoned)[0], loss, rtol=1e-5)
  assert latent.shape == (B, 8, 8, 4) and recon.shape == (B, IMAGE, IMAGE, 3)
  img = batch["image"][:4].astype(np.float64)
  pixel = np.mean((recon[:4] - img) ** 2)
  lat = np.mean((latent[:4] - np.asarray(mean, np.float64)[:4]) ** 2)
  clipped = np.mean(((np.clip(recon[:4], -1, 1) - img) ** 2).reshape(4, -1), axis=1)
  want = {"pixel": pixel, "latent": lat, "pixel+latent": pixel + 0.5 * lat}[objective]
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
  # eval (train=False) reports every metric whatever the objective
  np.testing.assert_allclose(float(metrics["pixel_mse"]), pixel, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["latent_mse"]), lat, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["psnr"]), np.mean(10 * np.log10(4 / clipped)), rtol=1e-5)


def test_train_steps_leave_the_vae_unchanged(vae_params) -> None:
  """N train steps through boldjax's own train step: the encoder's params change, the VAE in
  extra is bit-identical, and neither params, gradients nor optimizer state hold a VAE leaf."""
  task = make_task(vae_params, objective="pixel+latent")
  batch = make_batch()
  params, extra = task.init(jax.random.key(0), batch)
  assert set(params) == {"fc1", "fc2", "deconv1"}  # the encoder only
  tx = optax.adamw(1e-3, weight_decay=0.01)
  state = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra
  )
  n_opt = len(jax.tree.leaves(state.opt_state))
  step = jax.jit(state_lib.make_train_step(task, tx, optax.constant_schedule(1e-3),
                                           jax.random.key(1), 1))  # fmt: skip
  losses = []
  for i in range(4):
    state, metrics = step(state, make_batch(i % 2))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 4 and all(np.isfinite(losses))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra["vae"]), vae_params)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       state.params, params)  # fmt: skip
  assert all(v > 0 for v in jax.tree.leaves(moved)), moved
  assert len(jax.tree.leaves(state.opt_state)) == n_opt
  vae_sizes = {np.shape(a) for a in jax.tree.leaves(vae_params)}
  opt_sizes = {np.shape(a) for a in jax.tree.leaves(state.opt_state)}
  assert not (vae_sizes - {np.shape(a) for a in jax.tree.leaves(params)}) & opt_sizes
  # The gradient of the loss is taken wrt params only: the jaxpr has no cotangent for extra.
  grads = jax.grad(lambda p: task.loss(p, extra, batch, None)[0])(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert losses[-1] < losses[0] or losses[-2] < losses[0]


def test_features(vae_params) -> None:
  """features(feature_params(params, extra)) = the latent and the clipped decode; plain params
  decode through the host copy of the same VAE."""
  task = make_task(vae_params)
  batch = make_batch()
  params, extra = task.init(jax.random.key(0), batch)
  feats = task.features(task.feature_params(params, extra), batch)
  plain = task.features(params, batch)
  assert feats["latent"].shape == (B, 8, 8, 4) and feats["recon"].shape == (B, IMAGE, IMAGE, 3)
  assert float(jnp.max(jnp.abs(feats["recon"]))) <= 1.0
  latent = task.model.apply({"params": params}, batch["fmri"])["latent"]
  want = jnp.clip(vae_lib.decode(vae_params, latent, VAE), -1, 1)  # the VAE's own decode
  np.testing.assert_allclose(feats["recon"], want, atol=1e-6)
  np.testing.assert_allclose(plain["recon"], feats["recon"], atol=1e-6)


def test_bad_settings_are_one_line_input_errors(vae_params, tmp_path) -> None:
  def fails(match: str, **kw) -> None:
    with pytest.raises(InputError, match=match) as e:
      kw.pop("make", make_task)(vae_params, **kw)
    assert "\n" not in str(e.value)

  fails(r"config.task.objective: expected one of .* found 'pixels'", objective="pixels")
  fails("config.task.latent_weight: expected >= 0", latent_weight=-1.0)
  # latent grid of the encoder vs the VAE's
  cfg = make_config()
  cfg.model.latent_size = 16
  with pytest.raises(InputError, match=r"config.model.latent_size: expected 8 \(image size 16 / "
                                       r"the VAE's downsampling 2"):  # fmt: skip
    Fmri2ImgTask(cfg, INFO, vae=(VAE, vae_params))
  cfg = make_config()
  cfg.model.hidden = (32, 60)
  with pytest.raises(InputError, match=r"config.model.hidden\[-1\]: expected a multiple of 4\*4"):
    Fmri2ImgTask(cfg, INFO, vae=(VAE, vae_params))
  # VAE params of another config
  other = random_vae(vae_lib.preset("small", block_out_channels=(8, 8), norm_num_groups=4))
  with pytest.raises(InputError, match="the VAE params do not match its config.model"):
    Fmri2ImgTask(make_config(), INFO, vae=(VAE, other))
  # decoder_from: empty, not a workdir, not a vae run
  with pytest.raises(InputError, match=r"config.task.decoder_from: expected the workdir of a "
                                       r"trained VAE .* found ''"):  # fmt: skip
    Fmri2ImgTask(make_config(), INFO)
  with pytest.raises(InputError, match="config.task.decoder_from: .*nowhere/config.json: not "
                                       "found"):  # fmt: skip
    Fmri2ImgTask(make_config(decoder_from=str(tmp_path / "nowhere")), INFO)
  (tmp_path / "enc").mkdir()
  (tmp_path / "enc" / "config.json").write_text(json.dumps({"task": {"name": "encoding"}}))
  with pytest.raises(InputError, match=r"task.name expected 'vae' .* found 'encoding'"):
    Fmri2ImgTask(make_config(decoder_from=str(tmp_path / "enc")), INFO)


def test_fmri_width_is_checked(vae_params) -> None:
  task = make_task(vae_params)
  batch = make_batch()
  params, extra = task.init(jax.random.key(0), batch)
  bad = {**batch, "fmri": batch["fmri"][:, :5]}
  with pytest.raises(ValueError, match=r"fmri expected \(B, 12\) \(info.num_voxels\)"):
    task.loss(params, extra, bad, None)
