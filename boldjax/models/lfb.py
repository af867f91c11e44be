"""learning-from-brains (Thomas et al. 2022): embedder, backbones, heads in one module.

  frames (B, S, P) in input space, special tokens (MSK / CLS / SEP) also in input space
  -> embedder: [Linear -> LN -> GELU(erf) -> Dropout] x (n-1), Linear -> LN -> Dropout
     + TR embedding wt_re[round(t / 0.2)] (1501 rows; id 1500 = dummy for t < 0)
  -> backbone: GPT-2 (CSM), BERT (Seq-/Network-BERT) or the LSTM autoencoder
  -> unembedder Linear(D -> P) (only when D != P), pooler Linear+Tanh+Dropout, heads.

Batch preparation (masking, SEP/CLS insertion) happens inside the model methods so the
tokens are ordinary params; every quirk of the original is kept on purpose (see the lfb_*
parity fixtures): CLS goes after the last valid frame, BERT's token types and modelling mask
end up shifted by +1 against the inputs, BERT pools index 0 (the first frame, not the CLS),
GPT pools the CLS position, NetBERT's mask token is one scalar per time position.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boldjax.models import layers
from boldjax.models.bert import Bert
from boldjax.models.gpt2 import GPT2
from boldjax.models.lstm import LSTMAutoencoder

STYLES = ("csm", "bert", "netbert", "autoencoder")
ARCHITECTURES = {"csm": "gpt", "bert": "bert", "netbert": "bert", "autoencoder": "autoencoder"}
# PyTorch nn.Linear default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def tr_position_ids(t: jax.Array, precision: float = 0.2, tr_max: float = 300.0) -> jax.Array:
  """TR embedding ids as the original: long(round(t / p) * p * int(1 / p)) in float32;
  negative t (CLS / SEP / MSK markers, t = -1) -> the dummy id int(tr_max / p)."""
  num = int(tr_max / precision)
  t = jnp.asarray(t, jnp.float32)
  ids = (jnp.round(t / precision) * precision * int(1 / precision)).astype(jnp.int32)
  return jnp.where(ids >= 0, jnp.minimum(ids, num), num)


def cls_summary(h: jax.Array, length: jax.Array, architecture: str) -> jax.Array:
  """The hidden state the original pools: GPT's CLS (at `length`), BERT's index 0."""
  index = length if architecture == "gpt" else jnp.zeros_like(length)
  return jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]


def mean_frame_summary(h: jax.Array, length: jax.Array, architecture: str) -> jax.Array:
  """Mean hidden state over the valid frames (positions < length; the CLS is excluded)."""
  del architecture
  frames = (jnp.arange(h.shape[1])[None, :] < length[:, None]).astype(h.dtype)
  total = jnp.einsum("bs,bsd->bd", frames, h)
  return total / jnp.maximum(jnp.sum(frames, axis=1, keepdims=True), 1.0)


DECODE_POOLINGS = {"cls": cls_summary, "mean": mean_frame_summary}


def insert_at(x: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
  """Insert value (broadcast to x[:, 0]) at per-row index: (B, S, ...) -> (B, S+1, ...)."""
  B, S = x.shape[:2]
  j = jnp.arange(S + 1)[None, :]
  idx = index.astype(jnp.int32)[:, None]
  src = jnp.clip(jnp.where(j < idx, j, j - 1), 0, S - 1)
  src = src.reshape(src.shape + (1,) * (x.ndim - 2))
  out = jnp.take_along_axis(x, src, axis=1)
  at = (j == idx).reshape((B, S + 1) + (1,) * (x.ndim - 2))
  return jnp.where(at, jnp.broadcast_to(value, out.shape).astype(x.dtype), out)


class Embedder(nn.Module):
  in_dim: int
  embed_dim: int
  num_layers: int = 1
  dropout: float = 0.0
  tr_precision: float = 0.2
  tr_max: float = 300.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    """x (B, S, P), t (B, S) seconds -> (embeds (B, S, D), TR ids (B, S))."""
    kw = dict(dtype=self.dtype, kernel_init=torch_linear_init)
    h = x.astype(self.dtype)
    for k in range(self.num_layers):
      axes = ("patch", "embed") if k == 0 else ("embed", "embed")
      h = layers.dense(self.embed_dim, axes, name=f"linear_{k}", **kw)(h)
      h = layers.layer_norm(1e-5, name=f"norm_{k}", dtype=self.dtype)(h)
      if k < self.num_layers - 1:
        h = layers.gelu(h, approximate=False)
      h = layers.Dropout(self.dropout)(h, deterministic=deterministic)
    ids = tr_position_ids(t, self.tr_precision, self.tr_max)
    wt_re = nn.Embed(
      int(self.tr_max / self.tr_precision) + 1,
      self.embed_dim,
      embedding_init=layers.partitioned(nn.initializers.normal(1.0), (None, "embed")),
      name="wt_re",
    )
    return layers.constrain(h + wt_re(ids).astype(self.dtype)), ids


class Unembedder(nn.Module):
  embed_dim: int
  out_dim: int
  num_layers: int = 1
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, kernel_init=torch_linear_init)
    for k in range(self.num_layers - 1):
      h = layers.dense(self.embed_dim, ("embed", "embed"), name=f"linear_{k}", **kw)(h)
      h = layers.layer_norm(1e-5, name=f"norm_{k}", dtype=self.dtype)(h)
      h = layers.Dropout(self.dropout)(layers.gelu(h), deterministic=deterministic)
    last = f"linear_{self.num_layers - 1}"
    return layers.dense(self.out_dim, ("embed", "patch"), name=last, **kw)(h)


class LfbModel(nn.Module):
  """One learning-from-brains model; `style` picks the objective and backbone."""

  style: str
  in_dim: int
  embed_dim: int = 768
  num_layers: int = 4
  num_heads: int = 12
  intermediate_factor: int = 4
  n_positions: int = 512
  dropout: float = 0.1
  tr_precision: float = 0.2
  tr_max: float = 300.0
  embed_layers: int = 1
  unembed_layers: int = 1
  hidden_activation: str = "gelu_new"
  num_classes: int = 0  # 0: no decoding head
  # Decoding-mode summary fed to the pooler: "cls" as the original (GPT: the CLS after the
  # last frame; BERT: index 0), or "mean" over the valid frames' hidden states, which keeps
  # what a pretrained forecaster spreads over its frame outputs (see DECODE_POOLINGS).
  decode_pooling: str = "cls"
  dtype: Any = jnp.float32

  @property
  def architecture(self) -> str:
    return ARCHITECTURES[self.style]

  def setup(self) -> None:
    if self.style not in STYLES:
      raise ValueError(f"LfbModel.style: expected one of {STYLES}, found {self.style!r}")
    if self.decode_pooling not in DECODE_POOLINGS:
      raise ValueError(
        f"LfbModel.decode_pooling: expected one of {sorted(DECODE_POOLINGS)}, "
        f"found {self.decode_pooling!r}"
      )
    if self.decode_pooling != "cls" and self.architecture == "autoencoder":
      raise ValueError(
        "LfbModel.decode_pooling: the autoencoder pools with its encoder; expected 'cls', "
        f"found {self.decode_pooling!r}"
      )
    D, P, kw = self.embed_dim, self.in_dim, dict(dtype=self.dtype)
    self.drop = layers.Dropout(self.dropout)
    self.embedder = Embedder(
      P, D, self.embed_layers, self.dropout, self.tr_precision, self.tr_max, **kw
    )
    tok = layers.partitioned(nn.initializers.normal(1.0), (None, None, "patch"))
    arch = self.architecture
    if arch != "autoencoder":
      if self.style == "netbert":
        msk_init = layers.partitioned(nn.initializers.normal(1.0), (None, "length", None))
        self.msk_embed = self.param("msk_embed", msk_init, (1, self.n_positions, 1))
      else:
        self.msk_embed = self.param("msk_embed", tok, (1, 1, P))
      self.cls_embed = self.param("cls_embed", tok, (1, 1, P))
      inner = D * self.intermediate_factor
      common = dict(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        embed_dim=D,
        inner_dim=inner,
        n_positions=self.n_positions,
        dropout=self.dropout,
        hidden_activation=self.hidden_activation,
        **kw,
      )
      self.pooler = layers.dense(D, ("embed", "embed"), kernel_init=torch_linear_init, **kw)
    if arch == "gpt":
      self.transformer = GPT2(**common)
    elif arch == "bert":
      self.sep_embed = self.param(
        "sep_embed", layers.partitioned(nn.initializers.normal(1.0), (None, "patch")), (1, P)
      )
      self.transformer = Bert(**common)
      self.is_next_head = layers.dense(1, ("embed", None), kernel_init=torch_linear_init, **kw)
    elif arch == "autoencoder":
      self.autoencoder = LSTMAutoencoder(self.num_layers, D, self.dropout)
    if self.num_classes:
      self.decoding_head = layers.dense(
        self.num_classes, ("embed", None), kernel_init=torch_linear_init, **kw
      )
    if D != P:
      self.unembedder = Unembedder(D, P, self.unembed_layers, self.dropout, **kw)

  # ---- shared pieces -------------------------------------------------------------------
  def _unembed(self, h: jax.Array, deterministic: bool) -> jax.Array:
    if self.embed_dim == self.in_dim:
      return h
    return self.unembedder(h, deterministic=deterministic)

  def _pool(self, h: jax.Array, deterministic: bool) -> jax.Array:
    pooled = jnp.tanh(self.pooler(h))
    return self.drop(pooled, deterministic=deterministic)

  def _backbone(
    self,
    x: jax.Array,
    t: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None,
    deterministic: bool,
  ) -> dict[str, jax.Array]:
    embeds, ids = self.embedder(x, t, deterministic=deterministic)
    out = {"prep/inputs_embeds": x, "prep/t_rs": t, "t_r_position_ids": ids, "embeds": embeds}
    if self.architecture == "gpt":
      out["hidden_states"] = self.transformer(embeds, attention_mask, deterministic=deterministic)
    else:
      out["bert_embeddings"], out["hidden_states"] = self.transformer(
        embeds, attention_mask, token_type_ids, deterministic=deterministic
      )
    return out

  # ---- objectives ------------------------------------------------------------------------
  def csm(
    self, inputs: jax.Array, t: jax.Array, masking_i: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """Causal sequence modelling: frame i -> MSK, attention cut to 0..i, frames > i zeroed;
    the prediction for frame i is read at position i (not shifted)."""
    B, S, P = inputs.shape
    pos = jnp.arange(S)[None, :]
    i = masking_i.astype(jnp.int32)[:, None]
    frame = pos == i
    attn = pos <= i
    x = jnp.where(frame[..., None], self.msk_embed.astype(inputs.dtype), inputs)
    x = jnp.where(attn[..., None], x, jnp.zeros_like(x))
    out = self._backbone(x, t, attn, None, deterministic)
    out["outputs"] = self._unembed(out["hidden_states"], deterministic)
    out["prep/attention_mask"] = attn.astype(jnp.int32)
    out["prep/modelling_mask"] = jnp.broadcast_to(frame[..., None], (B, S, P)).astype(jnp.int32)
    out["masked_predictions"] = jnp.take_along_axis(out["outputs"], i[..., None], axis=1)[:, 0]
    return out

  def bert(
    self,
    inputs: jax.Array,
    t: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array,
    modelling_mask: jax.Array,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    """Seq-/Network-BERT on [seq_a | seq_b | pad] (B, S, P) with token types 0/1.

    modelling_mask (B, S, P) bool marks masked entries (frames for Seq-BERT, parcels at every
    valid time for Network-BERT). Returns the prepared (B, S+3) arrays, the model outputs and
    `frame_predictions` (B, S, P): the output the loss reads for each original entry.
    """
    B, S, P = inputs.shape
    am = attention_mask.astype(bool)
    tt = token_type_ids.astype(jnp.int32)
    la = jnp.sum(am & (tt == 0), axis=1)[:, None]
    lb = jnp.sum(am & (tt == 1), axis=1)[:, None]
    mm = modelling_mask.astype(bool) & am[..., None]
    if self.style == "netbert":
      if S > self.n_positions:
        raise ValueError(f"LfbModel: {S} frames exceed n_positions={self.n_positions}")
      msk = self.msk_embed[:, :S, :]
    else:
      msk = self.msk_embed
    x = jnp.where(mm, msk.astype(inputs.dtype), inputs)
    # [a, SEP, b, SEP, CLS, zeros]: position j of the (S+3)-long sequence.
    j = jnp.arange(S + 3)[None, :]
    in_a, in_b = j < la, (j > la) & (j <= la + lb)
    sep = (j == la) | (j == la + lb + 1)
    cls = j == la + lb + 2
    src = jnp.clip(jnp.where(in_a, j, j - 1), 0, S - 1)
    frames = jnp.take_along_axis(x, src[..., None], axis=1)
    xp = jnp.where((in_a | in_b)[..., None], frames, 0.0)
    xp = jnp.where(sep[..., None], self.sep_embed[None].astype(xp.dtype), xp)
    xp = jnp.where(cls[..., None], self.cls_embed.astype(xp.dtype), xp)
    tp = jnp.take_along_axis(t.astype(jnp.float32), src, axis=1)
    tp = jnp.where(in_a | in_b, tp, 0.0)
    tp = jnp.where(sep | cls, -1.0, tp)
    # Token types and modelling mask as the original leaves them: shifted by +1.
    ttp = ((j >= la + 2) & (j <= la + lb + 2)).astype(jnp.int32)
    mm_src = jnp.clip(jnp.where(j <= la, j - 1, j - 2), 0, S - 1)
    mm_valid = ((j >= 1) & (j <= la)) | ((j >= la + 2) & (j <= la + lb + 1))
    mmp = jnp.take_along_axis(mm, mm_src[..., None], axis=1) & mm_valid[..., None]
    amp = j <= la + lb + 2
    out = self._backbone(xp, tp, amp, ttp, deterministic)
    out["outputs"] = self._unembed(out["hidden_states"], deterministic)
    out["pooler_outputs"] = self._pool(out["hidden_states"][:, 0], deterministic)
    out["is_next_logits"] = self.is_next_head(out["pooler_outputs"])
    f = jnp.arange(S)[None, :]
    read = jnp.clip(f + 1 + (f >= la), 0, S + 2)
    out["frame_predictions"] = jnp.take_along_axis(out["outputs"], read[..., None], axis=1)
    out.update(
      {
        "prep/attention_mask": amp.astype(jnp.int32),
        "prep/token_type_ids": ttp,
        "prep/modelling_mask": mmp.astype(jnp.int32),
        "modelling_mask": mm,
      }
    )
    return out

  def autoencode(
    self,
    inputs: jax.Array,
    t: jax.Array,
    teacher_forcing: jax.Array | bool = False,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    """LSTM autoencoder: embed every frame (padding included), encode, decode S steps."""
    embeds, ids = self.embedder(inputs, t, deterministic=deterministic)
    out = self.autoencoder(embeds, teacher_forcing, deterministic=deterministic)
    out.update({"prep/inputs_embeds": inputs, "t_r_position_ids": ids, "embeds": embeds})
    out["outputs"] = self._unembed(out["decoder/outputs"], deterministic)
    out["pooler_outputs"] = out["encoder/pooler_outputs"]
    return out

  # ---- downstream ------------------------------------------------------------------------
  def encode(
    self, inputs: jax.Array, t: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """Decoding-mode forward without the class head: CLS inserted after the last valid frame
    (transformers), summarised by decode_pooling (LSTM: the encoder pooler)."""
    if self.architecture == "autoencoder":
      embeds, ids = self.embedder(inputs, t, deterministic=deterministic)
      enc = self.autoencoder.encode(embeds, deterministic=deterministic)
      return {
        "prep/inputs_embeds": inputs,
        "t_r_position_ids": ids,
        "embeds": embeds,
        "hidden_states": enc["outputs"],
        "pooler_outputs": enc["pooler_outputs"],
        "cls_index": jnp.zeros(inputs.shape[:1], jnp.int32),
      }
    am = attention_mask.astype(bool)
    length = jnp.sum(am, axis=1).astype(jnp.int32)
    x = insert_at(inputs, length, self.cls_embed[0, 0])
    tp = insert_at(t.astype(jnp.float32), length, jnp.float32(-1.0))
    amp = jnp.arange(inputs.shape[1] + 1)[None, :] <= length[:, None]
    out = self._backbone(x, tp, amp, None, deterministic)
    summary = DECODE_POOLINGS[self.decode_pooling]
    pooled = summary(out["hidden_states"], length, self.architecture)
    out["pooler_outputs"] = self._pool(pooled, deterministic)
    out["prep/attention_mask"] = amp.astype(jnp.int32)
    out["cls_index"] = length
    return out

  def decode(
    self, inputs: jax.Array, t: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """encode() + decoding_head -> 'logits' (B, num_classes)."""
    if not self.num_classes:
      raise ValueError("LfbModel.decode: num_classes is 0 (no decoding head)")
    out = self.encode(inputs, t, attention_mask, deterministic=deterministic)
    out["logits"] = self.decoding_head(out["pooler_outputs"])
    return out

  def __call__(
    self,
    inputs: jax.Array,
    t: jax.Array,
    attention_mask: jax.Array,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    """Touch every parameter (used by init): the pretraining and the decoding paths."""
    B, S, _ = inputs.shape
    if self.style == "csm":
      out = self.csm(inputs, t, jnp.ones((B,), jnp.int32), deterministic=deterministic)
    elif self.architecture == "bert":
      zeros = jnp.zeros((B, S), jnp.int32)
      mm = jnp.zeros(inputs.shape, bool)
      out = self.bert(inputs, t, attention_mask, zeros, mm, deterministic=deterministic)
    else:
      out = self.autoencode(inputs, t, deterministic=deterministic)
    # The pooler exists (untrained) in every pretrained model, as in the original, so a
    # checkpoint always holds everything a decoding run grafts.
    dec = self.encode(inputs, t, attention_mask, deterministic=deterministic)
    out = {**out, "pooled": dec["pooler_outputs"]}
    if self.num_classes:
      out["logits"] = self.decoding_head(dec["pooler_outputs"])
    return out
