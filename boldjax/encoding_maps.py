"""`python -m boldjax.encoding_maps --workdir=W --out=maps.png`: brain-to-network maps.

Draws on boldjax's fsaverage5 flat map what a trained encoding model chose per vertex:
the layer (argmax of the layer selector), the global-token mix, the image position (x to
red, y to green), held-out R^2, and the seed's channel clusters of the readout weights
(k-means of the vertices' readout rows, then Ward on the centroids). On the synthetic
default the planted layer and position are drawn beside them. Per-vertex arrays go to an
.npz next to the picture. fsaverage data of finer meshes (fsaverage7 for Algonauts) is drawn
through its first 10,242 vertices per hemisphere: the icosahedral meshes nest.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from boldjax import cli

PROG = "python -m boldjax.encoding_maps"
FSAVERAGE5_VERTICES = 10242  # per hemisphere


def channel_clusters(weights: np.ndarray, k: int, *, fine: int = 64, seed: int = 0) -> np.ndarray:
  """(N, D) readout weights -> (N,) cluster ids 0..k-1: k-means into `fine` groups of
  unit-normalised rows, then Ward agglomeration of the centroids into k, as the seed."""
  from sklearn.cluster import AgglomerativeClustering, KMeans

  w = np.asarray(weights, np.float64)
  w = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)
  fine = max(k, min(fine, len(w)))
  km = KMeans(n_clusters=fine, n_init=4, random_state=seed).fit(w)
  ward = AgglomerativeClustering(n_clusters=k, linkage="ward").fit(km.cluster_centers_)
  return ward.labels_[km.labels_].astype(np.int64)


def surface_index(fsaverage_index: np.ndarray, hemisphere: np.ndarray) -> np.ndarray:
  """Index into the fsaverage5 FlatSurface (left then right), -1 where a finer mesh's
  vertex has no fsaverage5 counterpart."""
  idx = np.asarray(fsaverage_index, np.int64)
  out = idx + np.asarray(hemisphere, np.int64) * FSAVERAGE5_VERTICES
  return np.where(idx < FSAVERAGE5_VERTICES, out, -1)


def to_surface(values: np.ndarray, where: np.ndarray, num_vertices: int) -> np.ndarray:
  """Per-data-vertex values (N, ...) onto every surface vertex (NaN where there is none)."""
  values = np.asarray(values, np.float64)
  out = np.full((num_vertices, *values.shape[1:]), np.nan)
  keep = where >= 0
  out[where[keep]] = values[keep]
  return out


def run_results(loaded: Any, split: str, clusters: int) -> dict[str, np.ndarray]:
  """Per-vertex R^2, selections, readout clusters (and planted answer) of a loaded run."""
  from boldjax.evals.encoding import per_vertex_results

  task, info = loaded.task, loaded.info
  res = per_vertex_results(
    task, loaded.state.params, loaded.state.extra, loaded.config, info, split,
    loaded.mesh, loaded.rules,
  )  # fmt: skip
  params = task.feature_params(loaded.state.params, loaded.state.extra)
  res["readout"] = np.asarray(task.readout_weights(params))
  res["clusters"] = channel_clusters(res["readout"], clusters, seed=int(loaded.config.seed))
  res["layer"] = np.argmax(res["sel_layer"], axis=-1)
  res["fsaverage_index"], res["hemisphere"] = info.fsaverage_index, info.hemisphere
  if info.planted is not None:
    for k in ("layer", "x", "y", "scale"):
      res[f"planted_{k}"] = np.asarray(info.planted[k])
  return res


def _crop(images: list[np.ndarray], margin: int = 4) -> tuple[slice, slice]:
  finite = np.zeros(images[0].shape[:2], bool)
  for im in images:
    finite |= np.isfinite(im if im.ndim == 2 else im[..., 0])
  rows, cols = np.flatnonzero(finite.any(1)), np.flatnonzero(finite.any(0))
  if not len(rows):
    return slice(None), slice(None)
  h, w = finite.shape
  return (
    slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)),
    slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)),
  )


def draw_maps(res: dict[str, np.ndarray], path: str, *, num_layers: int, title: str = "") -> str:
  """The figure: one panel per map, cropped to the vertices that have data."""
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from boldjax.geometry.flatmap import FlatMapResampler
  from boldjax.geometry.plotting import save_figure
  from boldjax.geometry.surfaces import load_flat_surface

  surface = load_flat_surface("fsaverage5")
  resampler = FlatMapResampler.fit(surface, width=900)
  where = surface_index(res["fsaverage_index"], res["hemisphere"])
  shown = int(np.sum(where >= 0))
  if shown == 0:
    raise ValueError("encoding maps: no vertex of the data lies on fsaverage5")

  def image(values: np.ndarray) -> np.ndarray:
    pix = resampler.to_pixels(to_surface(values, where, surface.num_vertices))
    pix = np.where(resampler.mask, pix, np.nan)
    return pix

  def position(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rgb = np.stack([image((x + 1) / 2), image((y + 1) / 2), np.full(resampler.mask.shape, 0.5)])
    rgb = np.moveaxis(rgb, 0, -1)
    rgb[~np.isfinite(rgb[..., 0]) | ~np.isfinite(rgb[..., 1])] = np.nan
    return rgb

  layer_cmap = matplotlib.colormaps["viridis"].resampled(num_layers)
  k = int(res["clusters"].max()) + 1
  panels = [
    ("selected layer", image(res["layer"].astype(float)), layer_cmap, (-0.5, num_layers - 0.5)),
    ("global-token mix s", image(res["sel_scale"][:, 0]), "magma", (0.0, 1.0)),
    ("position (x red, y green)", position(*res["sel_space"].T), None, None),
    ("held-out R$^2$", image(res["r2"]), "inferno", (0.0, max(float(np.nanmax(res["r2"])), 1e-3))),
    ("readout clusters", image(res["clusters"].astype(float)), matplotlib.colormaps["tab10"]
     .resampled(k), (-0.5, k - 0.5)),
  ]  # fmt: skip
  if "planted_layer" in res:
    panels += [
      ("planted layer", image(res["planted_layer"].astype(float)), layer_cmap,
       (-0.5, num_layers - 0.5)),
      ("planted position", position(res["planted_x"], res["planted_y"]), None, None),
    ]  # fmt: skip
  rows, cols = _crop([p[1] for p in panels])
  ncols = 4
  nrows = -(-len(panels) // ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows + 0.4), dpi=110)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  background = np.where(resampler.mask, 0.85, 1.0)[rows, cols]
  for ax, (name, data, cmap, lim) in zip(axes.ravel(), panels, strict=False):
    ax.imshow(background, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    data = data[rows, cols]
    if cmap is None:  # RGB
      rgba = np.concatenate([np.nan_to_num(data), np.isfinite(data[..., :1]).astype(float)], -1)
      ax.imshow(np.clip(rgba, 0, 1), interpolation="nearest")
    else:
      shown_im = ax.imshow(
        np.ma.masked_invalid(data), cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest"
      )
      fig.colorbar(shown_im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(name, fontsize=10)
  fig.suptitle(title or f"brain-to-network maps ({shown} of {len(where)} vertices on fsaverage5)")
  return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog=PROG, description="Draw the brain-to-network maps of an encoding run."
  )
  p.add_argument("--workdir", required=True, help="a trained encoding run")
  p.add_argument("--out", required=True, help="the picture (.png); per-vertex arrays go to .npz")
  p.add_argument("--split", default="test", help="held-out split for R^2 (default test)")
  p.add_argument("--clusters", type=int, default=6, help="readout channel clusters (default 6)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  return p


def main(argv: list[str]) -> str:
  from boldjax import workdir as workdir_lib
  from boldjax.cli import InputError

  args = build_parser().parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, "config.json")):
    raise InputError(f"{args.workdir}: --workdir: expected a run folder with config.json")
  loaded = workdir_lib.load_run(args.workdir, args.step)
  if loaded.config.task.name != "encoding":
    raise InputError(
      f"{args.workdir}/config.json: field 'task.name' expected 'encoding', "
      f"found {loaded.config.task.name!r}"
    )
  res = run_results(loaded, args.split, args.clusters)
  stem = os.path.splitext(args.out)[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tmp = f"{stem}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **res)
  try:  # the .npz lands only with the picture: a failed draw leaves neither
    out = draw_maps(res, args.out, num_layers=loaded.info.num_layers)
  except BaseException:
    os.remove(tmp)
    raise
  os.replace(tmp, stem + ".npz")
  print(
    f"[encoding maps] wrote {out} and {stem}.npz: median R^2 {np.nanmedian(res['r2']):.3f} "
    f"over {len(res['r2'])} vertices (step {loaded.step})",
    flush=True,
  )
  return out


if __name__ == "__main__":
  cli.run_argparse(PROG, main, sys.argv[1:])
