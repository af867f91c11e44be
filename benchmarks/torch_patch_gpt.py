"""boldGPT's IGPT decoder in plain PyTorch, for the speed comparison only.

Written from the parity spec (shared/parity/boldgpt_*/spec.json), not copied: separate
bias-free q / kv Linears (kv rows [0:D] = K), proj with bias, F.scaled_dot_product_attention
(causal), pre-LN blocks named norm1 / norm3, timm Mlp with exact GELU, torch LayerNorm
defaults. State-dict names are boldGPT's ('decoder.' prefix), so the boldjax converter's
params_to_torch output loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int, attn_drop: float = 0.0):
    super().__init__()
    self.heads, self.attn_drop = heads, attn_drop
    self.q = nn.Linear(dim, dim, bias=False)
    self.kv = nn.Linear(dim, 2 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    H = self.heads
    q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)
    k, v = self.kv(x).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
    p = self.attn_drop if self.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, heads)
    self.norm3 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm3(x))


class Decoder(nn.Module):
  """[group_token + sub_embed[s]] ++ (patch_embed(p) + pos_embed[order]), + next-pos queries."""

  def __init__(
    self,
    num_patches: int,
    patch_dim: int,
    num_outputs: int,
    num_subjects: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
  ):
    super().__init__()
    self.group_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.sub_embed = nn.Parameter(torch.randn(num_subjects, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
    self.next_pos_query = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
    self.eos_query = nn.Parameter(torch.randn(1, dim) * 0.02)
    self.patch_embed = nn.Linear(patch_dim, dim)
    self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
    self.norm = nn.LayerNorm(dim)
    self.head = nn.Linear(dim, num_outputs)

  def forward(self, patches: torch.Tensor, subject_id: torch.Tensor, order: torch.Tensor):
    B, N, _ = patches.shape
    x = self.patch_embed(patches) + self.pos_embed[order]
    sub = self.group_token + self.sub_embed[subject_id]
    x = torch.cat([sub, x], dim=1)
    eos = self.eos_query.expand(B, 1, -1)
    x = x + torch.cat([self.next_pos_query[order], eos], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, :N])


class PatchGPT(nn.Module):
  """Wrapper so state-dict names carry boldGPT's 'decoder.' prefix."""

  def __init__(self, **kwargs):
    super().__init__()
    self.decoder = Decoder(**kwargs)

  def loss(self, batch: dict[str, torch.Tensor], categorical: bool, patch_mask: torch.Tensor):
    """Mean token CE over B*N (categorical) or masked MSE (continuous), as boldGPT."""
    out = self.decoder(batch["patches"], batch["subject_id"], batch["order"])
    if categorical:
      return F.cross_entropy(out.flatten(0, 1), batch["tokens"].flatten())
    m = patch_mask[batch["order"]].to(out.dtype).expand_as(out)
    return torch.sum(m * (out - batch["patches"]) ** 2) / torch.sum(m)


def from_boldjax(model, params) -> PatchGPT:
  """A torch PatchGPT holding the same weights as a boldjax PatchGPT (`model`, `params`)."""
  from boldjax.convert.boldgpt import params_to_torch

  if model.num_registers or model.with_cross or not (model.with_sub_embed and model.with_next_pos):
    raise ValueError("torch_patch_gpt: only the default boldGPT layout is implemented")
  net = PatchGPT(
    num_patches=model.num_patches,
    patch_dim=model.patch_dim,
    num_outputs=model.num_outputs,
    num_subjects=model.num_subjects,
    dim=model.embed_dim,
    depth=model.depth,
    heads=model.num_heads,
    mlp_ratio=model.mlp_ratio,
  )
  state = {k: torch.from_numpy(v.copy()) for k, v in params_to_torch(params).items()}
  net.load_state_dict(state, strict=True)
  return net
