"""The embedded default of the encoding family: images with fMRI responses whose answer is known.

Vertices are the occipital cortex of the real fsaverage5 surface (the cortex vertices
nearest each hemisphere's occipital pole on the registration sphere). Each vertex gets a
planted answer that varies smoothly over cortex, as in the visual system:
  layer:    a posterior-to-anterior gradient (distance from the pole, L bands of equal size);
  position: a retinotopic map: the vertex's place around the pole, scaled into (-0.75, 0.75)
            of the image (x the width axis, as grid_sample), mirrored between hemispheres;
  scale:    the global-token mix, 0.1 at the pole rising to 0.6 at the rim.
Its response to an image is a fixed random readout of that layer's bottlenecked tokens of a
fixed backbone, sampled at that position: the FactorTopy forward model with the planted
selections, computed here independently in numpy. Signals are z-scored per vertex over the
images and Gaussian noise is added so that var(signal) / var(response) is the stated noise
ceiling: a perfect model reaches R^2 = noise_ceiling on held-out images.
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


@dataclasses.dataclass(frozen=True)
class SyntheticEncodingSpec:
  num_images: int = 3000
  image_size: int = 64
  visual_fraction: float = 0.15  # of each hemisphere's cortex vertices, nearest the pole
  backbone: str = "tiny"  # the preset whose tokens make the responses
  backbone_seed: int = 0  # its random weights (when no weights file is given)
  bottleneck: int = 128  # = the model's: it cannot hold every layer's planted readout at once
  noise_ceiling: float = 0.5
  grid: tuple[int, int] = (8, 8)
  seed: int = 0

  def key(self) -> str:
    blob = json.dumps({**dataclasses.asdict(self), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def occipital_vertices(visual_fraction: float) -> dict[str, np.ndarray]:
  """The occipital cortex of fsaverage5: per vertex its fsaverage index, hemisphere,
  sphere coordinates (right hemisphere shifted +x as the seed does), distance from the
  pole (0..1 within the hemisphere) and tangent-plane coordinates (u lateral, v dorsal)."""
  from nilearn import datasets

  fs = datasets.load_fsaverage("fsaverage5")
  out: dict[str, list] = {k: [] for k in ("index", "hemisphere", "coords", "r", "u", "v")}
  for h, side in enumerate(("left", "right")):
    pial = np.asarray(fs["pial"].parts[side].coordinates, np.float64)
    sphere = np.asarray(fs["sphere"].parts[side].coordinates, np.float64)
    cortex = np.zeros(len(pial), bool)
    cortex[np.asarray(fs["flat"].parts[side].faces).ravel()] = True
    unit = sphere / np.linalg.norm(sphere, axis=1, keepdims=True)
    pole = unit[np.flatnonzero(cortex)[np.argmin(pial[cortex, 1])]]  # most posterior cortex
    dist = np.linalg.norm(unit - pole, axis=1)
    candidates = np.flatnonzero(cortex)
    count = max(8, int(round(visual_fraction * len(candidates))))
    chosen = np.sort(candidates[np.argsort(dist[candidates], kind="stable")[:count]])
    up = np.array([0.0, 0.0, 1.0]) - pole[2] * pole  # dorsal direction in the tangent plane
    up /= np.linalg.norm(up)
    lateral = np.cross(pole, up)
    sign = 1.0 if h == 0 else -1.0  # mirror: both hemispheres' maps have the same layout
    xyz = sphere[chosen] + (np.array([200.0, 0.0, 0.0]) if h == 1 else 0.0)
    out["index"].append(chosen)
    out["hemisphere"].append(np.full(len(chosen), h, np.int8))
    out["coords"].append(xyz.astype(np.float32))
    out["r"].append(dist[chosen] / dist[chosen].max())
    out["u"].append(sign * unit[chosen] @ lateral)
    out["v"].append(unit[chosen] @ up)
  return {k: np.concatenate(v) for k, v in out.items()}


def planted_answer(vertices: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """layer (N,) int, x, y in (-0.75, 0.75), scale (N,) in [0.1, 0.6]."""
  r = vertices["r"]
  rank = np.argsort(np.argsort(r, kind="stable"), kind="stable") / len(r)  # equal-size bands
  layer = np.minimum((rank * num_layers).astype(np.int64), num_layers - 1)

  def spread(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, 1), np.percentile(a, 99)
    return np.clip(0.75 * (2 * (a - lo) / (hi - lo) - 1), -0.75, 0.75)

  return {
    "layer": layer,
    "x": spread(vertices["u"]).astype(np.float32),
    "y": spread(-vertices["v"]).astype(np.float32),  # dorsal cortex: lower field (y down)
    "scale": (0.1 + 0.5 * r).astype(np.float32),
  }


def bilinear_weights(x: np.ndarray, y: np.ndarray, h: int, w: int):
  """grid_sample(bilinear, zeros, align_corners=False) as 4 (row, col, weight) per point;
  out-of-grid corners get weight 0 (and a clamped index)."""
  px = (x + 1) * w / 2 - 0.5
  py = (y + 1) * h / 2 - 0.5
  x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
  fx, fy = px - x0, py - y0
  corners = []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      rows, cols = y0 + dy, x0 + dx
      inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
      corners.append((np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), wy * wx * inside))
  return corners


def planted_signal(
  local: np.ndarray, global_: np.ndarray, planted: dict[str, np.ndarray], rng: np.random.Generator,
  bottleneck: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
  """(images, N) noiseless responses of the planted FactorTopy, and its random weights.

  local (n, L, h, w, C), global_ (n, L, C) float32 tokens of every image.
  """
  n, num_layers, h, w, c = local.shape
  proj = rng.normal(0, 1 / np.sqrt(c), (num_layers, c, bottleneck)).astype(np.float32)
  readout = rng.normal(0, 1, (len(planted["layer"]), bottleneck)).astype(np.float32)
  corners = bilinear_weights(planted["x"], planted["y"], h, w)
  layer, s = planted["layer"], planted["scale"][None, :, None]
  out = np.zeros((n, len(layer)), np.float32)
  chunk = max(1, 2**27 // (len(layer) * bottleneck * 4))  # ~0.5 GB per temporary
  for lo in range(0, n, chunk):
    local_b = np.einsum("nlhwc,lcd->nlhwd", local[lo : lo + chunk], proj)  # (n, L, h, w, bd)
    global_b = np.einsum("nlc,lcd->nld", global_[lo : lo + chunk], proj)
    v = s * global_b[:, layer]
    for rows, cols, wt in corners:
      v += (1 - s) * wt[None, :, None] * local_b[:, layer, rows, cols]
    out[lo : lo + chunk] = np.mean(v * readout[None], axis=-1)
  return out, {"proj": proj, "readout": readout}


def with_noise(signal: np.ndarray, noise_ceiling: float, rng: np.random.Generator) -> np.ndarray:
  """z-score each vertex's signal, add noise so var(signal)/var(total) = noise_ceiling."""
  if not 0 < noise_ceiling <= 1:
    raise ValueError(f"synthetic encoding: noise_ceiling expected in (0, 1], found {noise_ceiling}")
  z = (signal - signal.mean(0)) / (signal.std(0) + 1e-12)
  sigma = np.sqrt((1 - noise_ceiling) / noise_ceiling)
  return (z + sigma * rng.standard_normal(z.shape)).astype(np.float32)


