"""Fuzzed importers (issue 15.5): valid inputs of every format, then mutated.

The property, for `python -m boldjax.prepare FORMAT ...` run as the command runs it
(cli.run_argparse): the import either succeeds and the dataset reads back equal to the input
within the stored precision (float16 / float32 bold: within one unit in the last place of the
stored value; parcel means of NIfTI / CIFTI likewise; NSD-Flat's uint8 maps exactly), or it
exits 2 with one stderr line that names the input file and what was expected; never another
exception, never an output or `*.tmp-*` folder left behind. Mutations that make an input
invalid (NaN, truncation, missing keys, ...) must be refused.

Finite values that overflow the stored dtype (1e38 in a float16 dataset) are refused with the
field named (store float32 with --dtype=float32, or rescale): silently writing inf would turn
good input into NaN losses far away from the cause.

Examples per importer come from the hypothesis profile (tests/conftest.py): "ci" is
derandomized and small, `--hypothesis-profile=long` runs 10x as many, randomized.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from boldjax import checkpoint, cli, config_utils, prepare
from boldjax.data import importers, records
from tests.run_helpers import read_bold_runs

PROG = prepare.PROG
NAMES = ("in", "dätä ü", "a b", "x..y", "日本", "sub-07 scan")  # file names (no extension)
SUBJECTS = ("sub-01", "../up", "a/b", "ünï cødé", " sp ace ", "..", "7", "sub-x/../y")


def _examples(fraction: float = 1.0) -> settings:
  """This importer's share of the loaded profile's max_examples (slower formats get less)."""
  return settings(max_examples=max(1, int(settings().max_examples * fraction)))


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
  """A fresh folder per example (tmp_path is per test, not per example)."""
  d = Path(tempfile.mkdtemp(prefix="boldjax-fuzz-"))
  try:
    yield d
  finally:
    shutil.rmtree(d, ignore_errors=True)


def _norm(text: str) -> str:
  return " ".join(str(text).split())


def run_prepare(argv: list, out: Path, inputs: list, must_fail: bool = False) -> str | None:
  """The command on argv: the output path on success, None on a clean refusal (checked)."""
  err, so = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
    try:
      cli.run_argparse(PROG, prepare.main, [str(a) for a in argv])
    except SystemExit as e:
      code = e.code
  left = glob.glob(os.path.join(glob.escape(str(out.parent)), "*.tmp-*"))
  assert not left, f"temporary folders left behind: {left}"
  if code == 0:
    assert not must_fail, f"imported a bad input without complaint: {argv}"
    assert out.is_dir()
    event(f"{argv[0]}: imported")
    return str(out)
  text = err.getvalue()
  lines = [line for line in text.splitlines() if line.strip()]
  assert code == cli.EXIT_BAD_INPUT and len(lines) == 1, text[-3000:]
  line = lines[0]
  assert line.startswith(f"{PROG}: error: ") and "Traceback" not in text, line
  assert any(_norm(os.path.basename(str(p))) in line for p in inputs), f"no file named: {line}"
  assert re.search(r"field|column|expected|missing", line), f"no field named: {line}"
  assert not out.exists(), f"{out} left behind by a refused import"
  event(f"{argv[0]}: refused")
  return None


def assert_stored(got: np.ndarray, want: np.ndarray, dtype: str, where: str) -> None:
  """got (stored as dtype) equals want within one unit in the last place of dtype."""
  want = np.asarray(want, np.float64)
  got = np.asarray(got)
  assert got.dtype == np.dtype(dtype) and got.shape == want.shape, (where, got.dtype, got.shape)
  ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
  bad = np.abs(got.astype(np.float64) - want) > ulp
  assert not bad.any(), f"{where}: {got[bad][:5]} != {want[bad][:5]} ({dtype})"


def _fits(x: np.ndarray, dtype: str) -> bool:
  """x (finite) survives the cast to dtype (and the float32 of parcel means) without inf."""
  x = np.asarray(x, np.float64)
  with np.errstate(over="ignore"):
    return bool(np.isfinite(x.astype(np.float32)).all() and np.isfinite(x.astype(dtype)).all())


_read_bold = read_bold_runs


def _truncate(path: Path, data: st.DataObject) -> int:
  """Cut the file at a drawn byte; returns the cut."""
  raw = path.read_bytes()
  cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
  path.write_bytes(raw[:cut])
  return cut


def _tar_complete_below(path: Path) -> int:
  """Bytes a tar needs to be complete: its members plus the two end-of-archive blocks (the
  rest is padding to the 10 KiB record size, which readers do not need)."""
  with tarfile.open(path) as tar:
    for _ in tar:
      pass
    return tar.offset + 1024


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
  """x as float64 times factor (inf where that overflows: input to be refused)."""
  with np.errstate(over="ignore"):
    return x.astype(np.float64) * factor


def _values(data: st.DataObject, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
  """Random values at a drawn scale (tiny .. near the float16 limit .. 1e38)."""
  seed = data.draw(st.integers(0, 2**16), label="seed")
  scale = data.draw(st.sampled_from([1.0, 1e-30, 1e3, 3e4, 6.6e4, 1e38]), label="scale")
  x = np.random.default_rng(seed).standard_normal(shape) * scale
  with np.errstate(over="ignore"):  # 1e38 as float16 is inf: input the importer must refuse
    return np.clip(x, -3e38, 3e38).astype(dtype)


def _mutation(data: st.DataObject, mutations: tuple[str, ...], valid: tuple[str, ...]) -> str:
  """A mutation; one draw in three keeps the input valid, so that imports get compared too."""
  pool = valid if data.draw(st.integers(0, 2), label="valid?") == 0 else mutations
  return data.draw(st.sampled_from(pool), label="mutation")


def _common(data: st.DataObject, out: Path) -> tuple[list[str], str]:
  dtype = data.draw(st.sampled_from(["float16", "float32"]), label="dtype")
  return [f"--out={out}", f"--dtype={dtype}", "--seq-min=2"], dtype


# ------------------------------------------------------------------------------------------
# webdataset: learning-from-brains (.pyd pickles)
# ------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _npy(x: np.ndarray, allow_pickle: bool = False) -> bytes:
  buf = io.BytesIO()
  np.save(buf, x, allow_pickle=allow_pickle)
  return buf.getvalue()


LFB_MUTATIONS = (
  "none", "nan", "inf", "huge", "float64", "int", "str", "ndim1", "ndim3", "empty_t", "empty_r",
  "short", "wrong_r", "not_array", "bad_pickle", "no_tr", "bad_tr", "bad_label", "no_bold",
  "truncate", "path_keys",
)  # fmt: skip
BAD_TRS = (None, "abc", -1.0, 0.0, math.nan, math.inf, [2.0, 2.0], 1e300, {})
BAD_LABELS = ("x", None, [1, 2], 1.5, -5, 2**40, math.nan, {"a": 1})


@given(st.data())
@_examples(1.0)
def test_fuzz_webdataset_lfb(data):
  mutation = _mutation(data, LFB_MUTATIONS, ("none", "huge", "float64", "path_keys"))
  n_runs = data.draw(st.integers(1, 3), label="runs")
  r = data.draw(st.integers(1, 4), label="R")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    runs = []
    for k in range(n_runs):
      key = f"ds_sub-{k}_run-1"
      if mutation == "path_keys":
        key = data.draw(st.sampled_from(["d/sub-1_x", "../sub-2_ü run", "a b/sub-3", "é"]))
        key = f"{key}{k}"
      t = data.draw(st.integers(2, 6), label="T")
      runs.append([key, _values(data, (t, r)), 2.0, k % 3])
    bad = data.draw(st.integers(0, n_runs - 1), label="bad run")
    bold = runs[bad][1]
    must_fail = mutation not in ("none", "huge", "float64", "path_keys")
    if mutation in ("nan", "inf"):
      bold[data.draw(st.integers(0, bold.shape[0] - 1)), 0] = (
        np.nan if mutation == "nan" else np.inf
      )
    elif mutation == "huge":
      bold[0, 0] = 1e38
    elif mutation == "float64":
      runs[bad][1] = _scaled(bold, data.draw(st.sampled_from([1.0, 1e300])))
    elif mutation == "int":
      with np.errstate(invalid="ignore"):
        runs[bad][1] = bold.astype(np.int32)
    elif mutation == "str":
      runs[bad][1] = bold.astype(str)
    elif mutation == "ndim1":
      runs[bad][1] = bold.ravel()
    elif mutation == "ndim3":
      runs[bad][1] = bold[None]
    elif mutation == "empty_t":
      runs[bad][1] = bold[:0]
    elif mutation == "empty_r":
      for run in runs:
        run[1] = run[1][:, :0]
    elif mutation == "short":
      runs[bad][1] = bold[:1]
    elif mutation == "wrong_r":
      if n_runs == 1:
        runs.append(["ds_sub-9_run-1", np.zeros((4, r + 1), np.float32), 2.0, 0])
      else:
        runs[bad][1] = np.zeros((4, r + 1), np.float32)
    elif mutation == "not_array":
      runs[bad][1] = data.draw(st.sampled_from([None, "text", {"a": 1}, 3.0]))
    elif mutation == "bad_tr":
      runs[bad][2] = data.draw(st.sampled_from(BAD_TRS), label="tr")
    elif mutation == "bad_label":
      runs[bad][3] = data.draw(st.sampled_from(BAD_LABELS), label="label")
    name = data.draw(st.sampled_from(NAMES), label="file") + ".tar"
    tar_path = d / name
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
      for i, (key, x, tr, label) in enumerate(runs):
        payload = pickle.dumps(x)
        if mutation == "bad_pickle" and i == bad:
          payload = payload[: data.draw(st.integers(0, len(payload) - 1))] + b"\x00garbage"
        if not (mutation == "no_bold" and i == bad):
          _add(tar, f"{key}.bold.pyd", payload)
        if not (mutation == "no_tr" and i == bad):
          _add(tar, f"{key}.t_r.pyd", pickle.dumps(tr))
        _add(tar, f"{key}.task_label.pyd", pickle.dumps(label))
    if mutation == "truncate":
      complete = _tar_complete_below(tar_path)
      must_fail = _truncate(tar_path, data) < complete
    argv = ["webdataset", tar_path, "--allow-pickle", *common]
    got = run_prepare(argv, out, [tar_path], must_fail)
    if got is None:
      return
    assert all(_fits(run[1], dtype) for run in runs), "overflowing values were stored"
    ds, recs = _read_bold(got)
    assert ds.meta["num_parcels"] == r and len(recs) == len(runs)
    for key, x, tr, label in runs:
      rec = recs[key]
      assert_stored(rec["bold"], x, dtype, key)
      assert rec["tr"] == tr and rec["label"] == label
      assert rec["subject"] == importers.common.subject_of(
        key, importers.common.subject_of(str(tar_path), name[:-4])
      )


# ------------------------------------------------------------------------------------------
# webdataset: CortexMAE (.npy + JSON)
# ------------------------------------------------------------------------------------------

CMAE_MUTATIONS = (
  "none", "nan", "huge", "int", "object_npy", "bad_npy", "no_meta", "meta_invalid",
  "meta_list", "meta_utf8", "bad_tr", "bad_n_frames", "bad_subject", "bad_events",
  "bad_stats", "only_mean", "truncate", "subjects",
)  # fmt: skip


@given(st.data())
@_examples(1.0)
def test_fuzz_webdataset_cortexmae(data):
  mutation = _mutation(data, CMAE_MUTATIONS, ("none", "subjects"))
  n_runs = data.draw(st.integers(1, 3), label="runs")
  r = data.draw(st.integers(1, 4), label="R")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    runs = []
    for k in range(n_runs):
      t = data.draw(st.integers(2, 5), label="T")
      subject = f"sub-{k}"
      if mutation == "subjects":
        subject = data.draw(st.sampled_from(SUBJECTS), label="subject") + str(k)
      meta = {"subject": subject, "tr": 0.8, "n_frames": t, "task": "wm"}
      events = [{"onset": 1.0, "duration": 2.0, "trial_type": "faces"}]
      stats = (np.zeros((1, r)), np.ones((1, r)))
      runs.append({"key": f"sub-{k}_task-wm", "bold": _values(data, (t, r), "float16"),
                   "meta": meta, "events": events, "stats": stats})  # fmt: skip
    bad = runs[data.draw(st.integers(0, n_runs - 1), label="bad run")]
    files = {"meta.json": json.dumps(bad["meta"]).encode()}
    must_fail = mutation not in ("none", "huge", "subjects")
    if mutation == "nan":
      bad["bold"][-1, 0] = np.nan
    elif mutation == "huge":
      bad["bold"] = bad["bold"].astype(np.float32)
      bad["bold"][0, 0] = 1e38
    elif mutation == "int":
      with np.errstate(invalid="ignore"):
        bad["bold"] = bad["bold"].astype(np.int16)
    elif mutation == "meta_invalid":
      files["meta.json"] = b'{"subject": "sub-0", "tr": '
    elif mutation == "meta_list":
      files["meta.json"] = json.dumps(data.draw(st.sampled_from([[1, 2], "s", 3, None]))).encode()
    elif mutation == "meta_utf8":
      files["meta.json"] = b'{"subject": "\xff\xfe"}'
    elif mutation == "bad_tr":
      bad["meta"]["tr"] = data.draw(st.sampled_from(["abc", None, -1, [1], {}, 0]), label="tr")
    elif mutation == "bad_n_frames":
      bad["meta"]["n_frames"] = data.draw(st.sampled_from(["x", 1.5, -1, 99, [3]]))
    elif mutation == "bad_subject":
      bad["meta"]["subject"] = data.draw(st.sampled_from(["", None, {"a": 1}, [1]]))
    elif mutation == "bad_events":
      bad["events"] = data.draw(
        st.sampled_from(
          [5, "x", [{"onset": "abc", "duration": 1, "trial_type": "a"}],
           {"onset": [1.0, 2.0], "duration": [1.0], "trial_type": ["a", "b"]},
           [{"onset": 1.0, "duration": 0.0, "trial_type": "a"}], [[1, 2, 3]],
           [{"onset": math.nan, "duration": 1.0, "trial_type": "a"}]]
        )
      )  # fmt: skip
    elif mutation == "bad_stats":
      bad["stats"] = data.draw(
        st.sampled_from([(np.zeros(r + 1), np.ones(r + 1)), (np.full(r, np.nan), np.ones(r))])
      )
    name = data.draw(st.sampled_from(NAMES), label="file") + ".tar"
    tar_path = d / name
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
      for run in runs:
        key = run["key"]
        own = {"meta.json": json.dumps(run["meta"]).encode()}
        if run is bad and not mutation.startswith("bad_"):
          own = files
        bold = _npy(run["bold"])
        if run is bad and mutation == "object_npy":
          bold = _npy(np.asarray([run["bold"], None], dtype=object), allow_pickle=True)
        elif run is bad and mutation == "bad_npy":
          bold = bold[: data.draw(st.integers(0, len(bold) - 1))]
        _add(tar, f"{key}.bold.npy", bold)
        if not (run is bad and mutation == "no_meta"):
          _add(tar, f"{key}.meta.json", own["meta.json"])
        _add(tar, f"{key}.events.json", json.dumps(run["events"]).encode())
        _add(tar, f"{key}.mean.npy", _npy(np.asarray(run["stats"][0])))
        if not (run is bad and mutation == "only_mean"):
          _add(tar, f"{key}.std.npy", _npy(np.asarray(run["stats"][1])))
    if mutation == "truncate":
      complete = _tar_complete_below(tar_path)
      must_fail = _truncate(tar_path, data) < complete
    if mutation == "bad_events" and isinstance(bad["events"], list) and len(bad["events"]) == 1:
      ev = bad["events"][0]
      must_fail = not (isinstance(ev, dict) and ev.get("onset") == 1.0)  # onset nan / 0 s
    got = run_prepare(["webdataset", tar_path, *common], out, [tar_path], must_fail)
    if got is None:
      return
    assert all(_fits(run["bold"], dtype) for run in runs), "overflowing values were stored"
    ds, recs = _read_bold(got)
    assert ds.meta["bold_is_zscored"] and len(recs) == len(runs)
    for run in runs:
      rec = recs[run["key"]]
      assert_stored(rec["bold"], run["bold"], dtype, run["key"])
      assert rec["subject"] == run["meta"]["subject"] and rec["tr"] == np.float32(0.8)
      np.testing.assert_array_equal(rec["block_onset_s"], [1.0])


# ------------------------------------------------------------------------------------------
# hdf5: one atlas, and the Semantoks three-atlas layout
# ------------------------------------------------------------------------------------------

H5_MUTATIONS = (
  "none", "nan_inside", "inf", "huge", "int", "float64", "empty_n", "empty_t", "empty_r",
  "ndim2", "all_nan_run", "no_subjects", "subjects_shape", "subject_empty", "subject_utf8",
  "subjects", "int_subjects", "bad_tr", "labels_shape", "labels_float", "labels_huge",
  "labels_negative", "ts_len", "truncate", "garbage",
)  # fmt: skip


@given(st.data())
@_examples(1.0)
def test_fuzz_hdf5_single_atlas(data):
  import h5py

  mutation = _mutation(data, H5_MUTATIONS, ("none", "int", "subjects", "int_subjects"))
  n = data.draw(st.integers(1, 4), label="N")
  r = data.draw(st.integers(1, 4), label="R")
  t_max = data.draw(st.integers(3, 7), label="T")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    x = _values(data, (n, r, t_max))
    lengths = [data.draw(st.integers(2, t_max), label="len") for _ in range(n)]
    for i, length in enumerate(lengths):
      x[i, :, length:] = np.nan
    subjects = [f"S{i // 2}" for i in range(n)]
    labels = np.asarray([i % 3 for i in range(n)])
    tr: object = 0.8
    ts_len = None
    must_fail = mutation not in ("none", "huge", "int", "float64", "subjects", "int_subjects")
    i = data.draw(st.integers(0, n - 1), label="row")
    if mutation == "nan_inside":
      x[i, 0, 0] = np.nan
    elif mutation == "inf":
      x[i, -1, 0] = -np.inf
    elif mutation == "huge":
      x[i, 0, 0] = 1e38
    elif mutation == "int":
      x = np.nan_to_num(x, nan=0.0).clip(-1000, 1000).astype(np.int16)
      lengths = [t_max] * n
    elif mutation == "float64":
      x = _scaled(x, data.draw(st.sampled_from([1.0, 1e300])))
    elif mutation == "empty_n":
      x, subjects, labels, lengths = x[:0], [], labels[:0], []
    elif mutation == "empty_t":
      x = x[:, :, :0]
    elif mutation == "empty_r":
      x = x[:, :0]
    elif mutation == "ndim2":
      x = x[:, 0]
    elif mutation == "all_nan_run":
      x[i] = np.nan
    elif mutation == "subjects_shape":
      subjects = subjects + ["extra"]
    elif mutation == "subject_empty":
      subjects[i] = ""
    elif mutation == "subjects":
      subjects = [data.draw(st.sampled_from(SUBJECTS), label="subject") for _ in range(n)]
    elif mutation == "bad_tr":
      tr = data.draw(st.sampled_from(["abc", -1.0, np.nan, np.zeros(0), np.inf]), label="tr")
    elif mutation == "labels_shape":
      labels = np.arange(n + 1)
    elif mutation == "labels_float":
      labels = labels + 0.5
    elif mutation == "labels_huge":
      labels = labels + 2**40
    elif mutation == "labels_negative":
      labels = labels - 7
    elif mutation == "ts_len":
      bad_lengths = [np.zeros(n), np.full(n, t_max + 1), np.asarray([b"a"] * n), np.full(n, 1.5)]
      ts_len = data.draw(st.sampled_from(bad_lengths))
    name = data.draw(st.sampled_from(NAMES), label="file") + ".h5"
    path = d / name
    with h5py.File(path, "w") as f:
      f.create_dataset("timeseries/aal", data=x)
      f["timeseries/aal"].attrs["tr"] = tr
      if mutation == "int_subjects":
        f.create_dataset("long_subject_id", data=np.arange(n) // 2)
      elif mutation == "subject_utf8":
        f.create_dataset("long_subject_id", data=np.asarray([b"\xff\xfe"] * n))
      elif mutation != "no_subjects":
        f.create_dataset("long_subject_id", data=np.asarray([s.encode() for s in subjects]))
      f.create_dataset("labels/state", data=labels)
      if ts_len is not None:
        f.create_dataset("ts_len", data=ts_len)
    if mutation == "truncate":
      _truncate(path, data)
    elif mutation == "garbage":
      path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    got = run_prepare(["hdf5", path, *common], out, [path], must_fail)
    if got is None:
      return
    want = [np.asarray(x[i, :, : lengths[i]], np.float64).T for i in range(n)]
    assert all(_fits(w, dtype) for w in want), "overflowing values were stored"
    ds, recs = _read_bold(got)
    assert len(recs) == n and ds.meta["num_parcels"] == r
    for i in range(n):
      rec = recs[str(i)]
      assert_stored(rec["bold"], want[i], dtype, f"row {i}")
      assert rec["label"] == labels[i] and rec["tr"] == np.float32(0.8)
      want_sub = str(np.arange(n)[i] // 2) if mutation == "int_subjects" else subjects[i]
      assert rec["subject"] == want_sub


SEMANTOKS_MUTATIONS = (
  "none", "drop_tian", "drop_buckner", "drop_both", "tail_mismatch", "nan_inside", "wrong_rois",
  "wrong_n", "huge", "int",
)  # fmt: skip


@given(st.data())
@_examples(0.5)
def test_fuzz_hdf5_semantoks(data):
  import h5py

  from boldjax.data import semantoks_layout as layout

  mutation = _mutation(data, SEMANTOKS_MUTATIONS, ("none", "drop_tian", "drop_both", "int"))
  n = data.draw(st.integers(1, 3), label="N")
  t_max = data.draw(st.integers(3, 6), label="T")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    x = _values(data, (n, layout.NUM_ROIS, t_max))
    lengths = [data.draw(st.integers(2, t_max), label="len") for _ in range(n)]
    for i, length in enumerate(lengths):
      x[i, :, length:] = np.nan
    drop = {"drop_tian": ("tian3",), "drop_buckner": ("buckner7",)}.get(mutation, ())
    drop = ("tian3", "buckner7") if mutation == "drop_both" else drop
    must_fail = mutation in ("tail_mismatch", "nan_inside", "wrong_rois", "wrong_n")
    i = data.draw(st.integers(0, n - 1), label="row")
    slices = layout.atlas_slices()
    if mutation == "tail_mismatch" and lengths[i] < t_max:
      x[i, slices["tian3"], lengths[i]] = 1.0
    elif mutation == "tail_mismatch":
      x[i, slices["tian3"], t_max - 1] = np.nan
    elif mutation == "nan_inside":
      x[i, slices["buckner7"].start + 1, 0] = np.nan
    elif mutation == "huge":
      x[i, 3, 0] = 1e38
    elif mutation == "int":
      x = np.nan_to_num(x, nan=0.0).clip(-1000, 1000).astype(np.int16)
      lengths = [t_max] * n
    name = data.draw(st.sampled_from(NAMES), label="file") + ".h5"
    path = d / name
    with h5py.File(path, "w") as f:
      for atlas, sl in slices.items():
        if atlas in drop:
          continue
        part = x[:, sl]
        if atlas == "tian3" and mutation == "wrong_rois":
          part = part[:, :-1]
        if atlas == "buckner7" and mutation == "wrong_n":
          part = np.concatenate([part, part[:1]])
        f.create_dataset(f"timeseries/{atlas}", data=part)
      f["timeseries"].attrs["tr"] = 2.0
      subjects = [f"sub-{i}" for i in range(n)]
      f.create_dataset("long_subject_id", data=np.asarray([s.encode() for s in subjects]))
      f.create_dataset("sex_bi", data=np.arange(n) % 2)
    got = run_prepare(["hdf5", path, *common], out, [path], must_fail)
    if got is None:
      return
    ds, recs = _read_bold(got)
    assert ds.meta["num_parcels"] == layout.NUM_ROIS and len(recs) == n
    for i in range(n):
      want = np.asarray(x[i, :, : lengths[i]], np.float64).T
      for atlas in drop:
        want[:, slices[atlas]] = 0.0
      assert _fits(want, dtype), "overflowing values were stored"
      assert_stored(recs[str(i)]["bold"], want, dtype, f"row {i}")


# ------------------------------------------------------------------------------------------
# nifti: tiny 4-D runs + a 3-D atlas
# ------------------------------------------------------------------------------------------

NIFTI_MUTATIONS = (
  "none", "nan", "inf", "huge", "float64", "int16", "ndim3", "atlas_4d", "atlas_fraction",
  "atlas_zero", "atlas_nan", "atlas_grid", "truncate", "truncate_atlas", "garbage", "no_tr",
  "short", "subjects",
)  # fmt: skip
GRID = (3, 3, 2)


def _parcel_means(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(T, V) data, (V,) labels -> (T, R) float64 means for each label > 0, in order."""
  x = np.asarray(x, np.float64)
  return np.stack([x[:, labels == k].mean(1) for k in np.unique(labels[labels > 0])], axis=1)


