"""Shared transformer blocks (pre-LN, timm/boldGPT layout) with logical axis names.

Every parameter carries logical axis names through `nn.with_logical_partitioning` so one rule
table in boldjax.sharding maps them onto the mesh. Axis names used here: "embed", "mlp",
"heads", "kv" (head_dim), "vocab", "patch" (input dim), "length" (positions), "subjects".

Attention keeps separate query / key / value projections. boldGPT packs key and value into one
`kv` Linear and GPT-2 packs all three; the converters split them, so one layout serves every
family and cross-attention (query from x, key/value from a context) needs no special case.

Generation uses an explicit cache pytree ({"key", "value"}: (B, L, heads, head_dim) per layer)
passed into `decode` and returned updated: pure, jit-friendly and easy to carry through
`lax.fori_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Any

# timm's trunc_normal_(std=.02) cuts at absolute +-2, i.e. at 100 sigma: a plain normal.
default_kernel_init = nn.initializers.normal(0.02)
ACTIVATION_AXES = ("batch", "length", "embed")


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Shorthand for an initializer whose parameter carries logical axis names.

  A logical name repeated within one parameter (an embed -> embed projection) is kept
  on its first axis only: one array cannot be split twice over the same mesh axis.
  """
  seen: set[str] = set()
  unique = []
  for name in axes:
    unique.append(None if name in seen else name)
    if name is not None:
      seen.add(name)
  return nn.with_logical_partitioning(init, tuple(unique))


def constrain(x: jax.Array, axes: Sequence[str | None] = ACTIVATION_AXES) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op without a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU: exact erf form (PyTorch nn.GELU default) or the tanh form (GPT-2 `gelu_new`).

  The exact form is written as PyTorch writes it, x/2 (1 + erf(x/sqrt 2)): jax.nn.gelu's
  erfc(-x/sqrt 2) costs several exps per element on XLA:CPU, erf is one rational polynomial
  (issue #6: ~12% of the patch-GPT train step).
  """
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / np.sqrt(2.0))).astype(x.dtype))


def _weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  """x^T dy for x (..., K), dy (..., N) -> (K, N), laid out as XLA:CPU computes fastest.

  Eigen's contraction producing a (K, N) = (large, small) result runs at about half speed
  (fc2 at K=512, N=128: 11.5 vs 6.2 ms on one core; K=1536, N=384: 123 vs 94 ms), so for
  K > N this computes (dy^T x) (N, K) and transposes it; the optimization barrier stops
  XLA's algebraic simplifier from folding the transpose back into the dot. Same sums.
  """
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= dy2.shape[1]:
    return jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
  return jax.lax.optimization_barrier(jax.lax.dot_general(dy2, x2, (((0,), (0,)), ((), ())))).T


@jax.custom_vjp
def _dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_matmul_fwd(x, kernel):
  return _dense_matmul(x, kernel), (x, kernel)


def _dense_matmul_bwd(res, dy):
  x, kernel = res
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  return dx.astype(x.dtype), _weight_grad(x, dy).astype(kernel.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers: Any,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """nn.Dense's dot_general with the weight gradient of _weight_grad (same values).

  Falls back to lax.dot_general for anything but Dense's own contraction (last axis of
  lhs with axis 0 of a 2-D kernel, no batch axes, default precision and output type).
  """
  (lc, rc), (lb, rb) = dimension_numbers
  plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not tuple(lb) and not tuple(rb)
  if rhs.ndim != 2 or not plain or precision is not None or preferred_element_type is not None:
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
    )
  return _dense_matmul(lhs, rhs)


def dense(
  features: int,
  axes: tuple[str | None, str | None],
  *,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  kernel_init: Initializer = default_kernel_init,
  name: str | None = None,
) -> nn.Dense:
  """nn.Dense with (in, out) logical axes on the kernel and (out,) on the zero-init bias."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=partitioned(kernel_init, axes),
    bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)),
    dot_general=dense_dot_general,
    name=name,
  )


def layer_norm(
  eps: float = 1e-5,
  *,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  axis_name: str = "embed",
  name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm with PyTorch's eps default (flax defaults to 1e-6); statistics in float32."""
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=partitioned(nn.initializers.ones_init(), (axis_name,)),
    bias_init=partitioned(nn.initializers.zeros_init(), (axis_name,)),
    name=name,
  )


