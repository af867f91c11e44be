"""The frozen vision backbone a config names: a ViT preset plus published weights or a seed.

config.data.backbone = {name: a models/vit.py preset, weights: "" (random init from `seed`)
or a published open_clip / timm file (.safetensors, .npz; torch pickles with allow_pickle),
image_size: 0 (the preset's) or the size images are resized to before the backbone (its
position embeddings are resampled to the new grid, as timm and open_clip do)}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from boldjax.cli import InputError
from boldjax.data.paths import setting


@dataclasses.dataclass
class Backbone:
  name: str
  config: Any  # models.vit.ViTConfig
  image_size: int  # what the images are resized to before the backbone
  params: Any
  weights_id: str  # what the tokens depend on: sha256 of the file or "random:<seed>"
  notes: list[str]


def preset(name: str) -> Any:
  from boldjax.models import vit

  if name not in vit.PRESETS:
    raise InputError(
      f"config.data.backbone.name: expected one of {sorted(vit.PRESETS)}, found {name!r}"
    )
  return vit.PRESETS[name]


def load(bcfg: Any) -> Backbone:
  """The backbone of config.data.backbone (weights read and checked, or initialised)."""
  import jax

  from boldjax.data import token_cache
  from boldjax.models import vit

  name = str(setting(bcfg, "name", "tiny"))
  config = preset(name)
  weights = str(setting(bcfg, "weights", ""))
  if weights:
    from boldjax.convert import vision

    params, notes = vision.load_backbone(
      weights, config, allow_pickle=bool(setting(bcfg, "allow_pickle", False))
    )
    weights_id = token_cache.file_sha256(weights)
  else:
    seed = int(setting(bcfg, "seed", 0))
    params = vit.init_params(config, jax.random.key(seed))
    weights_id, notes = f"random:{seed}", [f"{name}: random weights (seed {seed})"]
  params = jax.tree.map(np.asarray, params)
  size = int(setting(bcfg, "image_size", 0)) or int(config.image_size)
  return Backbone(name, config, size, params, weights_id, list(notes))


def token_fn(backbone: Backbone, grid: tuple[int, int], mean, std, batch_size: int):
  """uint8 images (n, H, W, 3) numpy -> (local (n, L, h, w, C), global (n, L, C)) float32."""
  from boldjax.data import token_cache
  from boldjax.models import vit

  fn = token_cache.make_token_fn(
    lambda p, x: vit.get_tokens(p, x, backbone.config),
    image_size=backbone.image_size,
    grid=grid,
    mean=mean,
    std=std,
  )

  def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(images) <= batch_size:
      pad = batch_size - len(images)
      full = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
      local, global_ = fn(backbone.params, full)
      return np.asarray(local)[: len(images)], np.asarray(global_)[: len(images)]
    parts = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  return run
