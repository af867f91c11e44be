"""fMRI-to-image data: trials (voxel betas + the image shown) and images alone, for grain.

Pipelines (config.data.source):
  synthetic_fmri2img  the embedded default (synthetic_fmri2img.py, built once under cache_dir)
  trials              a trials dataset folder (data.path; `prepare nsd_betas` writes one)
  stimulus_images     images only, for the VAE task: a stimulus dataset, a trials dataset's
                      images, or (no data.path) the synthetic default's images, so that the
                      VAE learns the images fmri2img decodes (train split only in training)
Batches: fmri (B, V) float32 z-scored betas, image (B, H, W, 3) float32 in [-1, 1], image_id
(B,) int64, valid (B,) bool. Training reads single trials, shuffled (repeats are separate
examples); evaluation reads one row PER IMAGE with its betas averaged over its repeats, in
record order of first showing, padded to whole batches (valid False).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import image_records, synthetic_fmri2img, trial_records
from boldjax.data.paths import cache_dir, readable_dataset, setting
from boldjax.data.pipeline import keyed_batches

KEYS = ("fmri", "image", "image_id", "valid")
IMAGE_KEYS = ("image", "image_id", "valid")
AUGMENTS = ("none", "flip")


def default_config() -> ml_collections.ConfigDict:
  """config.data of the fmri2img family (configs/fmri2img.py, configs/vae.py)."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic_fmri2img"  # or "trials" (data.path) or "stimulus_images" (VAE)
  c.path = ml_collections.FieldReference(None, field_type=str)
  c.cache_dir = os.environ.get("BOLDJAX_CACHE", os.path.expanduser("~/.cache/boldjax"))
  c.synthetic = ml_collections.ConfigDict(
    dataclasses.asdict(synthetic_fmri2img.SyntheticFmri2ImgSpec())
  )
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_workers = 0
  c.augment = "none"  # "flip": random horizontal flips (stimulus_images only)
  return c


@dataclasses.dataclass
class Fmri2ImgInfo:
  """What the fmri2img task and the reconstruction evaluator need to know about the data."""

  path: str  # the trials dataset
  num_voxels: int
  image_size: int
  split_sizes: dict[str, int]  # trials
  split_images: dict[str, int]  # images with trials (the eval rows)
  noise_ceiling: np.ndarray | None  # (V,) when the data states one
  planted: dict[str, np.ndarray] | None  # the synthetic default's forward model
  meta: dict[str, Any]


@dataclasses.dataclass
class ImagesInfo:
  """The images the VAE task trains on."""

  path: str  # a stimulus dataset folder
  image_size: int
  split_sizes: dict[str, int]  # images
  kind: str  # the folder data.path named: "stimulus", "trials" or "synthetic_fmri2img"
  meta: dict[str, Any]


def synthetic_spec(data_cfg: Any) -> synthetic_fmri2img.SyntheticFmri2ImgSpec:
  fields = {f.name for f in dataclasses.fields(synthetic_fmri2img.SyntheticFmri2ImgSpec)}
  syn = setting(data_cfg, "synthetic", {})
  syn = syn.to_dict() if hasattr(syn, "to_dict") else dict(syn)
  unknown = sorted(set(syn) - fields)
  if unknown:
    raise InputError(
      f"config.data.synthetic: fields {unknown} unknown; expected some of {sorted(fields)}"
    )
  return synthetic_fmri2img.SyntheticFmri2ImgSpec(**syn)


def synthetic_path(data_cfg: Any) -> str:
  """The synthetic default's trials folder, built once per spec under a lock."""
  from boldjax.data.flat_builder import file_lock

  spec = synthetic_spec(data_cfg)
  synthetic_fmri2img.check_spec(spec)
  out = synthetic_fmri2img.dataset_path(data_cfg, spec)
  if not os.path.exists(os.path.join(out, "meta.json")):
    with file_lock(out + ".lock", f"building {out}"):
      if not os.path.exists(os.path.join(out, "meta.json")):
        print(
          f"[synthetic fmri2img] building {out} ({spec.num_images} images, "
          f"{spec.num_voxels} voxels, {spec.repeats} repeats)",
          flush=True,
        )
        synthetic_fmri2img.build(spec, out)
  return out


