"""Render flat maps to PNG for reports, colabs and eyeballing synthetic data.

matplotlib is imported only inside the functions and figures are drawn on an Agg canvas
without pyplot, so boldjax never changes the caller's plotting backend or pyplot state.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from boldjax.geometry.flatmap import FlatMapResampler

_BACKGROUND = (0.82, 0.82, 0.82, 1.0)


def robust_limit(maps: np.ndarray, mask: np.ndarray | None) -> float:
  """99th percentile of |x| inside the mask (over all maps); 1.0 when that is 0 or empty."""
  maps = np.asarray(maps, np.float64)
  vals = maps[..., mask] if mask is not None else maps.reshape(-1)
  vals = np.abs(vals[np.isfinite(vals)])
  if vals.size == 0:
    return 1.0
  lim = float(np.percentile(vals, 99))
  return lim if lim > 0 else 1.0


def plot_flat_maps(
  maps: np.ndarray,
  mask: np.ndarray | None,
  path: str | os.PathLike,
  *,
  titles: Sequence[str] | None = None,
  ncols: int = 4,
  cmap: str = "RdBu_r",
  vmin: float | None = None,
  vmax: float | None = None,
  colorbar_label: str | None = None,
  panel_width: float = 3.5,
  dpi: int = 100,
) -> str:
  """Draw (N, H, W) or (H, W) maps in a grid with one shared colour bar; returns the path.

  Pixels outside `mask` are grey. Default limits are symmetric: +-(99th percentile of |x|
  inside the mask).
  """
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  maps = np.asarray(maps, np.float32)
  if maps.ndim == 2:
    maps = maps[None]
  if maps.ndim != 3:
    raise ValueError(f"plot_flat_maps: maps expected (N, H, W) or (H, W), found {maps.shape}")
  n, h, w = maps.shape
  if mask is not None:
    mask = np.asarray(mask, bool)
    if mask.shape != (h, w):
      raise ValueError(f"plot_flat_maps: mask shape expected {(h, w)}, found {mask.shape}")
  if titles is not None and len(titles) != n:
    raise ValueError(f"plot_flat_maps: titles expected {n} entries, found {len(titles)}")
  if vmin is None or vmax is None:
    lim = robust_limit(maps, mask)
    vmin = -lim if vmin is None else vmin
    vmax = lim if vmax is None else vmax

  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  panel_h = panel_width * h / w + (0.3 if titles is not None else 0.05)
  fig = Figure(figsize=(panel_width * ncols + 0.9, panel_h * nrows + 0.2), dpi=dpi)
  FigureCanvasAgg(fig)  # render with Agg without touching pyplot's global backend
  axes = fig.subplots(nrows, ncols, squeeze=False)
  colormap = matplotlib.colormaps[cmap].with_extremes(bad=_BACKGROUND)
  image = None
  for k, ax in enumerate(axes.ravel()):
    ax.set_axis_off()
    if k >= n:
      continue
    data = np.ma.masked_array(maps[k], mask=~mask if mask is not None else ~np.isfinite(maps[k]))
    image = ax.imshow(data, cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if titles is not None:
      ax.set_title(str(titles[k]), fontsize=9)
  fig.subplots_adjust(left=0.01, right=0.9, bottom=0.02, top=0.96, wspace=0.03, hspace=0.12)
  cax = fig.add_axes((0.915, 0.1, 0.015, 0.8))
  bar = fig.colorbar(image, cax=cax)
  if colorbar_label:
    bar.set_label(colorbar_label)
  return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> str:
  """PNG through etils.epath (gs:// too), written whole: a failed draw leaves no file."""
  from etils import epath

  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return os.fspath(path)


def plot_surface_values(
  values: np.ndarray,
  resampler: FlatMapResampler,
  path: str | os.PathLike,
  **kwargs,
) -> str:
  """Resample per-vertex values (V,) or (N, V) to the flat map and plot them."""
  return plot_flat_maps(resampler.to_pixels(values), resampler.mask, path, **kwargs)
