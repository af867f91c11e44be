"""The frozen vision backbone a config names: a ViT preset plus published weights or a seed.

config.data.backbone = {name: a models/vit.py preset, arch: ViTConfig fields that replace
the preset's (None: the preset's; 0 for output_dim / layerscale_init: none), so that other
sizes and variants (a CLIP ViT-L/14, GELU instead of QuickGELU, registers) need no new
preset, weights: "" (random init from `seed`) or a published open_clip / timm file
(.safetensors, .npz; torch pickles with allow_pickle), image_size: 0 (the preset's) or the
size images are resized to before the backbone (its position embeddings are resampled to
the new grid, as timm and open_clip do)}.
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


_ARCH_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_NONE_AS_ZERO = ("output_dim", "layerscale_init")  # Optional fields: 0 in arch means None


def arch_fields() -> dict[str, type]:
  """ViTConfig field -> the type its command-line override parses to."""
  from boldjax.models import vit

  return {
    f.name: _ARCH_TYPES[str(f.type).replace(" | None", "")]
    for f in dataclasses.fields(vit.ViTConfig)
    if f.name != "name"
  }


def arch_config() -> Any:
  """config.data.backbone.arch: one typed placeholder per ViTConfig field (None: the
  preset's), so `--config.data.backbone.arch.width=1024` parses on the command line."""
  import ml_collections
  from ml_collections import config_dict

  return ml_collections.ConfigDict(
    {name: config_dict.placeholder(kind) for name, kind in arch_fields().items()}
  )


def arch_overrides(bcfg: Any) -> dict[str, Any]:
  """The fields config.data.backbone.arch sets (0 -> None for the optional ones)."""
  arch = setting(bcfg, "arch", None) or {}
  known = arch_fields()
  unknown = sorted(set(arch) - set(known))
  if unknown:
    raise InputError(
      f"config.data.backbone.arch: expected fields of {sorted(known)}, found {unknown}"
    )
  out = {}
  for name, value in arch.items():
    if value is None:
      continue
    if name in _NONE_AS_ZERO and not value:
      value = None
    out[name] = value
  return out


def backbone_config(bcfg: Any) -> Any:
  """The ViTConfig of config.data.backbone: its preset with the arch overrides applied."""
  base = preset(str(setting(bcfg, "name", "tiny")))
  changes = arch_overrides(bcfg)
  if not changes:
    return base
  try:
    return dataclasses.replace(base, **changes, name=f"{base.name}+arch")
  except InputError as e:
    raise InputError(f"config.data.backbone.arch: {e}") from e


def weights_identity(bcfg: Any) -> str:
  """What the tokens depend on besides the config: the weights file's sha256, or the seed
  and init of random weights (cheap: a cache hit never loads the weights)."""
  from boldjax.data import token_cache

  weights = str(setting(bcfg, "weights", ""))
  if weights:
    return token_cache.file_sha256(weights)
  init = str(setting(bcfg, "init", "distinct"))
  return f"random:{int(setting(bcfg, 'seed', 0))}" + ("" if init == "model" else f":{init}")


def load(bcfg: Any) -> Backbone:
  """The backbone of config.data.backbone (weights read and checked, or initialised)."""
  import jax

  from boldjax.models import vit

  name = str(setting(bcfg, "name", "tiny"))
  config = backbone_config(bcfg)
  weights = str(setting(bcfg, "weights", ""))
  if weights:
    from boldjax.convert import vision

    params, notes = vision.load_backbone(
      weights, config, allow_pickle=bool(setting(bcfg, "allow_pickle", False))
    )
  else:
    seed = int(setting(bcfg, "seed", 0))
    params = vit.init_params(config, jax.random.key(seed))
    init = str(setting(bcfg, "init", "distinct"))
    if init == "distinct":
      params = distinct_layers(params, seed)
    elif init != "model":
      raise InputError(f"config.data.backbone.init: expected 'distinct' or 'model', found {init!r}")
    notes = [f"{name}: random weights (seed {seed}, init {init})"]
  params = jax.tree.map(np.asarray, params)
  weights_id = weights_identity(bcfg)
  size = int(setting(bcfg, "image_size", 0)) or int(config.image_size)
  return Backbone(name, config, size, params, weights_id, list(notes))


def distinct_layers(params: Any, seed: int, attention_scale: float = 3.0) -> Any:
  """Random block weights under which a ViT's layers differ: variance-preserving (lecun)
  kernels, query/key kernels x`attention_scale`.

  A ViT at its training init (std 0.02) passes the patch embedding through almost
  unchanged: every layer's tokens are a linear image of every other's (ridge R^2 1.00
  between layers at one position, measured on the tiny preset), so no model could tell
  which layer a planted response came from. With sharper attention and unit-gain kernels
  the tiny preset's layers predict each other with R^2 0.63-0.92.
  """
  import jax

  rng = np.random.default_rng(seed)

  def redraw(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] != "kernel" or not names[0].startswith("blocks"):
      return leaf
    fan_in = leaf.shape[0] * (leaf.shape[1] if names[-2] == "out" else 1)
    scale = attention_scale if names[-2] in ("query", "key") else 1.0
    return rng.normal(0, scale / np.sqrt(fan_in), leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(redraw, params)


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
