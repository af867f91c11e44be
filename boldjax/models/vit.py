"""One Flax ViT for the frozen vision backbones of encoding models (CLIP, DINOv2, MAE, timm).

Images are NHWC floats. The token order is the one timm and open_clip use: class token,
then register tokens, then patches in row-major grid order. Every block's output is
returned (the seed's get_tokens() reads raw block outputs, not normed ones).

The options are the ones that change numbers in the published towers:
  - pos_embed_on="all": the learned position embedding covers every token (OpenAI CLIP,
    timm default); "patches": patches only, prefix tokens get none (timm `no_embed_class`,
    DINOv2 with registers as timm ships it).
  - act: exact erf GELU (timm, DINOv2, MAE) or QuickGELU x sigmoid(1.702 x) (OpenAI CLIP).
  - ln_pre (CLIP `ln_pre`, timm `norm_pre`), final_norm (CLIP `ln_post`, timm `norm`),
    fc_norm (timm, after pooling), output_dim (CLIP `proj`), LayerScale, LayerNorm eps.

Other image sizes: the patch part of the position embedding is resampled to the new grid
with bicubic interpolation, half-pixel centres, antialiased when shrinking
(jax.image.resize "cubic"): the same numbers as torch's F.interpolate(mode="bicubic",
antialias=True, align_corners=False), which timm's resample_abs_pos_embed and open_clip's
resize_pos_embed use (checked in tests/test_parity_vision.py). Prefix position vectors are
kept as they are. (facebookresearch/dinov2's own hub code resamples without antialiasing,
so its tokens at other sizes differ slightly from timm's and from these.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boldjax.cli import InputError
from boldjax.models.layers import Attention, constrain, dense, gelu, layer_norm, partitioned

Params = Any
POS_EMBED_ON = ("all", "patches")
ACTS = ("gelu", "quick_gelu")
POOLS = ("token", "avg")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT tower; sizes as in the published checkpoint."""

  image_size: int = 224  # the size the position embedding was trained at
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  num_registers: int = 0
  class_token: bool = True
  pos_embed_on: str = "all"  # "all" tokens (CLIP, timm) | "patches" (timm no_embed_class)
  ln_pre: bool = False  # CLIP ln_pre / timm norm_pre
  final_norm: bool = True  # CLIP ln_post / timm norm (over all tokens)
  fc_norm: bool = False  # timm fc_norm (after pooling)
  pool: str = "token"  # pooled feature: class token | "avg" of patch tokens (timm)
  output_dim: int | None = None  # CLIP proj (width -> output_dim)
  act: str = "gelu"  # "gelu" (exact erf) | "quick_gelu" (OpenAI CLIP)
  layerscale_init: float | None = None  # LayerScale gamma init; None: no LayerScale
  ln_eps: float = 1e-6  # timm 1e-6, CLIP (torch default) 1e-5
  qkv_bias: bool = True
  patch_bias: bool = True  # CLIP conv1 has no bias, timm's patch_embed has one
  channels: int = 3
  name: str = "vit"

  def __post_init__(self) -> None:
    def bad(field: str, expected: str) -> None:
      found = getattr(self, field)
      raise InputError(f"ViTConfig({self.name}).{field}: expected {expected}, found {found!r}")

    if self.pos_embed_on not in POS_EMBED_ON:
      bad("pos_embed_on", f"one of {POS_EMBED_ON}")
    if self.act not in ACTS:
      bad("act", f"one of {ACTS}")
    if self.pool not in POOLS:
      bad("pool", f"one of {POOLS}")
    if self.pool == "token" and not self.class_token:
      bad("pool", "'avg' when class_token=False")
    if self.heads <= 0 or self.width % self.heads:
      bad("heads", f"a divisor of width={self.width}")
    if self.patch_size <= 0 or self.image_size < self.patch_size:
      bad("patch_size", f"between 1 and image_size={self.image_size}")
    if self.layers <= 0:
      bad("layers", "a positive number")

  @property
  def grid(self) -> int:
    """Patches per side at image_size (the position embedding's grid)."""
    return self.image_size // self.patch_size

  @property
  def num_prefix(self) -> int:
    """Tokens before the patches: class token + registers."""
    return int(self.class_token) + self.num_registers

  @property
  def num_pos(self) -> int:
    """Rows of the position embedding."""
    prefix = self.num_prefix if self.pos_embed_on == "all" else 0
    return self.grid**2 + prefix

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)  # as timm and open_clip round it


