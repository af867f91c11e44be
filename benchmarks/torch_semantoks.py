"""Brain-Semantoks SimDINO (CNN_TF encoder, DINOHead, MCR + masked cosine, EMA teacher) in
plain PyTorch.

For the speed comparison only; written from the semantoks parity spec's quirks, not copied:
  - per-network FlexibleNetworkTokenizer: concat[Conv1d(R_n -> C, 'same'), SLConv branch]
    -> exact GELU -> mean over time -> LayerNorm; SLConv = multi-scale kernel (nearest
    upsampling x 2**max(0, i-1), times multiplier**(S-i-1)) divided by the frozen
    kernel_norm buffer, a true convolution (flipped kernel, zero padding ((K-1)//2, rest))
    grouped per ROI (output channel roi*heads + head) plus the D skip term, then Linear;
  - mask_embedding replaces masked tokens BEFORE the network + sin-cos position encodings,
    CLS prepended, pre-LN blocks with LayerScale (qkv without bias), final LayerNorm;
  - DINOHead(remove_last_layer=True): Linear -> GELU -> Linear -> F.normalize;
  - SimDINO step: student on masked views, teacher (no grad) on the unmasked views; MCR
    coding-rate loss (batched Cholesky) on the CLS heads and on the per-network
    time-averaged heads, masked cosine loss on the heads of the masked tokens only
    (boolean selection, as the original); after the optimizer step the teacher moves by
    EMA with the original's cosine momentum.
State-dict names are the original's (student_encoder.network_tokenizers.<atlas>.<n>...,
student_predictor.mlp.0, teacher_*), so boldjax.convert.semantoks.params_to_torch output
loads with strict=True (the SLConv kernel_norm buffers come from the boldjax "buffers").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SLConv(nn.Module):
  def __init__(
    self,
    channels: int,
    heads: int,
    kernel_size: int,
    num_scales: int,
    decay_min: float = 2.0,
    decay_max: float = 2.0,
  ):
    super().__init__()
    self.heads, self.channels = heads, channels
    self.kernel_list = nn.ParameterList(
      nn.Parameter(torch.randn(heads, channels, kernel_size)) for _ in range(num_scales)
    )
    self.D = nn.Parameter(torch.randn(heads, channels))
    mult = np.linspace(decay_min, decay_max, channels).astype(np.float32).reshape(1, -1, 1)
    self.register_buffer("multiplier", torch.from_numpy(mult), persistent=False)
    self.register_buffer("kernel_norm", torch.ones(heads, channels, 1))

  def kernel(self) -> torch.Tensor:
    S = len(self.kernel_list)
    parts = [
      F.interpolate(k, scale_factor=2 ** max(0, i - 1), mode="nearest")
      * self.multiplier ** (S - i - 1)
      for i, k in enumerate(self.kernel_list)
    ]
    return torch.cat(parts, dim=-1) / self.kernel_norm

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (n, R, L) -> (n, R*heads, L), channel roi*heads + head."""
    n, R, L = x.shape
    H = self.heads
    k = self.kernel()
    K = k.shape[-1]
    left = (K - 1) // 2
    w = k.permute(1, 0, 2).reshape(R * H, 1, K).flip(-1)  # true convolution
    y = F.conv1d(F.pad(x, (left, K - 1 - left)), w, groups=R)
    skip = x[:, :, None, :] * self.D.t()[None, :, :, None]  # (n, R, H, L)
    return y + skip.reshape(n, R * H, L)


class SLConvBranch(nn.Module):
  def __init__(self, rois: int, out_channels: int, branch):
    super().__init__()
    heads = math.ceil(out_channels / rois)
    self.slconv = SLConv(
      rois, heads, branch.kernel_size, branch.num_scales, branch.decay_min, branch.decay_max
    )
    self.projection = nn.Linear(heads * rois, out_channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.projection(self.slconv(x).transpose(1, 2)).transpose(1, 2)


class NetworkTokenizer(nn.Module):
  """FlexibleNetworkTokenizer: (n, R_n, patch) -> (n, sum of branch channels)."""

  def __init__(self, rois: int, branches: Sequence[Any], final_norm: str, pooling: str):
    super().__init__()
    mods = []
    for b in branches:
      if b.type == "sgconv":
        mods.append(SLConvBranch(rois, b.out_channels, b))
      elif b.depthwise:
        raise ValueError("torch_semantoks: depthwise tokenizer branches are not implemented")
      else:
        mods.append(
          nn.Conv1d(rois, b.out_channels, b.kernel_size, padding="same", dilation=b.dilation)
        )
    self.branches = nn.ModuleList(mods)
    width = sum(b.out_channels for b in branches)
    self.norm = nn.LayerNorm(width) if final_norm == "layer" else nn.Identity()
    self.pooling = pooling

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.gelu(torch.cat([b(x) for b in self.branches], dim=1))
    y = y.mean(dim=-1) if self.pooling == "mean" else y.amax(dim=-1)
    return self.norm(y)


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    B, L, D = x.shape
    H = self.heads
    q, k, v = self.qkv(x).reshape(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v)
    return self.proj(y.transpose(1, 2).reshape(B, L, D))


class LayerScale(nn.Module):
  def __init__(self, dim: int, init: float):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), float(init)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.gamma


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int, ls_init: float | None):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, heads)
    self.ls1 = LayerScale(dim, ls_init) if ls_init else nn.Identity()
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = nn.Sequential(
      nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0)
    )
    self.ls2 = LayerScale(dim, ls_init) if ls_init else nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


