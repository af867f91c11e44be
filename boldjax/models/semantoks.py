"""Brain-Semantoks encoder (SamGijsen/Brain-Semantoks `CNN_TF`) and its SimDINO head.

  x (B, R, T) ROI time series
  -> time cut into P = (T - patch) // patch + 1 non-overlapping patches (torch `unfold`)
  -> per network n (static ROI indices): NetworkTokenizer on (B*P, patch, R_n)
       = concat[Conv1d branch, SLConv branch] -> exact GELU -> mean over time -> LayerNorm
  -> tokenizer_out (B, N, P, D); optional mask (B, N, P): True -> `mask_embedding`,
     applied BEFORE the position encodings (student only in SimDINO); the tokens of
     `absent_networks` (atlases missing from the data) always -> `mask_embedding`
  -> + learnable network embedding[n] + fixed sin-cos temporal encoding[p]
  -> network-major flatten (token 1 + n*P + p), CLS prepended (no position encoding)
  -> pre-LN blocks with LayerScale (qkv without bias) -> final LayerNorm on every token.

The SLConv `kernel_norm` is a frozen buffer: the original fixes it at the first forward from
the kernel of that moment (the initial one) and never updates it, and the EMA teacher keeps
its own copy. Here it lives in a separate flax variable collection "buffers", initialised at
`init` from the initial kernel and read (never written) by `apply`; keep that collection out
of the optimizer and out of the EMA, and pass it to every apply:
`encoder.apply({"params": p, "buffers": b}, x, mask)`.

Initialisers follow the original (PyTorch defaults: U(+-1/sqrt(fan_in)) for Linear / Conv;
N(0, .02) for CLS, mask and network embeddings; N(0, 1) SLConv kernels; trunc-normal(.02)
and zero bias in the head); the attention output bias starts at zero. LayerNorm eps 1e-5 with
the two-pass variance, GELU exact (erf) everywhere.
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

Dtype = Any


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


def sincos_1d(embed_dim: int, num_positions: int) -> np.ndarray:
  """(num_positions, D) [sin(p w), cos(p w)], w_k = 1/10000**(k/(D/2)), in float64."""
  if embed_dim % 2:
    raise ValueError(f"sincos_1d: embed_dim must be even for sin-cos encoding, found {embed_dim}")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  pos = np.arange(num_positions, dtype=np.float32).astype(np.float64)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


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


class SemantoksBlock(nn.Module):
  """x + ls1 * attn(norm1 x); x + ls2 * mlp(norm2 x) (qkv without bias, exact GELU)."""

  embed_dim: int
  num_heads: int
  mlp_dim: int
  layer_scale_init: float | None = None
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    D = self.embed_dim
    drop_path = layers.DropPath(self.drop_path_rate)

    def scale(name: str, y: jax.Array) -> jax.Array:
      if not self.layer_scale_init:
        return y
      init = nn.initializers.constant(self.layer_scale_init)
      return y * self.param(name, layers.partitioned(init, ("embed",)), (D,))

    y = layers.Attention(
      D,
      self.num_heads,
      qkv_bias=False,
      out_bias=True,
      dtype=self.dtype,
      kernel_init=torch_uniform(D),
      name="attn",
    )(layer_norm("norm1")(x), deterministic=deterministic)
    x = x + drop_path(scale("ls1", y), deterministic=deterministic)

    def dense(features, fan_in, axes, name):
      return nn.Dense(
        features,
        dtype=self.dtype,
        kernel_init=layers.partitioned(torch_uniform(fan_in), axes),
        bias_init=layers.partitioned(torch_uniform(fan_in), (axes[1],)),
        dot_general=layers.dense_dot_general,
        name=name,
      )

    y = dense(self.mlp_dim, D, ("embed", "mlp"), "fc1")(layer_norm("norm2")(x))
    y = layers.gelu(y, approximate=False)
    y = dense(D, self.mlp_dim, ("mlp", "embed"), "fc2")(y)
    return layers.constrain(x + drop_path(scale("ls2", y), deterministic=deterministic))


class SemantoksEncoder(nn.Module):
  """CNN_TF: network tokenizers + inter-network transformer (see the module docstring).

  network_rois: ROI indices per network (network_rois_from_map); embed_dim must equal the sum
  of the branches' out_channels. Returns a dict: tokens (B, 1+N*P, D) after the final norm,
  tokenizer_out (B, N, P, D) (before mask / positions), cls (B, D),
  cls_avg (B, 2D) = [mean of the N*P non-CLS tokens, CLS] (the original's 'cls_avg').
  """

  network_rois: tuple[tuple[int, ...], ...]
  branches: tuple[TokenizerBranch, ...]
  embed_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  num_patches: int
  layer_scale_init: float | None = None
  do_masking: bool = True
  tokenizer_final_norm: str = "layer"
  tokenizer_pooling: str = "mean"
  tokenizer_linear_map: bool | None = None  # NetworkTokenizer.linear_map (None: when cheaper)
  # Networks whose atlas the data lacks (meta 'missing_networks'): their tokens are always
  # replaced by mask_embedding after the tokenizer (the original README's advice for data
  # without tian3 / buckner7), so their (zero-filled) input never reaches the transformer.
  absent_networks: tuple[int, ...] = ()
  drop_path_rate: float = 0.0
  emb_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def _check(self, x: jax.Array) -> None:
    width = sum(b.out_channels for b in self.branches)
    if width != self.embed_dim:
      raise ValueError(
        f"SemantoksEncoder: embed_dim {self.embed_dim} != sum of tokenizer out_channels {width}"
      )
    num_rois = 1 + max(max(r) for r in self.network_rois)
    if x.ndim != 3 or x.shape[1] < num_rois:
      raise ValueError(
        f"SemantoksEncoder: input must be (B, R>={num_rois}, T), found shape {x.shape}"
      )
    P = (x.shape[2] - self.patch_size) // self.patch_size + 1
    if P != self.num_patches:
      raise ValueError(
        f"SemantoksEncoder: T={x.shape[2]} gives {P} patches of {self.patch_size}, "
        f"expected num_patches={self.num_patches}"
      )

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """x (B, R, T) float; mask (B, N, P) bool, True = replace by mask_embedding."""
    self._check(x)
    bad = [n for n in self.absent_networks if not 0 <= n < len(self.network_rois)]
    if bad:
      raise ValueError(
        f"SemantoksEncoder: absent_networks expected ids in 0..{len(self.network_rois) - 1}, "
        f"found {bad}"
      )
    B, N, P, D, ps = (
      x.shape[0],
      len(self.network_rois),
      self.num_patches,
      self.embed_dim,
      self.patch_size,
    )
    # torch unfold(dim=2, size=ps, step=ps) then permute -> (B, P, ps, R) channels-last
    xp = x[:, :, : P * ps].reshape(B, x.shape[1], P, ps).transpose(0, 2, 3, 1)
    tokens = []
    for n, rois in enumerate(self.network_rois):
      xn = jnp.take(xp, np.asarray(rois), axis=3).reshape(B * P, ps, len(rois))
      t = NetworkTokenizer(
        self.branches,
        self.tokenizer_final_norm,
        self.tokenizer_pooling,
        self.dtype,
        self.tokenizer_linear_map,
        name=f"tokenizer_{n}",
      )(xn)
      tokens.append(t.reshape(B, P, D))
    tok = jnp.stack(tokens, axis=1).astype(jnp.float32)  # (B, N, P, D)
    tok = nn.with_logical_constraint(tok, ("batch", None, None, "embed"))

    def embedding(name, shape, axes):
      return self.param(name, layers.partitioned(nn.initializers.normal(0.02), axes), shape)

    h = tok
    if self.do_masking:
      mask_emb = embedding("mask_embedding", (1, D), (None, "embed"))
      if mask is not None:
        if mask.shape != (B, N, P):
          raise ValueError(
            f"SemantoksEncoder: mask must be (B, N, P)={(B, N, P)}, found {mask.shape}"
          )
        h = jnp.where(mask.astype(bool)[..., None], mask_emb[0], h)
      if self.absent_networks:
        absent = np.zeros((N,), bool)
        absent[list(self.absent_networks)] = True
        h = jnp.where(jnp.asarray(absent)[None, :, None, None], mask_emb[0], h)
    elif mask is not None or self.absent_networks:
      raise ValueError(
        "SemantoksEncoder: a mask or absent_networks was given but do_masking=False (no "
        "mask_embedding)"
      )
    cls = embedding("cls_token", (1, 1, D), (None, None, "embed"))
    net = embedding("network_embedding", (N, D), (None, "embed"))
    pos = net[:, None, :] + jnp.asarray(sincos_1d(D, P), jnp.float32)[None]
    h = (h + pos[None]).reshape(B, N * P, D)
    h = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)), h], axis=1).astype(self.dtype)
    h = layers.Dropout(self.emb_dropout)(h, deterministic=deterministic)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
    for i in range(self.depth):
      h = SemantoksBlock(
        D,
        self.num_heads,
        self.mlp_dim,
        self.layer_scale_init,
        float(rates[i]),
        self.dtype,
        name=f"block_{i}",
      )(h, deterministic=deterministic)
    h = layer_norm("norm")(h)
    return {
      "tokens": h,
      "tokenizer_out": tok,
      "cls": h[:, 0],
      "cls_avg": jnp.concatenate([jnp.mean(h[:, 1:], axis=1), h[:, 0]], axis=-1),
    }


class DinoHead(nn.Module):
  """DINOHead(remove_last_layer=True): MLP (nlayers Linear, exact GELU between) -> L2 norm.

  torch F.normalize: x / max(||x||, eps), eps 1e-12 (float32 path of the original).
  """

  hidden_dim: int
  bottleneck_dim: int
  nlayers: int = 3
  eps: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = max(self.nlayers, 1)
    init = nn.initializers.normal(0.02)  # trunc_normal_(std=.02) cuts at +-2: a plain normal
    for i in range(n):
      last = i == n - 1
      axes = ("embed" if i == 0 else "mlp", None if last else "mlp")
      x = nn.Dense(
        self.bottleneck_dim if last else self.hidden_dim,
        dtype=self.dtype,
        kernel_init=layers.partitioned(init, axes),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), (axes[1],)),
        dot_general=layers.dense_dot_general,
        name=f"linear_{i}",
      )(x)
      if not last:
        x = layers.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, self.eps)


def split_tokens(tokens: jax.Array, num_networks: int, num_patches: int) -> dict[str, jax.Array]:
  """Encoder tokens (B, 1+N*P, D) -> the SimDINO head inputs.

  cls (B, D); net (B, N, D) = per-network mean over the P patches; patch (B, N*P, D).
  """
  B, _, D = tokens.shape
  patch = tokens[:, 1:]
  net = patch.reshape(B, num_networks, num_patches, D).mean(axis=2)
  return {"cls": tokens[:, 0], "net": net, "patch": patch}


def init_simdino(
  rng: jax.Array, encoder: SemantoksEncoder, head: DinoHead, x: jax.Array
) -> dict[str, Any]:
  """Fresh student variables: {"params": {"encoder", "head"}, "buffers": {"encoder"}}.

  Params carry logical-axis boxes (nn.unbox them for a plain tree). The teacher starts as a
  copy of all of it (buffers included), as the original's deepcopy + first forward do.
  """
  k1, k2 = jax.random.split(rng)
  enc = encoder.init(k1, x)
  head_vars = head.init(k2, jnp.zeros((1, encoder.embed_dim), jnp.float32))
  return {
    "params": {"encoder": enc["params"], "head": head_vars["params"]},
    "buffers": {"encoder": enc["buffers"]},
  }
