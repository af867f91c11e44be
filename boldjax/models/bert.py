"""BERT encoder in the HF `BertModel` layout (learning-from-brains Seq-/Network-BERT backbone).

Embeddings: inputs_embeds + position_embeddings + token_type_embeddings -> LayerNorm ->
dropout. Post-LN layers: x = LN(x + attn(x)); x = LN(x + output(act(intermediate(x)))).
Every LayerNorm uses eps 1e-12 (HF default). No pooler (the original builds BertModel with
add_pooling_layer=False and pools with its own head); word_embeddings are never used.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boldjax.models import layers
from boldjax.models.gpt2 import activation


class BertLayer(nn.Module):
  embed_dim: int
  num_heads: int
  inner_dim: int
  dropout: float = 0.0
  eps: float = 1e-12
  hidden_activation: str = "gelu_new"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype)
    h = layers.Attention(
      self.embed_dim,
      self.num_heads,
      qkv_bias=True,
      attn_drop_rate=self.dropout,
      proj_drop_rate=self.dropout,
      name="attention",
      **kw,
    )(x, mask=mask, deterministic=deterministic)
    x = layers.layer_norm(self.eps, name="attention_norm", **kw)(x + h)
    h = layers.dense(self.inner_dim, ("embed", "mlp"), name="intermediate", **kw)(x)
    h = activation(self.hidden_activation)(h)
    h = layers.dense(self.embed_dim, ("mlp", "embed"), name="output", **kw)(h)
    h = layers.Dropout(self.dropout)(h, deterministic=deterministic)
    return layers.constrain(layers.layer_norm(self.eps, name="output_norm", **kw)(x + h))


class Bert(nn.Module):
  """HF BertModel on inputs_embeds; returns (embedding output, last hidden state)."""

  num_layers: int
  num_heads: int
  embed_dim: int
  inner_dim: int
  n_positions: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.0
  eps: float = 1e-12
  hidden_activation: str = "gelu_new"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    L = x.shape[1]
    if L > self.n_positions:
      raise ValueError(f"Bert: sequence length {L} exceeds n_positions={self.n_positions}")
    init = nn.initializers.normal(0.02)
    pos = nn.Embed(
      self.n_positions,
      self.embed_dim,
      embedding_init=layers.partitioned(init, ("length", "embed")),
      name="position_embeddings",
    )
    types = nn.Embed(
      self.type_vocab_size,
      self.embed_dim,
      embedding_init=layers.partitioned(init, (None, "embed")),
      name="token_type_embeddings",
    )
    if token_type_ids is None:
      token_type_ids = jnp.zeros(x.shape[:2], jnp.int32)
    e = x.astype(self.dtype) + pos(jnp.arange(L))[None].astype(self.dtype)
    e = e + types(token_type_ids.astype(jnp.int32)).astype(self.dtype)
    e = layers.layer_norm(self.eps, name="embeddings_norm", dtype=self.dtype)(e)
    h = layers.Dropout(self.dropout)(e, deterministic=deterministic)
    mask = attention_mask.astype(bool)[:, None, None, :]
    for i in range(self.num_layers):
      h = BertLayer(
        self.embed_dim,
        self.num_heads,
        self.inner_dim,
        dropout=self.dropout,
        eps=self.eps,
        hidden_activation=self.hidden_activation,
        dtype=self.dtype,
        name=f"layer_{i}",
      )(h, mask, deterministic=deterministic)
    return e, h
