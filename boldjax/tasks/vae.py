"""KL-VAE objective (Stable Diffusion's AutoencoderKL, boldjax/models/vae.py) on images.

fmri2img decodes through a frozen VAE decoder; nothing can be downloaded here, so the same
VAE class trains as its own task on the stimulus images (or a converted SD-1.5 VAE workdir,
`python -m boldjax.convert sd_vae`, has the same layout) and fmri2img freezes that run.

Batch: image (B, H, W, in_channels) float32 in [-1, 1], valid (B,). Loss per valid row:
mean squared pixel error of the decoded posterior sample + task.kl_weight * KL / (H W C),
the KL summed over latent dims and normalised per pixel value like the reconstruction term,
so kl_weight means the same at any image size. Metrics: recon_mse, kl (nats per image),
psnr (dB for the [-1, 1] range, i.e. peak-to-peak 2). Eval (train=False) decodes the
posterior mean.

config.model: {"name": "vae", "preset": "small" | "sd15", "dtype": "float32" | "bfloat16",
and any VAEConfig field overriding the preset}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from boldjax import registry
from boldjax.cli import InputError
from boldjax.models.vae import AutoencoderKL, VAEConfig, kl_divergence, preset
from boldjax.tasks.base import PyTree, Task, row_weights, weighted_mean

_NOT_FIELDS = ("name", "preset", "dtype")
DTYPES = ("float32", "bfloat16")


def vae_config(model_cfg: Any) -> VAEConfig:
  """The VAEConfig of config.model: the preset with the config's field overrides."""
  name = str(model_cfg.get("preset", "small"))
  fields = {f.name for f in dataclasses.fields(VAEConfig)} - {"name"}
  overrides = {}
  for key, value in model_cfg.items():
    if key in _NOT_FIELDS or value is None:  # None: the preset's value
      continue
    if key not in fields:
      raise InputError(
        f"config.model.{key}: not a VAE field; expected one of {sorted(fields)} (or "
        f"{list(_NOT_FIELDS)})"
      )
    overrides[key] = value
  try:
    config = preset(name, **overrides)
    config.validate()
  except ValueError as e:
    field = "preset" if str(e).startswith("VAE preset") else str(e).split(":")[0]
    raise InputError(f"config.model.{field}: {e}") from e
  return config


def model_config(preset_name: str = "small", dtype: str = "float32") -> Any:
  """config.model: the preset, the compute dtype and one typed placeholder per VAEConfig
  field (None: the preset's), so `--config.model.block_out_channels=(32,64)` parses."""
  import ml_collections
  from ml_collections import config_dict

  c = ml_collections.ConfigDict({"name": "vae", "preset": preset_name, "dtype": dtype})
  for f in dataclasses.fields(VAEConfig):
    if f.name != "name":
      kind = tuple if f.name == "block_out_channels" else type(getattr(VAEConfig(), f.name))
      c[f.name] = config_dict.placeholder(kind)
  return c


def psnr(mse: jax.Array, peak_to_peak: float = 2.0) -> jax.Array:
  """PSNR in dB of a mean squared error for images spanning `peak_to_peak`."""
  return 10.0 * jnp.log10(peak_to_peak**2 / jnp.maximum(mse, 1e-10))


@registry.register("task", "vae")
class VAETask(Task):
  name = "vae"

  def __init__(self, config: Any, info: Any):
    super().__init__(config, info)
    self.vae_config = vae_config(config.model)
    dtype = str(config.model.get("dtype", "float32"))
    if dtype not in DTYPES:
      raise InputError(f"config.model.dtype: expected one of {list(DTYPES)}, found {dtype!r}")
    self.dtype = jnp.dtype(dtype)
    self.model = AutoencoderKL(self.vae_config, self.dtype)
    self.kl_weight = float(config.task.get("kl_weight", 1e-3))
    if self.kl_weight < 0:
      raise InputError(f"config.task.kl_weight: expected >= 0, found {self.kl_weight}")
    size = getattr(info, "image_size", None)
    if size is not None:
      self._check_size(int(size), "info.image_size (config.data)")

  def _check_size(self, size: int, what: str) -> None:
    f = self.vae_config.downsample_factor
    if size % f:
      raise InputError(
        f"{what}: expected a multiple of {f} (2^(levels - 1), config.model.block_out_channels="
        f"{tuple(self.vae_config.block_out_channels)}), found {size}"
      )

  def _images(self, batch: dict[str, Any]) -> jax.Array:
    x = batch["image"]
    c = self.vae_config.in_channels
    if x.ndim != 4 or x.shape[-1] != c:
      raise ValueError(
        f"vae batch: image expected (B, H, W, {c}) (config.model.in_channels), found "
        f"{tuple(x.shape)}"
      )
    self._check_size(int(x.shape[1]), "batch image height")
    self._check_size(int(x.shape[2]), "batch image width")
    return jnp.asarray(x, jnp.float32)

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    x = self._images(batch)
    return self.model.init(rng, x[:1])["params"], {}

  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del extra
    x = self._images(batch)
    out = self.model.apply({"params": params}, x, sample_rng=rng if train else None)
    weights = row_weights(batch, x.shape[0])
    per_pixel = jnp.square(out["recon"] - x).reshape(x.shape[0], -1)
    mse = jnp.mean(per_pixel, axis=-1)
    kl = kl_divergence(out["mean"], out["logvar"])
    values = x.shape[1] * x.shape[2] * x.shape[3]
    per_row = mse + jnp.float32(self.kl_weight / values) * kl
    loss = weighted_mean(per_row, weights)
    metrics = {
      "loss": loss,
      "recon_mse": weighted_mean(mse, weights),
      "kl": weighted_mean(kl, weights),
      "psnr": weighted_mean(psnr(mse), weights),
    }
    return loss, metrics

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """mean (B, h, w, latent) posterior means (unscaled) and recon (B, H, W, out_channels),
    their decoding clipped to [-1, 1]."""
    x = self._images(batch)
    mean, _ = self.model.apply({"params": params}, x, method=AutoencoderKL.encode)
    recon = self.model.apply({"params": params}, mean, method=AutoencoderKL.decode)
    return {"mean": mean, "recon": jnp.clip(recon, -1.0, 1.0)}
