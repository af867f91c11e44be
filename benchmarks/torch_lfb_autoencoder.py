"""learning-from-brains LSTM autoencoder (embedder + LSTM encoder / decoder + unembedder).

For the speed comparison only; written from the lfb_autoencoder parity spec, not copied.
The encoder is L single-layer bidirectional torch LSTMs whose (h, c) is handed from layer to
layer, with x = LN(mean of the two directions + the layer's input) -> dropout in between;
the decoder steps S times through L unidirectional LSTMs in a Python loop (as the
original), from h = the encoder's direction-mean final h, c = 0 and the pooler output as the
first input, each later input being the last output (dropout -> Linear -> dropout) or, with
teacher forcing, the embedded frame at the same index. State-dict names are the original's,
so boldjax.convert.lfb.params_to_torch output loads with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.torch_lfb_gpt import Embedder, load_lfb_weights


def _norm_then_dropout(dim: int, dropout: float) -> nn.Sequential:
  return nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout))


class LstmAutoencoder(nn.Module):
  def __init__(
    self,
    in_dim: int,
    dim: int,
    layers: int,
    dropout: float,
    tr_precision: float = 0.2,
    tr_max: float = 300.0,
  ):
    super().__init__()
    self.dim = dim
    self.embedder = Embedder(in_dim, dim, dropout, tr_precision, tr_max)
    self.embedder.msk_embed = None  # the autoencoder's embedder has no MSK / CLS tokens
    self.embedder.cls_embed = None
    self.decoder = nn.Module()
    enc = self.decoder.encoder = nn.Module()
    enc.lstms = nn.ModuleList(
      nn.LSTM(dim, dim, batch_first=True, bidirectional=True) for _ in range(layers)
    )
    enc.layer_norms = nn.ModuleList(_norm_then_dropout(dim, dropout) for _ in range(layers - 1))
    enc.pooler_layer = nn.Sequential(
      nn.Dropout(dropout), nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout)
    )
    dec = self.decoder.decoder = nn.Module()
    dec.lstms = nn.ModuleList(nn.LSTM(dim, dim, batch_first=True) for _ in range(layers))
    dec.layer_norms = nn.ModuleList(_norm_then_dropout(dim, dropout) for _ in range(layers - 1))
    dec.linear_output_layer = nn.Sequential(
      nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
    )
    self.unembedder = nn.Module()
    self.unembedder.model = nn.Sequential(nn.Linear(dim, in_dim))

  def encode(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outputs (B, S, D), hidden (B, D), pooler output (B, D))."""
    enc, D = self.decoder.encoder, self.dim
    x, prev, state = embeds, None, None
    for i, lstm in enumerate(enc.lstms):
      if i > 0:
        x = enc.layer_norms[i - 1](x + prev)
      out, state = lstm(x, state)
      prev, x = x, (out[..., :D] + out[..., D:]) / 2.0
    hidden = state[0].mean(dim=0)
    return x, hidden, enc.pooler_layer(hidden)

  def decode(
    self, first: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor, forcing: bool
  ) -> torch.Tensor:
    dec = self.decoder.decoder
    h, c = hidden[None], torch.zeros_like(hidden)[None]
    inp, outputs = first, []
    for s in range(embeds.shape[1]):
      x, prev = (embeds[:, s] if forcing else inp), None
      for i, lstm in enumerate(dec.lstms):
        if i > 0:
          x = dec.layer_norms[i - 1](x + prev)
        y, (h, c) = lstm(x[:, None], (h, c))
        prev, x = x, y[:, 0]
      inp = dec.linear_output_layer(x)
      outputs.append(inp)
    return torch.stack(outputs, dim=1)

  def forward(
    self, inputs: torch.Tensor, t_rs: torch.Tensor, teacher_forcing: bool = False
  ) -> dict[str, torch.Tensor]:
    embeds = self.embedder(inputs, t_rs)
    enc_out, hidden, pooled = self.encode(embeds)
    dec_out = self.decode(pooled, hidden, embeds, teacher_forcing)
    return {
      "embeds": embeds,
      "encoder/outputs": enc_out,
      "encoder/hidden": hidden,
      "encoder/pooler_outputs": pooled,
      "decoder/outputs": dec_out,
      "outputs": self.unembedder.model(dec_out),
    }

  def loss(
    self,
    inputs: torch.Tensor,
    t_rs: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_forcing: bool = False,
  ) -> torch.Tensor:
    """L1 over every parcel of the valid frames."""
    out = self.forward(inputs, t_rs, teacher_forcing)["outputs"]
    valid = attention_mask.bool()[..., None].expand_as(inputs)
    return (out - inputs).abs().masked_select(valid).mean()


def from_boldjax(model, params) -> LstmAutoencoder:
  """A torch LstmAutoencoder holding the same weights as a boldjax LfbModel('autoencoder')."""
  if model.style != "autoencoder" or model.embed_layers != 1 or model.unembed_layers != 1:
    raise ValueError(
      "torch_lfb_autoencoder: needs LfbModel(style='autoencoder') with one embed / unembed "
      f"layer, found style={model.style!r}, embed_layers={model.embed_layers}, "
      f"unembed_layers={model.unembed_layers}"
    )
  if model.embed_dim == model.in_dim:
    raise ValueError("torch_lfb_autoencoder: needs an unembedder (embed_dim != in_dim)")
  net = LstmAutoencoder(
    model.in_dim, model.embed_dim, model.num_layers, model.dropout, model.tr_precision,
    model.tr_max,
  )  # fmt: skip
  return load_lfb_weights(net, params, model)
