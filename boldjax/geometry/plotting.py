"""Flat maps to PNG: a grid of panels sharing one diverging colour scale and colour bar."""

from __future__ import annotations

import os

import numpy as np


def plot_flat_maps(
  maps: np.ndarray,
  mask: np.ndarray | None,
  path: str,
  *,
  titles: list[str] | None = None,
  ncols: int = 4,
  cmap: str = "RdBu_r",
  vmin: float | None = None,
  vmax: float | None = None,
  colorbar_label: str | None = None,
) -> str:
  """Renders (N, H, W) or (H, W) maps; pixels outside `mask` are drawn light grey."""
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  maps = np.asarray(maps, np.float32)
  if maps.ndim == 2:
    maps = maps[None]
  if maps.ndim != 3:
    raise ValueError(f"plot_flat_maps: maps must be (N, H, W) or (H, W), found {maps.shape}")
  n, h, w = maps.shape
  if mask is None:
    mask = np.ones((h, w), bool)
  if mask.shape != (h, w):
    raise ValueError(f"plot_flat_maps: mask must be ({h}, {w}) like the maps, found {mask.shape}")
  if titles is not None and len(titles) != n:
    raise ValueError(f"plot_flat_maps: {n} maps but {len(titles)} titles")
  inside = maps[:, mask]
  if vmax is None:
    vmax = float(np.percentile(np.abs(inside), 99)) if inside.size else 1.0
    vmax = vmax or 1.0
  if vmin is None:
    vmin = -vmax

  ncols = max(1, min(ncols, n))
  nrows = int(np.ceil(n / ncols))
  panel_w = 3.2
  fig, axes = plt.subplots(
    nrows,
    ncols,
    figsize=(panel_w * ncols + 0.8, panel_w * h / w * nrows + 0.6 * nrows),
    squeeze=False,
    constrained_layout=True,
  )
  cm = matplotlib.colormaps[cmap].copy()
  cm = cm.with_extremes(bad="#dddddd")
  image = None
  for k, ax in enumerate(axes.ravel()):
    ax.set_axis_off()
    if k >= n:
      continue
    image = ax.imshow(
      np.ma.masked_where(~mask, maps[k]), cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    if titles is not None:
      ax.set_title(titles[k], fontsize=8)
  bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, fraction=0.03)
  if colorbar_label:
    bar.set_label(colorbar_label)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_surface_values(values: np.ndarray, resampler, path: str, **kwargs) -> str:
  """Vertex values (V,) or (N, V) -> flat maps -> PNG."""
  return plot_flat_maps(resampler.to_pixels(values), resampler.mask, path, **kwargs)
