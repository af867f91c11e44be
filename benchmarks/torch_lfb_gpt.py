"""learning-from-brains CSM GPT (embedder + HF GPT-2 layout + unembedder) in plain PyTorch.

For the speed comparison only; written from the lfb_gpt_csm parity spec, not copied. Names
follow the original's state dict (embedder.embed_model.model.0, decoder.transformer.h.i,
unembedder.model.0, Conv1D weights stored (in, out)), so boldjax.convert.lfb.params_to_torch
output loads with strict=True. Only the CSM path (one embed / unembed layer) is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Conv1D(nn.Module):
  """HF GPT-2 Conv1D: y = x @ W + b with W stored (in, out)."""

  def __init__(self, fan_in: int, fan_out: int):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(fan_in, fan_out) * 0.02)
    self.bias = nn.Parameter(torch.zeros(fan_out))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
      *x.shape[:-1], -1
    )


def gelu_new(x: torch.Tensor) -> torch.Tensor:
  return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class GPT2Attention(nn.Module):
  def __init__(self, dim: int, heads: int, dropout: float):
    super().__init__()
    self.heads, self.dropout = heads, dropout
    self.c_attn = Conv1D(dim, 3 * dim)
    self.c_proj = Conv1D(dim, dim)
    self.resid_dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, L, D = x.shape
    H = self.heads
    q, k, v = (t.reshape(B, L, H, D // H).transpose(1, 2) for t in self.c_attn(x).split(D, dim=-1))
    p = self.dropout if self.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, L, D)))


class GPT2MLP(nn.Module):
  def __init__(self, dim: int, inner: int, dropout: float):
    super().__init__()
    self.c_fc = Conv1D(dim, inner)
    self.c_proj = Conv1D(inner, dim)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.dropout(self.c_proj(gelu_new(self.c_fc(x))))


class GPT2Block(nn.Module):
  def __init__(self, dim: int, heads: int, inner: int, dropout: float):
    super().__init__()
    self.ln_1 = nn.LayerNorm(dim)
    self.attn = GPT2Attention(dim, heads, dropout)
    self.ln_2 = nn.LayerNorm(dim)
    self.mlp = GPT2MLP(dim, inner, dropout)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x), mask)
    return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
  def __init__(self, dim: int, layers: int, heads: int, inner: int, positions: int, dropout):
    super().__init__()
    self.wpe = nn.Embedding(positions, dim)
    self.drop = nn.Dropout(dropout)
    self.h = nn.ModuleList(GPT2Block(dim, heads, inner, dropout) for _ in range(layers))
    self.ln_f = nn.LayerNorm(dim)

  def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    L = x.shape[1]
    x = self.drop(x + self.wpe.weight[:L])
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    mask = causal[None, None] & attention_mask[:, None, None, :]
    for block in self.h:
      x = block(x, mask)
    return self.ln_f(x)


class Embedder(nn.Module):
  def __init__(self, in_dim: int, dim: int, dropout: float, tr_precision: float, tr_max: float):
    super().__init__()
    self.embed_model = nn.Module()
    self.embed_model.model = nn.Sequential(
      nn.Linear(in_dim, dim), nn.LayerNorm(dim), nn.Dropout(dropout)
    )
    self.precision, self.num = tr_precision, int(tr_max / tr_precision)
    self.wt_re = nn.Embedding(self.num + 1, dim)
    self.msk_embed = nn.Parameter(torch.randn(1, 1, in_dim))
    self.cls_embed = nn.Parameter(torch.randn(1, 1, in_dim))

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = self.precision
    ids = (torch.round(t / p) * p * int(1 / p)).long()
    ids = torch.where(ids >= 0, ids.clamp(max=self.num), self.num)
    return self.embed_model.model(x) + self.wt_re(ids)


class CsmGPT(nn.Module):
  """CSM: frame i -> MSK token, attention cut to 0..i, later frames zeroed; L1 at frame i."""

  def __init__(
    self,
    in_dim: int,
    dim: int,
    layers: int,
    heads: int,
    inner: int,
    positions: int,
    dropout: float,
    tr_precision: float = 0.2,
    tr_max: float = 300.0,
  ):
    super().__init__()
    self.embedder = Embedder(in_dim, dim, dropout, tr_precision, tr_max)
    self.decoder = nn.Module()
    self.decoder.transformer = GPT2(dim, layers, heads, inner, positions, dropout)
    self.decoder.pooler_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
    self.unembedder = nn.Module()
    self.unembedder.model = nn.Sequential(nn.Linear(dim, in_dim))

  def loss(self, batch: dict[str, torch.Tensor], masking_i: torch.Tensor) -> torch.Tensor:
    x, t, length = batch["bold"], batch["t_sec"], batch["length"]
    B, S, P = x.shape
    pos = torch.arange(S, device=x.device)[None, :]
    i = masking_i[:, None]
    frame, attn = pos == i, pos <= i
    h = torch.where(frame[..., None], self.embedder.msk_embed, x)
    h = torch.where(attn[..., None], h, torch.zeros_like(h))
    h = self.decoder.transformer(self.embedder(h, t), attn)
    out = self.unembedder.model(h)
    pred = out[torch.arange(B), masking_i]
    target = x[torch.arange(B), masking_i]
    w = (length >= 2).to(x.dtype)
    per_row = (pred - target).abs().mean(dim=-1)
    return torch.sum(w * per_row) / torch.clamp(w.sum(), min=1e-12)


def from_boldjax(model, params) -> CsmGPT:
  """A torch CsmGPT holding the same weights as a boldjax LfbModel(style='csm')."""

  if model.style != "csm" or model.embed_layers != 1 or model.unembed_layers != 1:
    raise ValueError("torch_lfb_gpt: only CSM with one embed / unembed layer is implemented")
  if model.hidden_activation != "gelu_new" or model.embed_dim == model.in_dim:
    raise ValueError("torch_lfb_gpt: needs hidden_activation='gelu_new' and an unembedder")
  return load_lfb_weights(CsmGPT(**lfb_sizes(model)), params, model)


def lfb_sizes(model) -> dict[str, Any]:
  """The torch lfb references' constructor arguments read off a boldjax LfbModel."""
  return dict(
    in_dim=model.in_dim,
    dim=model.embed_dim,
    layers=model.num_layers,
    heads=model.num_heads,
    inner=model.embed_dim * model.intermediate_factor,
    positions=model.n_positions,
    dropout=model.dropout,
    tr_precision=model.tr_precision,
    tr_max=model.tr_max,
  )


def load_lfb_weights(net: nn.Module, params, model) -> nn.Module:
  """Copies boldjax LfbModel params (one embed / unembed layer, no class head) into net."""
  from boldjax.convert.lfb import params_to_torch

  structure = dict(
    style=model.style, num_layers=model.num_layers, embed_layers=1, unembed_layers=1, num_classes=0
  )
  sd = params_to_torch(params, structure, model.num_heads)
  net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  return net
