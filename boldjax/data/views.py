"""Two-view crops, augmentations and token masks for network-token DINO (Brain-Semantoks).

Follows Brain-Semantoks' data/dataset.py (FMRIDataset.__getitem__, .augment,
._get_crop_start_indices, slice_masker) at 5208f40, re-written for numpy Generators:

  run (T, R), z-scored per ROI over the whole run   (done by the pipeline, before cropping)
  -> optional resampling onto a TR grid             (resample_run)
  -> 2 crops of crop_length frames, starts ~ U{0..T-crop_length}, each independently
  -> per crop, in the original's order: ROI dropout, time-block zeroing, scaling, noise
  -> per crop a (networks x patches) token mask     (slice_masker)

The crop layout is ROI-major (R, crop_length), the layout the Semantoks encoder takes.
Every random draw comes from the Generator passed in (grain's per-element rng in
training), never a global RNG, so iterator checkpoints stay exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

# Order of the `augment` switches: the original's augment_level order
# [spatial, temporal, noise, scale]. They are APPLIED in the original's order
# roi_dropout, time_block, scale, noise (FMRIDataset.augment).
AUGMENT_NAMES = ("roi_dropout", "time_block", "noise", "scale")
_EVAL_TAG = 0x5E3A  # mixes into eval rngs so they differ from other seeded streams
_PAD_ROW = 2**62  # rng stream of eval padding rows (never a real plan row)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Which augmentations run and their ranges (defaults: the original's augment_level 1)."""

  roi_dropout: bool = True
  time_block: bool = True
  noise: bool = True
  scale: bool = True
  roi_drop_range: tuple[float, float] = (0.0, 0.1)  # fraction of ROIs zeroed ~ U(lo, hi)
  time_drop_range: tuple[float, float] = (0.0, 0.3)  # fraction of frames zeroed ~ U(lo, hi)
  scale_range: tuple[float, float] = (0.8, 1.2)  # amplitude factor ~ U(lo, hi)
  noise_std: float = 0.1  # additive N(0, noise_std^2)

  @property
  def any(self) -> bool:
    return self.roi_dropout or self.time_block or self.noise or self.scale


def _range(cfg: Any, key: str, default: tuple[float, float], lo: float, hi: float):
  value = _get(cfg, key, default)
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
      f"data config: field {key!r} expected a pair (lo, hi), found {value!r}"
    ) from None
  if not lo <= a <= b <= hi:
    raise ValueError(f"data config: field {key!r} expected {lo} <= lo <= hi <= {hi}, found {value}")
  return a, b


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def augment_spec(data_cfg: Any) -> AugmentSpec:
  """The AugmentSpec of a data config (fields augment, roi_drop_range, ...); validated."""
  flags = tuple(_get(data_cfg, "augment", (1, 1, 1, 1)))
  if len(flags) != 4 or any(int(f) not in (0, 1) or float(f) != int(f) for f in flags):
    raise ValueError(
      f"data config: field 'augment' expected 4 switches in {{0, 1}} ordered {AUGMENT_NAMES}, "
      f"found {flags!r}"
    )
  noise_std = float(_get(data_cfg, "noise_std", 0.1))
  if noise_std < 0:
    raise ValueError(f"data config: field 'noise_std' expected >= 0, found {noise_std}")
  return AugmentSpec(
    **{name: bool(int(f)) for name, f in zip(AUGMENT_NAMES, flags, strict=True)},
    roi_drop_range=_range(data_cfg, "roi_drop_range", (0.0, 0.1), 0.0, 1.0),
    time_drop_range=_range(data_cfg, "time_drop_range", (0.0, 0.3), 0.0, 1.0),
    scale_range=_range(data_cfg, "scale_range", (0.8, 1.2), 0.0, math.inf),
    noise_std=noise_std,
  )


def mask_ratio(data_cfg: Any) -> tuple[float, float]:
  """data_cfg.mask_ratio (the original's masking_ratio), validated."""
  return _range(data_cfg, "mask_ratio", (0.65, 0.85), 0.0, 1.0)


