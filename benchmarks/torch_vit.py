"""open_clip's VisionTransformer (the seed's default CLIP backbone) in plain PyTorch, and the
seed's feature pass.

For the speed comparison only; written from open_clip's module structure (open_clip
3.x transformer.py), not copied, and checked against the openclip_vit parity fixture:
conv1 (no bias) -> class_embedding + positional_embedding -> ln_pre -> resblocks (batch
first; x + attn(ln_1 x) with nn.MultiheadAttention, x + mlp(ln_2 x) with c_fc, QuickGELU or
GELU, c_proj) -> ln_post -> class token @ proj. LayerNorm eps 1e-5 (torch's default).
State-dict names are open_clip's visual tower's, so boldjax.convert.vision reads them.

`get_tokens` is the seed's ModifiedCLIP.get_tokens (per block: patch tokens (B, C, p, p)
and the class token (B, C), raw block outputs); `feature_pass` adds what the token cache
does around it: uint8 NHWC images -> [0, 1] -> (x - mean) / std, and PLModel's
downsample_local_tokens (F.interpolate to the grid, bilinear, align_corners=False).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
  """open_clip's LayerNorm: computes in the input's dtype, returns it."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    orig = x.dtype
    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig)


class QuickGELU(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
    super().__init__()
    self.ln_1 = LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ls_1 = nn.Identity()
    self.ln_2 = LayerNorm(width)
    hidden = int(width * mlp_ratio)
    self.mlp = nn.Sequential(
      OrderedDict(
        [("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]
      )
    )
    self.ls_2 = nn.Identity()

  def attention(self, x: torch.Tensor) -> torch.Tensor:
    return self.attn(x, x, x, need_weights=False)[0]  # q is k is v: MHA's inference fast path

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.ls_1(self.attention(self.ln_1(x)))
    return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
  def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act):
    super().__init__()
    self.resblocks = nn.ModuleList(
      ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)
    )


class VisionTransformer(nn.Module):
  """open_clip VisionTransformer (pool_type 'tok', learnable positions, no LayerScale)."""

  def __init__(
    self,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    mlp_ratio: float,
    output_dim: int,
    quick_gelu: bool = True,
  ):
    super().__init__()
    self.grid = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
    scale = width**-0.5
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
    self.ln_pre = LayerNorm(width)
    act = QuickGELU if quick_gelu else nn.GELU
    self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
    self.ln_post = LayerNorm(width)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

  def embed(self, x: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) -> ln_pre(tokens + positions) (B, 1 + grid^2, C)."""
    x = self.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
    return self.ln_pre(x)

  def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
    """Every resblock's output (B, T, C), class token first."""
    x, out = self.embed(x), []
    for r in self.transformer.resblocks:
      x = r(x)
      out.append(x)
    return out

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """The CLIP image embedding: ln_post(class token) @ proj."""
    return self.ln_post(self.blocks(x)[-1])[:, 0] @ self.proj

  def get_tokens(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The seed's get_tokens: {str(i): (B, C, grid, grid)} patch tokens, {str(i): (B, C)}."""
    x = self.embed(x)
    local, glob = {}, {}
    for i, r in enumerate(self.transformer.resblocks):
      x = r(x)
      saved = x.clone()[:, 1:]
      local[str(i)] = saved.permute(0, 2, 1).reshape(x.shape[0], -1, self.grid, self.grid)
      glob[str(i)] = x[:, 0]
    return local, glob


def from_config(config) -> VisionTransformer:
  """A VisionTransformer with boldjax ViTConfig `config`'s sizes; the config must describe
  an open_clip tower (see `openclip_layout`)."""
  want = openclip_layout(config, act=config.act)
  if config != want:
    diff = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) !=
            getattr(want, f.name)]  # fmt: skip
    raise ValueError(f"torch_vit: config {config.name!r} is not an open_clip tower: {diff}")
  return VisionTransformer(
    config.image_size, config.patch_size, config.width, config.layers, config.heads,
    config.mlp_ratio, config.output_dim, quick_gelu=config.act == "quick_gelu",
  )  # fmt: skip


def openclip_layout(config, act: str = "quick_gelu"):
  """A boldjax ViTConfig with `config`'s sizes in open_clip's layout: ln_pre, ln_post,
  projection (to the width unless set), no patch bias, eps 1e-5, class token, positions on
  every token, no registers / LayerScale / fc_norm."""
  return dataclasses.replace(
    config, num_registers=0, class_token=True, pos_embed_on="all", ln_pre=True,
    final_norm=True, fc_norm=False, pool="token", output_dim=config.output_dim or config.width,
    act=act, layerscale_init=None, ln_eps=1e-5, qkv_bias=True, patch_bias=False, channels=3,
  )  # fmt: skip


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def feature_pass(
  model: VisionTransformer,
  images: torch.Tensor,
  grid: Sequence[int],
  mean: Sequence[float],
  std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
  """uint8 images (B, H, W, 3) at the model's size -> local (B, L, h, w, C) and global
  (B, L, C) float32 tokens, stacked in boldjax's layout for comparison."""
  x = images.permute(0, 3, 1, 2).float() / 255.0
  m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
  s = torch.tensor(std, dtype=torch.float32)[:, None, None]
  local, glob = model.get_tokens((x - m) / s)
  size = tuple(int(g) for g in grid)
  for k, v in local.items():  # PLModel.downsample_local_tokens
    local[k] = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
  stacked = torch.stack(list(local.values()), dim=1).permute(0, 1, 3, 4, 2)
  return stacked, torch.stack(list(glob.values()), dim=1)
