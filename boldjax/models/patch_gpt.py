"""PatchGPT: boldGPT's IGPT decoder (next-patch prediction over a shuffled patch order).

Sequence (N patches, already in the shuffled order; order[b, t] = which patch sits at t):

  x = [group_token + sub_embed[subject_id]] ++ (patch_embed(patches) + pos_embed[order])
  x += next_pos_query[order] ++ eos_query            # tells position t which patch comes next
  x = blocks(x) (causal), final norm, head; output[:, :N]

so position t (which has seen the subject token and patches < t) predicts patch order[t].
Optional registers (learned tokens appended at the end) attend to, and are attended by,
every token as in boldGPT; note that this lets information flow backwards through the
registers, so a register model is not strictly causal and cannot use the KV cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boldjax.models import layers

SIZES: dict[str, dict[str, Any]] = {
  "tiny": dict(embed_dim=192, num_heads=3),
  "small": dict(embed_dim=384, num_heads=6),
  "base": dict(embed_dim=768, num_heads=12),
}


def size_kwargs(size: str) -> dict[str, Any]:
  """embed_dim / num_heads / depth / mlp_ratio of a named boldGPT size."""
  if size not in SIZES:
    raise ValueError(f"PatchGPT: unknown size {size!r}; expected one of {sorted(SIZES)}")
  return dict(SIZES[size], depth=12, mlp_ratio=4.0)


class PatchGPT(nn.Module):
  """boldGPT IGPT decoder; categorical head (vocab logits) or continuous head (patch)."""

  num_patches: int
  patch_dim: int
  categorical: bool = True
  vocab_size: int = 1024
  num_subjects: int = 1024
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  with_sub_embed: bool = True
  with_next_pos: bool = True
  num_registers: int = 0
  with_cross: bool = False
  drop_rate: float = 0.0
  sub_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_outputs(self) -> int:
    return self.vocab_size if self.categorical else self.patch_dim

  def setup(self) -> None:
    D, pdt = self.embed_dim, self.param_dtype
    emb = layers.partitioned(layers.default_kernel_init, ("length", "embed"))
    kw = dict(dtype=self.dtype, param_dtype=pdt)
    self.patch_embed = layers.dense(D, ("patch", "embed"), name="patch_embed", **kw)
    if self.with_cross:
      self.cross_embed = layers.dense(D, (None, "embed"), name="cross_embed", **kw)
    self.group_token = self.param(
      "group_token",
      layers.partitioned(nn.initializers.zeros_init(), (None, None, "embed")),
      (1, 1, D),
      pdt,
    )
    if self.with_sub_embed:
      self.sub_embed = self.param(
        "sub_embed",
        layers.partitioned(layers.default_kernel_init, ("subjects", None, "embed")),
        (self.num_subjects, 1, D),
        pdt,
      )
    self.pos_embed = self.param("pos_embed", emb, (self.num_patches, D), pdt)
    if self.with_next_pos:
      self.next_pos_query = self.param("next_pos_query", emb, (self.num_patches, D), pdt)
      self.eos_query = self.param("eos_query", emb, (1, D), pdt)
    if self.num_registers > 0:
      self.reg_embed = self.param("reg_embed", emb, (self.num_registers, D), pdt)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)  # timm stochastic-depth rule
    self.blocks = [
      layers.Block(
        embed_dim=D,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        with_cross=self.with_cross,
        proj_drop_rate=self.proj_drop_rate,
        attn_drop_rate=self.attn_drop_rate,
        drop_path_rate=float(rates[i]),
        layer_norm_eps=self.layer_norm_eps,
        gelu_approximate=self.gelu_approximate,
        **kw,
      )
      for i in range(self.depth)
    ]
    self.norm = layers.layer_norm(self.layer_norm_eps, **kw)
    self.head_drop = layers.Dropout(self.drop_rate)
    head_axis = "vocab" if self.categorical else "patch"
    self.head = layers.dense(self.num_outputs, ("embed", head_axis), name="head", **kw)

  # --- embeddings -------------------------------------------------------------------------

  def _per_sample(self, table: jax.Array, order: jax.Array | None, batch: int) -> jax.Array:
    """table[order] as (B, N, D); order (B, N), (N,) or None (= identity)."""
    if order is None:
      return jnp.broadcast_to(table[None], (batch,) + table.shape)
    out = jnp.take(table, order, axis=0)
    return jnp.broadcast_to(out, (batch,) + out.shape[-2:])

  def _subject_token(
    self, subject_id: jax.Array | None, batch: int, deterministic: bool
  ) -> jax.Array:
    token = jnp.broadcast_to(self.group_token, (batch, 1, self.embed_dim))
    if subject_id is None:
      return token
    if not self.with_sub_embed:
      raise ValueError("PatchGPT: subject_id was given but with_sub_embed=False")
    sub = jnp.take(self.sub_embed, jnp.asarray(subject_id).reshape(batch), axis=0)
    if self.sub_drop_rate > 0.0 and not deterministic:
      # boldGPT TokenDropout: drop the whole subject embedding, no 1/(1-p) rescaling.
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.sub_drop_rate, (batch, 1, 1))
      sub = jnp.where(keep, sub, 0.0)
    return token + sub

  def _tokens(
    self,
    patches: jax.Array,
    subject_id: jax.Array | None,
    order: jax.Array | None,
    *,
    offset: int | jax.Array | None,
    deterministic: bool,
  ) -> jax.Array:
    """Input tokens. offset None/-1: subject token + patches 0..S-1 (positions 0..S);
    offset >= 0: patches offset..offset+S-1 only (positions offset+1..offset+S)."""
    if order is not None and not self.with_next_pos:
      raise ValueError("PatchGPT: an explicit order needs with_next_pos=True (boldGPT shuffle)")
    B, S = patches.shape[:2]
    x = self.patch_embed(patches.astype(self.dtype))
    pos = self._per_sample(self.pos_embed, order, B)
    prepend = offset is None or (isinstance(offset, int) and offset < 0)
    if prepend:
      x = x + pos[:, :S].astype(x.dtype)
      x = jnp.concatenate([self._subject_token(subject_id, B, deterministic).astype(x.dtype), x], 1)
      first = 0
    else:
      x = x + jax.lax.dynamic_slice_in_dim(pos, offset, S, axis=1).astype(x.dtype)
      first = offset + 1
    if self.with_next_pos:
      eos = jnp.broadcast_to(self.eos_query[None], (B, 1, self.embed_dim))
      query = jnp.concatenate([self._per_sample(self.next_pos_query, order, B), eos], axis=1)
      x = x + jax.lax.dynamic_slice_in_dim(query, first, x.shape[1], axis=1).astype(x.dtype)
    return layers.constrain(x)

  def _context(self, context: jax.Array | None) -> jax.Array | None:
    if context is None:
      return None
    if not self.with_cross:
      raise ValueError("PatchGPT: a context was given but with_cross=False")
    return self.cross_embed(context.astype(self.dtype))

  def _mask(self, length: int) -> jax.Array | None:
    """None (plain causal) or the boldGPT register mask: causal + registers global."""
    if self.num_registers == 0:
      return None
    R = self.num_registers
    mask = jnp.tril(jnp.ones((length, length), bool))
    mask = mask.at[:, -R:].set(True)
    return mask.at[-R:, :].set(True)

  # --- forward ----------------------------------------------------------------------------

  def hidden(
    self,
    patches: jax.Array,
    subject_id: jax.Array | None = None,
    order: jax.Array | None = None,
    context: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """Final-norm hidden states (B, N + 1 + num_registers, D)."""
    x = self._tokens(patches, subject_id, order, offset=None, deterministic=deterministic)
    if self.num_registers > 0:
      reg = jnp.broadcast_to(self.reg_embed[None], (x.shape[0],) + self.reg_embed.shape)
      x = jnp.concatenate([x, reg.astype(x.dtype)], axis=1)
    context = self._context(context)
    mask = self._mask(x.shape[1])
    for block in self.blocks:
      x = block(x, context, mask=mask, causal=mask is None, deterministic=deterministic)
    return self.norm(x)

  def _head(self, x: jax.Array, deterministic: bool) -> jax.Array:
    x = self.head_drop(x, deterministic=deterministic)
    return self.head(x).astype(jnp.float32)

  def __call__(
    self,
    patches: jax.Array,
    subject_id: jax.Array | None = None,
    order: jax.Array | None = None,
    context: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """(B, N, vocab) logits or (B, N, patch_dim) predictions; position t predicts patch t."""
    N = patches.shape[1]
    x = self.hidden(patches, subject_id, order, context, deterministic=deterministic)
    return self._head(x[:, :N], deterministic)

  def features(
    self,
    patches: jax.Array,
    subject_id: jax.Array | None = None,
    order: jax.Array | None = None,
    context: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Probe features (deterministic).

    tokens: (B, N, D) final-norm states at the patch tokens (positions 1..N, in the input's
      shuffled order; token t has seen patches <= t).
    cls: (B, D) the last (EOS) position, the only one that has seen the whole map (the first
      position has seen only the subject token, so it is useless for probing).
    mean: (B, D) mean of `tokens`.
    registers: (B, R, D) when num_registers > 0.
    """
    N = patches.shape[1]
    x = self.hidden(patches, subject_id, order, context, deterministic=True)
    tokens = x[:, 1 : N + 1]
    out = {"tokens": tokens, "cls": x[:, N], "mean": tokens.mean(axis=1)}
    if self.num_registers > 0:
      out["registers"] = x[:, N + 1 :]
    return out

  def decode(
    self,
    patches: jax.Array,
    subject_id: jax.Array | None,
    order: jax.Array | None,
    cache: list[dict[str, jax.Array]],
    *,
    offset: int | jax.Array,
    context: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """Cached decoding (boldGPT's `offset` convention).

    offset = -1 (python int): run the subject token and the S prefix patches (positions
      0..S, S may be 0); offset >= 0: run patches[:, :S] as shuffled patches offset..,
      i.e. positions offset+1..offset+S. Returns head outputs for the positions run
      (the last one predicts the next patch) and the updated cache.
    """
    if self.num_registers > 0:
      raise ValueError("PatchGPT.decode: registers attend globally; generate with use_cache=False")
    if len(cache) != self.depth:
      raise ValueError(f"PatchGPT.decode: cache has {len(cache)} layers, expected {self.depth}")
    x = self._tokens(patches, subject_id, order, offset=offset, deterministic=deterministic)
    index = 0 if isinstance(offset, int) and offset < 0 else offset + 1
    context = self._context(context)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block.decode(x, layer_cache, index, context, deterministic=deterministic)
      new_cache.append(layer_cache)
    return self._head(self.norm(x), deterministic), new_cache


def init_cache(model: PatchGPT, batch_size: int, dtype: Any = None) -> list[dict[str, jax.Array]]:
  """Empty KV cache for all N + 1 positions of `model` (one dict per block)."""
  head_dim = model.embed_dim // model.num_heads
  dtype = model.dtype if dtype is None else dtype
  length = model.num_patches + 1
  return [
    layers.init_attention_cache(batch_size, length, model.num_heads, head_dim, dtype)
    for _ in range(model.depth)
  ]
