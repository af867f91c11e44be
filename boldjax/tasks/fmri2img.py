"""fMRI-to-image objective (aaalgo/fmri2img): voxels -> latent -> a FROZEN VAE -> image.

Batch: fmri (B, V) float32 (z-scored betas), image (B, H, W, 3) float32 in [-1, 1], valid
(B,). params = the FmriEncoder only; the frozen VAE lives in TrainState.extra["vae"] (both
halves: the decoder for pixels, the encoder for latent targets and the reconstruction
evaluator's latent space), so no optimizer state or gradient ever exists for it. It is read
from config.task.decoder_from: a workdir whose config.task.name is "vae" (a configs/vae.py
run, or `python -m boldjax.convert sd_vae` of SD-1.5's VAE); its config.model gives the
VAEConfig. Latents are unscaled (the seed decodes them without 1/0.18215).

init() returns the VAE as constants of the init computation (as encoding.py's "pe"), so
every way a state is built (train, reload, convert, the random-init baseline) holds the
same frozen weights; a checkpoint restores them like any other state entry.

config.task.objective:
  "pixel" (the seed): mean squared error of decode(latent) against the image;
  "latent": mean squared error of the latent against encode(image).mean (no decoder in the
    loss: cheaper; pixel_mse / psnr are then measured at eval only);
  "pixel+latent": pixel + task.latent_weight * latent.
Rows are weighted by batch["valid"]. Metrics: pixel_mse, psnr (of the recon clipped to
[-1, 1], dB for the peak-to-peak 2 range, per row), latent_mse (when the objective has it,
and always at eval).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.models import vae as vae_lib
from boldjax.models.fmri2img import FmriEncoder, reshape_grid
from boldjax.tasks.base import PyTree, Task, row_weights, weighted_mean
from boldjax.tasks.vae import psnr, vae_config

OBJECTIVES = ("pixel", "latent", "pixel+latent")
DTYPES = ("float32", "bfloat16")


def load_vae(workdir: str) -> tuple[vae_lib.VAEConfig, dict[str, Any]]:
  """(VAEConfig, host params) of a VAE workdir (config.task.decoder_from); InputError when it
  is missing, not a workdir or not a 'vae' run."""
  from boldjax import checkpoint
  from boldjax.tasks.base import pretrained_params

  field = "config.task.decoder_from"
  if not workdir:
    raise InputError(
      f"{field}: expected the workdir of a trained VAE (python -m boldjax.main "
      "--config=configs/vae.py --workdir=W, or a converted SD-1.5 VAE), found ''"
    )
  try:
    config = checkpoint.load_config(workdir)
  except InputError as e:
    raise InputError(f"{field}: {e}") from e
  task = config.get("task", {}).get("name", None)
  if task != "vae":
    raise InputError(
      f"{field}: {workdir}/config.json: task.name expected 'vae' (a configs/vae.py run), "
      f"found {task!r}"
    )
  vcfg = vae_config(config.model)
  try:
    params, _ = pretrained_params(workdir)
  except FileNotFoundError as e:
    raise InputError(f"{field}: {e}") from e
  return vcfg, jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params))


@registry.register("task", "fmri2img")
class Fmri2ImgTask(Task):
  name = "fmri2img"

  def __init__(self, config: Any, info: Any, *, vae: tuple[Any, Any] | None = None):
    """vae: (VAEConfig, host params) to use instead of reading config.task.decoder_from
    (tests and benchmarks)."""
    super().__init__(config, info)
    t, m = config.task, config.model
    self.objective = str(t.get("objective", "pixel"))
    if self.objective not in OBJECTIVES:
      raise InputError(
        f"config.task.objective: expected one of {list(OBJECTIVES)}, found {self.objective!r}"
      )
    self.latent_weight = float(t.get("latent_weight", 1.0))
    if self.latent_weight < 0:
      raise InputError(f"config.task.latent_weight: expected >= 0, found {self.latent_weight}")
    dtype = str(m.get("dtype", "float32"))
    if dtype not in DTYPES:
      raise InputError(f"config.model.dtype: expected one of {list(DTYPES)}, found {dtype!r}")
    self.dtype = jnp.dtype(dtype)
    self.decoder_from = str(t.get("decoder_from", "") or "")
    self.vae_config, self._vae_params = vae if vae is not None else load_vae(self.decoder_from)
    where = "the VAE given" if vae is not None else self.decoder_from
    self.image_size = int(info.image_size)
    factor = self.vae_config.downsample_factor
    if self.image_size % factor:
      raise InputError(
        f"info.image_size (config.data): expected a multiple of {factor} (the downsampling of "
        f"the VAE in {where}), found {self.image_size}"
      )
    latent = self.image_size // factor
    size = int(m.get("latent_size", 0) or latent)
    if size != latent:
      raise InputError(
        f"config.model.latent_size: expected {latent} (image size {self.image_size} / the "
        f"VAE's downsampling {factor}, {where}), found {size}"
      )
    hidden = tuple(int(h) for h in m.get("hidden", (2048, 2048, 1024)))
    try:
      reshape_grid(hidden[-1], (latent, latent))
    except ValueError as e:
      raise InputError(f"config.model.{e}") from e
    self.model = FmriEncoder(
      input_dim=int(info.num_voxels),
      hidden=hidden,
      latent_hw=(latent, latent),
      latent_channels=self.vae_config.latent_channels,
      dtype=self.dtype,
    )
    self._check_vae_params(where)

  def _check_vae_params(self, where: str) -> None:
    """The VAE params have exactly the VAEConfig's tree (a run of another config fails here)."""
    want = jax.tree.map(lambda a: tuple(a.shape), vae_lib.abstract_params(self.vae_config))
    have = jax.tree.map(np.shape, self._vae_params)
    if want != have:
      raise InputError(
        f"config.task.decoder_from: {where}: the VAE params do not match its config.model "
        f"({self.vae_config.name}, block_out_channels {self.vae_config.block_out_channels})"
      )

  def host_extra(self) -> PyTree:
    """TrainState.extra as host arrays: {"vae": the frozen VAE's params}."""
    return {"vae": self._vae_params}

  # ----------------------------------------------------------------------------- state

  def _fmri(self, batch: dict[str, Any]) -> jax.Array:
    x = batch["fmri"]
    if x.ndim != 2 or x.shape[1] != self.model.input_dim:
      raise ValueError(
        f"fmri2img batch: fmri expected (B, {self.model.input_dim}) (info.num_voxels), found "
        f"{tuple(x.shape)}"
      )
    return jnp.asarray(x, jnp.float32)

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    params = self.model.init(rng, self._fmri(batch)[:1])["params"]
    return params, jax.tree.map(jnp.asarray, self.host_extra())

  def trainable(self, params: PyTree) -> PyTree | None:
    del params
    return None  # params hold the encoder only; the VAE is in extra

  # ----------------------------------------------------------------------------- VAE

  def decode_latents(self, extra: PyTree, z: jax.Array) -> jax.Array:
    """Images (B, H, W, 3), unclipped, of unscaled latents through the frozen decoder."""
    vae = jax.lax.stop_gradient(extra["vae"])
    return vae_lib.decode(vae, z, self.vae_config, dtype=self.dtype).astype(jnp.float32)

  def encode_images(self, extra: PyTree, images: jax.Array) -> jax.Array:
    """Posterior means (B, h, w, latent_channels) of images in [-1, 1] (frozen encoder)."""
    vae = jax.lax.stop_gradient(extra["vae"])
    images = jnp.asarray(images, jnp.float32)
    mean, _ = vae_lib.encode(vae, images, self.vae_config, dtype=self.dtype)
    return mean.astype(jnp.float32)

  # ----------------------------------------------------------------------------- objective

  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng  # deterministic model
    latent = self.model.apply({"params": params}, self._fmri(batch))["latent"]
    image = jnp.asarray(batch["image"], jnp.float32)
    B = image.shape[0]
    weights = row_weights(batch, B)
    per_row = lambda d: jnp.mean(jnp.square(d).reshape(B, -1), axis=-1)  # noqa: E731
    metrics: dict[str, jax.Array] = {}
    loss = jnp.zeros((), jnp.float32)
    if "pixel" in self.objective or not train:
      recon = self.decode_latents(extra, latent)
      pixel = weighted_mean(per_row(recon - image), weights)
      metrics["pixel_mse"] = pixel
      metrics["psnr"] = weighted_mean(psnr(per_row(jnp.clip(recon, -1, 1) - image)), weights)
      if "pixel" in self.objective:
        loss = loss + pixel
    if "latent" in self.objective or not train:
      target = self.encode_images(extra, image)
      lat = weighted_mean(per_row(latent - target), weights)
      metrics["latent_mse"] = lat
      if "latent" in self.objective:
        loss = loss + (lat if self.objective == "latent" else jnp.float32(self.latent_weight) * lat)
    metrics["loss"] = loss
    return loss, metrics

  # ----------------------------------------------------------------------------- outputs

  def feature_params(self, params: PyTree, extra: PyTree) -> PyTree:
    return {"params": params, "vae": extra["vae"]}

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """latent (B, h, w, C) unscaled and recon (B, H, W, 3) clipped to [-1, 1], from
    feature_params(params, extra) (plain params decode through the host copy of the VAE)."""
    if isinstance(params, dict) and set(params) == {"params", "vae"}:
      p, extra = params["params"], {"vae": params["vae"]}
    else:
      p, extra = params, self.host_extra()
    latent = self.model.apply({"params": p}, self._fmri(batch))["latent"]
    return {"latent": latent, "recon": jnp.clip(self.decode_latents(extra, latent), -1.0, 1.0)}
