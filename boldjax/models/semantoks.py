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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boldjax.models import layers
from boldjax.models.network_tokenizer import (  # noqa: F401  (re-exported: the model's parts)
  NetworkTokenizer,
  SLConv,
  TokenizerBranch,
  branches_from_config,
  layer_norm,
  linear_map_is_cheaper,
  network_rois_from_map,
  torch_uniform,
)

Dtype = Any


def sincos_1d(embed_dim: int, num_positions: int) -> np.ndarray:
  """(num_positions, D) [sin(p w), cos(p w)], w_k = 1/10000**(k/(D/2)), in float64."""
  if embed_dim % 2:
    raise ValueError(f"sincos_1d: embed_dim must be even for sin-cos encoding, found {embed_dim}")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  pos = np.arange(num_positions, dtype=np.float32).astype(np.float64)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


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
