"""Synthetic stimulus images: a few thousand distinct, natural-ish pictures with no download.

Stimulus-driven models (encoding, fMRI-to-image) need images whose statistics look like
photographs, so that a vision backbone's layers respond differently to them. We build them
from the sample photographs that ship inside scikit-image and scikit-learn (random crops,
flips, colour and scale changes) and add procedural ones (oriented gratings and plaids,
shapes on backgrounds, 1/f noise textures), so that low-level and high-level features vary.

Image i depends only on (seed, i) and on images 0..i-1 (a repeat is redrawn), so the same
seed gives the same bytes and a shorter run is a prefix of a longer one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import numpy as np
from PIL import Image, ImageDraw

# Photographs bundled in scikit-image's and scikit-learn's wheels (no download); read with
# PIL from the installed files (importing skimage.io / sklearn.datasets costs seconds).
SKIMAGE_SOURCES = (
  "astronaut.png",
  "coffee.png",
  "chelsea.png",
  "rocket.jpg",
  "hubble_deep_field.jpg",
  "ihc.png",
  "retina.jpg",
  "motorcycle_left.png",
  "camera.png",
  "coins.png",
  "moon.png",
  "grass.png",
  "gravel.png",
  "brick.png",
  "clock_motion.png",
  "cell.png",
)
SKLEARN_SOURCES = ("china.jpg", "flower.jpg")
KINDS = ("photo", "grating", "shapes", "texture")
_KIND_P = np.array([0.55, 0.15, 0.15, 0.15])
_MAX_REDRAWS = 100


def _package_dir(package: str) -> str:
  spec = importlib.util.find_spec(package)  # locates without importing the package
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      f"synthetic_images: package {package!r} (its bundled sample images) is not installed"
    )
  return list(spec.submodule_search_locations)[0]


def source_files() -> list[str]:
  """Paths of the bundled photographs, in a fixed order."""
  skimage_dir = os.path.join(_package_dir("skimage"), "data")
  sklearn_dir = os.path.join(_package_dir("sklearn"), "datasets", "images")
  return [os.path.join(skimage_dir, f) for f in SKIMAGE_SOURCES] + [
    os.path.join(sklearn_dir, f) for f in SKLEARN_SOURCES
  ]


@functools.lru_cache(maxsize=1)
def source_images() -> tuple[tuple[str, Image.Image, bool], ...]:
  """(file name, RGB PIL image, was grey) of every bundled photograph."""
  out = []
  for path in source_files():
    with Image.open(path) as img:
      grey = img.mode in ("L", "LA", "1", "I", "I;16")
      out.append((os.path.basename(path), img.convert("RGB"), grey))
  return tuple(out)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  return np.meshgrid(c, c, indexing="xy")


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random crop of a bundled photograph, flipped, recoloured and rescaled."""
  sources = source_images()
  _, img, grey = sources[int(rng.integers(len(sources)))]
  w, h = img.size
  side = rng.uniform(0.15, 1.0) * min(w, h)
  aspect = np.exp(rng.uniform(-0.2, 0.2))
  cw, ch = min(w, side * aspect), min(h, side / aspect)
  x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
  crop = img.resize(
    (size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0
  )
  x = np.asarray(crop, np.float32) / 255
  if rng.random() < 0.5:
    x = x[:, ::-1]
  if rng.random() < 0.1:
    x = x[::-1]
  if grey or rng.random() < 0.2:  # tint: a grey source gets a colour
    x = x.mean(-1, keepdims=True) * rng.uniform(0.4, 1.0, 3).astype(np.float32)
    x = x / max(float(x.max()), 1e-3)
  elif rng.random() < 0.3:  # hue change by channel permutation
    x = x[..., rng.permutation(3)]
  grey_x = x.mean(-1, keepdims=True)
  x = grey_x + (x - grey_x) * rng.uniform(0.3, 1.5)  # saturation
  mean = float(x.mean())
  x = mean + (x - mean) * rng.uniform(0.6, 1.4)  # contrast
  x = x * rng.uniform(0.7, 1.3)  # brightness
  return x


def _grating(rng: np.random.Generator, size: int) -> np.ndarray:
  """Sine or square gratings (sometimes a plaid) in two colours, sometimes in an aperture."""
  xx, yy = _grid(size)
  g = np.zeros_like(xx)
  for _ in range(1 if rng.random() < 0.7 else 2):
    theta = rng.uniform(0, np.pi)
    cycles = rng.uniform(1.0, max(1.5, size / 5))  # cycles per image, below Nyquist
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(np.pi * cycles * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    g += np.sign(wave) if rng.random() < 0.3 else wave
  g /= max(float(np.abs(g).max()), 1e-6)
  c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
  contrast = rng.uniform(0.3, 1.0)
  x = (c1 + c2) / 2 + g[..., None] * contrast * (c1 - c2)[None, None] / 2
  if rng.random() < 0.4:  # Gaussian aperture on a uniform background
    cx, cy, sigma = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.8)
    env = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[..., None]
    x = env * x + (1 - env) * rng.uniform(0, 1, 3)
  return x.astype(np.float32)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
  """Ellipses, rotated rectangles, polygons and lines on a plain or graded background,
  drawn at twice the size and reduced (antialiased edges)."""
  big = 2 * size
  c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
  if rng.random() < 0.5:
    t = np.linspace(0, 1, big, dtype=np.float32)
    xx, yy = np.meshgrid(t, t, indexing="xy")
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)
    bg = c1 + ramp[..., None] * (c2 - c1)
  else:
    bg = np.broadcast_to(c1, (big, big, 3))
  img = Image.fromarray(np.round(np.clip(bg, 0, 1) * 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(1, 7))):
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    cx, cy = rng.uniform(0.1, 0.9, 2) * big
    r = rng.uniform(0.06, 0.35) * big
    kind = int(rng.integers(4))
    if kind == 0:
      a = r * rng.uniform(0.4, 1.0)
      draw.ellipse((cx - r, cy - a, cx + r, cy + a), fill=colour)
    elif kind == 1:
      theta = rng.uniform(0, np.pi)
      hw, hh = r, r * rng.uniform(0.2, 1.0)
      corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
      rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
      pts = corners @ rot.T + [cx, cy]
      draw.polygon([tuple(p) for p in pts], fill=colour)
    elif kind == 2:
      k = int(rng.integers(3, 8))
      ang = np.sort(rng.uniform(0, 2 * np.pi, k))
      rad = r * rng.uniform(0.4, 1.0, k)
      draw.polygon(
        [(cx + q * np.cos(t), cy + q * np.sin(t)) for t, q in zip(ang, rad, strict=True)],
        fill=colour,
      )
    else:
      x1, y1 = rng.uniform(0, 1, 2) * big
      draw.line((cx, cy, x1, y1), fill=colour, width=max(1, int(rng.uniform(0.01, 0.06) * big)))
  return np.asarray(img.reduce(2), np.float32) / 255


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
  """1/f^alpha noise (sometimes oriented), coloured by a two-colour ramp or per channel."""
  fy = np.fft.fftfreq(size)[:, None]
  fx = np.fft.rfftfreq(size)[None, :]
  f = np.sqrt(fx**2 + fy**2)
  f[0, 0] = 1.0
  amp = f ** -rng.uniform(0.8, 2.5)
  if rng.random() < 0.3:  # oriented: keep frequencies near one direction
    theta = rng.uniform(0, np.pi)
    cos = np.abs(fx * np.cos(theta) + fy * np.sin(theta)) / f
    amp = amp * cos ** rng.uniform(2, 8)
  amp[0, 0] = 0.0
  channels = 1 if rng.random() < 0.5 else 3
  noise = rng.standard_normal((channels, size, size)).astype(np.float32)
  field = np.fft.irfft2(np.fft.rfft2(noise) * amp, s=(size, size)).astype(np.float32)
  field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
  if channels == 1:
    t = 1 / (1 + np.exp(-1.5 * field[0]))
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)
  shared = rng.uniform(0.3, 0.9)
  mixed = shared * field[:1] + (1 - shared) * field
  x = rng.uniform(0.3, 0.7, (3, 1, 1)) + rng.uniform(0.1, 0.25) * mixed
  return np.moveaxis(x, 0, -1).astype(np.float32)


_MAKERS = (_photo, _grating, _shapes, _texture)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def synthetic_images(
  count: int, size: int, seed: int = 0, *, with_kinds: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """(count, size, size, 3) uint8 distinct images; with_kinds also returns (count,) int8
  indices into KINDS (photo, grating, shapes, texture)."""
  count, size = int(count), int(size)
  if count < 0 or size < 8:
    raise ValueError(f"synthetic_images: expected count >= 0 and size >= 8, found {count}, {size}")
  images = np.empty((count, size, size, 3), np.uint8)
  kinds = np.empty(count, np.int8)
  seen: set[bytes] = set()
  for i in range(count):
    for attempt in range(_MAX_REDRAWS):
      rng = np.random.default_rng([int(seed), i, attempt])
      kind = int(rng.choice(len(KINDS), p=_KIND_P))
      img = _to_uint8(_MAKERS[kind](rng, size))
      digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
      if digest not in seen:
        break
    else:
      raise RuntimeError(f"synthetic_images: image {i} repeated {_MAX_REDRAWS} times")
    seen.add(digest)
    images[i], kinds[i] = img, kind
  return (images, kinds) if with_kinds else images