@given(st.data())
@_examples(0.5)
def test_fuzz_nifti(data):
  import nibabel as nib

  mutation = _mutation(data, NIFTI_MUTATIONS, ("none", "int16", "atlas_grid", "subjects"))
  n_runs = data.draw(st.integers(1, 2), label="runs")
  k = data.draw(st.integers(1, 4), label="parcels")
  ext = data.draw(st.sampled_from([".nii", ".nii.gz"]), label="ext")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    seed = data.draw(st.integers(0, 2**16), label="atlas seed")
    atlas = np.random.default_rng(seed).integers(0, k + 1, GRID)
    atlas.reshape(-1)[: k + 1] = np.arange(k + 1)  # every label present
    atlas = atlas.astype(np.int16)
    affine = np.eye(4)
    must_fail = mutation not in ("none", "huge", "float64", "int16", "atlas_grid", "subjects")
    atlas_img = nib.Nifti1Image(atlas, affine)
    if mutation == "atlas_4d":
      atlas_img = nib.Nifti1Image(np.stack([atlas, atlas], -1), affine)
    elif mutation == "atlas_fraction":
      atlas_img = nib.Nifti1Image(atlas + np.float32(0.5), affine)
    elif mutation == "atlas_zero":
      atlas_img = nib.Nifti1Image(np.zeros(GRID, np.int16), affine)
    elif mutation == "atlas_nan":
      bad_atlas = atlas.astype(np.float32)
      bad_atlas[0, 0, 0] = np.nan
      atlas_img = nib.Nifti1Image(bad_atlas, affine)
    elif mutation == "atlas_grid":  # twice as fine: resampled (nearest) onto the EPI grid
      fine = np.repeat(np.repeat(np.repeat(atlas, 2, 0), 2, 1), 2, 2)
      aff = np.diag([0.5, 0.5, 0.5, 1.0])
      aff[:3, 3] = -0.25
      atlas_img = nib.Nifti1Image(fine, aff)
    atlas_path = d / f"atlas{ext}"
    nib.save(atlas_img, atlas_path)
    runs, paths, subjects = [], [], []
    for j in range(n_runs):
      t = data.draw(st.integers(2, 5), label="T")
      x = _values(data, (*GRID, t))
      bad = j == 0
      if bad and mutation in ("nan", "inf"):
        idx = tuple(np.argwhere(atlas == k)[0])
        x[(*idx, t - 1)] = np.nan if mutation == "nan" else np.inf
      elif bad and mutation == "huge":
        x[..., 0] = 1e38
      elif bad and mutation == "float64":
        x = _scaled(x, data.draw(st.sampled_from([1.0, 1e300])))
      elif bad and mutation == "int16":
        x = np.clip(x, -1000, 1000).astype(np.int16)
      elif bad and mutation == "ndim3":
        x = x[..., 0]
      elif bad and mutation == "short":
        x = x[..., :1]
      img = nib.Nifti1Image(x, affine)
      img.header.set_xyzt_units("mm", "sec")
      if x.ndim == 4:
        img.header.set_zooms((1.0, 1.0, 1.0, 0.0 if bad and mutation == "no_tr" else 1.5))
      stem = data.draw(st.sampled_from(NAMES), label="file")
      p = d / f"{stem}_sub-{j}_run{ext}"
      nib.save(img, p)
      if bad and mutation == "truncate":
        _truncate(p, data)
      elif bad and mutation == "garbage":
        p.write_bytes(b"not a nifti" * 40)
      paths.append(p)
      runs.append(x)
      subjects.append(data.draw(st.sampled_from(SUBJECTS)) + str(j))
    if mutation == "truncate_atlas":
      _truncate(atlas_path, data)
    argv = ["nifti", *paths, f"--atlas={atlas_path}", *common]
    if mutation == "subjects":
      argv += [f"--subject={s}" for s in subjects]
    got = run_prepare(argv, out, [*paths, atlas_path], must_fail)
    if got is None:
      return
    ds, recs = _read_bold(got)
    assert ds.meta["num_parcels"] == k and len(recs) == n_runs
    for j, (p, x) in enumerate(zip(paths, runs, strict=True)):
      rec = recs[importers.common.file_stem(str(p))]
      want = _parcel_means(x.reshape(-1, x.shape[-1]).T, atlas.reshape(-1))
      assert _fits(want, dtype), "overflowing values were stored"
      assert_stored(rec["bold"], want, dtype, str(p))
      assert rec["tr"] == np.float32(1.5)
      if mutation == "subjects":
        assert rec["subject"] == subjects[j]


