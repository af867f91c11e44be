"""The embedded default of the fMRI-to-image family: trials whose forward model is known.

Images come from synthetic_images (the shared stimulus source). "Voxels" model early visual
cortex, fixed here before any decoder is trained on them:
  receptive field: a centre at eccentricity e (dense near the fovea, like cortical
      magnification: e = a((1 + 1/a)^u - 1), u uniform) and a polar angle, in image
      coordinates x (width axis) and y (down) in [-1, 1]; a Gaussian of size
      sigma = 0.03 + 0.1 e (half-widths) that grows with eccentricity;
  feature: one of luminance, four rectified colour-opponent channels (R-G, G-R, B-Y,
      Y-B), or quadrature Gabor energy at 3 spatial frequencies x 4 orientations (fine
      frequencies favoured near the fovea), computed on the whole image;
  response: the RF-weighted sum of that feature map, compressed (power `exponent`),
      standardised over images.
Each image is shown `repeats` times; a trial's beta is signal + Gaussian noise with
var(signal) / var(beta) = noise_ceiling for every voxel, so two repeats of a voxel
correlate at noise_ceiling across images and averaging r repeats leaves noise variance
(1 - nc) / (nc r). Voxels sit in a small volume laid out retinotopically (two hemispheres,
log-eccentricity x polar angle, collisions stacked in depth), as in a flattened V1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from boldjax.data import paths

FORMAT = 1
COLOUR = ("R-G", "G-R", "B-Y", "Y-B")
SPATIAL_FREQS = (0.05, 0.1, 0.2)  # cycles per pixel at 64 px; scaled with image size
ORIENTATIONS = 4
FEATURES = (
  "luminance",
  *COLOUR,
  *(f"gabor_sf{s}_o{o}" for s in range(len(SPATIAL_FREQS)) for o in range(ORIENTATIONS)),
)
_FEATURE_P = (0.15, 0.25, 0.6)  # luminance, colour, Gabor energy
_FOVEA = 0.15  # cortical-magnification constant a (half-widths)
_VOXEL_MM = 1.8


@dataclasses.dataclass(frozen=True)
class SyntheticFmri2ImgSpec:
  num_images: int = 2400
  image_size: int = 64
  num_voxels: int = 1500
  noise_ceiling: float = 0.6  # var(signal) / var(single-trial beta), every voxel
  repeats: int = 3
  val_images: int = 100
  test_images: int = 150
  exponent: float = 0.5  # compressive nonlinearity
  seed: int = 0

  def key(self) -> str:
    blob = json.dumps({**dataclasses.asdict(self), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_spec(spec: SyntheticFmri2ImgSpec) -> None:
  from boldjax.cli import InputError

  where = "config.data.synthetic"
  if not 0 < spec.noise_ceiling <= 1:
    raise InputError(
      f"{where}: field 'noise_ceiling' expected in (0, 1], found {spec.noise_ceiling}"
    )
  if spec.repeats < 1 or spec.num_voxels < 1 or spec.image_size < 16:
    raise InputError(
      f"{where}: fields 'repeats', 'num_voxels', 'image_size' expected >= 1, 1, 16, found "
      f"{spec.repeats}, {spec.num_voxels}, {spec.image_size}"
    )
  if (
    spec.val_images < 0
    or spec.test_images < 1
    or spec.num_images - spec.val_images - spec.test_images < 2
  ):
    raise InputError(
      f"{where}: fields 'num_images', 'val_images', 'test_images' expected test >= 1 and at "
      f"least 2 train images, found {spec.num_images}, {spec.val_images}, {spec.test_images}"
    )


def planted_voxels(spec: SyntheticFmri2ImgSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Per voxel: x, y (RF centre), size (sigma, half-widths), eccentricity, angle, feature."""
  v = spec.num_voxels
  u = rng.uniform(0, 1, v)
  ecc = _FOVEA * ((1 + 1 / _FOVEA) ** u - 1)  # in [0, 1]: denser near the fovea
  angle = rng.uniform(-np.pi, np.pi, v)
  x = np.clip(ecc * np.cos(angle), -0.95, 0.95)
  y = np.clip(ecc * np.sin(angle), -0.95, 0.95)
  size = 0.03 + 0.1 * ecc
  family = rng.choice(3, size=v, p=_FEATURE_P)
  feature = np.zeros(v, np.int64)
  colour = family == 1
  feature[colour] = 1 + rng.integers(0, len(COLOUR), int(colour.sum()))
  gabor = np.flatnonzero(family == 2)
  # preferred frequency falls with eccentricity: sf index 2 at the fovea, 0 at the rim
  pref = 2 - 2 * ecc[gabor]
  logits = -((np.arange(len(SPATIAL_FREQS))[None] - pref[:, None]) ** 2) / (2 * 0.6**2)
  p = np.exp(logits)
  p /= p.sum(1, keepdims=True)
  sf = (rng.uniform(size=(len(gabor), 1)) > np.cumsum(p, 1)).sum(1)
  ori = rng.integers(0, ORIENTATIONS, len(gabor))
  feature[gabor] = 1 + len(COLOUR) + sf * ORIENTATIONS + ori
  return {
    "x": x.astype(np.float32),
    "y": y.astype(np.float32),
    "size": size.astype(np.float32),
    "eccentricity": ecc.astype(np.float32),
    "angle": angle.astype(np.float32),
    "feature": feature,
  }


