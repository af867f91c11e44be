"""NSD single-trial betas (`python -m boldjax.prepare nsd_betas BETAS_DIR --design=...
--stimuli=... --roi=... --subject=N --out=D`) -> a trials dataset (trial_records) for fmri2img.

Layout read (NSD data manual, "Functional data (NSD)", "Experiments")::

  BETAS_DIR/betas_sessionNN.nii.gz   (X, Y, Z, 750) int16, percent signal change x 300
  BETAS_DIR/betas_sessionNN.hdf5     dataset 'betas', MATLAB's X x Y x Z x 750, which h5py
                                     reads as (750, Z, Y, X): every axis reversed
  ROI mask NIfTI (X, Y, Z)           nsdgeneral (1 in, 0 out, -1 outside the brain) or a
                                     labelled ROI file (> 0 in); same grid as the betas
  nsd_expdesign.mat                  masterordering (1, 30000): trial -> 1-based 10k index;
                                     subjectim (8, 10000): 10k index -> 1-based 73k id;
                                     sharedix (1, 1000): 1-based 73k ids of the shared images
  nsd_stimuli.hdf5                   imgBrick (73000, 425, 425, 3) uint8; row = 73k id - 1

Trial t (1-based) of session s shows masterordering[(s - 1) * 750 + t]. Betas are divided by
--scale (300) and kept per trial (repeats stay separate trials); images are split by image:
the shared images present -> test, the rest a seeded train/val split. Sessions are streamed
into a scratch memory map (one session in memory at a time), then written; z-scoring on the
train trials is write_trial_dataset's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.data import image_records, store
from boldjax.data.importers.images import NSD_KEY, BrickImages, open_brick

TRIALS_PER_SESSION = 750
BETA_SCALE = 300.0
DEFAULT_SIZE = 64
BETAS_KEY = "betas"
DESIGN_FIELDS = ("masterordering", "subjectim")
_SESSION_FILE = re.compile(r"^betas_session(\d+)\.(hdf5|h5|nii\.gz|nii)$")
_PREFERENCE = {"hdf5": 0, "h5": 1, "nii.gz": 2, "nii": 3}  # several files of one session


# ------------------------------------------------------------------------------------------
# The experiment design.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Design:
  """nsd_expdesign.mat, 1-based as stored: masterordering (N,), subjectim (S, 10000),
  sharedix (K,) or None."""

  path: str
  masterordering: np.ndarray
  subjectim: np.ndarray
  sharedix: np.ndarray | None


def _read_mat(path: str) -> dict[str, np.ndarray]:
  """A MATLAB file's arrays: v5 through scipy, v7.3 (HDF5) through h5py (transposed back to
  MATLAB's axis order)."""
  import scipy.io

  if not os.path.isfile(path):
    raise InputError(f"{path}: field 'design' (--design) expected nsd_expdesign.mat, found no file")
  try:
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
  except NotImplementedError:  # v7.3
    import h5py

    try:
      with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k]).T for k in f if isinstance(f[k], h5py.Dataset)}
    except OSError as e:
      raise InputError(f"{path}: field 'design' expected a MATLAB file, found {e}") from e
  except Exception as e:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError ...
    raise InputError(
      f"{path}: field 'design' expected a MATLAB .mat file, found {type(e).__name__}: {e}"
    ) from e


def _int_field(path: str, fields: dict[str, np.ndarray], name: str, expected: str) -> np.ndarray:
  if name not in fields:
    raise InputError(f"{path}: field {name!r} expected {expected}, found none (fields "
                     f"{sorted(fields)})")  # fmt: skip
  x = np.asarray(fields[name])
  if (
    x.dtype.kind not in "iuf"
    or x.size == 0
    or not np.all(np.isfinite(x))
    or np.any(x != np.round(x))
  ):
    raise InputError(f"{path}: field {name!r} expected {expected}, found {x.dtype} {x.shape}")
  return x.astype(np.int64)