PRESETS: dict[str, ViTConfig] = {
  # OpenAI CLIP ViT-B/16 visual tower (open_clip "ViT-B-16", quick_gelu).
  "clip_b16": ViTConfig(
    image_size=224, patch_size=16, width=768, layers=12, heads=12, ln_pre=True,
    output_dim=512, act="quick_gelu", ln_eps=1e-5, patch_bias=False, name="clip_b16",
  ),
  # timm vit_small_patch14_reg4_dinov2: 518 px (37 x 37 grid), 4 registers, LayerScale,
  # position embedding on patches only (timm folds DINOv2's class position into cls_token).
  "dinov2_s14": ViTConfig(
    image_size=518, patch_size=14, width=384, layers=12, heads=6, num_registers=4,
    pos_embed_on="patches", layerscale_init=1e-5, name="dinov2_s14",
  ),
  # timm vit_base_patch16_224.mae (pretraining weights: final norm, class-token pool).
  "mae_b16": ViTConfig(
    image_size=224, patch_size=16, width=768, layers=12, heads=12, name="mae_b16",
  ),
  # A small random backbone for the synthetic default on 2 CPU cores: 64 px -> 8 x 8 grid.
  "tiny": ViTConfig(
    image_size=64, patch_size=8, width=64, layers=4, heads=4, name="tiny",
  ),
}  # fmt: skip


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation."""
  return x * jax.nn.sigmoid(np.float32(1.702) * x)


def resample_pos_grid(pos: jax.Array, old: tuple[int, int], new: tuple[int, int]) -> jax.Array:
  """(1, old_h*old_w, C) patch position vectors -> (1, new_h*new_w, C), bicubic (see above)."""
  if tuple(old) == tuple(new):
    return pos
  c = pos.shape[-1]
  grid = pos.reshape(1, old[0], old[1], c).astype(jnp.float32)
  out = jax.image.resize(grid, (1, new[0], new[1], c), method="cubic", antialias=True)
  return out.reshape(1, new[0] * new[1], c).astype(pos.dtype)


class LayerScale(nn.Module):
  """x * gamma (per channel), timm / DINOv2 LayerScale."""

  init_value: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = partitioned(nn.initializers.constant(self.init_value), ("embed",))
    gamma = self.param("gamma", init, (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class ViTMlp(nn.Module):
  hidden_dim: int
  act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = quick_gelu(x) if self.act == "quick_gelu" else gelu(x)
    return dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class ViTBlock(nn.Module):
  """Pre-LN block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    y = layer_norm(cfg.ln_eps, dtype=self.dtype, name="norm1")(x)
    y = Attention(cfg.width, cfg.heads, qkv_bias=cfg.qkv_bias, dtype=self.dtype, name="attn")(y)
    if cfg.layerscale_init is not None:
      y = LayerScale(cfg.layerscale_init, name="ls1")(y)
    x = x + y
    y = layer_norm(cfg.ln_eps, dtype=self.dtype, name="norm2")(x)
    y = ViTMlp(cfg.mlp_dim, cfg.act, dtype=self.dtype, name="mlp")(y)
    if cfg.layerscale_init is not None:
      y = LayerScale(cfg.layerscale_init, name="ls2")(y)
    return constrain(x + y)


