"""KL-VAE in the diffusers AutoencoderKL architecture (Stable Diffusion's VAE), NHWC.

diffusers 0.42 has no Flax VAE any more, and fmri2img decodes through SD-1.5's frozen
decoder, so boldjax carries its own; boldjax/convert/vae.py loads diffusers weights into it.
Module and param names follow the torch ones (`down_blocks_0/resnets_1/conv_shortcut`, ...)
so the converter is a rename plus layout changes.

Layout, as diffusers builds it (Encoder / Decoder in diffusers/models/autoencoders/vae.py):
  encoder: conv_in -> per level: layers_per_block ResnetBlock2D (+ Downsample2D: pad
    (0, 1, 0, 1), 3x3 stride-2 conv, on all but the last level) -> mid block (resnet,
    single-head self-attention with GroupNorm and a residual, resnet) -> GroupNorm, SiLU,
    conv_out to 2 * latent_channels; quant_conv (1x1) -> (mean, logvar), logvar clamped
    to [-30, 20].
  decoder: post_quant_conv (1x1) -> conv_in -> mid block -> per level (channels reversed):
    layers_per_block + 1 resnets (+ nearest 2x upsample and a 3x3 conv on all but the last)
    -> GroupNorm, SiLU, conv_out.
Latents are UNscaled everywhere here; `config.scaling_factor` is only for callers that feed
a diffusion model. Params are replicated (the VAE is small; data parallel only); `dtype`
sets the compute dtype of convs and projections, norms and softmax stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Dtype = Any

LOGVAR_RANGE = (-30.0, 20.0)
PARTS = ("encoder", "quant_conv", "post_quant_conv", "decoder")
ENCODER_PARTS = ("encoder", "quant_conv")
DECODER_PARTS = ("post_quant_conv", "decoder")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Sizes of an AutoencoderKL (diffusers' constructor arguments of the same names)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 4
  norm_eps: float = 1e-6
  scaling_factor: float = 0.18215
  mid_attention: bool = True
  name: str = "vae"

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def validate(self) -> None:
    """Raise ValueError naming the field when the sizes cannot build a model."""
    if not self.block_out_channels:
      raise ValueError("block_out_channels: expected at least one level, found ()")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"norm_num_groups: {self.norm_num_groups} does not divide block_out_channels "
          f"{tuple(self.block_out_channels)}"
        )
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block: expected >= 1, found {self.layers_per_block}")


PRESETS: dict[str, VAEConfig] = {
  # Stable Diffusion 1.5's VAE (runwayml/stable-diffusion-v1-5, subfolder vae): 83.7M params.
  "sd15": VAEConfig(name="sd15"),
  # Trains on 2 CPU cores at 64x64 (configs/vae.py: 600 steps of 16 images in ~7 min):
  # 2 down-samplings -> 16x16x4 latents (what fmri2img's encoder emits), one resnet per
  # level, attention at 16x16; 0.68M params.
  "small": VAEConfig(
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, name="small"
  ),
}


def preset(name: str, **overrides: Any) -> VAEConfig:
  """PRESETS[name] with field overrides (tuples for block_out_channels)."""
  if name not in PRESETS:
    raise ValueError(f"VAE preset: expected one of {sorted(PRESETS)}, found {name!r}")
  if "block_out_channels" in overrides:
    overrides["block_out_channels"] = tuple(int(c) for c in overrides["block_out_channels"])
  return dataclasses.replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------------- blocks


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over NHWC, statistics in float32 (two-pass variance, as torch).

  Statistics come from per-channel sums over H, W, grouped afterwards: the same sums as
  a (B, H, W, groups, C/groups) reshape, about 3x faster forward and backward on XLA:CPU.
  """

  groups: int
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    h = x.astype(jnp.float32)
    b, per = h.shape[0], c // self.groups
    n = np.float32(np.prod(h.shape[1:-1]) * per)
    spatial = tuple(range(1, h.ndim - 1))
    expand = (slice(None),) + (None,) * len(spatial) + (slice(None),)

    def group_mean(v: jax.Array) -> jax.Array:  # (B, C) sums -> (B, C) group means
      g = jnp.sum(v.reshape(b, self.groups, per), axis=-1) / n
      return jnp.repeat(g, per, axis=-1)

    d = h - group_mean(jnp.sum(h, axis=spatial))[expand]
    inv = jax.lax.rsqrt(group_mean(jnp.sum(d * d, axis=spatial)) + np.float32(self.eps))
    return (d * (inv * scale)[expand] + bias).astype(x.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, pad: Any = None):
  if pad is None:
    pad = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
    features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
    param_dtype=jnp.float32, name=name,
  )  # fmt: skip


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: norm-SiLU-conv twice, 1x1 shortcut
  when the width changes, output scale 1."""

  out_channels: int
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="norm1")(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="norm2")(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """The VAE mid-block attention: GroupNorm, one head over all positions (scale C^-1/2),
  to_out projection, residual."""

  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    cfg = self.config
    h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="group_norm")(x).reshape(b, hh * ww, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
    q, k, v = (dense(name=n)(h) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * np.float32(1.0 / np.sqrt(c)), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
    out = dense(name="to_out")(out).reshape(b, hh, ww, c)
    return x + out.astype(x.dtype)


class MidBlock(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.config, self.dtype, name="resnets_0")(x)
    if self.config.mid_attention:
      x = Attention(self.config, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.config, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
  """DownEncoderBlock2D: resnets, then (not on the last level) Downsample2D: diffusers pads
  (0, 1, 0, 1) and runs a 3x3 stride-2 conv without padding."""

  out_channels: int
  downsample: bool
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for j in range(self.config.layers_per_block):
      h = ResnetBlock(self.out_channels, self.config, self.dtype, name=f"resnets_{j}")(h)
    if self.downsample:
      h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
      h = Resample(self.out_channels, 2, self.dtype, name="downsamplers_0")(h)
    return h


class UpBlock(nn.Module):
  """UpDecoderBlock2D: layers_per_block + 1 resnets, then (not on the last level)
  Upsample2D: nearest 2x and a 3x3 conv."""

  out_channels: int
  upsample: bool
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for j in range(self.config.layers_per_block + 1):
      h = ResnetBlock(self.out_channels, self.config, self.dtype, name=f"resnets_{j}")(h)
    if self.upsample:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, exact
      h = Resample(self.out_channels, 1, self.dtype, name="upsamplers_0")(h)
    return h


class Resample(nn.Module):
  """The conv of Downsample2D (stride 2, no padding) / Upsample2D (stride 1, padding 1)."""

  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    pad = "VALID" if self.stride == 2 else None
    return _conv(self.features, 3, "conv", self.dtype, stride=self.stride, pad=pad)(h)


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt = self.config, self.dtype
    chans = cfg.block_out_channels
    h = _conv(chans[0], 3, "conv_in", dt)(x.astype(dt))
    for i, c in enumerate(chans):
      h = DownBlock(c, i < len(chans) - 1, cfg, dt, name=f"down_blocks_{i}")(h)
    h = MidBlock(cfg, dt, name="mid_block")(h)
    h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(h))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", dt)(h)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt = self.config, self.dtype
    chans = tuple(reversed(cfg.block_out_channels))
    h = _conv(chans[0], 3, "conv_in", dt)(z.astype(dt))
    h = MidBlock(cfg, dt, name="mid_block")(h)
    for i, c in enumerate(chans):
      h = UpBlock(c, i < len(chans) - 1, cfg, dt, name=f"up_blocks_{i}")(h)
    h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(h))
    return _conv(cfg.out_channels, 3, "conv_out", dt)(h).astype(jnp.float32)


# --------------------------------------------------------------------------------- model


class AutoencoderKL(nn.Module):
  """encode(x) -> (mean, logvar); decode(z) -> images; __call__ -> both (a sampled z when
  sample_rng is given, else the mean). Images NHWC, latents NHWC (B, H/f, W/f, latent)."""

  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype)
    self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(self, x: jax.Array, *, sample_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    mean, logvar = self.encode(x)
    z = mean
    if sample_rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape, mean.dtype)
    return {"mean": mean, "logvar": logvar, "z": z, "recon": self.decode(z)}


# --------------------------------------------------------------------------------- helpers


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per example, summed over the latent dims
  (diffusers' DiagonalGaussianDistribution.kl)."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  per = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(per.reshape(per.shape[0], -1), axis=-1)


def encoder_params(params: Params) -> Params:
  """The params encode() reads ({encoder, quant_conv})."""
  return {k: params[k] for k in ENCODER_PARTS}


def decoder_params(params: Params) -> Params:
  """The params decode() reads ({post_quant_conv, decoder}): what fmri2img freezes."""
  return {k: params[k] for k in DECODER_PARTS}


def encode(
  params: Params, x: jax.Array, config: VAEConfig, *, dtype: Dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """(mean, logvar) of images x (B, H, W, in_channels) in [-1, 1]; params need only
  encoder and quant_conv."""
  return AutoencoderKL(config, dtype).apply(
    {"params": encoder_params(params)}, x, method=AutoencoderKL.encode
  )


def decode(params: Params, z: jax.Array, config: VAEConfig, *, dtype: Dtype = jnp.float32):
  """Images (B, H, W, out_channels) from unscaled latents z; params need only
  post_quant_conv and decoder."""
  return AutoencoderKL(config, dtype).apply(
    {"params": decoder_params(params)}, z, method=AutoencoderKL.decode
  )


def init_params(config: VAEConfig, rng: jax.Array, image_size: int = 0) -> Params:
  """Fresh params (shapes do not depend on the image size; the smallest valid one is used)."""
  size = image_size or config.downsample_factor
  x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  return AutoencoderKL(config).init(rng, x)["params"]


@functools.lru_cache(maxsize=16)
def abstract_params(config: VAEConfig) -> Params:
  """jax.ShapeDtypeStruct tree of the params (nothing allocated; cached per config)."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def num_params(config: VAEConfig) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(config)))