def load_design(path: str) -> Design:
  """nsd_expdesign.mat -> Design (masterordering and subjectim required, sharedix optional)."""
  fields = _read_mat(path)
  order = _int_field(path, fields, "masterordering", "a (1, trials) array of 1-based 10k indices")
  if order.ndim > 2 or (order.ndim == 2 and 1 not in order.shape):
    raise InputError(
      f"{path}: field 'masterordering' expected a (1, trials) vector, found {order.shape}"
    )
  subjectim = _int_field(path, fields, "subjectim", "a (subjects, 10000) array of 1-based 73k ids")
  if subjectim.ndim != 2:
    raise InputError(
      f"{path}: field 'subjectim' expected a (subjects, 10000) array, found {subjectim.shape}"
    )
  shared = None
  if "sharedix" in fields:
    shared = _int_field(path, fields, "sharedix", "a vector of 1-based 73k ids").reshape(-1)
  return Design(path, order.reshape(-1), subjectim, shared)


# ------------------------------------------------------------------------------------------
# Sessions and the ROI mask.
# ------------------------------------------------------------------------------------------
def find_sessions(betas_dir: str) -> dict[int, str]:
  """session number -> betas_sessionNN file (.hdf5 preferred over .nii.gz over .nii)."""
  if not os.path.isdir(betas_dir):
    raise InputError(
      f"{betas_dir}: field 'betas_dir' expected a folder of betas_sessionNN.nii.gz/.hdf5, "
      f"found none"
    )
  found: dict[int, tuple[int, str]] = {}
  for name in sorted(os.listdir(betas_dir)):
    m = _SESSION_FILE.match(name)
    if m:
      s, rank = int(m.group(1)), _PREFERENCE[m.group(2)]
      if s not in found or rank < found[s][0]:
        found[s] = (rank, os.path.join(betas_dir, name))
  if not found:
    raise InputError(
      f"{betas_dir}: field 'sessions' expected files betas_sessionNN.nii.gz or .hdf5, found "
      f"{sorted(os.listdir(betas_dir))[:6]}"
    )
  return {s: found[s][1] for s in sorted(found)}


def parse_sessions(text: str | None, available: dict[int, str], where: str) -> list[int]:
  """--sessions '1-3,5' (1-based, inclusive ranges) -> sorted session numbers; None = all
  found. Each must have a file."""
  if text is None:
    return sorted(available)
  chosen: set[int] = set()
  for item in (p.strip() for p in text.split(",")):
    try:
      if "-" in item:
        lo, hi = item.split("-", 1)
        chosen.update(range(int(lo), int(hi) + 1))
      elif item:
        chosen.add(int(item))
    except ValueError as e:
      raise InputError(
        f"--sessions: field 'sessions' expected numbers and a-b ranges, found {item!r}"
      ) from e
  if not chosen or min(chosen) < 1:
    raise InputError(f"--sessions: field 'sessions' expected numbers >= 1, found {text!r}")
  missing = sorted(chosen - set(available))
  if missing:
    raise InputError(
      f"{where}: field 'sessions' expected betas_session{missing[0]:02d}.nii.gz or .hdf5 "
      f"(--sessions={text}), found sessions {sorted(available)}"
    )
  return sorted(chosen)


@dataclasses.dataclass(frozen=True)
class RoiMask:
  """The ROI mask: values (X, Y, Z), affine, ijk (V, 3) of voxels > 0 in C order."""

  path: str
  values: np.ndarray
  affine: np.ndarray
  ijk: np.ndarray


def load_roi(path: str) -> RoiMask:
  """A 3-D NIfTI ROI mask; voxels > 0 are kept (nsdgeneral 1; labelled ROI files 1..n;
  0 unlabelled, -1 outside the brain)."""
  import nibabel as nib

  if not os.path.isfile(path):
    raise InputError(f"{path}: field 'roi' (--roi) expected a NIfTI ROI mask, found no file")
  try:
    img = nib.load(path)
    values = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # noqa: BLE001 - nibabel raises many kinds on a bad file
    raise InputError(
      f"{path}: field 'roi' expected a NIfTI ROI mask, found {type(e).__name__}: {e}"
    ) from e
  if values.ndim == 4 and values.shape[3] == 1:
    values = values[..., 0]
  if values.ndim != 3:
    raise InputError(f"{path}: field 'roi' expected a 3-D mask, found shape {values.shape}")
  values = np.nan_to_num(values, nan=0.0)
  ijk = np.argwhere(values > 0).astype(np.int64)
  if len(ijk) == 0:
    raise InputError(f"{path}: field 'roi' expected voxels > 0, found none")
  return RoiMask(path, values, np.asarray(img.affine, np.float64), ijk)


