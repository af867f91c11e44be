"""Brain-Semantoks' network tokenizer: each functional network's ROIs x time -> one token per
time patch, through convolution or SLConv branches (the SLConv kernels are frozen buffers
built from decaying multi-scale kernels), with the cheaper of the conv and linear-map forms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boldjax.models import layers
from boldjax.models.layers import Dtype


def torch_uniform(fan_in: int) -> layers.Initializer:
  """PyTorch's default Linear / Conv init, U(+-1/sqrt(fan_in)), for any kernel layout."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TokenizerBranch(NamedTuple):
  """One branch of a FlexibleNetworkTokenizer (hashable, so it can be a module attribute)."""

  type: str  # "dense" / "dilated" (Conv1d) or "sgconv" (SLConv + Linear)
  out_channels: int
  kernel_size: int
  depthwise: bool = False
  dilation: int = 1
  num_scales: int = 3
  decay_min: float = 2.0
  decay_max: float = 2.0


def branches_from_config(
  config: Sequence[Mapping[str, Any]], source: str = "tokenizer_config"
) -> tuple[TokenizerBranch, ...]:
  """The original's `tokenizer_config` list of dicts -> TokenizerBranch tuple."""
  out = []
  for i, cfg in enumerate(config):
    kind = cfg.get("type")
    if kind not in ("dense", "dilated", "sgconv"):
      raise ValueError(
        f"{source}[{i}].type: expected 'dense', 'dilated' or 'sgconv', found {kind!r}"
      )
    out.append(
      TokenizerBranch(
        type=kind,
        out_channels=int(cfg["out_channels"]),
        kernel_size=int(cfg["kernel_size"]),
        depthwise=bool(cfg.get("depthwise", False)),
        dilation=int(cfg.get("dilation", 1)),
        num_scales=int(cfg.get("num_scales", 3)),
        decay_min=float(cfg.get("decay_min", 2.0)),
        decay_max=float(cfg.get("decay_max", 2.0)),
      )
    )
  return tuple(out)


def network_rois_from_map(network_map: np.ndarray) -> tuple[tuple[int, ...], ...]:
  """ROI indices (in ROI order) of each network, networks in ascending id order.

  network_map: (R,) integer network id per ROI (the original's `CNN_TF.network_map`).
  """
  m = np.asarray(network_map)
  if m.ndim != 1 or m.dtype.kind not in "iu":
    raise ValueError(f"network_map: expected a 1-D integer array, found {m.dtype} {m.shape}")
  return tuple(tuple(int(i) for i in np.flatnonzero(m == n)) for n in np.unique(m))


def slconv_kernel(kernels: Sequence[jax.Array], multiplier: jax.Array | np.ndarray) -> jax.Array:
  """SGConv kernel (heads, R, L): scale i upsampled (nearest) x2**max(0, i-1) and multiplied
  by multiplier**(S-i-1) (multiplier (R,), one decay per channel), concatenated in time."""
  S = len(kernels)
  mult = jnp.asarray(multiplier, jnp.float32)[None, :, None]
  parts = [
    jnp.repeat(k, 2 ** max(0, i - 1), axis=-1) * mult ** (S - i - 1) for i, k in enumerate(kernels)
  ]
  return jnp.concatenate(parts, axis=-1)


def slconv_multiplier(decay_min: float, decay_max: float, channels: int) -> np.ndarray:
  """The original's `multiplier` buffer: linspace(decay_min, decay_max, channels) (float32)."""
  return np.linspace(decay_min, decay_max, channels).astype(np.float32)