def augment_crop(x: np.ndarray, rng: np.random.Generator, spec: AugmentSpec) -> np.ndarray:
  """One crop (R, L) -> augmented float32 copy, as FMRIDataset.augment.

  The factors are drawn first (ROI fraction, frame fraction, scale), then applied in the
  original's order: zero max(1, int(R * f_roi)) distinct ROIs; zero one contiguous block
  of max(1, int(L * f_time)) frames (all frames when that is >= L); multiply by the scale;
  add N(0, noise_std^2). A fraction drawn as exactly 0 skips its step (as the original).
  """
  out = np.array(x, np.float32, copy=True)
  r, n = out.shape
  roi_f = rng.uniform(*spec.roi_drop_range) if spec.roi_dropout else 0.0
  time_f = rng.uniform(*spec.time_drop_range) if spec.time_block else 0.0
  factor = rng.uniform(*spec.scale_range) if spec.scale else 1.0
  if roi_f > 0:
    out[rng.choice(r, size=max(1, int(r * roi_f)), replace=False)] = 0.0
  if time_f > 0:
    k = max(1, int(n * time_f))
    if n - k > 0:
      start = int(rng.integers(0, n - k + 1))
      out[:, start : start + k] = 0.0
    else:
      out[:] = 0.0
  if factor != 1.0:
    out *= np.float32(factor)
  if spec.noise and spec.noise_std > 0:
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(spec.noise_std)
  return out


def network_mask(
  rng: np.random.Generator, num_networks: int, num_patches: int, ratio: Sequence[float]
) -> np.ndarray:
  """Whole networks masked (the original's network_masker): k ~ U{lo_n .. hi_n - 1} networks
  with lo_n = max(1, int(N * lo)), hi_n = min(N, int(N * hi)). Where the original's
  torch.randint(lo_n, hi_n) would fail (hi_n <= lo_n, e.g. N=7 gives 4..5 -> only 4 is
  possible, N=1 gives 1..0) k = lo_n."""
  n = int(num_networks)
  lo_n, hi_n = max(1, int(n * ratio[0])), min(n, int(n * ratio[1]))
  k = int(rng.integers(lo_n, hi_n)) if hi_n > lo_n else lo_n
  mask = np.zeros((n, int(num_patches)), bool)
  mask[rng.permutation(n)[:k]] = True
  return mask


def temporal_mask(
  rng: np.random.Generator, num_networks: int, num_patches: int, ratio: Sequence[float]
) -> np.ndarray:
  """Contiguous patches masked across all networks (the original's temporal_masker):
  length = min(max(1, ceil(U(lo, hi) * P)), P) - 1, start ~ U{0 .. P - length}.
  (The original's "- 1" keeps one patch visible; for P=5 and (0.65, 0.85): 3 or 4.)"""
  p = int(num_patches)
  f = rng.uniform(float(ratio[0]), float(ratio[1]))
  length = min(max(1, math.ceil(f * p)), p) - 1
  start = int(rng.integers(0, max(0, p - length) + 1))
  mask = np.zeros((int(num_networks), p), bool)
  mask[:, start : start + length] = True
  return mask


def slice_masker(
  rng: np.random.Generator, num_networks: int, num_patches: int, ratio: Sequence[float]
) -> np.ndarray:
  """(N, P) bool token mask, True = masked: with probability 1/2 a temporal_mask, else a
  network_mask (the original's slice_masker). The masked FRACTION is k/N or length/P,
  not a draw from `ratio` itself (N=9, P=5: 5/9 or 6/9 of networks, 3/5 or 4/5 of time)."""
  if rng.random() < 0.5:
    return temporal_mask(rng, num_networks, num_patches, ratio)
  return network_mask(rng, num_networks, num_patches, ratio)


def resampled_length(length: int, tr: float, target_tr: float | None) -> int:
  """Frames of a run of `length` frames at `tr` after resample_run onto `target_tr`."""
  if target_tr is None or float(tr) == float(target_tr):
    return int(length)
  return int(int(length) * (float(tr) / float(target_tr)))


def resample_run(bold: np.ndarray, tr: float, target_tr: float | None) -> np.ndarray:
  """(T, R) at `tr` -> (T', R) float32 on the grid k * target_tr, k < int(T * tr / target_tr),
  by linear interpolation (float64 arithmetic), linearly extrapolating the last interval
  where the grid passes (T - 1) * tr (as the original's interp1d(fill_value='extrapolate')).

  The original resamples every run of a dataset from ONE fixed source TR
  (FMRIDataset.temporal_resampling_tr / source_tr, after z-scoring, as here). Resampling
  each run from its own TR, so runs at TR 0.72..2 s give crops of equal duration, is a
  boldjax addition. target_tr None (or equal to tr) returns the run unchanged.
  """
  bold = np.asarray(bold, np.float32)
  if target_tr is None or float(tr) == float(target_tr):
    return bold
  t = len(bold)
  if t < 2:
    raise ValueError(f"resample_run: need a run of >= 2 frames to interpolate, found {t}")
  factor = float(tr) / float(target_tr)
  pos = np.arange(resampled_length(t, tr, target_tr)) / factor  # in source frames
  i0 = np.clip(np.floor(pos).astype(np.int64), 0, t - 2)
  w = (pos - i0)[:, None]
  x = bold.astype(np.float64)
  return (x[i0] + w * (x[i0 + 1] - x[i0])).astype(np.float32)


