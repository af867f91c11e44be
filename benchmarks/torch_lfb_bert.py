"""learning-from-brains Seq-BERT (embedder + HF BertModel + heads) in plain PyTorch.

For the speed comparison only; written from the lfb_bert parity spec, not copied. The batch
preparation follows the original's steps one by one (mask frames -> MSK, add_sep_embeds,
add_cls_embed inserting CLS after the last SEP while LEFT-padding token types and the
modelling mask by one, so both end up shifted +1), vectorised over the batch. Losses as the
original: L1 between masked_select(outputs, shifted mask) and masked_select(inputs, mask),
plus BCE-with-logits NSP on the pooler of hidden state 0 (the first frame, not the CLS),
with the inverted label (is_next = 1: b does NOT follow a). State-dict names are the
original's, so boldjax.convert.lfb.params_to_torch output loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_lfb_gpt import Embedder, gelu_new, lfb_sizes, load_lfb_weights

ACTIVATIONS = {"gelu_new": gelu_new, "gelu": F.gelu, "relu": F.relu}


class BertSelfAttention(nn.Module):
  def __init__(self, dim: int, heads: int, dropout: float):
    super().__init__()
    self.heads, self.dropout = heads, dropout
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim)
    self.value = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, L, D = x.shape
    H = self.heads
    q, k, v = (
      f(x).reshape(B, L, H, D // H).transpose(1, 2) for f in (self.query, self.key, self.value)
    )
    p = self.dropout if self.training else 0.0
    # HF adds -10000 to masked scores; a boolean mask (-inf) gives the same softmax here
    # (every row keeps its valid keys).
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    return y.transpose(1, 2).reshape(B, L, D)


class BertAttention(nn.Module):
  def __init__(self, dim: int, heads: int, dropout: float, eps: float):
    super().__init__()
    self.self = BertSelfAttention(dim, heads, dropout)
    self.output = nn.Module()
    self.output.dense = nn.Linear(dim, dim)
    self.output.LayerNorm = nn.LayerNorm(dim, eps=eps)
    self.output.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = self.output.dropout(self.output.dense(self.self(x, mask)))
    return self.output.LayerNorm(x + h)


class BertLayer(nn.Module):
  """Post-LN: x = LN(x + attn(x)); x = LN(x + dense(act(dense(x))))."""

  def __init__(self, dim: int, heads: int, inner: int, dropout: float, eps: float, act: str):
    super().__init__()
    self.attention = BertAttention(dim, heads, dropout, eps)
    self.intermediate = nn.Module()
    self.intermediate.dense = nn.Linear(dim, inner)
    self.output = nn.Module()
    self.output.dense = nn.Linear(inner, dim)
    self.output.LayerNorm = nn.LayerNorm(dim, eps=eps)
    self.output.dropout = nn.Dropout(dropout)
    self.act = ACTIVATIONS[act]

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = self.attention(x, mask)
    h = self.output.dense(self.act(self.intermediate.dense(x)))
    return self.output.LayerNorm(x + self.output.dropout(h))


class BertModel(nn.Module):
  """HF BertModel(add_pooling_layer=False) on inputs_embeds (word_embeddings never used)."""

  def __init__(
    self, dim: int, layers: int, heads: int, inner: int, positions: int, dropout: float, act: str
  ):
    super().__init__()
    eps = 1e-12
    self.embeddings = nn.Module()
    self.embeddings.position_embeddings = nn.Embedding(positions, dim)
    self.embeddings.token_type_embeddings = nn.Embedding(2, dim)
    self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
    self.embeddings.dropout = nn.Dropout(dropout)
    self.encoder = nn.Module()
    self.encoder.layer = nn.ModuleList(
      BertLayer(dim, heads, inner, dropout, eps, act) for _ in range(layers)
    )

  def forward(
    self, x: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
  ) -> torch.Tensor:
    e = self.embeddings
    L = x.shape[1]
    h = x + e.position_embeddings.weight[:L] + e.token_type_embeddings(token_type_ids)
    h = e.dropout(e.LayerNorm(h))
    mask = attention_mask.bool()[:, None, None, :]
    for layer in self.encoder.layer:
      h = layer(h, mask)
    return h


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """x (B, S, ...) at per-row time indices index (B, L) -> (B, L, ...)."""
  idx = index.reshape(index.shape + (1,) * (x.ndim - 2)).expand(*index.shape, *x.shape[2:])
  return torch.gather(x, 1, idx)


def pack_pair(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """The BERTDataset layout: [a[:la] | b[:lb] | zeros], t restarting at 0 for b, token types
  0 / 1, attention mask on the la + lb frames, is_next = 1 - next_is_consecutive."""
  a, b = batch["bold"], batch["bold_next"]
  la, lb = batch["length"].long()[:, None], batch["length_next"].long()[:, None]
  Ta, Tb = a.shape[1], b.shape[1]
  j = torch.arange(Ta + Tb, device=a.device)[None, :]
  from_a, from_b = j < la, (j >= la) & (j < la + lb)
  ia, ib = j.clamp(max=Ta - 1).expand_as(from_a), (j - la).clamp(0, Tb - 1)
  x = torch.where(
    from_a[..., None],
    _gather_time(a, ia),
    torch.where(from_b[..., None], _gather_time(b, ib), torch.zeros((), dtype=a.dtype)),
  )
  ta, tb = batch["t_sec"], batch["t_sec_next"]
  t = torch.where(
    from_a, torch.gather(ta, 1, ia), torch.where(from_b, torch.gather(tb, 1, ib), 0.0)
  )
  return {
    "inputs": x,
    "t_rs": t,
    "attention_mask": (from_a | from_b).long(),
    "token_type_ids": from_b.long(),
    "is_next": 1 - batch["next_is_consecutive"].long(),
  }


def draw_frame_mask(attention_mask: torch.Tensor, rate: float) -> torch.Tensor:
  """MSMEmbedder.mask_inputs: a valid frame is masked when torch.rand >= 1 - rate."""
  u = torch.rand(attention_mask.shape, device=attention_mask.device)
  return (u >= 1.0 - rate) & attention_mask.bool()


def draw_parcel_mask(attention_mask: torch.Tensor, parcels: int, rate: float) -> torch.Tensor:
  """MNMEmbedder.mask_inputs: one torch.rand per (row, parcel); a parcel drawn >= 1 - rate
  is masked at every valid frame. (B, S, parcels)."""
  u = torch.rand((attention_mask.shape[0], parcels), device=attention_mask.device)
  return (u >= 1.0 - rate)[:, None, :] & attention_mask.bool()[..., None]


class SeqBert(nn.Module):
  """Model(BERTEmbedder, BERTModel decoder, UnEmbedder) with the Seq-BERT objective, or with
  `netbert` the Network-BERT one (NetBERTEmbedder: a masked entry (t, p) becomes the scalar
  msk_embed[0, t, 0]; masks are per (frame, parcel))."""

  def __init__(
    self,
    in_dim: int,
    dim: int,
    layers: int,
    heads: int,
    inner: int,
    positions: int,
    dropout: float,
    act: str = "gelu_new",
    tr_precision: float = 0.2,
    tr_max: float = 300.0,
    netbert: bool = False,
  ):
    super().__init__()
    self.netbert = netbert
    self.embedder = Embedder(in_dim, dim, dropout, tr_precision, tr_max)
    if netbert:
      self.embedder.msk_embed = nn.Parameter(torch.randn(1, positions, 1))
    self.embedder.sep_embed = nn.Parameter(torch.randn(1, in_dim))
    self.decoder = nn.Module()
    self.decoder.transformer = BertModel(dim, layers, heads, inner, positions, dropout, act)
    self.decoder.pooler_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout))
    self.decoder.is_next_head = nn.Sequential(nn.Linear(dim, 1))
    self.unembedder = nn.Module()
    self.unembedder.model = nn.Sequential(nn.Linear(dim, in_dim))

  def prep_batch(
    self,
    inputs: torch.Tensor,
    t_rs: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    frame_mask: torch.Tensor,
  ) -> dict[str, torch.Tensor]:
    """Masking, add_sep_embeds and add_cls_embed as the original (shapes S -> S+2 -> S+3).

    frame_mask: (B, S) whole frames (Seq-BERT) or (B, S, P) entries (Network-BERT).
    """
    B, S, P = inputs.shape
    emb = self.embedder
    am, tt = attention_mask.bool(), token_type_ids.long()
    la = (am & (tt == 0)).sum(1, keepdim=True)
    lb = (am & (tt == 1)).sum(1, keepdim=True)
    mm = frame_mask.bool()
    mm = (mm[..., None].expand(B, S, P) if mm.ndim == 2 else mm) & am[..., None]
    x = torch.where(mm, emb.msk_embed[:, :S] if self.netbert else emb.msk_embed, inputs)
    # add_sep_embeds: [a, SEP, b, SEP, zeros] (S+2); SEPs are not modelled (mask 0).
    j = torch.arange(S + 2, device=inputs.device)[None, :]
    in_a, in_b = j < la, (j > la) & (j <= la + lb)
    sep1, sep2 = j == la, j == la + lb + 1
    src = torch.where(in_a, j, j - 1).clamp(0, S - 1)
    frames = in_a | in_b
    x2 = torch.where(frames[..., None], _gather_time(x, src), torch.zeros((), dtype=x.dtype))
    x2 = torch.where((sep1 | sep2)[..., None], emb.sep_embed[None], x2)
    t2 = torch.where(frames, torch.gather(t_rs, 1, src), torch.zeros((), dtype=t_rs.dtype))
    t2 = torch.where(sep1 | sep2, -1.0, t2)
    tt2 = torch.where(frames, torch.gather(tt, 1, src), 0) + sep2.long()
    mm2 = torch.where(frames[..., None], _gather_time(mm, src), False)
    # add_cls_embed: CLS inserted at la+lb+2 (after the last SEP); token types and the
    # modelling mask are LEFT-padded with one zero instead (the +1 shift of the original).
    c = la + lb + 2
    k = torch.arange(S + 3, device=inputs.device)[None, :]
    src3 = torch.where(k < c, k, k - 1).clamp(0, S + 1)
    x3 = torch.where((k == c)[..., None], emb.cls_embed, _gather_time(x2, src3))
    t3 = torch.where(k == c, -1.0, torch.gather(t2, 1, src3))
    zero = torch.zeros((B, 1), dtype=tt2.dtype, device=tt2.device)
    tt3 = torch.cat([zero, tt2], dim=1)
    mm3 = torch.cat([torch.zeros((B, 1, P), dtype=torch.bool, device=mm2.device), mm2], dim=1)
    return {
      "inputs_embeds": x3,
      "t_rs": t3,
      "attention_mask": (k <= c).long(),
      "token_type_ids": tt3,
      "modelling_mask": mm3,
      "frame_mask": mm,
    }

  def forward(self, prep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    h = self.embedder(prep["inputs_embeds"], prep["t_rs"])
    h = self.decoder.transformer(h, prep["attention_mask"], prep["token_type_ids"])
    pooled = self.decoder.pooler_layer(h[:, 0])
    return {
      "hidden_states": h,
      "outputs": self.unembedder.model(h),
      "pooler_outputs": pooled,
      "is_next_logits": self.decoder.is_next_head(pooled),
    }

  def losses(
    self,
    inputs: torch.Tensor,
    t_rs: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    is_next: torch.Tensor,
    frame_mask: torch.Tensor,
  ) -> dict[str, torch.Tensor]:
    """masking_loss + is_next_loss on a packed batch with the given mask ((B, S) or (B, S, P))."""
    prep = self.prep_batch(inputs, t_rs, attention_mask, token_type_ids, frame_mask)
    out = self.forward(prep)
    target = inputs.masked_select(prep["frame_mask"])
    pred = out["outputs"].masked_select(prep["modelling_mask"])
    masking = F.l1_loss(pred, target)
    nsp = F.binary_cross_entropy_with_logits(
      out["is_next_logits"].reshape(-1), is_next.to(out["is_next_logits"].dtype)
    )
    return {**out, "masking_loss": masking, "is_next_loss": nsp, "loss": masking + nsp}

  def loss(self, packed: dict[str, torch.Tensor], frame_mask: torch.Tensor) -> torch.Tensor:
    """Total loss of a pack_pair() batch."""
    return self.losses(
      packed["inputs"],
      packed["t_rs"],
      packed["attention_mask"],
      packed["token_type_ids"],
      packed["is_next"],
      frame_mask,
    )["loss"]


def from_boldjax(model, params) -> SeqBert:
  """A torch SeqBert holding the same weights as a boldjax LfbModel(style='bert'|'netbert')."""

  if model.style not in ("bert", "netbert") or model.embed_layers != 1 or model.unembed_layers != 1:
    raise ValueError(
      "torch_lfb_bert: only Seq-/Network-BERT (style 'bert' / 'netbert') with one embed / "
      f"unembed layer is implemented, found style={model.style!r}, "
      f"embed_layers={model.embed_layers}, unembed_layers={model.unembed_layers}"
    )
  if model.embed_dim == model.in_dim or model.num_classes:
    raise ValueError("torch_lfb_bert: needs an unembedder (embed_dim != in_dim), no class head")
  net = SeqBert(**lfb_sizes(model), act=model.hidden_activation, netbert=model.style == "netbert")
  return load_lfb_weights(net, params, model)