class SLConv(nn.Module):
  """Structured long convolution (SGConv style, mackelab/neural_timeseries_diffusion).

  Input (N, L, R) channels-last. Output (N, L, R*heads), channel roi*heads + head, as the
  original's grouped conv1d: true convolution of each ROI with each head's normalised kernel
  (zero padding (K-1)//2 left, the rest right), plus the skip term D[head, roi] * x.
  Params: kernel_0..kernel_{S-1} (heads, R, kernel_size), D (heads, R);
  buffer "buffers"/kernel_norm (heads, R, 1) = L2 norm of the initial kernel over time.
  """

  channels: int
  heads: int
  kernel_size: int
  num_scales: int
  decay_min: float = 2.0
  decay_max: float = 2.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    H, R = self.heads, self.channels
    normal = nn.initializers.normal(1.0)
    axes = (None, None, None)
    kernels = [
      self.param(f"kernel_{i}", layers.partitioned(normal, axes), (H, R, self.kernel_size))
      for i in range(self.num_scales)
    ]
    d = self.param("D", layers.partitioned(normal, (None, None)), (H, R))
    k = slconv_kernel(kernels, slconv_multiplier(self.decay_min, self.decay_max, R))
    norm = self.variable(
      "buffers",
      "kernel_norm",
      lambda: jax.lax.stop_gradient(jnp.linalg.norm(k, axis=-1, keepdims=True)),
    ).value
    K = k.shape[-1]
    L = x.shape[1]
    if K > L:
      raise ValueError(f"SLConv: kernel length {K} exceeds the signal length {L} (patch size)")
    k = k / jax.lax.stop_gradient(norm)
    # True convolution = cross-correlation with the flipped kernel, written as K shifted
    # windows and one einsum: XLA's CPU grouped convolution (and its gradient) is several
    # times slower at these sizes (a patch of 4-20 frames, K <= 16). Channel = roi*H + head.
    left = (K - 1) // 2
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (left, K - 1 - left), (0, 0)))
    windows = jnp.stack([xp[:, i : i + L] for i in range(K)], axis=2)  # (n, L, K, R)
    y = jnp.einsum("nlkr,hrk->nlrh", windows, jnp.flip(k, -1).astype(self.dtype))
    y = y + jnp.einsum("nlr,hr->nlrh", x.astype(self.dtype), d.astype(self.dtype))
    return y.reshape(*y.shape[:2], R * H)