def rf_weights(planted: dict[str, np.ndarray], size: int) -> np.ndarray:
  """(size * size, V) float32 Gaussian RF weights (each column sums to 1) on pixel centres."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  xx, yy = np.meshgrid(c, c, indexing="xy")
  d2 = (xx.reshape(-1, 1) - planted["x"][None]) ** 2 + (yy.reshape(-1, 1) - planted["y"][None]) ** 2
  w = np.exp(-d2 / (2 * planted["size"][None] ** 2))
  return (w / w.sum(0, keepdims=True)).astype(np.float32)


def _gabor_spectra(size: int) -> np.ndarray:
  """(F, 2size, 2size) one-sided (analytic) Gabor spectra on the padded grid: the filtered
  image's modulus is the quadrature-pair energy."""
  n = 2 * size
  f = np.fft.fftfreq(n)
  fy, fx = np.meshgrid(f, f, indexing="ij")
  out = []
  for sf in SPATIAL_FREQS:
    sf = sf * 64 / size  # the same cycles per image at any size
    bw = sf / 2.5  # frequency-domain sigma: about one octave bandwidth
    for o in range(ORIENTATIONS):
      theta = np.pi * o / ORIENTATIONS
      cx, cy = sf * np.cos(theta), sf * np.sin(theta)
      out.append(np.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * bw**2)))
  return np.stack(out).astype(np.complex64)


