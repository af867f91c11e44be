"""FactorTopy (Brain Decodes Deep Nets, arXiv 2312.01280): a vertex-wise encoding model.

Each cortical vertex picks, through three MLPs of its (sinusoidally encoded) coordinates,
WHERE in the image (space selector: tanh -> (x, y)), WHICH layer of a frozen backbone
(softmax over layers) and WHICH scale (sigmoid mix of the local token at (x, y) and the
global token) predict its fMRI response; a per-vertex linear readout of the selected,
bottlenecked token gives the response. The selections, drawn on the cortex, are the
"brain-to-network maps".

Quirks kept from the seed (huzeyann/BrainDecodesDeepNets, see the bddn_encoding fixture):
  - the position encoding normalises by the min / max of the vertex set it is given, so it
    is a constant of the vertex set: compute it once (`position_encoding`) and pass it in;
  - selector MLPs: Linear(192, 128), exact GELU, Linear(128, 128), exact GELU, Linear(128, k,
    no bias, zero-initialised): every vertex starts at the centre, uniform over layers, 0.5;
  - sampling is torch grid_sample (bilinear, zero padding, align_corners=False, x = width);
  - the readout is a MEAN over the bottleneck dim of v * W, plus b;
  - reg = mean_n sum_l p log(p + 1e-8) / log L + mean (s - 0.5)^2 (minimising it maximises
    the layer entropy); objective = smooth_l1(beta 0.1) + reg * 0.1 * max(1 - step/2000, 0).

Layouts are NHWC: local tokens (B, L, h, w, C), global tokens (B, L, C). Tokens may come
from the cache in bfloat16 / float16; everything here computes in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boldjax.models import layers
from boldjax.models.network_tokenizer import torch_uniform

ENTROPY_EPS = 1e-8  # the seed's log(p + 1e-8)


# ------------------------------------------------------------------------ position encoding


def position_encoding(
  coords: Any, num_freqs: int = 32, period: float = 1000.0, max_steps: float = 100.0
) -> np.ndarray:
  """(N, D) vertex coordinates -> (N, D * num_freqs * 2) float32, the seed's PositionalEncoding.

  Every axis is shifted to start at 0 and scaled by max_steps / (largest axis range), then
  encoded as [sin, cos](omega_k * pos) with omega = period ** linspace(0, 1/F - 1, F),
  flattened (axis, freq, sin/cos). Computed in float64 (the seed runs float32; arguments
  reach ~max_steps rad). An axis with zero range (NaN in the seed) raises ValueError.
  """
  x = np.asarray(coords, np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"coords: expected a non-empty (N, D) array, found shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"coords: expected finite values, found {int(np.sum(~np.isfinite(x)))} not")
  low, high = x.min(0), x.max(0)
  span = high - low
  if np.any(span <= 0):
    axes = [int(i) for i in np.flatnonzero(span <= 0)]
    raise ValueError(f"coords: every axis must vary (the encoding divides by its range), "
                     f"found zero range on axis {axes}")  # fmt: skip
  steps = span * (max_steps / span.max())
  pos = (x - low) * (steps / span)  # (N, D)
  omega = float(period) ** np.linspace(0.0, 1.0 / num_freqs - 1.0, num_freqs)
  arg = pos[:, :, None] * omega  # (N, D, F)
  pe = np.stack([np.sin(arg), np.cos(arg)], axis=-1)  # (N, D, F, 2)
  return pe.reshape(x.shape[0], -1).astype(np.float32)


# ------------------------------------------------------------------------ resampling


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch upsample_bilinear2d (align_corners=False) taps along one axis: (i0, i1, l1)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """(..., H, W, C) -> (..., h, w, C) as torch F.interpolate(bilinear, align_corners=False).

  No antialiasing (jax.image.resize antialiases when downsampling, the seed does not): each
  output pixel mixes the two nearest source rows and columns. Computed in float32.
  """
  x = jnp.asarray(x, jnp.float32)
  H, W = x.shape[-3], x.shape[-2]
  h, w = (int(s) for s in size)
  r0, r1, lr = _linear_taps(H, h)
  c0, c1, lc = _linear_taps(W, w)
  lr = jnp.asarray(lr)[:, None, None]
  rows = jnp.take(x, r0, axis=-3) * (1.0 - lr) + jnp.take(x, r1, axis=-3) * lr
  lc = jnp.asarray(lc)[:, None]
  return jnp.take(rows, c0, axis=-2) * (1.0 - lc) + jnp.take(rows, c1, axis=-2) * lc


def bilinear_corners(xy: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """grid_sample's four taps of points xy (..., 2) in [-1, 1] on an (height, width) map.

  Returns (index (4, ...) int32 into the flattened h * w map, weight (4, ...) float32) for
  the corners (nw, ne, sw, se); a corner outside the map gets weight 0 (zero padding) and
  a clamped index. align_corners=False: pixel centres at (2i + 1) / size - 1; x -> width.
  """
  xy = jnp.asarray(xy, jnp.float32)
  ix = ((xy[..., 0] + 1.0) * width - 1.0) / 2.0
  iy = ((xy[..., 1] + 1.0) * height - 1.0) / 2.0
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  x1, y1 = x0 + 1.0, y0 + 1.0
  corners = (
    (x0, y0, (x1 - ix) * (y1 - iy)),
    (x1, y0, (ix - x0) * (y1 - iy)),
    (x0, y1, (x1 - ix) * (iy - y0)),
    (x1, y1, (ix - x0) * (iy - y0)),
  )
  index, weight = [], []
  for cx, cy, wt in corners:
    inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
    xi = jnp.clip(cx, 0, width - 1).astype(jnp.int32)
    yi = jnp.clip(cy, 0, height - 1).astype(jnp.int32)
    index.append(yi * width + xi)
    weight.append(jnp.where(inside, wt, 0.0))
  return jnp.stack(index), jnp.stack(weight)


@jax.custom_vjp
def sample_layers(maps: jax.Array, index: jax.Array, weight: jax.Array, p: jax.Array) -> jax.Array:
  """sum_l p[n, l] sum_c weight[c, n] maps[l, index[c, n], :]: (L, K, F) -> (N, F).

  The 4 bilinear taps of every point (bilinear_corners) on L maps of K pixels, mixed with
  per-point layer weights p (N, L). Pixel-major layout: each tap copies one contiguous
  row of F = batch x channels values. Forward: 4 L row gathers. Backward: two dense
  matmuls over the N x (L K) pixels: the map gradient = (interpolation matrix)^T dv
  (autodiff would scatter-add N x 4L rows into K pixels: 50x slower on XLA:CPU, atomics
  on GPU), and dv . maps for every pixel, whose 4 taps per layer give the tap and layer
  weight gradients.
  """
  L = maps.shape[0]
  out = jnp.zeros((index.shape[1], maps.shape[2]), jnp.float32)
  for i in range(L):
    for c in range(4):
      out = out + (weight[c] * p[:, i])[:, None] * jnp.take(maps[i], index[c], axis=0)
  return out


def _sample_layers_fwd(maps, index, weight, p):
  return sample_layers(maps, index, weight, p), (maps, index, weight, p)


def _sample_layers_bwd(res, dv):
  maps, index, weight, p = res
  K = maps.shape[1]
  prod = jnp.einsum("nf,lkf->nlk", dv, maps)  # dv . every pixel of every layer
  g = jnp.take_along_axis(prod, jnp.transpose(index)[:, None, :], axis=2)  # (N, L, 4)
  d_p = jnp.einsum("nlc,cn->nl", g, weight)
  d_weight = jnp.einsum("nlc,nl->cn", g, p)
  pixels = jnp.arange(K, dtype=index.dtype)
  interp = sum(weight[c][:, None] * (index[c][:, None] == pixels) for c in range(4))  # (N, K)
  mix = p[:, :, None] * interp[:, None, :]  # (N, L, K)
  d_maps = jnp.einsum("nlk,nf->lkf", mix, dv)
  return d_maps.astype(maps.dtype), None, d_weight, d_p


sample_layers.defvjp(_sample_layers_fwd, _sample_layers_bwd)


def grid_sample_bilinear(maps: jax.Array, xy: jax.Array) -> jax.Array:
  """maps (B, H, W, C), points xy (N, 2) shared by the batch -> samples (B, N, C).

  torch F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False) with the
  NCHW map and a (B, N, 1, 2) grid, transposed to NHWC: a gather of the 4 neighbours.
  """
  maps = jnp.asarray(maps, jnp.float32)
  B, H, W, C = maps.shape
  index, weight = bilinear_corners(xy, H, W)
  rows = jnp.transpose(maps, (1, 2, 0, 3)).reshape(1, H * W, B * C)
  out = sample_layers(rows, index, weight, jnp.ones((index.shape[1], 1), jnp.float32))
  return jnp.transpose(out.reshape(-1, B, C), (1, 0, 2))


# ------------------------------------------------------------------------ objective


def smooth_l1(
  pred: jax.Array, target: jax.Array, beta: float = 1.0, row_weights: jax.Array | None = None
) -> jax.Array:
  """torch F.smooth_l1_loss(pred, target, beta) (mean over every element).

  With row_weights (B,), the weighted mean over rows (axis 0) of the per-row mean: rows of
  weight 0 (padding) do not count. beta = 0 is the plain L1 (as torch).
  """
  d = jnp.abs(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  if beta > 0:
    loss = jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
  else:
    loss = d
  if row_weights is None:
    return jnp.mean(loss)
  w = jnp.asarray(row_weights, jnp.float32)
  per_row = jnp.mean(loss.reshape(loss.shape[0], -1), axis=1)
  return jnp.sum(w * per_row) / jnp.maximum(jnp.sum(w), 1e-12)


def reg_decay(step: Any, steps: int = 2000) -> Any:
  """The regulariser's weight factor max(1 - step / steps, 0).

  A python / numpy integer step gives a python float (float64, as the seed's global_step
  arithmetic); a jax array step gives float32 (inside a jitted loss).
  """
  if isinstance(step, (int, np.integer)):
    return max(1.0 - int(step) / steps, 0.0)
  # From the integer steps left: XLA turns the division by a constant into a multiply by
  # its reciprocal, so 1 - step / steps would be fused to 1 - step * (1 / steps) (1 ulp off
  # at step = steps / 2, worse near the end); step 0 gives exactly 1.
  left = jnp.clip(steps - jnp.asarray(step).astype(jnp.int32), 0, steps)
  return jnp.where(left == steps, 1.0, left.astype(jnp.float32) / jnp.float32(steps))


def entropy_regulariser(sel_layer: jax.Array, sel_scale: jax.Array) -> dict[str, jax.Array]:
  """The seed's reg: mean_n sum_l p log(p + 1e-8) / log L + mean (s - 0.5)^2.

  With one layer the entropy term is 0 (the seed divides 0 by log 1 = 0 and gets NaN).
  """
  L = sel_layer.shape[-1]
  entropy = jnp.mean(jnp.sum(jnp.log(sel_layer + ENTROPY_EPS) * sel_layer, axis=-1))
  entropy = entropy / jnp.float32(np.log(L)) if L > 1 else jnp.zeros((), jnp.float32)
  scale = jnp.mean(jnp.square(sel_scale - 0.5))
  return {"reg": entropy + scale, "reg_entropy": entropy, "reg_scale": scale}


# ------------------------------------------------------------------------ model


class Selector(nn.Module):
  """(N, 6F) position encoding -> (N, k) logits: Linear, GELU, Linear, GELU, Linear(no bias)."""

  features: int
  hidden: int = 128

  @nn.compact
  def __call__(self, pe: jax.Array) -> jax.Array:
    h = pe
    for i in range(2):
      fan_in = h.shape[-1]
      h = nn.Dense(
        self.hidden,
        kernel_init=torch_uniform(fan_in),
        bias_init=torch_uniform(fan_in),
        name=f"hidden_{i}",
      )(h)
      h = layers.gelu(h)
    return nn.Dense(
      self.features, use_bias=False, kernel_init=nn.initializers.zeros_init(), name="out"
    )(h)


_bottleneck_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class FactorTopy(nn.Module):
  """Per-vertex layer / space / scale selection and linear readout of frozen-backbone tokens.

  token_dim: the tokens' width, one int for every layer or one per layer (checked).
  __call__(pe (N, 6 num_freqs), local (B, L, h, w, C) or L arrays (B, h, w, C_l),
  global_ (B, L, C) or L arrays (B, C_l)) -> dict:
    y (B, N); sel_space (N, 2) (x = width, y = height, in (-1, 1)); sel_layer (N, L);
    sel_scale (N, 1) (weight of the global token); reg, reg_entropy, reg_scale (scalars);
    local_bottleneck (B, L, h, w, bottleneck), global_bottleneck (B, L, bottleneck).
  Params: {space,layer,scale}_selector/{hidden_0,hidden_1,out}, local_bottleneck_{l} /
  global_bottleneck_{l} (kernel (C_l, bottleneck), no bias), weight (N, bottleneck), bias (N,).
  """

  num_vertices: int
  num_layers: int
  token_dim: int | tuple[int, ...] | None = None
  bottleneck: int = 128
  hidden: int = 128
  num_freqs: int = 32

  def _layers(self, tokens: Any, kind: str, rank: int) -> list[jax.Array]:
    """Per-layer float32 arrays from a stacked array or a sequence, with their sizes checked."""
    if isinstance(tokens, (list, tuple)):
      parts = [jnp.asarray(t, jnp.float32) for t in tokens]
    else:
      tokens = jnp.asarray(tokens, jnp.float32)
      if tokens.ndim != rank + 1:
        raise ValueError(f"FactorTopy {kind}: expected {rank + 1} axes (B, L, ...), found "
                         f"shape {tokens.shape}")  # fmt: skip
      parts = [tokens[:, i] for i in range(tokens.shape[1])]
    if len(parts) != self.num_layers:
      raise ValueError(f"FactorTopy {kind}: expected num_layers={self.num_layers} layers, "
                       f"found {len(parts)}")  # fmt: skip
    dims = self.token_dim
    if dims is not None:
      dims = (dims,) * self.num_layers if isinstance(dims, int) else tuple(dims)
      found = tuple(int(p.shape[-1]) for p in parts)
      if found != dims:
        raise ValueError(f"FactorTopy {kind}: expected token widths {dims}, found {found}")
    for p in parts:
      if p.ndim != rank:
        raise ValueError(f"FactorTopy {kind}: expected per-layer arrays of {rank} axes, "
                         f"found shape {p.shape}")  # fmt: skip
    return parts

  def setup(self) -> None:
    L, bd = self.num_layers, self.bottleneck
    self.space_selector = Selector(2, self.hidden)
    self.layer_selector = Selector(L, self.hidden)
    self.scale_selector = Selector(1, self.hidden)
    # 1x1 conv / Linear without bias, torch's default U(+-1/sqrt(C)) from the kernel's fan-in.
    self.local_bottleneck = [
      nn.Dense(bd, use_bias=False, kernel_init=_bottleneck_init) for _ in range(L)
    ]
    self.global_bottleneck = [
      nn.Dense(bd, use_bias=False, kernel_init=_bottleneck_init) for _ in range(L)
    ]
    self.weight = self.param("weight", torch_uniform(bd), (self.num_vertices, bd), jnp.float32)
    self.bias = self.param("bias", torch_uniform(bd), (self.num_vertices,), jnp.float32)

  def selections(self, pe: jax.Array) -> dict[str, jax.Array]:
    """Per-vertex sel_space (N, 2) (tanh), sel_layer (N, L) (softmax), sel_scale (N, 1)."""
    pe = jnp.asarray(pe, jnp.float32)
    if pe.shape[0] != self.num_vertices:
      raise ValueError(f"FactorTopy pe: expected {self.num_vertices} rows (num_vertices), "
                       f"found shape {pe.shape}")  # fmt: skip
    return {
      "sel_space": jnp.tanh(self.space_selector(pe)),
      "sel_layer": jax.nn.softmax(self.layer_selector(pe), axis=-1),
      "sel_scale": jax.nn.sigmoid(self.scale_selector(pe)),
    }

  def __call__(self, pe: jax.Array, local: Any, global_: Any) -> dict[str, jax.Array]:
    N, L, bd = self.num_vertices, self.num_layers, self.bottleneck
    locs = self._layers(local, "local tokens", 4)
    globs = self._layers(global_, "global tokens", 2)

    loc_b = jnp.stack([self.local_bottleneck[i](x) for i, x in enumerate(locs)], 1)
    glob_b = jnp.stack([self.global_bottleneck[i](x) for i, x in enumerate(globs)], 1)
    sel = self.selections(pe)
    sel_space, sel_layer, sel_scale = sel["sel_space"], sel["sel_layer"], sel["sel_scale"]

    # v_local[n, b] = sum_l p[n, l] * bilinear sample of layer l at (x_n, y_n).
    B, _, h, w, _ = loc_b.shape
    index, weight = bilinear_corners(sel_space, h, w)  # (4, N)
    rows = jnp.transpose(loc_b, (1, 2, 3, 0, 4)).reshape(L, h * w, B * bd)
    v_local = sample_layers(rows, index, weight, sel_layer).reshape(N, B, bd)

    # y = mean_d(v * W) + b with v = (1 - s) v_local + s v_global, v_global = sum_l p g_l:
    # the global part as sum_l p[n, l] <g_l[b], W[n]>, without a (B, N, bd) v_global.
    weight_n, bias_n = self.weight, self.bias
    y_local = jnp.einsum("nbd,nd->bn", v_local, weight_n)
    y_global = jnp.einsum("nl,bln->bn", sel_layer, jnp.einsum("bld,nd->bln", glob_b, weight_n))
    s = sel_scale[:, 0]
    y = ((1.0 - s) * y_local + s * y_global) / jnp.float32(bd) + bias_n
    return {
      "y": y,
      "sel_space": sel_space,
      "sel_layer": sel_layer,
      "sel_scale": sel_scale,
      **entropy_regulariser(sel_layer, sel_scale),
      "local_bottleneck": loc_b,
      "global_bottleneck": glob_b,
    }