def trials_path(data_cfg: Any) -> str:
  path = setting(data_cfg, "path")
  if path:
    return readable_dataset(str(path), cache_dir(data_cfg))
  if setting(data_cfg, "source") == "trials":
    raise InputError(
      "config.data.path: source 'trials' expected a trials dataset folder (`python -m "
      "boldjax.prepare nsd_betas`), found none"
    )
  return synthetic_path(data_cfg)


def _check_augment(data_cfg: Any, allowed: tuple[str, ...]) -> str:
  augment = str(setting(data_cfg, "augment", "none"))
  if augment not in allowed:
    raise InputError(
      f"config.data.augment: expected one of {allowed} for source "
      f"{setting(data_cfg, 'source')!r}, found {augment!r}"
    )
  return augment


def prepare(data_cfg: Any) -> Fmri2ImgInfo:
  """Open (or build) the trials dataset."""
  _check_augment(data_cfg, ("none",))  # a flipped target is not the image the brain saw
  path = trials_path(data_cfg)
  ds = trial_records.open_trials(path)
  planted = None
  if os.path.exists(os.path.join(path, "planted.npz")):
    with np.load(os.path.join(path, "planted.npz")) as z:
      planted = {k: z[k] for k in z.files}
  nc = planted.get("noise_ceiling") if planted else None
  if nc is None and os.path.exists(os.path.join(path, "noise_ceiling.npy")):
    nc = np.load(os.path.join(path, "noise_ceiling.npy"))
  h, w = ds.image_size
  if h != w:
    raise InputError(f"{path}/meta.json: field 'image_size' expected square, found {[h, w]}")
  return Fmri2ImgInfo(
    path=ds.path,
    num_voxels=ds.num_voxels,
    image_size=h,
    split_sizes=ds.splits,
    split_images=dict(ds.meta["split_images"]),
    noise_ceiling=None if nc is None else np.asarray(nc, np.float32),
    planted=planted,
    meta=dict(ds.meta),
  )


