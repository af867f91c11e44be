"""Brain Decodes Deep Nets FactorTopy and its training objective in plain PyTorch.

For the speed comparison only; written from the seed (huzeyann/BrainDecodesDeepNets,
brainnet/model.py, position_encoding.py, plmodel.py) and the bddn_encoding spec's quirks,
not copied:
  - each selector is Sequential(PositionalEncoding, Linear(6F, 128), GELU, Linear(128, 128),
    GELU, Linear(128, k, no bias), Tanh | Softmax | Sigmoid); the encoding runs under
    no_grad on every call, normalised by the min / max of the coords it is given;
  - per-layer bottlenecks: Conv2d 1x1 (local, NCHW) and Linear (global), no bias;
  - v_global = sum over the layer axis of the (B, N, bd, L) product of the stacked global
    bottlenecks and sel_layer; v_local = sum_l sel_layer[:, l] * F.grid_sample(local_l,
    (x, y), bilinear, zero padding, align_corners=False); v = (1 - s) v_local + s v_global;
    y = mean_d(v * W) + b;
  - reg = sum_l p log(p + 1e-8) / log L (vertex mean) + mean (s - 0.5)^2; PLModel's
    training_step: smooth_l1(beta 0.1) + reg * LAMBDA * max(1 - global_step / 2000, 0).
`PLModel` keeps PLModel's names (model.* for FactorTopy, the frozen `coords` parameter) and
counts its optimizer steps (`count_step`, the seed's global_step). FactorTopy's state-dict
names are the seed's, so boldjax.convert.bddn.params_to_torch output loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PositionalEncoding(nn.Module):
  """The seed's point_position_encoding: (N, D) -> (N, D * features * 2), no gradient."""

  def __init__(self, max_steps: float = 100, features: int = 32, periods: float = 1000):
    super().__init__()
    self.max_steps, self.features, self.periods = max_steps, features, periods

  @torch.no_grad()
  def forward(self, points: torch.Tensor) -> torch.Tensor:
    low, high = points.min(0).values, points.max(0).values
    steps = high - low
    steps = steps * (self.max_steps / steps.max())
    positions = (points - low) * (steps / (high - low))
    f = self.features
    omega = torch.logspace(0, 1 / f - 1, f, self.periods, dtype=points.dtype)
    fraction = omega * positions.unsqueeze(-1)
    return torch.stack((fraction.sin(), fraction.cos()), dim=-1).flatten(-3)


def _selector(k: int, act: nn.Module, hidden: int, features: int) -> nn.Sequential:
  net = nn.Sequential(
    PositionalEncoding(features=features),
    nn.Linear(6 * features, hidden),
    nn.GELU(),
    nn.Linear(hidden, hidden),
    nn.GELU(),
    nn.Linear(hidden, k, bias=False),
    act,
  )
  nn.init.zeros_(net[-2].weight)
  return net


class FactorTopy(nn.Module):
  """The seed's FactorTopy (hidden / features: its hard-coded 128 / 32 by default)."""

  def __init__(
    self,
    n_vertices: int,
    layers: Sequence[Any],
    layer_widths: Sequence[int],
    bottleneck_dim: int = 128,
    hidden: int = 128,
    features: int = 32,
  ):
    super().__init__()
    self.layers = [str(layer) for layer in layers]
    self.local_token_bottleneck = nn.ModuleDict()
    self.global_token_bottleneck = nn.ModuleDict()
    for layer, width in zip(self.layers, layer_widths, strict=True):
      self.local_token_bottleneck[layer] = nn.Conv2d(width, bottleneck_dim, 1, bias=False)
      self.global_token_bottleneck[layer] = nn.Linear(width, bottleneck_dim, bias=False)
    self.space_selector_mlp = _selector(2, nn.Tanh(), hidden, features)
    self.layer_selector_mlp = _selector(len(self.layers), nn.Softmax(dim=-1), hidden, features)
    self.scale_selector_mlp = _selector(1, nn.Sigmoid(), hidden, features)
    dummy = nn.Linear(bottleneck_dim, n_vertices)
    self.weight = nn.Parameter(dummy.weight)  # (n_vertices, bottleneck_dim)
    self.bias = nn.Parameter(dummy.bias)  # (n_vertices,)

  def selections(self, coords: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
      "sel_space": self.space_selector_mlp(coords),
      "sel_layer": self.layer_selector_mlp(coords),
      "sel_scale": self.scale_selector_mlp(coords),
    }

  def forward(
    self,
    local_tokens: dict[str, torch.Tensor],  # layer -> (B, C, h, w); overwritten, as the seed
    global_tokens: dict[str, torch.Tensor],  # layer -> (B, C)
    coords: torch.Tensor,  # (N, 3)
  ) -> tuple[torch.Tensor, torch.Tensor]:
    assert list(local_tokens) == self.layers and list(global_tokens) == self.layers
    for layer in self.layers:
      local_tokens[layer] = self.local_token_bottleneck[layer](local_tokens[layer])
      global_tokens[layer] = self.global_token_bottleneck[layer](global_tokens[layer])
    sel = self.selections(coords)
    sel_space, sel_layer, sel_scale = sel["sel_space"], sel["sel_layer"], sel["sel_scale"]
    entropy = (torch.log(sel_layer + 1e-8) * sel_layer).sum(dim=-1).mean()
    reg = entropy / np.log(len(self.layers)) + (sel_scale - 0.5).pow(2).mean()

    stacked = torch.stack(list(global_tokens.values()), dim=-1)  # (B, bd, L)
    v_global = (stacked[:, None] * sel_layer[None, :, None, :]).sum(dim=-1)  # (B, N, bd)
    bsz = local_tokens[self.layers[0]].shape[0]
    grid = sel_space[None, :, None, :].expand(bsz, -1, 1, -1)  # (B, N, 1, 2)
    v_local = None
    for i, layer in enumerate(self.layers):
      sample = F.grid_sample(
        local_tokens[layer], grid, mode="bilinear", padding_mode="zeros", align_corners=False
      )  # (B, bd, N, 1)
      sample = sample.squeeze(-1).permute(0, 2, 1) * sel_layer[None, :, i].unsqueeze(-1)
      v_local = sample if v_local is None else v_local + sample
    s = sel_scale[None]  # (1, N, 1)
    v = (1 - s) * v_local + s * v_global  # (B, N, bd)
    y = (v * self.weight[None]).mean(dim=-1) + self.bias[None]  # (B, N)
    return y, reg