def _fail_read(path: str, error: BaseException) -> InputError:
  return InputError(
    f"{path}: field {BETAS_KEY!r} expected a complete beta file, found a truncated or corrupt "
    f"file ({type(error).__name__}: {' '.join(str(error).split())})"
  )


def _space_error(path: str, roi: RoiMask, what: str, found: Any, expected: Any) -> InputError:
  return InputError(
    f"{roi.path}: field {what!r} expected the grid of {path} ({expected}), found {found}: the "
    f"ROI mask must be in the betas' space"
  )


class SessionFile:
  """One betas_sessionNN file: header checks against the mask, then masked reads."""

  def __init__(self, session: int, path: str, roi: RoiMask):
    self.session, self.path, self.roi = session, path, roi
    self.hdf5 = path.endswith((".hdf5", ".h5"))
    shape3 = roi.values.shape
    if self.hdf5:
      shape = self._hdf5_shape()
      trials, spatial = (shape or (0,))[0], tuple(reversed(shape[1:]))
      if len(shape) != 4 or spatial != shape3:
        raise _space_error(path, roi, "shape", shape3, f"(750, Z, Y, X) = {shape}, reversed")
    else:
      img = self._nifti()
      shape = tuple(int(s) for s in img.shape)
      if len(shape) != 4:
        raise InputError(f"{path}: field 'shape' expected (X, Y, Z, 750), found {shape}")
      trials = shape[3]
      if shape[:3] != shape3:
        raise _space_error(path, roi, "shape", shape3, shape[:3])
      if not np.allclose(img.affine, roi.affine, atol=1e-4):
        found = np.round(roi.affine, 4).tolist()
        raise _space_error(path, roi, "affine", found, np.round(img.affine, 4).tolist())
    if trials != TRIALS_PER_SESSION:
      raise InputError(
        f"{path}: field 'trials' expected {TRIALS_PER_SESSION} per NSD session, found {trials}"
      )

  def _hdf5_shape(self) -> tuple[int, ...]:
    import h5py

    try:
      with h5py.File(self.path, "r") as f:
        if BETAS_KEY not in f or not isinstance(f[BETAS_KEY], h5py.Dataset):
          raise InputError(
            f"{self.path}: field {BETAS_KEY!r} expected a (750, Z, Y, X) dataset, found keys "
            f"{sorted(f)}"
          )
        return tuple(int(s) for s in f[BETAS_KEY].shape)
    except OSError as e:
      raise _fail_read(self.path, e) from e

  def _nifti(self) -> Any:
    import nibabel as nib

    try:
      return nib.load(self.path)
    except Exception as e:  # noqa: BLE001
      raise InputError(
        f"{self.path}: field 'file' expected a NIfTI image, found {type(e).__name__}: {e}"
      ) from e

  def read(self, scale: float) -> np.ndarray:
    """(750, V) float32 betas of the mask's voxels, divided by `scale`."""
    ijk = self.roi.ijk
    try:
      raw = self._read_hdf5() if self.hdf5 else self._read_nifti()
    except InputError:
      raise
    except Exception as e:  # noqa: BLE001 - h5py/gzip/zlib raise many kinds on damage
      raise _fail_read(self.path, e) from e
    betas = raw.astype(np.float32) / np.float32(scale)
    bad = ~np.isfinite(betas)
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):
      t = int(rows[0])
      raise InputError(
        f"{self.path}: trial {t + 1} field {BETAS_KEY!r} expected finite values, found "
        f"{int(bad[t].sum())} NaN/Inf of {len(ijk)} ROI voxels"
      )
    return betas

  def _read_nifti(self) -> np.ndarray:
    proxy = self._nifti().dataobj
    i, j, k = self.roi.ijk.T
    if hasattr(proxy, "get_unscaled"):  # stored dtype (int16), then scaling on the ROI only
      raw = np.asarray(proxy.get_unscaled())[i, j, k].T
      slope, inter = float(proxy.slope), float(proxy.inter)
      if slope != 1.0 or inter != 0.0:
        raw = raw * slope + inter
      return raw
    return np.asarray(proxy)[i, j, k].T

  def _read_hdf5(self) -> np.ndarray:
    """One read per (x, y) column of ROI voxels, over its z range: NSD's files are chunked
    per voxel (750 trials), so this touches little beyond the ROI (measured on a 81x104x83
    session, 28k ROI voxels: 1.0 s, against 8-9 s for reading it in z slabs)."""
    import h5py

    ijk = self.roi.ijk
    column = ijk[:, 0] * (int(ijk[:, 1].max()) + 1) + ijk[:, 1]
    order = np.argsort(column, kind="stable")
    _, starts = np.unique(column[order], return_index=True)
    with h5py.File(self.path, "r") as f:
      data = f[BETAS_KEY]  # (750, Z, Y, X)
      out = np.empty((data.shape[0], len(ijk)), data.dtype)
      for lo, hi in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        rows = order[lo:hi]
        i, j = (int(v) for v in ijk[rows[0], :2])
        k = ijk[rows, 2]
        k0 = int(k.min())
        out[:, rows] = data[:, k0 : int(k.max()) + 1, j, i][:, k - k0]
    return out


