"""`python -m boldjax.reconstruct --workdir=W --out=gallery.png`: held-out reconstructions
of an fmri2img run next to the images, and the metrics table.

The gallery's rows: ground truth, the model, ridge voxels -> VAE latent (decoded by the same
frozen decoder), ridge voxels -> pixels, the mean training image; columns: the first --n
images of the split. The table (boldjax.evals.reconstruction) is printed: pixel
correlation, SSIM and two-way identification in pixel, VAE-latent and (with weights in
config.evals.reconstruction.backbone) backbone space, for the model and every baseline.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from boldjax import cli

PROG = "python -m boldjax.reconstruct"
ROWS = (
  ("truth", "ground truth"),
  ("model", "model"),
  ("ridge_latent", "ridge -> VAE latent"),
  ("ridge_pixels", "ridge -> pixels"),
  ("mean_image", "mean train image"),
)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 (clipped)."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def draw_gallery(results: Any, path: str, *, n: int = 16, title: str = "") -> str:
  """PNG of the first n images (columns) and each method's reconstructions (rows), written
  whole (a failed draw leaves no file)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from boldjax.geometry.plotting import save_figure

  n = min(n, len(results.truth))
  rows = [(key, label) for key, label in ROWS if key == "truth" or key in results.recon]
  size = 1.1
  fig = Figure(figsize=(size * n + 1.6, size * len(rows) + 0.5), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(rows), n, squeeze=False)
  for r, (key, label) in enumerate(rows):
    images = results.truth if key == "truth" else results.recon[key]
    for c in range(n):
      ax = axes[r, c]
      ax.imshow(to_uint8(images[c]), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"#{int(results.image_id[c])}", fontsize=7)
    axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
  fig.suptitle(title or f"{results.split} images: ground truth and reconstructions", fontsize=9)
  fig.subplots_adjust(left=1.5 / (size * n + 1.6), right=0.99, top=0.9, bottom=0.02)
  return save_figure(fig, path)


def run_results(loaded: Any, split: str, *, baselines: bool = True) -> Any:
  """The reconstruction results of a loaded fmri2img run on one split."""
  from boldjax.evals import reconstruction

  name, settings = reconstruction.evaluator_settings(loaded.config)
  cfg = {**dict(settings), "baselines": baselines}
  rec = reconstruction.reconstructor_for(
    loaded.task, loaded.config, loaded.info, loaded.mesh, loaded.rules, cfg, split=split,
    name=name,
  )  # fmt: skip
  return rec.run(loaded.state.params, loaded.state.extra)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog=PROG, description="Draw held-out reconstructions of an fmri2img run; print metrics."
  )
  p.add_argument("--workdir", required=True, help="a trained fmri2img run")
  p.add_argument("--out", required=True, help="the gallery picture (.png)")
  p.add_argument("--split", default="test", help="held-out split (default test)")
  p.add_argument("--n", type=int, default=16, help="images in the gallery (default 16)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  p.add_argument("--no-baselines", action="store_true", help="the model only (faster)")
  return p


def main(argv: list[str]) -> str:
  from boldjax import checkpoint
  from boldjax import workdir as workdir_lib
  from boldjax.cli import InputError
  from boldjax.evals import reconstruction

  args = build_parser().parse_args(argv)
  if args.n < 1:
    raise InputError(f"--n: expected a positive number of images, found {args.n}")
  if not args.out.lower().endswith(".png"):
    raise InputError(f"--out: expected a .png file, found {args.out!r}")
  config = checkpoint.load_config(args.workdir)
  task_name = config.get("task", {}).get("name", None)
  if task_name != "fmri2img":
    raise InputError(
      f"{args.workdir}/config.json: field 'task.name' expected 'fmri2img', found {task_name!r}"
    )
  if args.split not in ("train", "val", "test"):
    raise InputError(f"--split: expected one of ['train', 'val', 'test'], found {args.split!r}")
  loaded = workdir_lib.load_run(args.workdir, args.step)
  results = run_results(loaded, args.split, baselines=not args.no_baselines)
  out = draw_gallery(results, args.out, n=args.n)
  print(reconstruction.format_table(results), flush=True)
  print(f"[reconstruct] wrote {out} (step {loaded.step})", flush=True)
  return out


if __name__ == "__main__":
  cli.run_argparse(PROG, main, sys.argv[1:])
