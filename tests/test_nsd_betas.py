"""NSD betas importer: a small layout in NSD's formats (750-trial sessions of a 6 x 5 x 4
volume as .nii.gz, .hdf5 and .nii; a labelled ROI mask; nsd_expdesign.mat; an imgBrick)
round-trips exactly; each bad input is refused with one line naming the file and field."""

from __future__ import annotations

import os
import tempfile

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from boldjax import prepare
from boldjax.data import image_records, trial_records
from boldjax.data.importers import nsd_betas
from tests.cli_helpers import prepare_refuses

SHAPE = (6, 5, 4)
TRIALS = nsd_betas.TRIALS_PER_SESSION
BRICK = 20  # images in the stimulus brick
SIDE = 32
SUBJECT = 2
AFFINE = np.array([[-1.8, 0, 0, 50.0], [0, 1.8, 0, -60.0], [0, 0, 1.8, -20.0], [0, 0, 0, 1]])
FORMATS = {1: "nii.gz", 2: "hdf5", 3: "nii"}


def _save_nifti(path, data, affine=AFFINE):
  nib.save(nib.Nifti1Image(data, affine), str(path))


def _save_betas(folder, session, raw, fmt):
  """raw (X, Y, Z, 750) in NSD's layout: NIfTI as is; HDF5 'betas' as h5py reads MATLAB's
  X x Y x Z x 750, i.e. every axis reversed."""
  path = folder / f"betas_session{session:02d}.{fmt}"
  if fmt == "hdf5":
    with h5py.File(path, "w") as f:
      f.create_dataset("betas", data=np.transpose(raw, (3, 2, 1, 0)))
  else:
    _save_nifti(path, raw)
  return path


def _layout(root, formats=FORMATS, seed=0):
  """BETAS_DIR, design, brick and ROI of subject SUBJECT; returns (argv, truth)."""
  rng = np.random.default_rng(seed)
  betas_dir = root / "betas"
  betas_dir.mkdir()
  brick = rng.integers(0, 256, (BRICK, SIDE, SIDE, 3), dtype=np.uint8)
  with h5py.File(root / "nsd_stimuli.hdf5", "w") as f:
    f.create_dataset("imgBrick", data=brick)
  used_10k = rng.choice(10000, 12, replace=False) + 1  # 1-based 10k indices shown
  used_73k = rng.choice(BRICK, 12, replace=False) + 1  # their 1-based 73k ids
  subjectim = rng.integers(BRICK + 1, 73001, (8, 10000))  # other entries: past the brick
  subjectim[SUBJECT - 1, used_10k - 1] = used_73k
  order = rng.integers(1, 10001, 30000)
  order[: TRIALS * len(formats)] = rng.choice(used_10k, TRIALS * len(formats))
  shared = np.concatenate([used_73k[:3], rng.choice(np.arange(BRICK + 1, 73001), 997)])
  design = {"masterordering": order[None], "subjectim": subjectim, "sharedix": shared[None]}
  scipy.io.savemat(root / "nsd_expdesign.mat", design)
  roi = rng.choice([-1, 0, 1, 2, 3], SHAPE, p=[0.2, 0.3, 0.2, 0.2, 0.1]).astype(np.int16)
  _save_nifti(root / "nsdgeneral.nii.gz", roi)
  raw = {}
  for s, fmt in formats.items():
    raw[s] = rng.integers(-3000, 3000, (*SHAPE, TRIALS), dtype=np.int16)
    _save_betas(betas_dir, s, raw[s], fmt)
  argv = [
    "nsd_betas", betas_dir, f"--design={root / 'nsd_expdesign.mat'}",
    f"--stimuli={root / 'nsd_stimuli.hdf5'}", f"--roi={root / 'nsdgeneral.nii.gz'}",
    f"--subject={SUBJECT}",
  ]  # fmt: skip
  truth = {"brick": brick, "roi": roi, "raw": raw, "design": design, "dir": betas_dir}
  return argv, truth


def _expected(truth, sessions):
  """(T, V) float32 betas / 300, (T,) 0-based 73k ids, ijk, computed here from the files'
  arrays."""
  ijk = np.argwhere(truth["roi"] > 0)
  betas = np.concatenate(
    [truth["raw"][s][tuple(ijk.T)].T.astype(np.float32) / np.float32(300) for s in sessions]
  )
  order = truth["design"]["masterordering"][0]
  trials = np.concatenate([order[(s - 1) * TRIALS : s * TRIALS] for s in sessions])
  ids = truth["design"]["subjectim"][SUBJECT - 1, trials - 1] - 1
  return betas, ids, ijk