def feature_maps(images: np.ndarray, spectra: np.ndarray) -> np.ndarray:
  """(n, F, H*W) float32 non-negative feature maps of uint8 images (see FEATURES)."""
  x = images.astype(np.float32) / 255
  n, h, w, _ = x.shape
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  lum = (r + g + b) / 3
  rg, by = r - g, b - (r + g) / 2
  maps = [lum, np.maximum(rg, 0), np.maximum(-rg, 0), np.maximum(by, 0), np.maximum(-by, 0)]
  centred = lum - lum.mean(axis=(1, 2), keepdims=True)
  padded = np.zeros((n, 2 * h, 2 * w), np.float32)
  padded[:, h // 2 : h // 2 + h, w // 2 : w // 2 + w] = centred
  spec = np.fft.fft2(padded).astype(np.complex64)
  for k in range(len(spectra)):
    resp = np.fft.ifft2(spec * spectra[k][None])[:, h // 2 : h // 2 + h, w // 2 : w // 2 + w]
    maps.append((resp.real**2 + resp.imag**2).astype(np.float32) * 100)
  return np.stack(maps, 1).reshape(n, len(maps), h * w)


def planted_signal(
  images: np.ndarray, planted: dict[str, np.ndarray], exponent: float, chunk: int = 200
) -> np.ndarray:
  """(n, V) float32 noiseless responses, standardised per voxel over the images."""
  size = images.shape[1]
  weights = rf_weights(planted, size)
  spectra = _gabor_spectra(size)
  feature = planted["feature"]
  groups = [(f, np.flatnonzero(feature == f)) for f in range(len(FEATURES))]
  out = np.zeros((len(images), len(feature)), np.float32)
  for lo in range(0, len(images), chunk):
    maps = feature_maps(images[lo : lo + chunk], spectra)
    for f, cols in groups:
      if len(cols):
        out[lo : lo + chunk, cols] = maps[:, f] @ weights[:, cols]
  out = np.maximum(out, 0) ** exponent
  std = out.std(0)
  return ((out - out.mean(0)) / np.where(std > 0, std, 1)).astype(np.float32)


def voxel_grid(planted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ijk on a small volume laid out like flattened V1: hemisphere (left visual field on the
  right one) x log-eccentricity x polar angle, voxels sharing a cell stacked in depth."""
  bins = 32
  ecc, angle = planted["eccentricity"], planted["angle"]
  right_hemi = np.cos(angle) < 0  # left visual field
  logecc = np.log(ecc + _FOVEA) - np.log(_FOVEA)
  i = np.minimum((logecc / (np.log(1 + _FOVEA) - np.log(_FOVEA)) * bins).astype(np.int64), bins - 1)
  i = i + bins * right_hemi
  upper = np.arcsin(np.clip(np.sin(angle), -1, 1))  # -pi/2 (up) .. pi/2 (down) in each hemifield
  j = np.minimum(((upper / np.pi + 0.5) * bins).astype(np.int64), bins - 1)
  cell = i * bins + j
  k = np.zeros(len(cell), np.int64)
  order = np.argsort(cell, kind="stable")
  sorted_cell = cell[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_cell)) + 1]
  k[order] = np.arange(len(cell)) - np.repeat(starts, np.diff(np.r_[starts, len(cell)]))
  ijk = np.stack([i, j, k], 1)
  affine = np.diag([_VOXEL_MM, _VOXEL_MM, _VOXEL_MM, 1.0])
  return {
    "ijk": ijk.astype(np.int32),
    "affine": affine,
    "volume_shape": np.array([2 * bins, bins, int(k.max()) + 1], np.int64),
  }


def image_splits(spec: SyntheticFmri2ImgSpec) -> np.ndarray:
  """(n,) 0/1/2 per image: a seeded permutation; test_images and val_images exactly."""
  rank = np.random.default_rng([spec.seed, 0x5B17]).permutation(spec.num_images)
  out = np.zeros(spec.num_images, np.int8)
  out[rank < spec.test_images] = 2
  out[(rank >= spec.test_images) & (rank < spec.test_images + spec.val_images)] = 1
  return out


def generate(spec: SyntheticFmri2ImgSpec) -> dict[str, Any]:
  """Everything the dataset holds, in memory: images, planted, signal, trials, betas."""
  from boldjax.data.synthetic_images import synthetic_images

  check_spec(spec)
  rng = np.random.default_rng([spec.seed, 0xF2])
  images = synthetic_images(spec.num_images, spec.image_size, spec.seed)
  planted = planted_voxels(spec, rng)
  signal = planted_signal(images, planted, spec.exponent)
  # trials: every image `repeats` times, in a random (session-like) order
  trial_image = rng.permutation(np.repeat(np.arange(spec.num_images), spec.repeats))
  sigma = np.sqrt((1 - spec.noise_ceiling) / spec.noise_ceiling)
  betas = signal[trial_image] + sigma * rng.standard_normal(
    (len(trial_image), spec.num_voxels), dtype=np.float32
  )
  return {
    "images": images,
    "planted": planted,
    "signal": signal,
    "trial_image_ids": trial_image.astype(np.int64),
    "betas": betas.astype(np.float32),
    "image_split": image_splits(spec),
    "voxels": voxel_grid(planted),
  }


def build(spec: SyntheticFmri2ImgSpec, out_dir: str) -> str:
  """Write the synthetic trials dataset (trial_records layout + planted.npz)."""
  from boldjax.data import trial_records

  data = generate(spec)
  v = spec.num_voxels

  def save_planted(path: str) -> None:
    np.savez(
      path,
      **data["planted"],
      feature_names=np.array(FEATURES),
      noise_ceiling=np.full(v, spec.noise_ceiling, np.float32),
      signal=data["signal"].astype(np.float16),  # (images, V), row = image_id
    )

  return trial_records.write_trial_dataset(
    out_dir,
    data["images"],
    np.arange(spec.num_images, dtype=np.int64),
    data["betas"],
    data["trial_image_ids"],
    image_split=data["image_split"],
    voxels=data["voxels"],
    extra_files={"planted.npz": save_planted},
    meta={
      "name": "synthetic_fmri2img",
      "source": "synthetic",
      "synthetic": dataclasses.asdict(spec),
      "noise_ceiling": spec.noise_ceiling,
      "forward_model": "retinotopic Gaussian RF x (luminance | colour opponent | Gabor "
      f"energy), power {spec.exponent}, z-scored, + noise at the ceiling",
    },
  )


def dataset_path(data_cfg: Any, spec: SyntheticFmri2ImgSpec) -> str:
  """Cache folder of the spec's dataset."""
  return os.path.join(paths.cache_dir(data_cfg), "synthetic_fmri2img", spec.key())