def build(spec: SyntheticEncodingSpec, tokens_of: Any, out_dir: str) -> str:
  """Write the synthetic stimulus dataset. tokens_of(uint8 images) -> (local, global) f32
  numpy of the planted backbone at spec.grid (batched inside)."""
  from boldjax.data import image_records
  from boldjax.data.synthetic_images import synthetic_images

  rng = np.random.default_rng(spec.seed)
  images = synthetic_images(spec.num_images, spec.image_size, spec.seed)
  vertices = occipital_vertices(spec.visual_fraction)
  local, global_ = tokens_of(images)
  planted = planted_answer(vertices, local.shape[1])
  signal, weights = planted_signal(local, global_, planted, rng, spec.bottleneck)
  responses = with_noise(signal, spec.noise_ceiling, rng)
  n = len(vertices["index"])

  def save_planted(path: str) -> None:
    np.savez(
      path,
      **planted,
      **weights,
      noise_ceiling=np.full(n, spec.noise_ceiling, np.float32),
    )

  return image_records.write_stimulus_dataset(
    out_dir,
    images,
    np.arange(spec.num_images, dtype=np.int64),
    responses=responses,
    vertices={
      "coords": vertices["coords"],
      "fsaverage_index": vertices["index"].astype(np.int64),
      "hemisphere": vertices["hemisphere"],
    },
    split_seed=spec.seed,
    extra_files={"planted.npz": save_planted},
    meta={
      "name": "synthetic_encoding",
      "source": "synthetic",
      "space": "fsaverage5",
      "synthetic": dataclasses.asdict(spec),
      "noise_ceiling": spec.noise_ceiling,
    },
  )


def dataset_path(data_cfg: Any, spec: SyntheticEncodingSpec, backbone_identity: Any) -> str:
  """Cache folder of the spec's dataset made with this backbone (its weights and inputs)."""
  blob = json.dumps([spec.key(), backbone_identity], sort_keys=True, default=str)
  key = hashlib.sha256(blob.encode()).hexdigest()[:12]
  return os.path.join(paths.cache_dir(data_cfg), "synthetic_encoding", key)