def test_round_trip_betas_images_split(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
  (tmp_path / "scratch").mkdir()
  argv, truth = _layout(tmp_path)
  out = prepare.main([*map(str, argv), f"--out={tmp_path / 'ds'}", "--size=16"])
  assert os.listdir(tmp_path / "scratch") == []  # the memory-mapped betas are gone
  ds = trial_records.open_trials(out)
  want, ids, ijk = _expected(truth, [1, 2, 3])
  assert ds.meta["sessions"] == [1, 2, 3] and ds.meta["subject"] == SUBJECT
  assert ds.meta["source"]["files"] == [f"betas_session0{s}.{f}" for s, f in FORMATS.items()]
  assert ds.num_voxels == len(ijk) and ds.meta["num_trials"] == 3 * TRIALS
  vox = ds.voxels()
  np.testing.assert_array_equal(vox["ijk"], ijk)
  np.testing.assert_array_equal(vox["roi_value"], truth["roi"][tuple(ijk.T)])
  np.testing.assert_array_equal(vox["volume_shape"], SHAPE)
  np.testing.assert_allclose(vox["affine"], AFFINE)
  # split by image: the shared images present are the test set; train/val disjoint
  shared = truth["design"]["sharedix"][0] - 1
  split_ids = {s: set(ds.index(s)["image_id"].tolist()) for s in image_records.SPLITS}
  assert split_ids["test"] == set(ids.tolist()) & set(shared.tolist()) and split_ids["test"]
  assert not split_ids["train"] & split_ids["val"] and split_ids["val"]
  assert split_ids["train"] | split_ids["val"] | split_ids["test"] == set(ids.tolist())
  # z-scoring from the train trials only, computed here
  train = ds.index("train")["trial"]
  assert sorted(train.tolist()) == np.flatnonzero(np.isin(ids, list(split_ids["train"]))).tolist()
  mean, std = want[train].astype(np.float64).mean(0), want[train].astype(np.float64).std(0)
  np.testing.assert_allclose(vox["mean"], mean, rtol=1e-6)
  np.testing.assert_allclose(vox["std"], std, rtol=1e-6)
  seen = []
  for split in image_records.SPLITS:
    index = ds.index(split)
    seen += index["trial"].tolist()
    np.testing.assert_array_equal(index["image_id"], ids[index["trial"]])
    zs = ((want[index["trial"]].astype(np.float64) - mean) / std).astype(np.float16)
    np.testing.assert_array_equal(ds.betas(split), zs.astype(np.float32))
    image_ids = ds.images.image_ids(split)
    assert set(image_ids.tolist()) == split_ids[split]
    pixels = [image_records.resize_image(truth["brick"][i], 16) for i in image_ids]
    np.testing.assert_array_equal(ds.images.images(split), np.stack(pixels))
  assert sorted(seen) == list(range(3 * TRIALS))  # every trial once: repeats kept
  with np.load(os.path.join(out, "nsd_trials.npz")) as z:
    np.testing.assert_array_equal(z["session"], np.repeat([1, 2, 3], TRIALS))
    np.testing.assert_array_equal(z["trial_in_session"], np.tile(np.arange(1, TRIALS + 1), 3))
    np.testing.assert_array_equal(z["nsd_id"], ids)


def test_sessions_flag_and_formats_agree(tmp_path):
  argv, truth = _layout(tmp_path)
  out = prepare.main([*map(str, argv), f"--out={tmp_path / 'ds'}", "--size=0", "--sessions=2-3"])
  ds = trial_records.open_trials(out)
  assert ds.meta["sessions"] == [2, 3] and ds.meta["num_trials"] == 2 * TRIALS
  assert ds.meta["image_size"] == [SIDE, SIDE]
  want, ids, _ = _expected(truth, [2, 3])
  index = ds.index("train")
  np.testing.assert_array_equal(index["image_id"], ids[index["trial"]])
  vox = ds.voxels()
  zs = (want[index["trial"]].astype(np.float64) - vox["mean"]) / vox["std"]
  np.testing.assert_allclose(ds.betas("train"), zs, atol=2e-3 * np.abs(zs).max())
  # one session as .hdf5 and as .nii.gz reads the same betas
  roi = nsd_betas.load_roi(str(tmp_path / "nsdgeneral.nii.gz"))
  raw = truth["raw"][1]
  nii = _save_betas(tmp_path, 1, raw, "nii.gz")
  h5 = _save_betas(tmp_path, 1, raw, "hdf5")
  a = nsd_betas.SessionFile(1, str(nii), roi).read(300.0)
  b = nsd_betas.SessionFile(1, str(h5), roi).read(300.0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, raw[tuple(roi.ijk.T)].T.astype(np.float32) / np.float32(300))


def test_without_sharedix_a_seeded_test_share(tmp_path):
  argv, truth = _layout(tmp_path, formats={1: "hdf5"})
  design = dict(truth["design"])
  del design["sharedix"]
  scipy.io.savemat(tmp_path / "nsd_expdesign.mat", design)
  out = prepare.main([*map(str, argv), f"--out={tmp_path / 'ds'}", "--size=8",
                      "--test-fraction=0.25", "--val-fraction=0.25"])  # fmt: skip
  ds = trial_records.open_trials(out)
  assert ds.meta["split_images"] == {"train": 6, "val": 3, "test": 3}
  assert "no sharedix" in ds.meta["image_split_rule"]


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _break(root, truth, case):
  """Damage the layout one way; return extra argv."""
  betas = truth["dir"]
  design = dict(truth["design"])
  if case == "mask_shape":
    _save_nifti(root / "nsdgeneral.nii.gz", truth["roi"][:, :, :3])
  elif case == "mask_affine":
    _save_nifti(root / "nsdgeneral.nii.gz", truth["roi"], np.diag([2.0, 2.0, 2.0, 1.0]))
  elif case == "mask_shape_hdf5":
    os.remove(betas / "betas_session01.nii.gz")
    os.remove(betas / "betas_session03.nii")
    _save_nifti(root / "nsdgeneral.nii.gz", truth["roi"][:5])
  elif case in ("past_subjectim", "past_brick"):
    order = design["masterordering"].copy()
    if case == "past_subjectim":
      order[0, TRIALS + 4] = 10001  # trial 5 of session 2
      design["masterordering"] = order
    else:
      fresh = int(np.setdiff1d(np.arange(1, 10001), order[0, : 3 * TRIALS])[0])
      order[0, 2 * TRIALS + 9] = fresh  # trial 10 of session 3 shows a new 10k index ...
      subjectim = design["subjectim"].copy()
      subjectim[SUBJECT - 1, fresh - 1] = BRICK + 1  # ... whose 73k id is past the brick
      design["masterordering"], design["subjectim"] = order, subjectim
    scipy.io.savemat(root / "nsd_expdesign.mat", design)
  elif case in ("nan_nifti", "nan_hdf5"):
    raw = truth["raw"][3 if case == "nan_nifti" else 2].astype(np.float32)
    i, j, k = np.argwhere(truth["roi"] > 0)[:2].T
    raw[i, j, k, 6] = np.nan  # trial 7, 2 ROI voxels
    session, fmt = (3, "nii") if case == "nan_nifti" else (2, "hdf5")
    _save_betas(betas, session, raw, fmt)
  elif case == "truncated_brick":
    _truncate(root / "nsd_stimuli.hdf5")
  elif case == "truncated_betas_hdf5":
    _truncate(betas / "betas_session02.hdf5")
  elif case == "truncated_betas_nifti":
    _truncate(betas / "betas_session01.nii.gz")
  elif case == "trial_count":
    _save_betas(betas, 3, truth["raw"][3][..., :749], "nii")
  elif case == "trial_count_hdf5":
    _save_betas(betas, 2, truth["raw"][2][..., 1:], "hdf5")
  elif case == "missing_design_field":
    del design["subjectim"]
    scipy.io.savemat(root / "nsd_expdesign.mat", design)
  elif case == "short_masterordering":
    design["masterordering"] = design["masterordering"][:, : 2 * TRIALS + 100]
    scipy.io.savemat(root / "nsd_expdesign.mat", design)
  elif case == "missing_session":
    return ["--sessions=2-4"]
  elif case == "subject":
    return ["--subject=9"]
  return []


@pytest.mark.parametrize(
  "case, match",
  [
    ("mask_shape", r"nsdgeneral\.nii\.gz: field 'shape' expected the grid of \S*"
                   r"betas_session01\.nii\.gz \(\(6, 5, 4\)\), found \(6, 5, 3\)"),
    ("mask_affine", r"nsdgeneral\.nii\.gz: field 'affine' expected the grid of \S*"
                    r"betas_session01\.nii\.gz \(\[\[-1\.8, .*found \[\[2\.0,"),
    ("mask_shape_hdf5", r"nsdgeneral\.nii\.gz: field 'shape' expected the grid of \S*"
                        r"betas_session02\.hdf5 \(\(750, Z, Y, X\) = \(750, 4, 5, 6\), reversed\), "
                        r"found \(5, 5, 4\)"),
    ("past_subjectim", r"nsd_expdesign\.mat: field 'masterordering' expected 10k indices in "
                       r"1\.\.10000 \(columns of subjectim\), found 10001 at trial 5 of session 2"),
    ("past_brick", r"nsd_expdesign\.mat: field 'subjectim' expected 73k ids in 1\.\.20 \(rows of "
                   r"\S*nsd_stimuli\.hdf5\), found 21 for 10k index \d+ at trial 10 of session 3"),
    ("nan_nifti", r"betas_session03\.nii: trial 7 field 'betas' expected finite values, found 2 "
                  r"NaN/Inf of \d+ ROI voxels"),
    ("nan_hdf5", r"betas_session02\.hdf5: trial 7 field 'betas' expected finite values, found 2 "
                 r"NaN/Inf"),
    ("truncated_brick", r"nsd_stimuli\.hdf5: field 'file' expected an HDF5 file, found .*"
                        r"truncated"),
    ("truncated_betas_hdf5", r"betas_session02\.hdf5: field 'betas' expected a complete beta "
                             r"file, found a truncated or corrupt file"),
    ("truncated_betas_nifti", r"betas_session01\.nii\.gz: field 'betas' expected a complete beta "
                              r"file, found a truncated or corrupt file"),
    ("trial_count", r"betas_session03\.nii: field 'trials' expected 750 per NSD session, "
                    r"found 749"),
    ("trial_count_hdf5", r"betas_session02\.hdf5: "
                         r"field 'trials' expected 750 per NSD session, found 749"),
    ("missing_design_field", r"nsd_expdesign\.mat: field 'subjectim' expected a \(subjects, "
                             r"10000\) array of 1-based 73k ids, found none"),
    ("short_masterordering", r"nsd_expdesign\.mat: field 'masterordering' expected trials of "
                             r"session 3 \(1501\.\.2250\), found 1600 trials"),
    ("missing_session", r"betas: field 'sessions' expected betas_session04\.nii\.gz or \.hdf5 "
                        r"\(--sessions=2-4\), found sessions \[1, 2, 3\]"),
    ("subject", r"nsd_expdesign\.mat: field 'subjectim' expected a row for --subject=9, found 8"),
  ],
)  # fmt: skip
def test_refusals_name_file_and_field(tmp_path, capsys, monkeypatch, case, match):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
  (tmp_path / "scratch").mkdir()
  argv, truth = _layout(tmp_path)
  extra = _break(tmp_path, truth, case)
  out = tmp_path / "out"
  prepare_refuses(capsys, [*argv, f"--out={out}", "--size=8", *extra], match, out)
  assert os.listdir(tmp_path / "scratch") == []
  assert [p for p in os.listdir(tmp_path) if p.startswith("out")] == []


def test_feeds_the_trials_pipeline(tmp_path):
  """The fmri2img pipeline reads the prepared folder: eval rows average each test image's
  repeats and carry its brick image."""
  from boldjax.data import fmri2img_pipeline

  argv, truth = _layout(tmp_path, formats={1: "nii.gz"})
  out = prepare.main([*map(str, argv), f"--out={tmp_path / 'ds'}", "--size=16"])
  cfg = fmri2img_pipeline.default_config()
  cfg.source, cfg.path = "trials", out
  info = fmri2img_pipeline.prepare(cfg)
  assert info.num_voxels == int((truth["roi"] > 0).sum()) and info.image_size == 16
  ds = trial_records.open_trials(out)
  stored, index = ds.betas("test"), ds.index("test")
  batches = fmri2img_pipeline.make_dataset(
    cfg, info, split="test", train=False, seed=0, batch_size=4
  )
  rows = 0
  for batch in batches:
    for fmri, image, image_id in zip(
      batch["fmri"][batch["valid"]], batch["image"][batch["valid"]],
      batch["image_id"][batch["valid"]], strict=True,
    ):  # fmt: skip
      rows += 1
      mean = stored[index["image_id"] == image_id].mean(0)
      np.testing.assert_allclose(fmri, mean, rtol=1e-5, atol=1e-5)
      pixels = image_records.resize_image(truth["brick"][image_id], 16)
      np.testing.assert_allclose(image, pixels / 127.5 - 1.0, atol=1e-6)
  assert rows == ds.meta["split_images"]["test"] == 3