def to_float_image(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(image, np.float32) / 127.5 - 1.0


class _ImageLookup:
  """image_id -> the uint8 image, from one split of a trials dataset's images."""

  def __init__(self, path: str, split: str):
    stim = image_records.open_stimulus(os.path.join(path, trial_records.IMAGES_DIR))
    self.images = stim.split(split)
    self.position = {int(i): p for p, i in enumerate(stim.image_ids(split).tolist())}
    self.where = f"{path} [{split}]"

  def __call__(self, image_id: int) -> np.ndarray:
    pos = self.position.get(int(image_id))
    if pos is None:
      raise ValueError(f"{self.where}: trial image {image_id} is not among the split's images")
    return self.images[pos]["image"]


class TrialSource:
  """Single trials of a split: fmri, image (float, [-1, 1]), image_id, valid."""

  def __init__(self, path: str, split: str):
    self.trials = trial_records.open_trials(path).split(split)
    self.lookup = _ImageLookup(path, split)

  def __len__(self) -> int:
    return len(self.trials)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self.trials[index]
    return {
      "fmri": ex["betas"],
      "image": to_float_image(self.lookup(ex["image_id"])),
      "image_id": np.int64(ex["image_id"]),
      "valid": np.bool_(True),
    }


class ImageAverageSource:
  """One row per image of a split (order of first showing): its betas averaged over its
  repeats (float32 mean of the stored values)."""

  def __init__(self, path: str, split: str):
    ds = trial_records.open_trials(path)
    self.trials = ds.split(split)
    self.lookup = _ImageLookup(path, split)
    ids = ds.index(split)["image_id"]
    self.image_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    self.image_ids = self.image_ids[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    groups = rank[inverse.ravel()]
    sort = np.argsort(groups, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(groups, minlength=len(order)))]
    self.records = [sort[bounds[i] : bounds[i + 1]] for i in range(len(order))]

  def __len__(self) -> int:
    return len(self.image_ids)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rows = [self.trials[int(r)]["betas"] for r in self.records[index]]
    image_id = int(self.image_ids[index])
    return {
      "fmri": np.mean(np.stack(rows), axis=0, dtype=np.float32),
      "image": to_float_image(self.lookup(image_id)),
      "image_id": np.int64(image_id),
      "valid": np.bool_(True),
    }


def _pad(num_voxels: int, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
  return {
    "fmri": np.zeros((num_voxels,), np.float32),
    "image": np.zeros((*image_size, 3), np.float32),
    "image_id": np.int64(-1),
  }


def make_dataset(
  data_cfg: Any,
  info: Fmri2ImgInfo,
  *,
  split: str,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Host-local batches (module docstring); train: single trials, shuffled, repeated,
  sliced per process, drop_remainder; eval: one padded pass, one row per image."""
  source = TrialSource(info.path, split) if train else ImageAverageSource(info.path, split)
  if len(source) == 0:
    raise ValueError(f"{info.path}: split {split!r} is empty")
  size = (info.image_size, info.image_size)
  return keyed_batches(
    source, _pad(info.num_voxels, size), KEYS, data_cfg, train=train, seed=seed,
    batch_size=batch_size, shard_index=shard_index, shard_count=shard_count,
  )  # fmt: skip


@registry.register("pipeline", "synthetic_fmri2img")
@registry.register("pipeline", "trials")
class Fmri2ImgPipeline:
  """Trials datasets (the synthetic default or a prepared folder) for the fmri2img task."""

  kind = "trials"

  prepare = staticmethod(prepare)
  make_dataset = staticmethod(make_dataset)


# ------------------------------------------------------------------------------------------
# Images alone (the VAE task).
# ------------------------------------------------------------------------------------------
class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of 'image' with probability 1/2 (grain's per-element rng)."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
    return element


class ImageSource:
  """A stimulus split as image (float, [-1, 1]), image_id, valid."""

  def __init__(self, path: str, split: str):
    self.images = image_records.open_stimulus(path).split(split)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self.images[index]
    return {
      "image": to_float_image(ex["image"]),
      "image_id": np.int64(ex["image_id"]),
      "valid": np.bool_(True),
    }


def _kind_of(path: str) -> str:
  meta_path = os.path.join(path, "meta.json")
  if not os.path.exists(meta_path):
    raise InputError(
      f"{meta_path}: config.data.path expected a stimulus or trials dataset, found no meta.json"
    )
  with open(meta_path) as f:
    return str(json.load(f).get("kind"))


def prepare_images(data_cfg: Any) -> ImagesInfo:
  """Open the images: data.path (a stimulus or trials dataset) or the synthetic default's."""
  _check_augment(data_cfg, AUGMENTS)
  path = setting(data_cfg, "path")
  if path:
    path = readable_dataset(str(path), cache_dir(data_cfg))
    kind = _kind_of(path)
    if kind == trial_records.KIND:
      path = trial_records.open_trials(path).images.path
    elif kind != image_records.KIND:
      raise InputError(
        f"{path}/meta.json: field 'kind' expected {image_records.KIND!r} or "
        f"{trial_records.KIND!r}, found {kind!r}"
      )
  else:
    kind = "synthetic_fmri2img"
    path = trial_records.open_trials(synthetic_path(data_cfg)).images.path
  stim = image_records.open_stimulus(path)
  h, w = stim.image_size
  if h != w:
    raise InputError(f"{path}/meta.json: field 'image_size' expected square, found {[h, w]}")
  return ImagesInfo(
    path=stim.path, image_size=h, split_sizes=stim.splits, kind=kind, meta=dict(stim.meta)
  )


def make_image_dataset(
  data_cfg: Any,
  info: ImagesInfo,
  *,
  split: str,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Batches {image, image_id, valid}; train shuffled and repeated (flips if data.augment
  says so), eval one padded pass in record order."""
  source = ImageSource(info.path, split)
  if len(source) == 0:
    raise ValueError(f"{info.path}: split {split!r} is empty")
  size = (info.image_size, info.image_size)
  pad = {"image": np.zeros((*size, 3), np.float32), "image_id": np.int64(-1)}
  flip = train and str(setting(data_cfg, "augment", "none")) == "flip"
  return keyed_batches(
    source, pad, IMAGE_KEYS, data_cfg, train=train, seed=seed, batch_size=batch_size,
    shard_index=shard_index, shard_count=shard_count, train_map=RandomFlip() if flip else None,
  )  # fmt: skip


@registry.register("pipeline", "stimulus_images")
class StimulusImagesPipeline:
  """Images only (stimulus or trials datasets, or the synthetic default's) for the VAE."""

  kind = "images"

  prepare = staticmethod(prepare_images)
  make_dataset = staticmethod(make_image_dataset)