class ViT(nn.Module):
  """images (B, H, W, channels) -> {"blocks": [(B, T, C)] per block, "features": final-normed
  tokens, "pooled", "embedding": pooled @ proj (pooled itself without output_dim)}."""

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, Any]:
    cfg = self.config
    p, c = cfg.patch_size, cfg.width
    if images.ndim != 4 or images.shape[-1] != cfg.channels:
      raise ValueError(
        f"ViT({cfg.name}): images expected (B, H, W, {cfg.channels}), found {images.shape}"
      )
    x = nn.Conv(
      c, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias, dtype=self.dtype,
      kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)), name="patch_embed",
    )(images)  # fmt: skip
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, c)

    prefix = []
    if cfg.class_token:
      init = partitioned(nn.initializers.normal(1e-6), (None, None, "embed"))
      prefix.append(self.param("cls_token", init, (1, 1, c), jnp.float32))
    if cfg.num_registers:
      init = partitioned(nn.initializers.normal(1e-6), (None, None, "embed"))
      prefix.append(self.param("reg_tokens", init, (1, cfg.num_registers, c), jnp.float32))
    prefix = [jnp.broadcast_to(t, (b,) + t.shape[1:]).astype(x.dtype) for t in prefix]

    init = partitioned(nn.initializers.normal(0.02), (None, None, "embed"))
    pos = self.param("pos_embed", init, (1, cfg.num_pos, c), jnp.float32)
    n_pre = cfg.num_pos - cfg.grid**2
    grid_pos = resample_pos_grid(pos[:, n_pre:], (cfg.grid, cfg.grid), (gh, gw))
    if cfg.pos_embed_on == "patches":
      x = jnp.concatenate(prefix + [x + grid_pos.astype(x.dtype)], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1)
      x = x + jnp.concatenate([pos[:, :n_pre], grid_pos], axis=1).astype(x.dtype)
    if cfg.ln_pre:
      x = layer_norm(cfg.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = constrain(x)

    blocks = []
    for i in range(cfg.layers):
      x = ViTBlock(cfg, dtype=self.dtype, name=f"blocks_{i}")(x)
      blocks.append(x)

    features = layer_norm(cfg.ln_eps, dtype=self.dtype, name="norm")(x) if cfg.final_norm else x
    if cfg.pool == "token":
      pooled = features[:, 0]
    else:
      pooled = features[:, cfg.num_prefix :].mean(axis=1)
    if cfg.fc_norm:
      pooled = layer_norm(cfg.ln_eps, dtype=self.dtype, name="fc_norm")(pooled)
    embedding = pooled
    if cfg.output_dim is not None:
      embedding = dense(cfg.output_dim, ("embed", None), use_bias=False, name="proj")(pooled)
    return {"blocks": blocks, "features": features, "pooled": pooled, "embedding": embedding}


def _unbox(tree: Any) -> Any:
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
  )


def init_params(config: ViTConfig, rng: jax.Array) -> Params:
  """Random params of the ViT `config` describes (plain arrays, no partitioning boxes)."""
  shape = (1, config.image_size, config.image_size, config.channels)
  variables = ViT(config).init(rng, jnp.zeros(shape, jnp.float32))
  return _unbox(variables["params"])


@functools.cache
def abstract_params(config: ViTConfig) -> Params:
  """jax.ShapeDtypeStruct tree of the params (nothing is allocated; cached per config)."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def get_tokens(params: Params, images: jax.Array, config: ViTConfig) -> tuple[jax.Array, jax.Array]:
  """The seed's get_tokens(): per block, local tokens (B, L, H', W', C) (patch tokens on the
  grid, registers dropped) and global tokens (B, L, C) (the class token; the mean patch token
  for towers without one). Raw block outputs, as the seed reads them."""
  blocks = ViT(config).apply({"params": params}, images)["blocks"]
  tokens = jnp.stack(blocks, axis=1)  # (B, L, T, C)
  b, n_layers, _, c = tokens.shape
  gh, gw = images.shape[1] // config.patch_size, images.shape[2] // config.patch_size
  local = tokens[:, :, config.num_prefix :].reshape(b, n_layers, gh, gw, c)
  glob = tokens[:, :, 0] if config.class_token else local.mean(axis=(2, 3))
  return local, glob