# ------------------------------------------------------------------------------------------
# Trials -> images -> splits.
# ------------------------------------------------------------------------------------------
def trial_stimuli(
  design: Design,
  subject: int,
  sessions: Sequence[int],
  files: dict[int, str],
  brick: str,
  brick_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
  """((T,) 1-based 10k index, (T,) 0-based 73k id = brick row) of every trial of `sessions`,
  in session order; each checked against subjectim and the brick."""
  n_subjects, n_10k = design.subjectim.shape
  if not 1 <= subject <= n_subjects:
    raise InputError(
      f"{design.path}: field 'subjectim' expected a row for --subject={subject}, found "
      f"{n_subjects} subjects"
    )
  order = design.masterordering
  ten_k, nsd = [], []
  for s in sessions:
    start = (s - 1) * TRIALS_PER_SESSION
    if start + TRIALS_PER_SESSION > len(order):
      raise InputError(
        f"{design.path}: field 'masterordering' expected trials of session {s} "
        f"({start + 1}..{start + TRIALS_PER_SESSION}), found {len(order)} trials"
      )
    k = order[start : start + TRIALS_PER_SESSION]
    bad = np.flatnonzero((k < 1) | (k > n_10k))
    if len(bad):
      t = int(bad[0])
      raise InputError(
        f"{design.path}: field 'masterordering' expected 10k indices in 1..{n_10k} (columns "
        f"of subjectim), found {int(k[t])} at trial {t + 1} of session {s} "
        f"({files[s]})"
      )
    ids = design.subjectim[subject - 1, k - 1] - 1
    bad = np.flatnonzero((ids < 0) | (ids >= brick_rows))
    if len(bad):
      t = int(bad[0])
      raise InputError(
        f"{design.path}: field 'subjectim' expected 73k ids in 1..{brick_rows} (rows of "
        f"{brick}), found {int(ids[t]) + 1} for 10k index {int(k[t])} at trial {t + 1} of "
        f"session {s}"
      )
    ten_k.append(k)
    nsd.append(ids)
  return np.concatenate(ten_k), np.concatenate(nsd)


def image_splits(
  image_ids: np.ndarray,
  shared: np.ndarray | None,
  *,
  val_fraction: float,
  test_fraction: float,
  seed: int,
) -> tuple[np.ndarray, str]:
  """(n,) 0/1/2 per image and the rule: NSD's shared images present -> test, the rest a
  seeded train/val split; without sharedix (or none present) a seeded test share."""
  split = np.zeros(len(image_ids), np.int8)
  test = np.zeros(len(image_ids), bool) if shared is None else np.isin(image_ids, shared - 1)
  if test.any():
    rest = np.flatnonzero(~test)
    split[test] = 2
    split[rest] = image_records.split_assignment(
      len(rest), (round(1.0 - val_fraction, 12), val_fraction, 0.0), seed
    )
    rule = (
      f"by image: NSD shared images present -> test ({int(test.sum())}); the rest: val "
      f"{val_fraction}, seed {seed}"
    )
  else:
    fractions = (round(1.0 - val_fraction - test_fraction, 12), val_fraction, test_fraction)
    split[:] = image_records.split_assignment(len(image_ids), fractions, seed)
    why = "no sharedix in the design" if shared is None else "no shared image among the trials"
    rule = f"by image ({why}): val {val_fraction}, test {test_fraction}, seed {seed}"
  return split, rule


# ------------------------------------------------------------------------------------------
# The importer.
# ------------------------------------------------------------------------------------------
def import_nsd_betas(
  betas_dir: str,
  out: str,
  *,
  design: str,
  stimuli: str,
  roi: str,
  subject: int,
  sessions: str | None = None,
  size: int | None = DEFAULT_SIZE,
  key: str = NSD_KEY,
  scale: float = BETA_SCALE,
  val_fraction: float = 0.1,
  test_fraction: float = 0.1,
  split_seed: int = 0,
  overwrite: bool = False,
  name: str | None = None,
) -> str:
  """NSD betas of one subject -> a trials dataset (see the module docstring). Every input is
  checked (design, mask, each session's header, trial -> image) before any beta is read."""
  from boldjax.data import trial_records

  if not (scale > 0 and np.isfinite(scale)):
    raise InputError(f"--scale: field 'scale' expected a number > 0 (NSD: 300), found {scale}")
  if size is not None and size < 0:
    raise InputError(f"--size: field 'size' expected pixels >= 0 (0 = as stored), found {size}")
  if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
    raise InputError(
      f"--val-fraction/--test-fraction: field 'fractions' expected two fractions >= 0 with a "
      f"sum < 1, found {val_fraction} and {test_fraction}"
    )
  store.check_new_dir(out, overwrite, "nsd_betas")  # before hours of reading
  spec = load_design(design)
  available = find_sessions(betas_dir)
  chosen = parse_sessions(sessions, available, betas_dir)
  mask = load_roi(roi)
  brick_rows, brick_shape = open_brick(stimuli, key)
  files = {s: available[s] for s in chosen}
  ten_k, nsd = trial_stimuli(spec, subject, chosen, files, stimuli, brick_rows)
  readers = [SessionFile(s, files[s], mask) for s in chosen]
  image_ids, trial_index = np.unique(nsd, return_inverse=True)
  split, rule = image_splits(
    image_ids, spec.sharedix, val_fraction=val_fraction, test_fraction=test_fraction,
    seed=split_seed,
  )  # fmt: skip
  n_trials, n_vox = len(nsd), len(mask.ijk)
  print(
    f"[prepare] nsd_betas: subject {subject}, {len(chosen)} sessions, {n_trials} trials of "
    f"{len(image_ids)} images, {n_vox} ROI voxels; split {np.bincount(split, minlength=3)} "
    f"images (train/val/test)",
    flush=True,
  )
  scratch = tempfile.mkdtemp(prefix="boldjax-nsd-betas-")
  images = BrickImages(stimuli, key, image_ids)
  try:
    betas = np.lib.format.open_memmap(
      os.path.join(scratch, "betas.npy"), mode="w+", dtype=np.float32, shape=(n_trials, n_vox)
    )
    for n, reader in enumerate(readers):
      start = time.monotonic()
      betas[n * TRIALS_PER_SESSION : (n + 1) * TRIALS_PER_SESSION] = reader.read(scale)
      print(
        f"[prepare] nsd_betas: session {reader.session:02d} ({os.path.basename(reader.path)}) "
        f"{n + 1}/{len(readers)}: {TRIALS_PER_SESSION} trials in {time.monotonic() - start:.1f}s",
        flush=True,
      )
    betas.flush()
    session_of = np.repeat(np.asarray(chosen, np.int64), TRIALS_PER_SESSION)
    trial_in_session = np.tile(np.arange(1, TRIALS_PER_SESSION + 1), len(chosen))

    def write_trials(path: str) -> None:
      np.savez(
        path, session=session_of, trial_in_session=trial_in_session,
        masterordering_index=(session_of - 1) * TRIALS_PER_SESSION + trial_in_session,
        index_10k=ten_k, nsd_id=nsd,
      )  # fmt: skip

    voxels = {
      "ijk": mask.ijk,
      "affine": mask.affine,
      "volume_shape": np.asarray(mask.values.shape, np.int64),
      "roi_value": mask.values[tuple(mask.ijk.T)].astype(np.int64),
    }
    meta = {
      "name": name or f"nsd_subj{subject:02d}",
      "source": {
        "importer": "nsd_betas",
        "betas_dir": os.path.abspath(betas_dir),
        "files": [os.path.basename(files[s]) for s in chosen],
        "design": os.path.abspath(design),
        "stimuli": os.path.abspath(stimuli),
        "stimuli_key": key,
        "brick_shape": list(brick_shape),
        "roi": os.path.abspath(roi),
      },
      "subject": subject,
      "sessions": chosen,
      "beta_units": f"percent signal change (stored / {scale:g})",
      "image_id": "NSD 73k id, 0-based (brick row)",
      "image_split_rule": rule,  # write_trial_dataset owns split_rule
    }
    return trial_records.write_trial_dataset(
      out,
      images,
      image_ids,
      betas,
      image_ids[trial_index.reshape(-1)],
      image_split=split,
      voxels=voxels,
      size=size or None,
      meta=meta,
      extra_files={"nsd_trials.npz": write_trials},
      overwrite=overwrite,
    )
  finally:
    images.close()
    shutil.rmtree(scratch, ignore_errors=True)


@registry.register("importer", "nsd_betas")
class NsdBetasImporter:
  help = "NSD single-trial betas (NIfTI/HDF5) + ROI mask + nsd_expdesign.mat + stimulus brick"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="BETAS_DIR with betas_sessionNN.nii.gz or .hdf5")
    parser.add_argument("--design", required=True, help="nsd_expdesign.mat")
    parser.add_argument("--stimuli", required=True, help="nsd_stimuli.hdf5 (imgBrick)")
    parser.add_argument("--roi", required=True, help="ROI mask NIfTI in the betas' space (> 0 in)")
    parser.add_argument("--subject", type=int, required=True, help="NSD subject 1..8")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--sessions", default=None, help="e.g. 1-3,5 (default: all found)")
    parser.add_argument(
      "--size", type=int, default=DEFAULT_SIZE,
      help=f"stored image side (default {DEFAULT_SIZE}; 0 = as stored, 425)",
    )  # fmt: skip
    parser.add_argument("--key", default=NSD_KEY, help="the brick's dataset name")
    parser.add_argument("--scale", type=float, default=BETA_SCALE, help="betas are stored x this")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="of non-test images")
    parser.add_argument(
      "--test-fraction", type=float, default=0.1, help="of images, only without sharedix"
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="dataset name in meta.json")

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    return import_nsd_betas(
      args.input,
      args.out,
      design=args.design,
      stimuli=args.stimuli,
      roi=args.roi,
      subject=args.subject,
      sessions=args.sessions,
      size=args.size,
      key=args.key,
      scale=args.scale,
      val_fraction=args.val_fraction,
      test_fraction=args.test_fraction,
      split_seed=args.split_seed,
      overwrite=args.overwrite,
      name=args.name,
    )
