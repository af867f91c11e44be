"""4-D NIfTI runs + a 3-D label atlas -> parcel means per frame (`python -m boldjax.prepare
nifti`). The atlas is resampled to the EPI grid with nilearn (nearest neighbour) when the
grids differ.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data.importers.common import (
  ImportOptions,
  add_common_arguments,
  file_stem,
  import_options,
  subject_of,
  write_dataset,
)


def parcel_means(
  data: np.ndarray, labels: np.ndarray, parcel_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(T, V) data, (V,) labels -> ((T, R) float64 means over each parcel id's elements,
  (R,) element counts). Elements whose label is not in parcel_ids are ignored. Float64, so
  that validate_record names means too large for the stored dtype instead of seeing inf."""
  import scipy.sparse as sp

  pos = {int(p): j for j, p in enumerate(parcel_ids)}
  uniq, inv = np.unique(labels, return_inverse=True)
  col = np.asarray([pos.get(int(u), -1) for u in uniq], np.int64)[inv.reshape(-1)]
  keep = np.flatnonzero(col >= 0)
  r = len(parcel_ids)
  onehot = sp.csr_matrix((np.ones(len(keep)), (col[keep], keep)), shape=(r, len(labels)))
  counts = np.asarray(onehot.sum(axis=1)).ravel()
  sums = (onehot @ np.asarray(data, np.float64).T).T
  return np.asarray(sums / np.maximum(counts, 1), np.float64), counts


def import_nifti(
  paths: Sequence[str],
  atlas_path: str,
  opts: ImportOptions,
  *,
  tr: float | None = None,
  subjects: Sequence[str] | None = None,
) -> str:
  """4-D NIfTI runs + a 3-D label atlas -> parcel-mean runs."""
  import nibabel as nib

  try:
    atlas_img = nib.load(atlas_path)
  except Exception as e:
    raise ValueError(f"{atlas_path}: field 'atlas': expected a NIfTI label image, found {e}") from e
  atlas_data = _read_image(atlas_path, atlas_img, "atlas")
  if atlas_data.ndim == 4 and atlas_data.shape[3] == 1:
    atlas_data = atlas_data[..., 0]
  if atlas_data.ndim != 3:
    raise ValueError(
      f"{atlas_path}: field 'atlas' expected a 3-D label image, found {atlas_data.shape}"
    )
  if not np.all(np.isfinite(atlas_data)):
    raise InputError(f"{atlas_path}: field 'atlas' expected integer labels, found NaN/Inf")
  if not np.all(atlas_data == np.round(atlas_data)):
    raise ValueError(f"{atlas_path}: field 'atlas' expected integer labels, found fractions")
  parcel_ids = np.unique(atlas_data[atlas_data > 0]).astype(np.int64)
  if len(parcel_ids) == 0:
    raise ValueError(f"{atlas_path}: field 'atlas' expected labels > 0, found none")
  if subjects is not None and len(subjects) != len(paths):
    raise ValueError(f"--subject: expected {len(paths)} ids (one per input), found {len(subjects)}")
  subs = list(subjects) if subjects else [subject_of(p, file_stem(p)) for p in paths]

  def records() -> Iterator[dict[str, Any]]:
    for path, sub in zip(paths, subs, strict=True):
      yield nifti_record(path, atlas_img, parcel_ids, tr=tr, subject=sub)

  meta = {
    "name": file_stem(paths[0]),
    "source": {"importer": "nifti", "inputs": list(paths), "atlas": atlas_path},
    "atlas": os.path.basename(atlas_path),
    "parcel_ids": parcel_ids.tolist(),
    "num_parcels": len(parcel_ids),
  }
  return write_dataset(opts, subs, records, meta)


def _read_image(path: str, img: Any, field: str) -> np.ndarray:
  """A loaded image's voxels as float64 (nibabel reads lazily: a truncated or corrupt file
  fails here, with EOFError, zlib.error, OSError or ValueError)."""
  try:
    return np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # noqa: BLE001 - the readers raise many types for a damaged file
    raise InputError(
      f"{path}: field {field!r}: expected a complete image, found a truncated or corrupt "
      f"file ({type(e).__name__}: {' '.join(str(e).split())})"
    ) from e


def atlas_on_grid(atlas_img: Any, img: Any) -> np.ndarray:
  """The atlas labels on img's 3-D voxel grid (nearest-neighbour resampling if needed)."""
  shape3 = img.shape[:3]
  if atlas_img.shape[:3] == shape3 and np.allclose(atlas_img.affine, img.affine, atol=1e-4):
    data = np.asarray(atlas_img.dataobj)
  else:
    from nilearn import image

    ref = image.index_img(img, 0)
    data = np.asarray(
      image.resample_to_img(
        atlas_img, ref, interpolation="nearest", force_resample=True, copy_header=True
      ).dataobj
    )
  return np.rint(data.reshape(shape3)).astype(np.int64)


def nifti_record(
  path: str, atlas_img: Any, parcel_ids: np.ndarray, *, tr: float | None, subject: str
) -> dict[str, Any]:
  """One 4-D NIfTI run -> a record of parcel means (T, R)."""
  import nibabel as nib

  try:
    img = nib.load(path)
  except Exception as e:
    raise ValueError(f"{path}: field 'file': expected a NIfTI image, found {e}") from e
  if len(img.shape) != 4:
    raise ValueError(f"{path}: field 'data' expected a 4-D image, found shape {img.shape}")
  if tr is None:
    zooms = img.header.get_zooms()
    unit = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    tr = float(zooms[3]) * scale if len(zooms) > 3 else 0.0
    if tr <= 0:
      raise ValueError(f"{path}: field 'pixdim[4]' (TR) expected > 0, found {tr}; pass --tr")
  try:
    labels = atlas_on_grid(atlas_img, img)
  except (ValueError, np.linalg.LinAlgError) as e:
    raise InputError(
      f"{path}: field 'atlas' expected an atlas that resamples onto this image's grid, "
      f"found {type(e).__name__}: {e}"
    ) from e
  missing = np.setdiff1d(parcel_ids, np.unique(labels))
  if len(missing):
    raise ValueError(
      f"{path}: field 'atlas' expected every parcel on the EPI grid, found {len(missing)} "
      f"missing after resampling (ids {missing[:5].tolist()}...)"
    )
  data = _read_image(path, img, "data")
  t = data.shape[3]
  means, _ = parcel_means(data.reshape(-1, t).T, labels.reshape(-1), parcel_ids)
  return {
    "where": path,
    "bold": means,
    "tr": tr,
    "subject": subject,
    "run": file_stem(path),
    "dataset": "nifti",
  }


@registry.register("importer", "nifti")
class NiftiImporter:
  help = "4-D NIfTI runs + a 3-D label atlas -> parcel means"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help="4-D .nii/.nii.gz files")
    parser.add_argument("--atlas", required=True, help="3-D label image (.nii/.nii.gz)")
    parser.add_argument("--tr", type=float, default=None, help="else the header's pixdim[4]")
    parser.add_argument("--subject", action="append", default=None, help="one per input")
    add_common_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_nifti(
      args.input, args.atlas, import_options(args), tr=args.tr, subjects=args.subject
    )
