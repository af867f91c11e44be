"""Encoding-model data: a stimulus dataset's fMRI responses joined with cached backbone tokens.

prepare() builds (or opens) the stimulus dataset: the synthetic default with its planted
answer, or a prepared folder (`python -m boldjax.prepare algonauts ...`); then the token
cache of config.data.backbone over its images (built once, keyed by backbone, weights and
images). Batches: local (B, L, h, w, C) and global (B, L, C) tokens in the cache's 16-bit
dtype, fmri (B, N) float32, image_id (B,), and valid (B,) on eval splits.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import backbones, synthetic_encoding, token_cache
from boldjax.data.paths import cache_dir, readable_dataset, setting
from boldjax.data.pipeline import keyed_batches

TRAIN_KEYS = ("local", "global", "fmri")
EVAL_KEYS = TRAIN_KEYS + ("image_id", "valid")


def default_config() -> ml_collections.ConfigDict:
  """config.data of the encoding family (configs/encoding.py fills in the backbone)."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic_encoding"
  c.path = ml_collections.FieldReference(None, field_type=str)
  c.cache_dir = os.environ.get("BOLDJAX_CACHE", os.path.expanduser("~/.cache/boldjax"))
  c.synthetic = ml_collections.ConfigDict(
    {
      k: (tuple(v) if isinstance(v, (list, tuple)) else v)
      for k, v in dataclasses.asdict(synthetic_encoding.SyntheticEncodingSpec()).items()
    }
  )
  c.synthetic.backbone_weights = ""
  c.synthetic.backbone_init = "distinct"
  c.backbone = ml_collections.ConfigDict(
    {
      "name": "tiny",
      "weights": "",
      "seed": 0,
      "init": "distinct",  # random weights: layers that differ (backbones.distinct_layers)
      "allow_pickle": False,
      "image_size": 0,
    }
  )
  c.backbone.arch = backbones.arch_config()  # ViTConfig fields replacing the preset's
  c.tokens = ml_collections.ConfigDict(
    {
      "grid": (8, 8),
      "dtype": "float16",
      "batch_size": 64,
      "mean": token_cache.IMAGENET_MEAN,  # the seed: ImageNet statistics, even for CLIP
      "std": token_cache.IMAGENET_STD,
    }
  )
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_workers = 0
  return c


@dataclasses.dataclass
class EncodingInfo:
  """What the encoding task, its evaluator and the maps need to know about the data."""

  path: str  # the stimulus dataset
  tokens_path: str  # its token cache
  coords: np.ndarray  # (N, 3) float32 vertex coordinates (the selectors' input)
  fsaverage_index: np.ndarray  # (N,) int64 vertex of the fsaverage mesh of its hemisphere
  hemisphere: np.ndarray  # (N,) int8, 0 left, 1 right
  num_layers: int
  token_dim: int
  grid: tuple[int, int]
  split_sizes: dict[str, int]
  backbone: str
  meta: dict[str, Any]
  noise_ceiling: np.ndarray | None = None  # (N,) when the data states one
  planted: dict[str, np.ndarray] | None = None  # the synthetic default's answer

  @property
  def num_vertices(self) -> int:
    return int(self.coords.shape[0])


def synthetic_spec(data_cfg: Any) -> synthetic_encoding.SyntheticEncodingSpec:
  fields = {f.name for f in dataclasses.fields(synthetic_encoding.SyntheticEncodingSpec)}
  syn = setting(data_cfg, "synthetic", {})
  values = {k: syn[k] for k in fields if k in syn}
  if "grid" in values:
    values["grid"] = tuple(int(g) for g in values["grid"])
  return synthetic_encoding.SyntheticEncodingSpec(**values)


def _grid(data_cfg: Any) -> tuple[int, int]:
  return tuple(int(g) for g in setting(setting(data_cfg, "tokens", {}), "grid", (8, 8)))


def _token_settings(data_cfg: Any) -> tuple[tuple[int, int], str, int, tuple, tuple]:
  tcfg = setting(data_cfg, "tokens", {})
  return (
    _grid(data_cfg),
    str(setting(tcfg, "dtype", "float16")),
    int(setting(tcfg, "batch_size", 64)),
    tuple(float(v) for v in setting(tcfg, "mean", token_cache.IMAGENET_MEAN)),
    tuple(float(v) for v in setting(tcfg, "std", token_cache.IMAGENET_STD)),
  )


def stimulus_path(data_cfg: Any) -> str:
  """The stimulus dataset folder: data.path, or the synthetic default (built once)."""
  from boldjax.data.flat_builder import file_lock

  path = setting(data_cfg, "path")
  if path:
    return readable_dataset(str(path), cache_dir(data_cfg))
  spec = synthetic_spec(data_cfg)
  syn = setting(data_cfg, "synthetic", {})
  planted_cfg = {  # the backbone whose tokens make the planted responses
    "name": spec.backbone,
    "weights": setting(syn, "backbone_weights", ""),
    "seed": spec.backbone_seed,
    "init": setting(syn, "backbone_init", "distinct"),
    "image_size": setting(setting(data_cfg, "backbone", {}), "image_size", 0),
  }
  _, _, batch, mean, std = _token_settings(data_cfg)
  identity = [backbones.weights_identity(planted_cfg), planted_cfg["image_size"], mean, std]
  out = synthetic_encoding.dataset_path(data_cfg, spec, identity)
  if not os.path.exists(os.path.join(out, "meta.json")):
    with file_lock(out + ".lock", f"building {out}"):
      if not os.path.exists(os.path.join(out, "meta.json")):
        planted = backbones.load(planted_cfg)
        tokens_of = backbones.token_fn(planted, spec.grid, mean, std, batch)
        print(f"[synthetic encoding] building {out} ({spec.num_images} images)", flush=True)
        synthetic_encoding.build(spec, tokens_of, out)
  return out