# ------------------------------------------------------------------------------------------
# cifti: a tiny dlabel + dtseries
# ------------------------------------------------------------------------------------------

CIFTI_MUTATIONS = (
  "none", "nan", "inf", "huge", "truncate", "truncate_dlabel", "dlabel_rows", "dlabel_fraction",
  "dlabel_nan", "other_model", "zero_step", "short", "garbage", "subjects",
)  # fmt: skip
VERTICES = 12


@given(st.data())
@_examples(0.5)
def test_fuzz_cifti(data):
  import nibabel as nib

  mutation = _mutation(data, CIFTI_MUTATIONS, ("none", "subjects"))
  k = data.draw(st.integers(1, 4), label="parcels")
  t = data.draw(st.integers(2, 5), label="T")
  with _scratch() as d:
    out = d / "out"
    common, dtype = _common(data, out)
    bm = nib.cifti2.BrainModelAxis.from_surface(np.arange(VERTICES), VERTICES + 4, "CortexLeft")
    seed = data.draw(st.integers(0, 2**16), label="label seed")
    labels = np.random.default_rng(seed).integers(0, k + 1, VERTICES)
    labels[: k + 1] = np.arange(k + 1)
    table = {i: (f"roi {i} ü", (1.0, 0.0, 0.0, 1.0)) for i in range(k + 1)}
    lab = labels[None].astype(np.float32)
    rows = ["parc"]
    if mutation == "dlabel_rows":
      lab, rows = np.concatenate([lab, lab]), ["a", "b"]
    elif mutation == "dlabel_fraction":
      lab = lab + np.float32(0.5)
    elif mutation == "dlabel_nan":
      lab[0, -1] = np.nan
    dlabel = d / "parc.dlabel.nii"
    lab_axis = nib.cifti2.LabelAxis(rows, [table] * len(rows))
    nib.save(nib.Cifti2Image(lab, (lab_axis, bm)), dlabel)
    x = _values(data, (t, VERTICES))
    must_fail = mutation not in ("none", "huge", "subjects")
    if mutation in ("nan", "inf"):
      x[-1, int(np.flatnonzero(labels == 1)[0])] = np.nan if mutation == "nan" else np.inf
    elif mutation == "huge":
      x[0] = 1e38
    elif mutation == "short":
      x = x[:1]
    series = nib.cifti2.SeriesAxis(0, 0.0 if mutation == "zero_step" else 0.72, len(x))
    model = bm
    if mutation == "other_model":
      model = nib.cifti2.BrainModelAxis.from_surface(np.arange(VERTICES) + 1, 20, "CortexLeft")
    stem = data.draw(st.sampled_from(NAMES), label="file")
    path = d / f"{stem}.dtseries.nii"
    nib.save(nib.Cifti2Image(x, (series, model)), path)
    if mutation == "truncate":
      _truncate(path, data)
    elif mutation == "truncate_dlabel":
      _truncate(dlabel, data)
    elif mutation == "garbage":
      path.write_bytes(b"\x00" * 600)
    subject = data.draw(st.sampled_from(SUBJECTS), label="subject")
    argv = ["cifti", path, f"--parcellation={dlabel}", *common]
    if mutation == "subjects":
      argv.append(f"--subject={subject}")
    got = run_prepare(argv, out, [path, dlabel], must_fail)
    if got is None:
      return
    ds, recs = _read_bold(got)
    assert ds.meta["num_parcels"] == k
    ((rec,),) = [list(recs.values())]
    want = _parcel_means(x, labels)
    assert _fits(want, dtype), "overflowing values were stored"
    assert_stored(rec["bold"], want, dtype, str(path))
    assert rec["tr"] == np.float32(0.72)
    if mutation == "subjects":
      assert rec["subject"] == subject