def _mix32(h: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons): a 32-bit integer hash with near-ideal avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout of x with cheap counter-hash random bits (see Dropout); key: a jax
  PRNG key (threefry: two words are drawn from it)."""
  if rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  counter = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
  bits = _mix32(_mix32(counter ^ seed[0]) + seed[1])
  keep = bits >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nn.Module):
  """Inverted dropout (nn.Dropout's contract) with cheap counter-hash random bits.

  Why: threefry bits for every activation cost ~10 ns per element on XLA:CPU (9% of the
  Seq-BERT train step, issue #6) and the rbg / unsafe_rbg key impls are 2x slower still.
  Here the module's 'dropout' rng (threefry, so per-seed and per-path determinism are
  jax's) gives two 32-bit words, and each element's bits are a two-round lowbias32 hash of
  its flat index mixed with them: ~0.3 ns per element. The keep test is an exact integer
  compare (keep probability 1 - round(rate 2^32) / 2^32).
  """

  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return hash_dropout(x, self.rate, self.make_rng(self.rng_collection))


class DropPath(nn.Module):
  """Stochastic depth: drop the whole residual branch per sample (timm DropPath)."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  """timm Mlp: fc1 -> GELU -> dropout -> fc2 -> dropout."""

  hidden_dim: int
  out_dim: int | None = None
  drop_rate: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    out_dim = self.out_dim or x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = gelu(x, self.gelu_approximate)
    x = Dropout(self.drop_rate)(x, deterministic=deterministic)
    x = dense(out_dim, ("mlp", "embed"), name="fc2", **kw)(x)
    return Dropout(self.drop_rate)(x, deterministic=deterministic)


def attention_mask(
  q_len: int, k_len: int, *, causal: bool, q_offset: jax.Array | int = 0
) -> jax.Array | None:
  """(q_len, k_len) bool mask, True = may attend; query i sits at position q_offset + i."""
  if not causal:
    return None
  q_pos = q_offset + jnp.arange(q_len)[:, None]
  return jnp.arange(k_len)[None, :] <= q_pos


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  dropout: Dropout | None = None,
  deterministic: bool = True,
) -> jax.Array:
  """Softmax(q k^T / sqrt(d)) v on (B, L, heads, head_dim) arrays; softmax in float32.

  `mask` broadcasts to (B, heads, Lq, Lk) (a (Lq, Lk) mask works), True = attend.
  """
  dtype = q.dtype
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def init_attention_cache(
  batch_size: int, length: int, num_heads: int, head_dim: int, dtype: Dtype = jnp.float32
) -> dict[str, jax.Array]:
  """Zero key/value cache for one self-attention layer."""
  shape = (batch_size, length, num_heads, head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


class EinsumDense(nn.Module):
  """A projection `einsum(equation, x, kernel) + bias` with a full-rank named kernel.

  Used for the (D, heads, head_dim) attention projections. flax's DenseGeneral initialises a
  flat 2-D kernel and reshapes it, and its shape check re-runs that initialiser inside
  apply, so logical constraints of rank 3 hit a rank-2 value whenever axis rules are active.
  """

  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  equation: str
  bias_axes: tuple[str | None, ...] | None = None  # None: no bias; else the trailing dims
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      partitioned(self.kernel_init, self.kernel_axes),
      self.kernel_shape,
      self.param_dtype,
    )
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.bias_axes is not None:
      shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_axes) :]
      bias = self.param(
        "bias",
        partitioned(nn.initializers.zeros_init(), self.bias_axes),
        shape,
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head attention, separate q / k / v projections, optional context and KV cache."""

  embed_dim: int
  num_heads: int
  kv_features: int | None = None  # width of the key/value input (default embed_dim)
  qkv_bias: bool = False
  out_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  def setup(self) -> None:
    if self.embed_dim % self.num_heads:
      raise ValueError(
        f"Attention: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
      )
    head_dim = self.embed_dim // self.num_heads

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)

    def proj(name: str, in_features: int) -> EinsumDense:
      return EinsumDense(
        kernel_shape=(in_features, self.num_heads, head_dim),
        kernel_axes=("embed", "heads", "kv"),
        equation="...d,dhk->...hk",
        bias_axes=("heads", "kv") if self.qkv_bias else None,
        name=name,
        **kw,
      )

    kv_features = self.kv_features or self.embed_dim
    self.query = proj("query", self.embed_dim)
    self.key, self.value = proj("key", kv_features), proj("value", kv_features)
    self.out = EinsumDense(
      kernel_shape=(self.num_heads, head_dim, self.embed_dim),
      kernel_axes=("heads", "kv", "embed"),
      equation="...hk,hkd->...d",
      bias_axes=("embed",) if self.out_bias else None,
      name="out",
      **kw,
    )
    self.attn_drop = Dropout(self.attn_drop_rate)
    self.proj_drop = Dropout(self.proj_drop_rate)

  def _finish(self, y: jax.Array, deterministic: bool) -> jax.Array:
    y = self.out(y)
    return self.proj_drop(y, deterministic=deterministic)

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    deterministic: bool = True,
  ) -> jax.Array:
    """Attend from x (B, N, D) to context (B, M, D) (default: x); mask True = attend."""
    context = x if context is None else context
    q, k, v = self.query(x), self.key(context), self.value(context)
    causal_mask = attention_mask(x.shape[1], context.shape[1], causal=causal)
    if causal_mask is not None:
      mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
    y = dot_product_attention(q, k, v, mask, dropout=self.attn_drop, deterministic=deterministic)
    return self._finish(y, deterministic)

  def decode(
    self,
    x: jax.Array,
    cache: dict[str, jax.Array],
    index: jax.Array | int,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal self-attention for x (B, S, D) at positions index..index+S-1 using a KV cache.

    The new keys/values are written into the cache at `index`; queries see cache slots up to
    their own position, so unfilled slots never count.
    """
    q, k, v = self.query(x), self.key(x), self.value(x)
    index = jnp.asarray(index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    key = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
    value = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
    mask = attention_mask(x.shape[1], key.shape[1], causal=True, q_offset=index)
    y = dot_product_attention(
      q,
      key.astype(q.dtype),
      value.astype(q.dtype),
      mask,
      dropout=self.attn_drop,
      deterministic=deterministic,
    )
    return self._finish(y, deterministic), {"key": key, "value": value}


class Block(nn.Module):
  """Pre-LN block: x + attn(norm1 x); [x + cross(norm2 x, context)]; x + mlp(norm3 x).

  The norm names follow boldGPT (norm3 is the MLP norm even without cross-attention).
  """

  embed_dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  with_cross: bool = False
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(
      embed_dim=self.embed_dim,
      num_heads=self.num_heads,
      qkv_bias=self.qkv_bias,
      attn_drop_rate=self.attn_drop_rate,
      proj_drop_rate=self.proj_drop_rate,
      **kw,
    )
    self.norm1 = layer_norm(self.layer_norm_eps, **kw)
    self.attn = Attention(**attn_kw)
    if self.with_cross:
      self.norm2 = layer_norm(self.layer_norm_eps, **kw)
      self.cross = Attention(**attn_kw)
    self.norm3 = layer_norm(self.layer_norm_eps, **kw)
    self.mlp = Mlp(
      hidden_dim=int(self.embed_dim * self.mlp_ratio),
      drop_rate=self.proj_drop_rate,
      gelu_approximate=self.gelu_approximate,
      **kw,
    )
    self.drop_path = DropPath(self.drop_path_rate)

  def _rest(self, x: jax.Array, context: jax.Array | None, deterministic: bool) -> jax.Array:
    if context is not None:
      if not self.with_cross:
        raise ValueError("Block: a context was given but with_cross=False")
      y = self.cross(self.norm2(x), context, deterministic=deterministic)
      x = x + self.drop_path(y, deterministic=deterministic)
    y = self.mlp(self.norm3(x), deterministic=deterministic)
    return constrain(x + self.drop_path(y, deterministic=deterministic))

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    deterministic: bool = True,
  ) -> jax.Array:
    y = self.attn(self.norm1(x), mask=mask, causal=causal, deterministic=deterministic)
    x = x + self.drop_path(y, deterministic=deterministic)
    return self._rest(x, context, deterministic)

  def decode(
    self,
    x: jax.Array,
    cache: dict[str, jax.Array],
    index: jax.Array | int,
    context: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal block step with a KV cache (see Attention.decode)."""
    y, cache = self.attn.decode(self.norm1(x), cache, index, deterministic=deterministic)
    x = x + self.drop_path(y, deterministic=deterministic)
    return self._rest(x, context, deterministic), cache
