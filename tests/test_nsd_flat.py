"""NSD-Flat importer: HF schema (parquet + arrow), exact values, splits, mask, clear errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from boldjax import prepare
from boldjax.data import records, transforms
from boldjax.data.importers import nsd_flat
from tests.cli_helpers import prepare_refuses

H, W = nsd_flat.HEIGHT, nsd_flat.WIDTH


def _png(arr: np.ndarray, mode: str = "L") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(buf, format="PNG")
  return buf.getvalue()


def _maps(n: int, seed: int = 0) -> np.ndarray:
  """NSD-Flat-like uint8 maps: background 127, an active blob in the middle."""
  rng = np.random.default_rng(seed)
  maps = np.full((n, H, W), nsd_flat.BACKGROUND, np.uint8)
  maps[:, 60:160, 30:90] = rng.integers(0, 256, size=(n, 100, 60))
  maps[:, 50:150, 110:170] = rng.integers(0, 256, size=(n, 100, 60))
  return maps


def _rows(maps: np.ndarray) -> dict[str, list]:
  """2 subjects x 5 sessions x (len(maps) / 10) trials, in the published column schema."""
  n = len(maps)
  per = n // 10
  subject = np.repeat([0, 1], n // 2)
  session = np.tile(np.repeat(np.arange(5), per), 2)
  trial = np.arange(n) % (n // 2)
  return {
    "subject_id": subject.tolist(),
    "trial_id": trial.tolist(),
    "session_id": session.tolist(),
    "nsd_id": (1000 + np.arange(n)).tolist(),
    "activity": [{"bytes": _png(m), "path": None} for m in maps],
    "subject": [f"subj0{s + 1}" for s in subject],
    "flagged": [False] * n,
    "BOLD5000": [False] * n,
    "shared1000": [(i % 3 == 0) for i in range(n)],
    "coco_id": list(range(n)),
  }


SCHEMA = pa.schema(
  [
    ("subject_id", pa.int64()),
    ("trial_id", pa.int64()),
    ("session_id", pa.int64()),
    ("nsd_id", pa.int64()),
    ("activity", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("subject", pa.string()),
    ("flagged", pa.bool_()),
    ("BOLD5000", pa.bool_()),
    ("shared1000", pa.bool_()),
    ("coco_id", pa.int64()),
  ]
)


def _write_parquet(path, rows, schema=SCHEMA):
  pq.write_table(pa.Table.from_pydict(rows, schema=schema), path, row_group_size=7)
  return str(path)


def _expected_split(rows, i):
  if rows["session_id"][i] >= 2:  # sessions 2, 3, 4 are each subject's last three
    return "test"
  return "val" if rows["shared1000"][i] else "train"


def _read_all(path):
  ds = records.open_flat_dataset(path)
  out = {}
  for split in records.SPLITS:
    src = ds.split(split)
    for i in range(len(src)):
      ex = src[i]
      out[int(ex["nsd_id"])] = (split, ex)
  return ds, out


def test_import_parquet_values_splits_mask(tmp_path):
  maps = _maps(20)
  rows = _rows(maps)
  src = _write_parquet(tmp_path / "train-00000-of-00001.parquet", rows)
  path = nsd_flat.import_nsd_flat(src, str(tmp_path / "out"))
  ds, got = _read_all(path)
  assert len(got) == 20
  for i in range(20):
    split, ex = got[1000 + i]
    assert split == _expected_split(rows, i)
    np.testing.assert_array_equal(ex["activity"], maps[i])  # uint8 bytes round trip
    assert (int(ex["subject_id"]), int(ex["trial_id"]), int(ex["session_id"])) == (
      rows["subject_id"][i],
      rows["trial_id"][i],
      rows["session_id"][i],
    )
    assert int(ex["label"]) == -1
  assert ds.splits == {
    s: sum(_expected_split(rows, i) == s for i in range(20)) for s in records.SPLITS
  }
  np.testing.assert_array_equal(ds.mask, (maps != 127).any(axis=0))
  assert ds.meta["num_subjects"] == 2 and ds.meta["num_classes"] == 0
  # dequantisation: float32 x / 255 * 5 - 2.5, masked
  dq = transforms.Dequantize(ds.mask).map(got[1003][1])["activity"]
  ref = maps[3].astype(np.float32) / np.float32(255) * np.float32(5) - np.float32(2.5)
  np.testing.assert_array_equal(dq, ref * ds.mask)


def test_cli_shards_mask_limit_and_arrow(tmp_path):
  maps = _maps(20, seed=1)
  rows = _rows(maps)
  shards = tmp_path / "hub" / "data"
  shards.mkdir(parents=True)
  half = {k: v[:10] for k, v in rows.items()}
  rest = {k: v[10:] for k, v in rows.items()}
  _write_parquet(shards / "train-00000-of-00002.parquet", half)
  _write_parquet(shards / "train-00001-of-00002.parquet", rest)
  mask = np.zeros((H, W), bool)
  mask[40:180, 20:180] = True
  np.save(tmp_path / "mask.npy", mask)
  out = prepare.main(
    [
      "nsd_flat",
      str(tmp_path / "hub"),
      f"--out={tmp_path / 'a'}",
      f"--mask={tmp_path / 'mask.npy'}",
    ]
  )
  ds, got = _read_all(out)
  np.testing.assert_array_equal(ds.mask, mask)
  assert len(got) == 20 and all(
    np.array_equal(got[1000 + i][1]["activity"], maps[i]) for i in range(20)
  )
  # --limit imports the first rows only; splits are recomputed on them (subject 0: 10 rows)
  out = prepare.main(["nsd_flat", str(tmp_path / "hub"), f"--out={tmp_path / 'b'}", "--limit=10"])
  ds, got = _read_all(out)
  assert sorted(got) == list(range(1000, 1010))
  # the same rows as an HF save_to_disk arrow directory (arrow stream files)
  arrow_dir = tmp_path / "arrow" / "train"
  arrow_dir.mkdir(parents=True)
  table = pa.Table.from_pydict(rows, schema=SCHEMA)
  with pa.ipc.new_stream(str(arrow_dir / "data-00000-of-00001.arrow"), SCHEMA) as writer:
    for batch in table.to_batches(max_chunksize=6):
      writer.write_batch(batch)
  out = nsd_flat.import_nsd_flat(str(tmp_path / "arrow"), str(tmp_path / "c"))
  ds, got_arrow = _read_all(out)
  assert len(got_arrow) == 20
  for i in range(20):
    assert got_arrow[1000 + i][0] == _expected_split(rows, i)
    np.testing.assert_array_equal(got_arrow[1000 + i][1]["activity"], maps[i])


def test_clear_errors(tmp_path, capsys):
  maps = _maps(10, seed=2)
  rows = _rows(maps)

  def check(rows, message, schema=SCHEMA, name="bad.parquet"):
    src = _write_parquet(tmp_path / name, rows, schema)
    out = tmp_path / f"out_{name}"
    prepare_refuses(capsys, ["nsd_flat", src, f"--out={out}"], message, out)

  corrupt = {**rows, "activity": list(rows["activity"])}
  corrupt["activity"][3] = {"bytes": rows["activity"][3]["bytes"][:60], "path": None}
  check(corrupt, r"bad\.parquet: row 3, field 'activity': corrupt or unreadable PNG")
  small = {**rows, "activity": list(rows["activity"])}
  small["activity"][8] = {"bytes": _png(maps[8][:-1]), "path": None}
  check(
    small,
    r"bad\.parquet: row 8, field 'activity': expected a 215x200 \(HxW\) mode 'L' PNG, "
    r"found 214x200 mode 'L'",
  )
  rgb = {**rows, "activity": list(rows["activity"])}
  rgb["activity"][0] = {"bytes": _png(maps[0], "RGB"), "path": None}
  check(rgb, r"row 0, field 'activity': expected .* mode 'L' PNG, found 215x200 mode 'RGB'")
  no_nsd = {k: v for k, v in rows.items() if k != "nsd_id"}
  schema = pa.schema([f for f in SCHEMA if f.name != "nsd_id"])
  check(
    no_nsd,
    r"missing\.parquet: row n/a, missing column\(s\) \['nsd_id'\]",
    schema,
    "missing.parquet",
  )
  null_session = {**rows, "session_id": [None] + rows["session_id"][1:]}
  check(
    null_session,
    r"nulls\.parquet: row 0, field 'session_id': expected a value, found null",
    name="nulls.parquet",
  )
  np.save(tmp_path / "mask.npy", np.ones((5, 5), bool))
  src = _write_parquet(tmp_path / "ok.parquet", rows)
  argv = ["nsd_flat", src, f"--out={tmp_path / 'o'}", f"--mask={tmp_path / 'mask.npy'}"]
  prepare_refuses(capsys, argv, r"mask\.npy: shape expected \(215, 200\), found \(5, 5\)",
                  tmp_path / "o")  # fmt: skip
  os.makedirs(tmp_path / "empty")
  argv = ["nsd_flat", tmp_path / "empty", f"--out={tmp_path / 'o2'}"]
  prepare_refuses(capsys, argv, r"empty: no \*\.parquet or \*\.arrow files", tmp_path / "o2")


def test_assign_splits_boldgpt_convention():
  subject = np.array([0] * 6 + [1] * 5)
  session = np.array([0, 1, 2, 3, 4, 5, 1, 3, 7, 8, 9])
  shared = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
  split = nsd_flat.assign_splits(subject, session, shared)
  assert split.tolist() == [
    "val", "train", "val", "test", "test", "test",  # subject 0: sessions 3-5 are test
    "val", "val", "test", "test", "test",  # subject 1: sessions 7-9 are test
  ]  # fmt: skip


def test_earlier_flag_spelling_is_accepted_with_a_note(capsys):
  from boldjax import prepare

  parser = prepare.build_parser()
  args = ["nsd_flat", "in.parquet", "--out=out"]
  assert parser.parse_args(args).test_sessions == nsd_flat.TEST_SESSIONS
  assert parser.parse_args([*args, "--test-sessions=2"]).test_sessions == 2
  assert capsys.readouterr().err == ""
  assert parser.parse_args([*args, "--test_sessions=5"]).test_sessions == 5
  err = capsys.readouterr().err
  assert "--test_sessions is deprecated" in err and "use --test-sessions" in err
