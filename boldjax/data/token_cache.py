"""Frozen-backbone tokens of a stimulus set, computed once and kept as an ArrayRecord dataset.

The seed kept every image's 12 x 65 x 768 tokens in RAM, keyed by its pixel sum (~20 GB per
Algonauts subject, and two images with the same sum collide). Here a jitted, batched pass
writes each layer's local tokens (resized to the encoder's grid with torch's bilinear,
align_corners=False, no antialiasing) and global tokens, in float16 or bfloat16, to a
dataset whose splits mirror the stimulus dataset record for record. Its folder name is a
hash of everything the tokens depend on (backbone config, weights, image bytes, grid,
normalisation, dtype), so a second run with the same inputs reads it back and a change
to any of them builds a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from boldjax.data import store

FORMAT_VERSION = 1
BUILDER_NAME = "boldjax_tokens"
BUILDER_VERSION = "1.0.0"
DTYPES = ("float16", "bfloat16")

# torchvision's ImageNet statistics; the seed normalises with them even for CLIP.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """What the cached tokens depend on, besides the images."""

  backbone: str  # a name for humans (the preset)
  backbone_config: dict[str, Any]  # the ViTConfig fields
  weights_id: str  # sha256 of the weights file, or "random:<seed>"
  grid: tuple[int, int] = (8, 8)
  dtype: str = "float16"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def key(self, images_id: str) -> str:
    blob = json.dumps(
      {**dataclasses.asdict(self), "images": images_id, "format": FORMAT_VERSION},
      sort_keys=True,
      default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def images_sha256(splits: dict[str, Any]) -> str:
  """Hash of every image's bytes and id, split by split, in record order."""
  digest = hashlib.sha256()
  for name in sorted(splits):
    source = splits[name]
    digest.update(f"{name}:{len(source)};".encode())
    for i in range(len(source)):
      ex = source[i]
      image = np.ascontiguousarray(ex["image"])
      digest.update(np.int64(ex["image_id"]).tobytes())
      digest.update(str(image.shape).encode())
      digest.update(image.tobytes())
  return digest.hexdigest()


def _storage_dtype(dtype: str) -> np.dtype:
  """On disk: float16 as is; bfloat16 as its raw 16 bits (TFDS has no bfloat16)."""
  if dtype not in DTYPES:
    raise ValueError(f"token cache: field 'dtype' expected one of {DTYPES}, found {dtype!r}")
  return np.dtype(np.float16 if dtype == "float16" else np.uint16)


def value_dtype(dtype: str) -> np.dtype:
  """The dtype a reader gets back (decode's output) for a cache stored as `dtype`."""
  _storage_dtype(dtype)  # checks the name
  if dtype == "float16":
    return np.dtype(np.float16)
  import ml_dtypes

  return np.dtype(ml_dtypes.bfloat16)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "float16":
    return np.asarray(x, np.float16)
  import ml_dtypes

  return np.asarray(x, ml_dtypes.bfloat16).view(np.uint16)


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "float16":
    return x
  import ml_dtypes

  return np.asarray(x).view(ml_dtypes.bfloat16)


def make_token_fn(
  forward: Callable[[Any, Any], tuple[Any, Any]],
  *,
  image_size: int,
  grid: tuple[int, int],
  mean: tuple[float, float, float],
  std: tuple[float, float, float],
) -> Callable[[Any, np.ndarray], tuple[Any, Any]]:
  """jit(params, uint8 images (B, H, W, 3)) -> (local (B, L, h, w, C), global (B, L, C)) f32.

  forward(params, normalised images) -> (local (B, L, H', W', C), global (B, L, C)), the
  backbone's get_tokens. Images of another size are resized (bilinear, antialiased, like
  torchvision's Resize on tensors) to the backbone's input size first.
  """
  import jax
  import jax.numpy as jnp

  from boldjax.models.factortopy import resize_bilinear

  mean_a = jnp.asarray(mean, jnp.float32)
  std_a = jnp.asarray(std, jnp.float32)

  @jax.jit
  def tokens(params, images):
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (image_size, image_size):
      x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "bilinear")
    x = (x - mean_a) / std_a
    local, global_ = forward(params, x)
    b, num_layers, h, w, c = local.shape
    if (h, w) != tuple(grid):
      flat = local.reshape(b * num_layers, h, w, c)
      local = resize_bilinear(flat, grid).reshape(b, num_layers, *grid, c)
    return local, global_

  return tokens


def _features(num_layers: int, grid: tuple[int, int], width: int, dtype: str) -> dict[str, Any]:
  import tensorflow_datasets as tfds

  f = tfds.features
  stored = _storage_dtype(dtype).type
  return {
    "image_id": f.Scalar(dtype=np.int64),
    "local": f.Tensor(shape=(num_layers, *grid, width), dtype=stored),
    "global": f.Tensor(shape=(num_layers, width), dtype=stored),
  }


