"""Algonauts 2023 subject folders (`python -m boldjax.prepare algonauts SUBJ_DIR --sphere=S`)
-> a stimulus dataset with responses on fsaverage vertices.

Layout read::

  SUBJ_DIR/training_split/training_fmri/{lh,rh}_training_fmri.npy   (images, columns) float32
  SUBJ_DIR/training_split/training_images/*.png                     sorted; one per fMRI row
  SUBJ_DIR/roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy       (163842,) nonzero = column

The fMRI is in challenge space: column j of a hemisphere is the j-th nonzero entry of its
mask, in fsaverage order, so fsaverage_index = flatnonzero(mask). Vertex coordinates come
from a FreeSurfer fsaverage sphere the user points to (not shipped: 163,842 vertices per
hemisphere), with the right hemisphere moved in +x so that the two do not overlap, by the
rule of the Brain Decodes Deep Nets seed (brainnet/coords.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import image_records
from boldjax.data.importers.images import (
  ImageFiles,
  add_stimulus_arguments,
  list_images,
  write_options,
)

HEMIS = ("lh", "rh")
FMRI = "training_split/training_fmri/{hemi}_training_fmri.npy"
IMAGES = "training_split/training_images"
MASK = "roi_masks/{hemi}.all-vertices_fsaverage_space.npy"
SPHERE_HELP = (
  "a FreeSurfer fsaverage sphere: a folder with lh.sphere and rh.sphere (e.g. "
  "$FREESURFER_HOME/subjects/fsaverage/surf), or the two files (--sphere=LH,RH)"
)
_NSD_ID = re.compile(r"nsd-(\d+)")
_SCAN_ROWS = 512


def _load_npy(path: str, field: str, mmap: bool = False) -> np.ndarray:
  if not os.path.exists(path):
    raise InputError(
      f"{path}: field {field!r} expected this file (Algonauts 2023 layout), found none"
    )
  try:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: field {field!r} expected a .npy array, found {e}") from e


def sphere_paths(spec: Sequence[str] | None) -> tuple[str, str]:
  """(lh, rh) sphere files from --sphere values: one folder (FreeSurfer's surf/ or the
  subject folder above it), or two files (named lh.* / rh.*, else in that order)."""
  items = [p.strip() for s in spec or () for p in s.split(",") if p.strip()]
  if not items:
    raise InputError(f"--sphere: field 'sphere' expected {SPHERE_HELP}; found none")
  if len(items) == 1:
    folder = items[0]
    if not os.path.isdir(folder):
      raise InputError(
        f"{folder}: field 'sphere' (--sphere) expected {SPHERE_HELP}; found no folder"
      )
    for sub in ("", "surf"):
      lh, rh = (os.path.join(folder, sub, f"{h}.sphere") for h in HEMIS)
      if os.path.isfile(lh) and os.path.isfile(rh):
        return lh, rh
    found = sorted(os.listdir(folder))[:6]
    raise InputError(
      f"{folder}: field 'sphere' (--sphere) expected lh.sphere and rh.sphere (or surf/lh.sphere "
      f"and surf/rh.sphere), found {found}"
    )
  if len(items) != 2:
    raise InputError(f"--sphere: field 'sphere' expected {SPHERE_HELP}; found {len(items)} paths")
  first, second = items
  if os.path.basename(first).startswith("rh.") and os.path.basename(second).startswith("lh."):
    first, second = second, first
  for p in (first, second):
    if not os.path.isfile(p):
      raise InputError(f"{p}: field 'sphere' (--sphere) expected {SPHERE_HELP}; found no file")
  return first, second


def read_sphere(path: str) -> np.ndarray:
  """(V, 3) float64 vertex coordinates of a FreeSurfer surface file."""
  import nibabel.freesurfer

  try:
    coords, _ = nibabel.freesurfer.read_geometry(path)
  except Exception as e:  # noqa: BLE001 - nibabel raises many kinds on a non-surface file
    raise InputError(
      f"{path}: field 'sphere' expected a FreeSurfer surface file, found {type(e).__name__}: {e}"
    ) from e
  return np.asarray(coords, np.float64)


def separate_hemispheres(lh: np.ndarray, rh: np.ndarray) -> np.ndarray:
  """rh coordinates moved in +x until they start past lh's x range stretched by 1.5 from its
  left edge (the seed's rule), so the two spheres do not overlap."""
  lo, hi = float(lh[:, 0].min()), float(lh[:, 0].max())
  limit = lo + 1.5 * (hi - lo)
  rh = rh.copy()
  start = float(rh[:, 0].min())
  if start < limit:
    rh[:, 0] += limit - start
  return rh


def _first_bad_row(fmri: np.ndarray) -> tuple[int, int] | None:
  """(row, non-finite count) of the first row with NaN/Inf, read in blocks."""
  for start in range(0, fmri.shape[0], _SCAN_ROWS):
    block = np.asarray(fmri[start : start + _SCAN_ROWS])
    bad = ~np.isfinite(block)
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):
      return start + int(rows[0]), int(bad[rows[0]].sum())
  return None


class HemisphereRows(Sequence):
  """Row i = lh row i then rh row i, float32 (the responses, read on demand)."""

  def __init__(self, lh: np.ndarray, rh: np.ndarray):
    self.lh, self.rh = lh, rh

  def __len__(self) -> int:
    return int(self.lh.shape[0])

  def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
    i = int(index)
    return np.concatenate([self.lh[i], self.rh[i]]).astype(np.float32)


