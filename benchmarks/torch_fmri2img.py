"""fmri2img's fMRI encoder and diffusers' AutoencoderKL in PyTorch, for the speed comparison.

The encoder is written from the seed (aaalgo/fmri2img models/basic_ae.py, as the
fmri2img_basic_ae spec describes it), not copied: fc1 -> GELU -> fc2 -> GELU -> fc3 -> GELU
(exact erf GELU), view(-1, 16, 8, 8) channel-major, ConvTranspose2d(16, 4, k4, s2, p1).
Fmri2Image decodes its latent with a frozen diffusers AutoencoderKL (no 1/0.18215 scaling)
and takes the pixel MSE, as train_basic_ae.py does. The VAE objective (boldjax's "vae"
task: reconstruction MSE of a posterior sample + kl_weight x KL (summed per image) per pixel
value) runs on the same diffusers model. State-dict names are the originals', so boldjax.convert's
converters read them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FmriEncoder(nn.Module):
  """The seed's encoder with its hidden sizes and reshape grid as arguments."""

  def __init__(
    self,
    input_dim: int,
    hidden: tuple[int, ...] = (2048, 2048, 1024),
    grid: tuple[int, int, int] = (16, 8, 8),
    latent_channels: int = 4,
  ):
    super().__init__()
    dims = (input_dim, *hidden)
    for i in range(len(hidden)):
      setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
    self.num_fc, self.grid = len(hidden), grid
    self.deconv1 = nn.ConvTranspose2d(grid[0], latent_channels, 4, stride=2, padding=1)

  def forward(self, fmri: torch.Tensor) -> torch.Tensor:
    x = fmri
    for i in range(self.num_fc):
      x = F.gelu(getattr(self, f"fc{i + 1}")(x))
    return self.deconv1(x.view(-1, *self.grid))


def diffusers_vae(config: Any):
  """diffusers.AutoencoderKL with boldjax VAEConfig `config`'s sizes."""
  from diffusers import AutoencoderKL

  levels = len(config.block_out_channels)
  return AutoencoderKL(
    in_channels=config.in_channels,
    out_channels=config.out_channels,
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    block_out_channels=tuple(config.block_out_channels),
    layers_per_block=config.layers_per_block,
    latent_channels=config.latent_channels,
    norm_num_groups=config.norm_num_groups,
    mid_block_add_attention=config.mid_attention,
    scaling_factor=config.scaling_factor,
  )


class Fmri2Image(nn.Module):
  """Encoder + frozen VAE decoder; loss = pixel MSE (the seed's training objective)."""

  def __init__(self, encoder: FmriEncoder, vae: nn.Module):
    super().__init__()
    self.encoder, self.vae = encoder, vae
    self.vae.requires_grad_(False)

  def loss(self, fmri: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    recon = self.vae.decode(self.encoder(fmri)).sample
    return F.mse_loss(recon, images)


class VAETrain(nn.Module):
  """diffusers AutoencoderKL under boldjax's vae objective."""

  def __init__(self, vae: nn.Module, kl_weight: float):
    super().__init__()
    self.vae, self.kl_weight = vae, kl_weight

  def loss(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
    dist = self.vae.encode(images).latent_dist
    z = dist.sample() if sample else dist.mean
    recon = self.vae.decode(z).sample
    kl = 0.5 * (dist.mean.square() + dist.var - 1.0 - dist.logvar).flatten(1).sum(1)
    values = images[0].numel()
    return F.mse_loss(recon, images) + self.kl_weight / values * kl.mean()


def nchw(images_nhwc: Any) -> torch.Tensor:
  return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