def build_cache(
  out_dir: str,
  splits: dict[str, Any],
  token_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
  *,
  spec: CacheSpec,
  images_id: str,
  batch_size: int = 64,
) -> str:
  """Write the tokens of every split's images (record i = image record i) into out_dir.

  token_fn(uint8 images (B, H, W, 3)) -> (local, global) numpy float32; every batch but
  the last of a split is full, the last is padded to full size so one compiled shape serves.
  """
  sizes = {name: len(src) for name, src in splits.items()}
  total = sum(sizes.values())
  probe = next(name for name in splits if sizes[name])
  local0, global0 = token_fn(np.stack([splits[probe][0]["image"]] * batch_size))
  num_layers, h, w, width = local0.shape[1:]
  done = {"n": 0, "start": time.monotonic(), "last": time.monotonic()}

  def batches(source) -> Iterator[dict[str, Any]]:
    n = len(source)
    for lo in range(0, n, batch_size):
      rows = [source[i] for i in range(lo, min(lo + batch_size, n))]
      images = np.stack([r["image"] for r in rows])
      pad = batch_size - len(rows)
      if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      local, global_ = token_fn(images)
      local, global_ = np.asarray(local), np.asarray(global_)
      for j, r in enumerate(rows):
        yield {
          "image_id": np.int64(r["image_id"]),
          "local": encode(local[j], spec.dtype),
          "global": encode(global_[j], spec.dtype),
        }
      done["n"] += len(rows)
      now = time.monotonic()
      if now - done["last"] >= 10 or done["n"] == total:
        done["last"] = now
        rate = done["n"] / max(now - done["start"], 1e-9)
        print(
          f"[token cache] {done['n']}/{total} images, {rate:.1f} images/s, "
          f"eta {(total - done['n']) / max(rate, 1e-9):.0f}s",
          flush=True,
        )

  nonempty = {name: batches(src) for name, src in splits.items() if sizes[name]}

  def finish(tmp: str, written: dict[str, int]) -> None:
    for name, count in written.items():
      if count != sizes[name]:
        raise RuntimeError(f"token cache {name}: wrote {count} records of {sizes[name]}")
    meta = {
      "format_version": FORMAT_VERSION,
      "kind": "tokens",
      "spec": dataclasses.asdict(spec),
      "images_id": images_id,
      "num_layers": int(num_layers),
      "grid": [int(h), int(w)],
      "width": int(width),
      "split_sizes": sizes,
    }
    store.write_json(os.path.join(tmp, "meta.json"), meta, indent=2, sort_keys=True)

  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  return store.write_dataset(
    out_dir,
    builder=(BUILDER_NAME, BUILDER_VERSION),
    features=_features(int(num_layers), (int(h), int(w)), int(width), spec.dtype),
    examples_by_split=nonempty,
    finish=finish,
    description="boldjax frozen-backbone tokens",
    shuffle=False,  # record i is image record i
  )


class TokenSource(store.SplitSource):
  """One split of a token cache: getitem -> {image_id, local, global} (stored dtype)."""

  builder_name = BUILDER_NAME
  builder_version = BUILDER_VERSION

  def __init__(self, path: str, split: str, dtype: str):
    super().__init__(path, split)
    self.dtype = dtype

  def __getstate__(self):
    return {**super().__getstate__(), "dtype": self.dtype}

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._open()[int(index)]
    return {
      "image_id": np.int64(ex["image_id"]),
      "local": decode(np.asarray(ex["local"]), self.dtype),
      "global": decode(np.asarray(ex["global"]), self.dtype),
    }


class TokenCache:
  """An opened token cache folder."""

  def __init__(self, path: str):
    self.path, self.meta = store.read_meta(path, what="token cache", version=FORMAT_VERSION)
    self.dtype = str(self.meta["spec"]["dtype"])

  @property
  def num_layers(self) -> int:
    return int(self.meta["num_layers"])

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(int(g) for g in self.meta["grid"])

  @property
  def width(self) -> int:
    return int(self.meta["width"])

  def split(self, name: str) -> TokenSource | store.EmptySource:
    sizes = self.meta["split_sizes"]
    if name not in sizes:
      raise KeyError(f"{self.path}: no split {name!r}; found {sorted(sizes)}")
    if sizes[name] == 0:
      return store.EmptySource(name)
    return TokenSource(self.path, name, self.dtype)


def cached_tokens(
  cache_root: str,
  splits: dict[str, Any],
  spec: CacheSpec,
  make_token_fn_: Callable[[], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]],
  *,
  batch_size: int = 64,
) -> TokenCache:
  """The cache for (spec, these images): reused when it exists, else built (under a lock,
  so processes sharing a cache folder build it once)."""
  from boldjax.data.flat_builder import file_lock

  images_id = images_sha256(splits)
  key = spec.key(images_id)
  path = os.path.join(cache_root, "tokens", f"{spec.backbone}-{key}")
  if not os.path.exists(os.path.join(path, "meta.json")):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with file_lock(path + ".lock", f"caching {spec.backbone} tokens in {path}"):
      if not os.path.exists(os.path.join(path, "meta.json")):
        start = time.monotonic()
        build_cache(
          path, splits, make_token_fn_(), spec=spec, images_id=images_id, batch_size=batch_size
        )
        print(f"[token cache] wrote {path} in {time.monotonic() - start:.1f}s", flush=True)
  else:
    print(f"[token cache] reusing {path}", flush=True)
  return TokenCache(path)