def import_algonauts(
  subject_dir: str, out: str, *, sphere: Sequence[str] | None, **options: Any
) -> str:
  """An Algonauts 2023 subject folder -> a stimulus dataset: training images, lh + rh
  responses (lh columns first) and their fsaverage vertices (vertices.npz)."""
  if not os.path.isdir(subject_dir):
    raise InputError(
      f"{subject_dir}: field 'subject_dir' expected an Algonauts 2023 subject folder"
    )
  fmri = {}
  for h in HEMIS:
    path = os.path.join(subject_dir, FMRI.format(hemi=h))
    x = _load_npy(path, "fmri", mmap=True)
    if x.ndim != 2 or x.dtype.kind != "f" or 0 in x.shape:
      raise InputError(
        f"{path}: field 'fmri' expected a float (images, vertices) array, found {x.dtype} {x.shape}"
      )
    fmri[h] = (path, x)
  (lh_path, lh), (rh_path, rh) = fmri["lh"], fmri["rh"]
  n = lh.shape[0]
  if rh.shape[0] != n:
    raise InputError(
      f"{rh_path}: field 'rows' expected {n} images (rows of {lh_path}), found {rh.shape[0]}"
    )
  image_dir = os.path.join(subject_dir, IMAGES)
  paths = list_images(image_dir, (".png",))
  if len(paths) != n:
    raise InputError(
      f"{image_dir}: field 'images' expected {n} PNG files (one per row of {lh_path}), "
      f"found {len(paths)}"
    )
  masks = {}
  for h, (fpath, x) in fmri.items():
    mpath = os.path.join(subject_dir, MASK.format(hemi=h))
    mask = _load_npy(mpath, "roi mask")
    if mask.ndim != 1 or mask.dtype.kind not in "biuf":
      raise InputError(
        f"{mpath}: field 'roi mask' expected a 1-D numeric array (one entry per fsaverage "
        f"vertex), found {mask.dtype} {mask.shape}"
      )
    index = np.flatnonzero(np.nan_to_num(mask) != 0)
    if len(index) != x.shape[1]:
      raise InputError(
        f"{mpath}: field 'nonzero entries' expected {x.shape[1]} (the columns of {fpath}), "
        f"found {len(index)}"
      )
    masks[h] = (mpath, mask, index)
  sphere_files = sphere_paths(sphere)
  coords = {}
  for h, spath in zip(HEMIS, sphere_files, strict=True):
    xyz = read_sphere(spath)
    mpath, mask, _ = masks[h]
    if xyz.shape[0] != len(mask):
      raise InputError(
        f"{spath}: field 'vertices' expected {len(mask)} (the length of {mpath}), found "
        f"{xyz.shape[0]}"
      )
    coords[h] = xyz
  for fpath, x in fmri.values():
    bad = _first_bad_row(x)
    if bad is not None:
      row, count = bad
      raise InputError(
        f"{fpath}: row {row} field 'fmri' expected finite values, found {count} NaN/Inf of "
        f"{x.shape[1]} columns"
      )
  rh_xyz = separate_hemispheres(coords["lh"], coords["rh"])
  lh_index, rh_index = masks["lh"][2], masks["rh"][2]
  vertices = {
    "coords": np.concatenate([coords["lh"][lh_index], rh_xyz[rh_index]]).astype(np.float32),
    "fsaverage_index": np.concatenate([lh_index, rh_index]).astype(np.int64),
    "hemisphere": np.repeat(np.int8([0, 1]), [len(lh_index), len(rh_index)]),
  }
  ids = np.arange(n, dtype=np.int64)
  subject = os.path.basename(os.path.normpath(subject_dir))
  meta = dict(options.pop("meta", {}))
  meta.setdefault("name", f"algonauts2023_{subject}")
  meta.update(
    source={
      "importer": "algonauts",
      "subject_dir": os.path.abspath(subject_dir),
      "sphere": [os.path.abspath(p) for p in sphere_files],
    },
    space="fsaverage",
    hemisphere_columns={"lh": int(lh.shape[1]), "rh": int(rh.shape[1])},
    fsaverage_vertices={h: int(len(masks[h][1])) for h in HEMIS},
  )

  def write_files(path: str) -> None:
    rows = []
    for i, p in zip(ids.tolist(), paths, strict=True):
      m = _NSD_ID.search(os.path.basename(p))
      rows.append([i, os.path.basename(p), int(m.group(1)) if m else -1])
    with open(path, "w") as f:
      json.dump({"columns": ["image_id", "file", "nsd_id"], "rows": rows}, f)

  print(
    f"[prepare] algonauts: {subject}: {n} images, {lh.shape[1]} + {rh.shape[1]} vertices",
    flush=True,
  )
  return image_records.write_stimulus_dataset(
    out,
    ImageFiles(paths),
    ids,
    responses=HemisphereRows(lh, rh),
    vertices=vertices,
    response_space="fsaverage (Algonauts 2023 challenge vertices through roi_masks)",
    extra_files={"image_files.json": write_files},
    meta=meta,
    **options,
  )


@registry.register("importer", "algonauts")
class AlgonautsImporter:
  help = "Algonauts 2023 subject folder + an fsaverage sphere -> images with fMRI responses"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="SUBJ_DIR (training_split/, roi_masks/)")
    parser.add_argument("--sphere", action="append", default=None, help=SPHERE_HELP)
    add_stimulus_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    name = f"algonauts2023_{os.path.basename(os.path.normpath(args.input))}"
    return import_algonauts(args.input, args.out, sphere=args.sphere, **write_options(args, name))