def crop_starts(rng: np.random.Generator, length: int, crop_length: int, num: int = 2):
  """num independent starts ~ U{0 .. length - crop_length} (the original's random crops)."""
  return rng.integers(0, int(length) - int(crop_length) + 1, size=int(num))


def probe_crops(
  bold_run: np.ndarray,
  crop_length: int,
  num_crops: int = 8,
  *,
  pad_short: bool = False,
  where: str = "probe_crops",
) -> np.ndarray:
  """(T, R) -> (num_crops, R, crop_length) float32: the linear probe's deterministic crops.

  Starts are np.linspace(0, T - crop_length, num_crops).astype(int) (truncation, as the
  original's 'regular' crop_starts). A run shorter than crop_length is an error; with
  pad_short=True it is zero-padded at the end and every crop starts at 0 (the original).
  """
  x = np.asarray(bold_run, np.float32)
  t, length = len(x), int(crop_length)
  if t < length:
    if not pad_short:
      raise ValueError(
        f"{where}: field 'crop_length' expected <= the run's {t} frames, found {length}"
      )
    x = np.concatenate([x, np.zeros((length - t, x.shape[1]), np.float32)])
    starts = np.zeros(int(num_crops), np.int64)
  else:
    starts = np.linspace(0, t - length, int(num_crops)).astype(int)
  return np.stack([x[s : s + length].T for s in starts])


class MakeViews(grain.transforms.RandomMap):
  """A planned, z-scored run -> views (2, R, L) f32, masks (2, N, P) bool, view_starts (2,)
  i32, subject_id, label (and valid when the element has it).

  train=True draws everything from grain's per-element rng. train=False ignores it and
  uses default_rng([eval_seed, plan row, tag]): an example's crops, augmentations and masks
  depend only on the seed and its row in the split's plan, not on sharding or batch size,
  so validation losses are reproducible. Padding rows (record -1) are zero views with a
  well-formed mask, subject 0, label -1.
  """

  def __init__(
    self,
    *,
    crop_length: int,
    patch_size: int,
    num_networks: int,
    spec: AugmentSpec,
    ratio: tuple[float, float],
    views_tr: float | None = None,
    train: bool = True,
    eval_seed: int = 0,
    where: str = "",
  ):
    self.crop_length, self.patch_size = int(crop_length), int(patch_size)
    self.num_patches = self.crop_length // self.patch_size
    self.num_networks = int(num_networks)
    self.spec, self.ratio = spec, (float(ratio[0]), float(ratio[1]))
    self.views_tr = None if views_tr is None else float(views_tr)
    self.train, self.eval_seed, self.where = bool(train), int(eval_seed), where

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    record = int(element["record"])
    if not self.train:
      row = int(element.get("row", record)) if record >= 0 else _PAD_ROW
      rng = np.random.default_rng([self.eval_seed % 2**63, row, _EVAL_TAG])
    n, p = self.num_networks, self.num_patches
    out = {
      "subject_id": np.int32(element["subject_id"]),
      "label": np.int32(element["label"]),
    }
    if record < 0:
      views = np.zeros((2, len(element["bold"][0]), self.crop_length), np.float32)
      starts = np.zeros(2, np.int32)
    else:
      bold = resample_run(element["bold"], float(element["tr"]), self.views_tr)
      if len(bold) < self.crop_length:
        raise ValueError(
          f"{self.where} record {record}: field 'crop_length' expected <= the run's "
          f"{len(bold)} frames{_resample_note(element, self.views_tr)}, found {self.crop_length}"
        )
      starts = crop_starts(rng, len(bold), self.crop_length).astype(np.int32)
      views = np.stack(
        [self._augment(bold[s : s + self.crop_length].T, rng) for s in starts.tolist()]
      )
    masks = np.stack([slice_masker(rng, n, p, self.ratio) for _ in range(2)])
    out.update(views=views, masks=masks, view_starts=starts)
    if "valid" in element:
      out["valid"] = np.bool_(element["valid"])
    return out

  def _augment(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.spec.any:
      return augment_crop(crop, rng, self.spec)
    return np.ascontiguousarray(crop, np.float32)


def _resample_note(element: dict[str, Any], views_tr: float | None) -> str:
  if views_tr is None:
    return ""
  return f" (T={len(element['bold'])} at TR {float(element['tr']):g} s resampled to {views_tr:g} s)"