def prepare(data_cfg: Any) -> EncodingInfo:
  """Open (or build) the stimulus dataset and its token cache."""
  from boldjax.data import image_records

  path = stimulus_path(data_cfg)
  stim = image_records.open_stimulus(path)
  if not stim.meta.get("response"):
    raise InputError(
      f"{path}/meta.json: field 'response': the encoding family needs fMRI responses per "
      "image, found none (`prepare images` / `nsd_images` datasets hold images only; "
      "`prepare algonauts` adds responses)"
    )
  vertices = stim.vertices()
  splits = {name: stim.split(name) for name in stim.splits}
  grid, dtype, batch, mean, std = _token_settings(data_cfg)
  bcfg = setting(data_cfg, "backbone", {})
  name = str(setting(bcfg, "name", "tiny"))
  config = backbones.backbone_config(bcfg)

  def make_fn():
    return backbones.token_fn(backbones.load(bcfg), grid, mean, std, batch)

  weights_id = backbones.weights_identity(bcfg)
  image_size = int(setting(bcfg, "image_size", 0)) or int(config.image_size)
  spec = token_cache.CacheSpec(
    backbone=name,
    backbone_config={**dataclasses.asdict(config), "input_size": image_size},
    weights_id=weights_id,
    grid=grid,
    dtype=dtype,
    mean=mean,
    std=std,
  )
  cache = token_cache.cached_tokens(cache_dir(data_cfg), splits, spec, make_fn, batch_size=batch)
  planted = None
  if os.path.exists(os.path.join(path, "planted.npz")):
    with np.load(os.path.join(path, "planted.npz")) as z:
      planted = {k: z[k] for k in z.files}
  nc = planted.get("noise_ceiling") if planted else None
  if nc is None and os.path.exists(os.path.join(path, "noise_ceiling.npy")):
    nc = np.load(os.path.join(path, "noise_ceiling.npy"))
  return EncodingInfo(
    path=path,
    tokens_path=cache.path,
    coords=np.asarray(vertices["coords"], np.float32),
    fsaverage_index=np.asarray(vertices["fsaverage_index"], np.int64),
    hemisphere=np.asarray(vertices["hemisphere"], np.int8),
    num_layers=cache.num_layers,
    token_dim=cache.width,
    grid=cache.grid,
    split_sizes={name: len(src) for name, src in splits.items()},
    backbone=name,
    meta=dict(stim.meta),
    noise_ceiling=None if nc is None else np.asarray(nc, np.float32),
    planted=planted,
  )


class JoinedSource:
  """Record i of a stimulus split with record i of its token cache split."""

  def __init__(self, stimulus: Any, tokens: Any, where: str):
    if len(stimulus) != len(tokens):
      raise ValueError(f"{where}: {len(tokens)} cached token records for {len(stimulus)} images")
    self.stimulus, self.tokens, self.where = stimulus, tokens, where

  def __len__(self) -> int:
    return len(self.stimulus)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex, tok = self.stimulus[index], self.tokens[index]
    if int(ex["image_id"]) != int(tok["image_id"]):
      raise ValueError(
        f"{self.where}: record {index} holds image {ex['image_id']} but its cached tokens "
        f"are of image {tok['image_id']}; delete the cache folder to rebuild it"
      )
    return {
      "local": tok["local"],
      "global": tok["global"],
      "fmri": np.asarray(ex["response"], np.float32),
      "image_id": np.int64(ex["image_id"]),
    }


def _pad_example(info: EncodingInfo, dtype: np.dtype) -> dict[str, np.ndarray]:
  h, w = info.grid
  return {
    "local": np.zeros((info.num_layers, h, w, info.token_dim), dtype),
    "global": np.zeros((info.num_layers, info.token_dim), dtype),
    "fmri": np.zeros((info.num_vertices,), np.float32),
    "image_id": np.int64(-1),
  }


def joined_split(info: EncodingInfo, split: str) -> JoinedSource:
  from boldjax.data import image_records

  stim = image_records.open_stimulus(info.path).split(split)
  tokens = token_cache.TokenCache(info.tokens_path).split(split)
  return JoinedSource(stim, tokens, f"{info.path} [{split}]")


def make_dataset(
  data_cfg: Any,
  info: EncodingInfo,
  *,
  split: str,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Host-local batches (see the module docstring); train: shuffled, repeated, sliced per
  process, drop_remainder; eval: one padded pass in record order."""
  source = joined_split(info, split)
  if len(source) == 0:
    raise ValueError(f"{info.path}: split {split!r} is empty")
  pad = None if train else _pad_example(info, token_cache.value_dtype(source.tokens.dtype))
  return keyed_batches(
    source, pad, TRAIN_KEYS if train else EVAL_KEYS, data_cfg, train=train, seed=seed,
    batch_size=batch_size, shard_index=shard_index, shard_count=shard_count,
  )  # fmt: skip


@registry.register("pipeline", "synthetic_encoding")
@registry.register("pipeline", "stimulus")
class EncodingPipeline:
  """Stimulus datasets with responses (the synthetic default or a prepared folder)."""

  kind = "stimulus"

  prepare = staticmethod(prepare)
  make_dataset = staticmethod(make_dataset)
