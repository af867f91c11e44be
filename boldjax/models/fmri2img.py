"""The fmri2img fMRI encoder (aaalgo/fmri2img models/basic_ae.py FmriEncoder), NHWC.

Voxel betas (B, V) -> MLP (exact GELU after EVERY layer, the last included) -> the last
hidden vector read channel-major as torch's view(-1, C, h, w) (feature f = c*h*w + y*w + x)
-> NHWC -> ConvTranspose2d(C -> latent_channels, kernel 4, stride 2, padding 1) -> the
(B, 2h, 2w, latent_channels) latent a frozen VAE decoder turns into an image (unscaled, as
the seed feeds it). The seed hard-codes hidden (2048, 2048, 1024) and a 16x16x4 latent:
here they are fields, with those defaults.

The transposed conv keeps torch's semantics: it is the gradient of a stride-2 conv, i.e. a
conv of the 2x-dilated input with the spatially flipped kernel and padding k-1-p per side.
Its kernel is stored (kh, kw, in, out) unflipped, so kernel[y, x, i, o] = torch w[i, o, y, x].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boldjax.models import layers
from boldjax.models.network_tokenizer import torch_uniform

KERNEL, STRIDE, PADDING = 4, 2, 1  # the seed's deconv1


def reshape_grid(hidden_last: int, latent_hw: Sequence[int]) -> tuple[int, int, int]:
  """(h, w, C) of the channel-major reshape before the transposed conv (it doubles h, w).

  Raises ValueError when the latent grid is odd or the last hidden width is not C * h * w.
  """
  lh, lw = (int(s) for s in latent_hw)
  if lh % STRIDE or lw % STRIDE or lh <= 0 or lw <= 0:
    raise ValueError(f"latent grid: expected even positive sizes, found {(lh, lw)}")
  h, w = lh // STRIDE, lw // STRIDE
  if hidden_last % (h * w):
    raise ValueError(
      f"hidden[-1]: expected a multiple of {h}*{w} (the {lh}x{lw} latent's half grid), "
      f"found {hidden_last}"
    )
  return h, w, hidden_last // (h * w)


def conv_transpose_torch(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """torch ConvTranspose2d (output_padding 0, dilation 1) on NHWC x; kernel (kh, kw, in, out)."""
  kh, kw = kernel.shape[:2]
  flipped = kernel[::-1, ::-1]
  pad = ((kh - 1 - padding, kh - 1 - padding), (kw - 1 - padding, kw - 1 - padding))
  return jax.lax.conv_general_dilated(
    x,
    flipped,
    window_strides=(1, 1),
    padding=pad,
    lhs_dilation=(stride, stride),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


class ConvTransposeTorch(nn.Module):
  """torch ConvTranspose2d(in, features, 4, stride 2, padding 1) with torch's default init."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # torch's fan_in for a ConvTranspose2d weight (in, out, kh, kw) is out * kh * kw.
    fan_in = self.features * KERNEL * KERNEL
    kernel = self.param(
      "kernel",
      layers.partitioned(torch_uniform(fan_in), (None, None, "channels", None)),
      (KERNEL, KERNEL, x.shape[-1], self.features),
    )
    bias = self.param("bias", layers.partitioned(torch_uniform(fan_in), (None,)), (self.features,))
    y = conv_transpose_torch(x.astype(self.dtype), kernel.astype(self.dtype), STRIDE, PADDING)
    return y.astype(jnp.float32) + bias


class FmriEncoder(nn.Module):
  """(B, V) betas -> (B, latent_h, latent_w, latent_channels) latent (torch default init)."""

  input_dim: int
  hidden: tuple[int, ...] = (2048, 2048, 1024)
  latent_hw: tuple[int, int] = (16, 16)
  latent_channels: int = 4
  dtype: Any = jnp.float32  # matmul / conv input dtype; params and outputs float32

  @nn.compact
  def __call__(self, fmri: jax.Array) -> dict[str, jax.Array]:
    """Every intermediate the parity fixture names (NHWC): fc{i}_out (before GELU),
    deconv1_in (B, h, w, C) and latent."""
    h, w, c = reshape_grid(self.hidden[-1], self.latent_hw)
    if fmri.shape[-1] != self.input_dim:
      raise ValueError(f"fmri: expected (B, {self.input_dim}) voxels, found {tuple(fmri.shape)}")
    out: dict[str, jax.Array] = {}
    x = jnp.asarray(fmri, jnp.float32)
    fan_in = self.input_dim
    for i, width in enumerate(self.hidden):
      axes = ("patch", "mlp") if i == 0 else ("embed", "mlp")
      dense = nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.partitioned(torch_uniform(fan_in), axes),
        bias_init=layers.partitioned(torch_uniform(fan_in), (axes[1],)),
        dot_general=layers.dense_dot_general,
        name=f"fc{i + 1}",
      )
      y = dense(x).astype(jnp.float32)
      out[f"fc{i + 1}_out"] = y
      x = layers.gelu(y)
      fan_in = width
    x = x.reshape(x.shape[0], c, h, w).transpose(0, 2, 3, 1)  # channel-major -> NHWC
    out["deconv1_in"] = x
    latent = ConvTransposeTorch(self.latent_channels, dtype=self.dtype, name="deconv1")(x)
    out["deconv1_out"] = out["latent"] = latent
    return out