class ConvBranch(nn.Module):
  """Conv1d(R -> C, k, padding 'same', dilation) or its depthwise-separable form."""

  branch: TokenizerBranch
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, R = self.branch, x.shape[-1]
    total = b.dilation * (b.kernel_size - 1)
    pad = [(total // 2, total - total // 2)]

    def conv(features, k, groups, name, dilation=1, padding=((0, 0),)):
      fan_in = (R // groups) * k
      return nn.Conv(
        features,
        (k,),
        padding=padding,
        kernel_dilation=(dilation,),
        feature_group_count=groups,
        dtype=self.dtype,
        kernel_init=layers.partitioned(torch_uniform(fan_in), (None, None, "embed")),
        bias_init=layers.partitioned(torch_uniform(fan_in), ("embed",)),
        name=name,
      )

    if b.depthwise:
      x = conv(R, b.kernel_size, R, "depthwise", b.dilation, pad)(x)
      return conv(b.out_channels, 1, 1, "pointwise")(x)
    return conv(b.out_channels, b.kernel_size, 1, "conv", b.dilation, pad)(x)


class SLConvBranch(nn.Module):
  """SLConv with ceil(C / R) heads, then Linear(heads*R -> C) at every time step."""

  branch: TokenizerBranch
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, R = self.branch, x.shape[-1]
    heads = math.ceil(b.out_channels / R)
    y = SLConv(
      R, heads, b.kernel_size, b.num_scales, b.decay_min, b.decay_max, self.dtype, name="slconv"
    )(x)
    fan_in = heads * R
    return nn.Dense(
      b.out_channels,
      dtype=self.dtype,
      kernel_init=layers.partitioned(torch_uniform(fan_in), (None, "embed")),
      bias_init=layers.partitioned(torch_uniform(fan_in), ("embed",)),
      dot_general=layers.dense_dot_general,
      name="projection",
    )(y)


def layer_norm(name: str | None = None, eps: float = 1e-5) -> nn.LayerNorm:
  """PyTorch LayerNorm (eps 1e-5, two-pass variance) with "embed"-named params."""
  return nn.LayerNorm(
    epsilon=eps,
    use_fast_variance=False,
    dtype=jnp.float32,
    scale_init=layers.partitioned(nn.initializers.ones_init(), ("embed",)),
    bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
    name=name,
  )


def _branch_macs(b: TokenizerBranch, rois: int) -> int:
  """Multiply-adds per time step of one branch applied directly to (.., L, rois)."""
  if b.type == "sgconv":
    heads = math.ceil(b.out_channels / rois)
    taps = sum(b.kernel_size * 2 ** max(0, i - 1) for i in range(b.num_scales))
    return heads * rois * (taps + 1) + heads * rois * b.out_channels
  if b.depthwise:
    return b.kernel_size * rois + rois * b.out_channels
  return b.kernel_size * rois * b.out_channels


def linear_map_is_cheaper(branches: Sequence[TokenizerBranch], length: int, rois: int) -> bool:
  """Whether NetworkTokenizer's dense (L R_n, L C) map costs at most 2x the direct branches
  (it runs as one large matmul instead of several small convolutions): short patches."""
  width = sum(b.out_channels for b in branches)
  return length * rois * width <= 2 * sum(_branch_macs(b, rois) for b in branches)


class NetworkTokenizer(nn.Module):
  """One network's patches (N, patch, R_n) -> tokens (N, sum of branch channels).

  Every branch is affine in its input (zero-padded convolutions, SLConv, Linear), so the
  branches' concatenated output is x (N, L R_n) @ W + b with W (L R_n, L C). linear_map=True
  computes W and b by running the branches on the L R_n unit patches and a zero patch (a
  batch of L R_n + 1 instead of N) and applies them as one matmul: the same function of the
  same parameters (gradients included) up to float rounding, and much faster on XLA:CPU for
  short patches (issue #6: the direct path costs ~15 small convolution / einsum ops per
  network). None picks it when its multiply-adds are at most 2x the direct ones
  (linear_map_is_cheaper).
  """

  branches: tuple[TokenizerBranch, ...]
  final_norm: str = "layer"  # "layer" or anything else = identity (the original's test)
  pooling: str = "mean"  # "mean" or "max"
  dtype: Dtype = jnp.float32
  linear_map: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, L, R = x.shape
    modules = [
      (SLConvBranch if b.type == "sgconv" else ConvBranch)(b, self.dtype, name=f"branch_{i}")
      for i, b in enumerate(self.branches)
    ]
    use_map = self.linear_map
    if use_map is None:
      use_map = linear_map_is_cheaper(self.branches, L, R)
    if use_map:
      # Unit patches e_(l, r) (row l R + r, as x.reshape(n, L R) orders them) and a zero patch.
      probe = jnp.concatenate(
        [jnp.eye(L * R, dtype=self.dtype).reshape(L * R, L, R), jnp.zeros((1, L, R), self.dtype)]
      )
      resp = jnp.concatenate([m(probe) for m in modules], axis=-1)  # (L R + 1, L, C)
      bias = resp[-1]
      weight = (resp[:-1] - bias).reshape(L * R, -1)
      y = jnp.dot(x.astype(self.dtype).reshape(n, L * R), weight).reshape(n, L, -1) + bias
    else:
      y = jnp.concatenate([m(x) for m in modules], axis=-1)
    y = layers.gelu(y.astype(jnp.float32), approximate=False)
    if self.pooling == "mean":
      y = jnp.mean(y, axis=1)
    elif self.pooling == "max":
      y = jnp.max(y, axis=1)
    else:
      raise ValueError(
        f"NetworkTokenizer.pooling: expected 'mean' or 'max', found {self.pooling!r}"
      )
    return layer_norm("norm")(y) if self.final_norm == "layer" else y
