"""GPT-2 decoder stack in the HF `GPT2Model` layout (learning-from-brains CSM backbone).

Pre-LN blocks (ln_1 -> attention -> residual, ln_2 -> c_fc -> gelu_new -> c_proj ->
residual), learned absolute positions `wpe`, final `ln_f`, LayerNorm eps 1e-5. The token
embedding `wte` is never used (the inputs are embedded BOLD frames), so it is not built.
HF packs q|k|v into one Conv1D `c_attn`; here they are separate projections (the converter
splits them) so the shared layers.Attention serves.

HF 4.16 masks with large finite negatives (-1e4) instead of -inf; for every row that sees
at least one key (always true here: key 0 is valid) both give the same float32 softmax.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boldjax.models import layers


def activation(name: str, source: str = "hidden_activation"):
  """HF activation names -> callables ('gelu_new' = tanh approximation, 'gelu' = erf)."""
  table = {
    "gelu_new": lambda x: layers.gelu(x, approximate=True),
    "gelu": lambda x: layers.gelu(x, approximate=False),
    "relu": jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f"{source}: expected one of {sorted(table)}, found {name!r}")
  return table[name]


class GPT2Block(nn.Module):
  """x + attn(ln_1 x); x + mlp(ln_2 x)."""

  embed_dim: int
  num_heads: int
  inner_dim: int
  num_layers: int = 1  # for GPT-2's 1/sqrt(2 L) scaling of residual projections
  dropout: float = 0.0
  eps: float = 1e-5
  hidden_activation: str = "gelu_new"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype)
    h = layers.layer_norm(self.eps, name="ln_1", **kw)(x)
    h = layers.Attention(
      self.embed_dim,
      self.num_heads,
      qkv_bias=True,
      attn_drop_rate=self.dropout,
      proj_drop_rate=self.dropout,
      name="attn",
      **kw,
    )(h, mask=mask, deterministic=deterministic)
    x = x + h
    h = layers.layer_norm(self.eps, name="ln_2", **kw)(x)
    h = layers.dense(self.inner_dim, ("embed", "mlp"), name="c_fc", **kw)(h)
    h = activation(self.hidden_activation)(h)
    proj_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.num_layers))
    h = layers.dense(self.embed_dim, ("mlp", "embed"), kernel_init=proj_init, name="c_proj", **kw)(
      h
    )
    h = layers.Dropout(self.dropout)(h, deterministic=deterministic)
    return layers.constrain(x + h)


class GPT2(nn.Module):
  """HF GPT2Model on inputs_embeds: + wpe, dropout, blocks (causal + padding mask), ln_f."""

  num_layers: int
  num_heads: int
  embed_dim: int
  inner_dim: int
  n_positions: int = 512
  dropout: float = 0.0
  eps: float = 1e-5
  hidden_activation: str = "gelu_new"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True
  ) -> jax.Array:
    """x (B, L, D) embedded inputs, attention_mask (B, L) (1/True = real) -> (B, L, D)."""
    L = x.shape[1]
    if L > self.n_positions:
      raise ValueError(f"GPT2: sequence length {L} exceeds n_positions={self.n_positions}")
    wpe = nn.Embed(
      self.n_positions,
      self.embed_dim,
      embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("length", "embed")),
      name="wpe",
    )
    x = x.astype(self.dtype) + wpe(jnp.arange(L))[None].astype(self.dtype)
    x = layers.Dropout(self.dropout)(x, deterministic=deterministic)
    causal = jnp.tril(jnp.ones((L, L), bool))
    mask = jnp.logical_and(causal[None, None], attention_mask.astype(bool)[:, None, None, :])
    for i in range(self.num_layers):
      x = GPT2Block(
        self.embed_dim,
        self.num_heads,
        self.inner_dim,
        num_layers=self.num_layers,
        dropout=self.dropout,
        eps=self.eps,
        hidden_activation=self.hidden_activation,
        dtype=self.dtype,
        name=f"h_{i}",
      )(x, mask, deterministic=deterministic)
    return layers.layer_norm(self.eps, name="ln_f", dtype=self.dtype)(x)