def sincos_1d(dim: int, positions: int) -> torch.Tensor:
  """[sin(p w), cos(p w)], w_k = 1/10000**(k/(D/2)), float64 then float32."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(np.arange(positions, dtype=np.float64), omega)
  return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32))


class InterNetworkTransformer(nn.Module):
  def __init__(self, N: int, P: int, dim: int, depth: int, heads: int, mlp_dim: int, ls, masking):
    super().__init__()
    if masking:
      self.mask_embedding = nn.Parameter(torch.randn(1, dim) * 0.02)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.network_learnable_pos_embedding = nn.Embedding(N, dim)
    self.register_buffer("temporal_pos_embedding", sincos_1d(dim, P), persistent=False)
    self.transformer_blocks = nn.ModuleList(Block(dim, heads, mlp_dim, ls) for _ in range(depth))


class CNN_TF(nn.Module):  # noqa: N801 (the original's class name)
  """(B, R, T) -> tokens (B, 1 + N*P, D) after the final LayerNorm."""

  def __init__(self, enc: Mapping[str, Any], atlas: str):
    super().__init__()
    self.rois = [torch.as_tensor(r, dtype=torch.long) for r in enc["network_rois"]]
    self.patch, self.P = int(enc["patch_size"]), int(enc["num_patches"])
    D = int(enc["embed_dim"])
    if enc.get("drop_path_rate", 0.0) or enc.get("emb_dropout", 0.0):
      raise ValueError("torch_semantoks: drop_path_rate / emb_dropout > 0 not implemented")
    tok = [
      NetworkTokenizer(
        len(r), enc["branches"], enc["tokenizer_final_norm"], enc["tokenizer_pooling"]
      )
      for r in self.rois
    ]
    self.network_tokenizers = nn.ModuleDict({atlas: nn.ModuleList(tok)})
    self.atlas = atlas
    self.inter_network_transformer = InterNetworkTransformer(
      len(self.rois),
      self.P,
      D,
      int(enc["depth"]),
      int(enc["num_heads"]),
      int(enc["mlp_dim"]),
      enc["layer_scale_init"],
      bool(enc["do_masking"]),
    )
    self.norm = nn.LayerNorm(D)

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    B = x.shape[0]
    P, ps = self.P, self.patch
    xp = x[:, :, : P * ps].unfold(2, ps, ps).permute(0, 2, 1, 3)  # (B, P, R, ps)
    tokens = []
    for rois, tokenizer in zip(self.rois, self.network_tokenizers[self.atlas], strict=True):
      xn = xp.index_select(2, rois).reshape(B * P, len(rois), ps)
      tokens.append(tokenizer(xn).reshape(B, P, -1))
    h = torch.stack(tokens, dim=1)  # (B, N, P, D)
    it = self.inter_network_transformer
    if mask is not None:
      h = torch.where(mask[..., None], it.mask_embedding[0], h)
    pos = it.network_learnable_pos_embedding.weight[:, None] + it.temporal_pos_embedding[None]
    h = (h + pos[None]).flatten(1, 2)
    h = torch.cat([it.cls_token.expand(B, -1, -1), h], dim=1)
    for block in it.transformer_blocks:
      h = block(h)
    return self.norm(h)


class DINOHead(nn.Module):
  def __init__(self, dim: int, hidden: int, bottleneck: int, nlayers: int):
    super().__init__()
    n = max(nlayers, 1)
    if n == 1:
      self.mlp = nn.Linear(dim, bottleneck)
    else:
      mods: list[nn.Module] = []
      for i in range(n):
        last = i == n - 1
        mods.append(nn.Linear(dim if i == 0 else hidden, bottleneck if last else hidden))
        if not last:
          mods.append(nn.GELU())
      self.mlp = nn.Sequential(*mods)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)


# ------------------------------------------------------------------------------ losses
def mcr_loss(
  student: torch.Tensor, teacher: torch.Tensor, eps: float = 0.05, coeff: float = 1.0
) -> dict[str, torch.Tensor]:
  """MCRLoss(expa_type=1): student / teacher (V, m, p) L2-normalised head outputs."""
  V, m, p = teacher.shape
  sim = torch.einsum("ibc,jbc->ij", teacher, student) / m
  off = 1.0 - torch.eye(V, dtype=sim.dtype, device=sim.device)
  comp = (sim * off).sum() / (V * V - V)
  z = (student + teacher) / 2
  cov = torch.einsum("nbc,nbd->ncd", z, z)
  eye = torch.eye(p, dtype=cov.dtype, device=cov.device)
  chol = torch.linalg.cholesky(eye + (p / (m * eps)) * cov)
  half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
  expa = half_logdet.mean() * (p + m) / (p * m)
  return {"loss": -coeff * comp - expa, "comp": comp, "expa": expa}


def teacher_momentum(step: int, base: float, total_steps: int) -> float:
  """SimDINOModel._get_teacher_momentum: 1 - (1 - base) (cos(pi s / total) + 1) / 2."""
  if total_steps <= 1:
    return base
  return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) * 0.5 + 0.5)


def network_loss_weight(step: int, weight: float, delay: int, decay: int, schedule: str) -> float:
  """main.get_network_loss_weight: 0 before the delay, decayed to 0 over `decay` steps."""
  if step < delay:
    return 0.0
  if decay <= 0:
    return weight
  since = step - delay
  if since >= decay:
    return 0.0
  if schedule == "cosine":
    return weight * 0.5 * (1.0 + math.cos(math.pi * since / decay))
  return weight * (1.0 - since / decay)


class SimDINO(nn.Module):
  """Student and EMA teacher (encoder + shared head each), the SimDINO losses and update."""

  def __init__(
    self,
    kwargs: Mapping[str, Any],
    *,
    mask_loss_weight: float = 0.5,
    eps: float = 0.05,
    coeff: float = 1.0,
    mask_frequency: float = 0.5,
    base_momentum: float = 0.99,
    total_steps: int = 1000,
    network_weight: tuple[float, int, int, str] = (0.5, 0, 0, "cosine"),
  ):
    super().__init__()
    enc, head = kwargs["encoder"], kwargs["head"]
    atlas = kwargs["atlas_names"][0]
    D = int(enc["embed_dim"])
    hd = (D, int(head["hidden_dim"]), int(head["bottleneck_dim"]), int(head["nlayers"]))
    self.student_encoder = CNN_TF(enc, atlas)
    self.student_predictor = DINOHead(*hd)
    self.teacher_encoder = CNN_TF(enc, atlas)
    self.teacher_predictor = DINOHead(*hd)
    for p in self.teacher_parameters():
      p.requires_grad_(False)
    self.N, self.P = len(enc["network_rois"]), int(enc["num_patches"])
    self.mask_loss_weight, self.eps, self.coeff = mask_loss_weight, eps, coeff
    self.mask_frequency, self.base_momentum = mask_frequency, base_momentum
    self.total_steps, self.network_weight = total_steps, network_weight
    self.step = 0  # optimizer steps taken (schedules are functions of it)

  def student_parameters(self) -> list[nn.Parameter]:
    return [*self.student_encoder.parameters(), *self.student_predictor.parameters()]

  def teacher_parameters(self) -> list[nn.Parameter]:
    return [*self.teacher_encoder.parameters(), *self.teacher_predictor.parameters()]

  def losses(
    self, views: torch.Tensor, masks: torch.Tensor | None, w_net: float
  ) -> dict[str, torch.Tensor]:
    """views (B, 2, R, L), masks (B, 2, N, P) bool or None (unmasked batch)."""
    B = views.shape[0]
    x = torch.cat([views[:, 0], views[:, 1]], dim=0)
    m = None if masks is None else torch.cat([masks[:, 0], masks[:, 1]], dim=0)
    s_tok = self.student_encoder(x, m)
    with torch.no_grad():
      t_tok = self.teacher_encoder(x, None)
    head_s, head_t = self.student_predictor, self.teacher_predictor

    def net(tok):  # per-network mean over the P patches, (2B, N, D)
      return tok[:, 1:].reshape(2 * B, self.N, self.P, -1).mean(dim=2)

    s_cls, s_net = head_s(s_tok[:, 0]), head_s(net(s_tok))
    with torch.no_grad():
      t_cls, t_net = head_t(t_tok[:, 0]), head_t(net(t_tok))
    cls = mcr_loss(s_cls.view(2, B, -1), t_cls.view(2, B, -1), self.eps, self.coeff)
    p = s_net.shape[-1]
    netl = mcr_loss(s_net.view(2, -1, p), t_net.view(2, -1, p), self.eps, self.coeff)
    total = cls["loss"]
    if w_net > 0:
      total = total + w_net * netl["loss"]
    out = {"cls_loss": cls["loss"], "network_mcr_loss": netl["loss"]}
    if m is not None and self.mask_loss_weight > 0:
      flat = m.reshape(2 * B, -1)
      s_mask = head_s(s_tok[:, 1:][flat])
      with torch.no_grad():
        t_mask = head_t(t_tok[:, 1:][flat])
      count = flat.sum(dim=1)
      weight = (1.0 / count.clamp(min=1).to(s_mask.dtype)).repeat_interleave(count)
      cos = F.cosine_similarity(s_mask, t_mask, dim=-1, eps=1e-8)
      out["mask_cosine_loss"] = -(cos * weight).sum() / (2 * B)
      total = total + self.mask_loss_weight * out["mask_cosine_loss"]
    out["total_loss"] = total
    return out

  def loss(self, batch: Mapping[str, torch.Tensor], *, apply_masks: bool | None = None):
    """Total loss at the current step; masks on a random mask_frequency of the batches
    (apply_masks=True/False forces them, e.g. for the deterministic parity check)."""
    if apply_masks is None:
      apply_masks = bool(torch.rand(()) < self.mask_frequency)
    w = network_loss_weight(self.step, *self.network_weight)
    return self.losses(batch["views"], batch["masks"] if apply_masks else None, w)["total_loss"]

  @torch.no_grad()
  def update_teacher(self) -> None:
    """EMA after the optimizer step, with the momentum of the step just taken."""
    m = teacher_momentum(self.step, self.base_momentum, self.total_steps)
    teacher, student = self.teacher_parameters(), self.student_parameters()
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, student, alpha=1.0 - m)
    self.step += 1


def kwargs_from_task(task) -> dict[str, Any]:
  """The semantoks_kwargs-style dict (encoder / head / atlas_names) of a boldjax DinoTask."""
  e, h = task.encoder, task.head
  fields = (
    "network_rois", "branches", "embed_dim", "depth", "num_heads", "mlp_dim", "patch_size",
    "num_patches", "layer_scale_init", "do_masking", "tokenizer_final_norm",
    "tokenizer_pooling", "drop_path_rate", "emb_dropout",
  )  # fmt: skip
  return {
    "encoder": {f: getattr(e, f) for f in fields},
    "head": {"hidden_dim": h.hidden_dim, "bottleneck_dim": h.bottleneck_dim, "nlayers": h.nlayers},
    "atlas_names": ("boldjax",),
  }


def state_dict_from_boldjax(
  params: Mapping[str, Any], teacher: Mapping[str, Any], buffers: Mapping[str, Any], kwargs
) -> dict[str, torch.Tensor]:
  """Student + teacher params (params_to_torch) and the kernel_norm buffers of both roles."""
  from boldjax.convert.semantoks import encoder_rules, params_to_torch

  sd = {**params_to_torch(params, kwargs, "student"), **params_to_torch(teacher, kwargs, "teacher")}
  for role in ("student", "teacher"):
    _, rules = encoder_rules(f"{role}_encoder", kwargs["encoder"], kwargs["atlas_names"][0])
    for name, path, _, _ in rules:
      value = buffers["encoder"]
      for key in path:
        value = value[key]
      sd[name] = np.asarray(value)
  return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}


def from_boldjax(task, params, extra) -> SimDINO:
  """A torch SimDINO with the student = params, teacher = extra['teacher'], the frozen
  kernel norms = extra['buffers'] and the schedules / loss weights of the DinoTask."""
  import flax.linen as nn_flax

  t = task.config.task
  kw = kwargs_from_task(task)
  net = SimDINO(
    kw,
    mask_loss_weight=task.mask_loss_weight,
    eps=task.eps,
    coeff=task.coeff,
    mask_frequency=task.mask_frequency,
    base_momentum=float(t.get("teacher_momentum", 0.99)),
    total_steps=int(task.config.total_steps),
    network_weight=(
      float(t.get("network_loss_weight", 0.5)),
      int(t.get("network_loss_delay_steps", 0)),
      int(t.get("network_loss_decay_steps", 0)),
      str(t.get("network_loss_schedule", "cosine")),
    ),
  )
  extra = nn_flax.unbox(extra)
  net.load_state_dict(
    state_dict_from_boldjax(params, extra["teacher"], extra["buffers"], kw), strict=True
  )
  net.step = int(np.asarray(extra["step"]))
  return net