class PLModel(nn.Module):
  """PLModel's trainable part: FactorTopy on cached tokens, the frozen vertex coordinates
  and training_step's objective with the regulariser's decay over the optimizer steps."""

  def __init__(
    self,
    coords: np.ndarray,
    layer_widths: Sequence[int],
    bottleneck_dim: int = 128,
    hidden: int = 128,
    features: int = 32,
    reg_weight: float = 0.1,
    reg_steps: int = 2000,
    beta: float = 0.1,
  ):
    super().__init__()
    self.coords = nn.Parameter(torch.as_tensor(np.asarray(coords, np.float32)))
    self.coords.requires_grad = False  # freeze, as the seed
    layers = list(range(len(layer_widths)))
    self.model = FactorTopy(len(coords), layers, layer_widths, bottleneck_dim, hidden, features)
    self.reg_weight, self.reg_steps, self.beta = reg_weight, reg_steps, beta
    self.global_step = 0

  def forward(self, local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]):
    return self.model(dict(local), dict(glob), self.coords)  # fresh dicts: forward mutates

  def get_decay(self) -> float:
    return max(1 - self.global_step / self.reg_steps, 0)

  def training_loss(
    self, local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor], fmri: torch.Tensor
  ) -> torch.Tensor:
    y, reg = self(local, glob)
    loss = F.smooth_l1_loss(y, fmri, beta=self.beta)
    return loss + reg * self.reg_weight * self.get_decay()

  def count_step(self) -> None:
    """After each optimizer step (Lightning's global_step)."""
    self.global_step += 1


def tokens_from_batch(
  local: np.ndarray, glob: np.ndarray
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
  """boldjax batch tokens, local (B, L, h, w, C) and global (B, L, C) in any float dtype ->
  the seed's per-layer float32 dicts {str(l): (B, C, h, w)} and {str(l): (B, C)}."""
  local, glob = np.asarray(local, np.float32), np.asarray(glob, np.float32)
  loc = {str(i): torch.from_numpy(np.ascontiguousarray(local[:, i].transpose(0, 3, 1, 2)))
         for i in range(local.shape[1])}  # fmt: skip
  glo = {str(i): torch.from_numpy(np.ascontiguousarray(glob[:, i])) for i in range(glob.shape[1])}
  return loc, glo


def from_boldjax(task, params) -> PLModel:
  """A torch PLModel with the weights, vertex set and objective of a boldjax EncodingTask."""
  import flax.linen as nn_flax

  from boldjax.convert.bddn import params_to_torch

  m = task.model
  dims = m.token_dim
  widths = [dims] * m.num_layers if isinstance(dims, int) else list(dims)
  net = PLModel(
    task.info.coords, widths, m.bottleneck, m.hidden, m.num_freqs,
    reg_weight=task.reg_weight, reg_steps=task.reg_steps, beta=task.beta,
  )  # fmt: skip
  sd = params_to_torch(nn_flax.unbox(params), range(m.num_layers))
  net.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  return net