# ------------------------------------------------------------------------------------------
# nsd_flat: parquet rows with PNG maps
# ------------------------------------------------------------------------------------------

NSD_MUTATIONS = (
  "none", "missing_column", "null", "string_ids", "float_ids", "huge_ids", "negative_ids",
  "png_size", "png_mode", "png_corrupt", "png_path", "truncate", "empty", "mask_garbage",
  "mask_shape", "names",
)  # fmt: skip


def _png(arr: np.ndarray, mode: str = "L") -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(buf, format="PNG")
  return buf.getvalue()


@given(st.data())
@_examples(0.5)
def test_fuzz_nsd_flat(data):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from boldjax.data.importers import nsd_flat

  mutation = _mutation(data, NSD_MUTATIONS, ("none", "names", "float_ids"))
  n = data.draw(st.integers(1, 4), label="rows")
  with _scratch() as d:
    out = d / "out"
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    maps = np.full((n, nsd_flat.HEIGHT, nsd_flat.WIDTH), nsd_flat.BACKGROUND, np.uint8)
    maps[:, 50:60, 40:50] = rng.integers(0, 256, (n, 10, 10))
    cols: dict[str, list] = {
      "subject_id": [i % 2 for i in range(n)],
      "trial_id": list(range(n)),
      "session_id": [i // 2 for i in range(n)],
      "nsd_id": [1000 + i for i in range(n)],
      "shared1000": [i % 3 == 0 for i in range(n)],
      "activity": [{"bytes": _png(m), "path": None} for m in maps],
    }
    # a PNG cut after its image data still decodes (then it must read back equal)
    must_fail = mutation not in ("none", "names", "float_ids", "png_corrupt")
    i = data.draw(st.integers(0, n - 1), label="row")
    if mutation == "missing_column":
      del cols[data.draw(st.sampled_from(sorted(cols)), label="column")]
    elif mutation == "null":
      cols[data.draw(st.sampled_from(list(nsd_flat.INDEX_COLUMNS)), label="column")][i] = None
    elif mutation == "string_ids":
      cols["subject_id"] = [data.draw(st.sampled_from(["abc", "1", "ü", ""]))] * n
    elif mutation == "float_ids":
      cols["trial_id"] = [float(v) + data.draw(st.sampled_from([0.0, 0.5])) for v in range(n)]
      must_fail = cols["trial_id"][0] != 0.0
    elif mutation == "huge_ids":
      column = data.draw(st.sampled_from(["subject_id", "session_id", "trial_id"]))
      cols[column][i] = data.draw(st.sampled_from([2**40, 2**63 - 1]))
      must_fail = column != "trial_id"
    elif mutation == "negative_ids":
      cols["subject_id"][i] = -3
    elif mutation == "png_size":
      cols["activity"][i] = {"bytes": _png(maps[i][:-1]), "path": None}
    elif mutation == "png_mode":
      cols["activity"][i] = {"bytes": _png(maps[i], "RGB"), "path": None}
    elif mutation == "png_corrupt":
      raw = cols["activity"][i]["bytes"]
      cols["activity"][i] = {"bytes": raw[: data.draw(st.integers(0, len(raw) - 1))], "path": None}
    elif mutation == "png_path":
      where = data.draw(st.sampled_from(["../nope.png", "a b/ü.png", "/nonexistent/x.png"]))
      cols["activity"][i] = {"bytes": None, "path": where}
    elif mutation == "empty":
      cols = {k: v[:0] for k, v in cols.items()}
    stem = data.draw(st.sampled_from(NAMES), label="file")
    folder = d / (stem if mutation == "names" else "in")
    folder.mkdir()
    path = folder / f"{stem}.parquet"
    pq.write_table(pa.Table.from_pydict(cols), path, row_group_size=2)
    if mutation == "truncate":
      _truncate(path, data)
    argv = ["nsd_flat", folder if mutation == "names" else path, f"--out={out}"]
    inputs = [path]
    if mutation in ("mask_garbage", "mask_shape"):
      mask = d / "mask.npy"
      if mutation == "mask_garbage":
        mask.write_bytes(b"\x93NUMPY garbage")
      else:
        np.save(mask, np.ones((5, 5), bool))
      argv.append(f"--mask={mask}")
      inputs = [mask]
    got = run_prepare(argv, out, inputs, must_fail)
    if got is None:
      return
    ds = records.open_flat_dataset(got)
    seen = {}
    for split in records.SPLITS:
      src = ds.split(split)
      for j in range(len(src)):
        ex = src[j]
        seen[int(ex["nsd_id"])] = ex
    assert sorted(seen) == cols["nsd_id"]
    for j in range(n):
      ex = seen[1000 + j]
      np.testing.assert_array_equal(ex["activity"], maps[j])
      assert int(ex["subject_id"]) == cols["subject_id"][j]
      assert int(ex["trial_id"]) == cols["trial_id"][j]
      assert int(ex["session_id"]) == cols["session_id"][j]


# ------------------------------------------------------------------------------------------
# config arguments and saved configs
# ------------------------------------------------------------------------------------------

DEFAULTS = {"size": "tiny", "steps": 10, "lr": 1e-3, "runlocal": False, "shape": (1, 2)}
_ARG_TEXT = st.text(
  st.sampled_from("size=steps,lr shape runlocal()[]'\"1e3-x.üé/{}:0"), max_size=40
)
_ARG_ITEM = st.tuples(
  st.sampled_from([*DEFAULTS, "sizes", ""]),
  st.sampled_from(["=", "", "=="]),
  st.one_of(
    st.sampled_from(["1", "1e3", "-2", "true", "no", "(3, 4)", "[1,", "(" * 300, "nan", "x"]),
    st.text(max_size=8),
  ),
).map("".join)
_ARGS = st.lists(_ARG_ITEM, max_size=4).map(",".join)


@given(st.one_of(_ARGS, _ARG_TEXT, st.text(max_size=30)))
@_examples(4.0)
def test_fuzz_parse_arg(arg):
  """A config argument parses or is refused with a ValueError naming the argument."""
  try:
    out = config_utils.parse_arg(arg, **DEFAULTS)
  except ValueError as e:
    assert "config argument" in str(e), e
    event("parse_arg: refused")
    return
  event("parse_arg: parsed")
  assert set(out.keys()) == set(DEFAULTS)
  for key, default in DEFAULTS.items():
    if default is not None and not isinstance(default, tuple):
      assert isinstance(out[key], type(default)), (key, out[key])


def _json_nodes(inner: st.SearchStrategy) -> st.SearchStrategy:
  return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


# NaN is left out here: test_config_changes_nan_is_unchanged checks it.
_JSON = st.recursive(
  st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
  _json_nodes,
  max_leaves=10,
)


_CONFIG_BYTES = st.one_of(
  _JSON.map(lambda v: json.dumps(v).encode()),
  st.binary(max_size=40),
  st.text(max_size=40).map(str.encode),
  st.dictionaries(st.text(max_size=6), _JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
)
_CONFIG_TREE = st.dictionaries(st.text(max_size=6), _JSON, max_size=4)


@given(_CONFIG_BYTES)
@_examples(2.0)
def test_fuzz_load_config(raw):
  """A workdir's config.json loads, or is refused with a ValueError naming the file."""
  with _scratch() as d:
    (d / checkpoint.CONFIG_FILE).write_bytes(raw)
    try:
      saved = checkpoint.load_config(d)
    except ValueError as e:
      assert checkpoint.CONFIG_FILE in str(e), e
      event("load_config: refused")
      return
    event("load_config: loaded")
    assert checkpoint.config_changes(saved, saved) == ([], [])


@given(_CONFIG_TREE, _CONFIG_TREE)
@_examples(2.0)
def test_fuzz_config_changes(saved, current):
  """Comparing a saved config with a live one never raises, and a config equals itself."""
  refused, allowed = checkpoint.config_changes(saved, current)
  assert all(isinstance(line, str) for line in refused + allowed)
  assert checkpoint.config_changes(saved, saved) == ([], [])
  assert checkpoint.config_changes(current, current) == ([], [])


@pytest.mark.parametrize(
  "arg",
  ["shape=(", "shape=" + "(" * 5000, "shape=[1,", "steps=1e3x"],
  ids=["(", "deep", "[", "int"],
)
def test_parse_arg_refuses_broken_literals(arg):
  with pytest.raises(cli.InputError, match=r"config argument '(shape|steps)'"):
    config_utils.parse_arg(arg, **DEFAULTS)


def test_config_changes_nan_is_unchanged():
  assert checkpoint.config_changes({"a": math.nan}, {"a": math.nan}) == ([], [])
