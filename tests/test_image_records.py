"""Image-stimulus datasets: synthetic images, the writer/reader, and the image importers
(folder, NSD HDF5 brick, synthetic) through `python -m boldjax.prepare`."""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from boldjax import prepare
from boldjax.cli import InputError
from boldjax.data import image_records
from boldjax.data.synthetic_images import KINDS, source_images, synthetic_images
from tests.cli_helpers import prepare_refuses


def _read_all(path: str) -> tuple[image_records.StimulusDataset, dict[int, tuple[str, dict]]]:
  """(dataset, {image_id: (split, record)}) with every split read back."""
  ds = image_records.open_stimulus(path)
  out = {}
  for split, n in ds.splits.items():
    src = ds.split(split)
    assert len(src) == n
    for i in range(n):
      rec = src[i]
      out[int(rec["image_id"])] = (split, rec)
  return ds, out


# ------------------------------------------------------------------------------------------
# Synthetic images.
# ------------------------------------------------------------------------------------------
def test_synthetic_images_distinct_deterministic_and_fast():
  source_images()  # load the bundled photographs once, outside the timing
  start = time.monotonic()
  images, kinds = synthetic_images(2000, 64, seed=3, with_kinds=True)
  elapsed = time.monotonic() - start
  assert images.shape == (2000, 64, 64, 3) and images.dtype == np.uint8
  assert len({im.tobytes() for im in images}) == 2000  # no two identical
  # every kind is drawn, in about the stated proportions (photo 0.55, others 0.15)
  frac = np.bincount(kinds, minlength=len(KINDS)) / 2000
  np.testing.assert_allclose(frac, [0.55, 0.15, 0.15, 0.15], atol=0.04)
  # the photos are natural-ish: broad intensity range, not flat
  photo = images[kinds == 0].reshape(-1, 64 * 64 * 3)
  assert np.median(photo.std(axis=1)) > 15 and np.median(np.ptp(photo, axis=1)) > 100
  # same seed -> same bytes; a shorter run is a prefix; another seed differs everywhere
  again = synthetic_images(300, 64, seed=3)
  np.testing.assert_array_equal(again, images[:300])
  other = synthetic_images(300, 64, seed=4)
  assert not any(np.array_equal(a, b) for a, b in zip(other, images[:300], strict=True))
  assert elapsed < 20, f"2000 images of 64x64 took {elapsed:.1f} s"  # ~2 s on 2 idle cores


def test_synthetic_images_repeat_is_redrawn(monkeypatch):
  """A repeated image is drawn again (attempt + 1), deterministically."""
  from boldjax.data import synthetic_images as mod

  flat = lambda rng, size: np.full((size, size, 3), rng.integers(2) / 2, np.float32)  # noqa: E731
  monkeypatch.setattr(mod, "_MAKERS", (flat,) * 4)
  x = mod.synthetic_images(2, 8, seed=0)
  assert not np.array_equal(x[0], x[1])
  np.testing.assert_array_equal(x, mod.synthetic_images(2, 8, seed=0))
  with pytest.raises(RuntimeError, match="image 2 repeated"):
    mod.synthetic_images(3, 8, seed=0)  # only two distinct images exist


# ------------------------------------------------------------------------------------------
# The writer and reader.
# ------------------------------------------------------------------------------------------
def test_split_assignment_counts_seed_and_fractions():
  a = image_records.split_assignment(103, (0.7, 0.2, 0.1), seed=5)
  assert np.bincount(a, minlength=3).tolist() == [72, 21, 10]
  np.testing.assert_array_equal(a, image_records.split_assignment(103, (0.7, 0.2, 0.1), seed=5))
  assert (a != image_records.split_assignment(103, (0.7, 0.2, 0.1), seed=6)).any()
  only_train = image_records.split_assignment(5, (1, 0, 0))
  assert np.bincount(only_train, minlength=3).tolist() == [5, 0, 0]
  with pytest.raises(InputError, match="'fractions' expected 3 non-negative numbers"):
    image_records.split_assignment(10, (0.8, 0.3, 0.1))


def test_write_read_round_trip_with_responses_vertices_and_extra_files(tmp_path):
  rng = np.random.default_rng(0)
  n, nv = 30, 9
  images = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
  ids = np.arange(n, dtype=np.int64) * 7 + 1000
  responses = rng.standard_normal((n, nv)).astype(np.float32)
  vertices = {
    "coords": rng.standard_normal((nv, 3)),
    "fsaverage_index": np.array([0, 5, 9, 10241, 3, 0, 5, 7, 8]),
    "hemisphere": np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]),
  }
  out = image_records.write_stimulus_dataset(
    str(tmp_path / "ds"),
    images,
    ids,
    responses,
    vertices,
    split_seed=2,
    fractions=(0.6, 0.2, 0.2),
    extra_files={"note.json": lambda p: open(p, "w").write('{"x": 1}')},
    meta={"name": "rt", "source": {"importer": "test"}, "space": "fsaverage5"},
  )
  ds, recs = _read_all(out)
  assert ds.meta["kind"] == "stimulus" and ds.meta["image_size"] == [12, 12]
  assert ds.splits == {"train": 18, "val": 6, "test": 6} and ds.meta["num_images"] == n
  assert ds.meta["response"] == {
    "num_vertices": nv,
    "space": "fsaverage5",
    "dtype": "float32",
    "has_vertices": True,
  }
  assert ds.meta["original_sizes"] == {"12x12": n} and ds.meta["source"] == {"importer": "test"}
  assign = image_records.split_assignment(n, (0.6, 0.2, 0.2), seed=2)
  for pos, image_id in enumerate(ids):
    split, rec = recs[int(image_id)]
    assert split == image_records.SPLITS[assign[pos]]
    np.testing.assert_array_equal(rec["image"], images[pos])
    np.testing.assert_array_equal(rec["response"], responses[pos])
    assert rec["response"].dtype == np.float32 and rec["image"].dtype == np.uint8
  for split in image_records.SPLITS:  # records in source order; the convenience readers agree
    pos = np.flatnonzero(assign == image_records.SPLITS.index(split))
    np.testing.assert_array_equal(ds.image_ids(split), ids[pos])
    np.testing.assert_array_equal(ds.images(split), images[pos])
    np.testing.assert_array_equal(ds.responses(split), responses[pos])
  v = ds.vertices()
  np.testing.assert_array_equal(v["coords"], vertices["coords"].astype(np.float32))
  np.testing.assert_array_equal(v["fsaverage_index"], vertices["fsaverage_index"])
  np.testing.assert_array_equal(v["hemisphere"], vertices["hemisphere"])
  assert v["fsaverage_index"].dtype == np.int64 and v["hemisphere"].dtype == np.int8
  assert json.load(open(os.path.join(out, "note.json"))) == {"x": 1}
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_resize_records_original_sizes_and_empty_split(tmp_path):
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # landscape: centre square cropped
  b = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  c = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  out = image_records.write_stimulus_dataset(
    str(tmp_path / "ds"), [a, b, c], [0, 1, 2], size=16, fractions=(1, 0, 0)
  )
  ds, recs = _read_all(out)
  assert ds.meta["original_sizes"] == {"16x16": 1, "20x30": 1, "8x8": 1}
  assert ds.splits == {"train": 3, "val": 0, "test": 0} and len(ds.split("val")) == 0
  assert ds.meta["response"] is None
  want_a = Image.fromarray(a[:, 5:25]).resize((16, 16), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(recs[0][1]["image"], np.asarray(want_a))
  np.testing.assert_array_equal(recs[1][1]["image"], b)  # already that size: untouched
  want_c = Image.fromarray(c).resize((16, 16), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(recs[2][1]["image"], np.asarray(want_c))
  with pytest.raises(FileNotFoundError, match="no vertex positions"):
    ds.vertices()
  with pytest.raises(ValueError, match="no responses stored"):
    ds.responses("train")


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"image_ids": [0, 0, 1]}, "'image_ids' expected unique"),
    ({"images": [np.zeros((4, 4, 3), np.uint8)] * 2 + [np.zeros((5, 4, 3), np.uint8)]},
     r"image 2 .*expected shape \(4, 4, 3\) like image 0"),
    ({"images": [np.zeros((4, 4), np.uint8)] * 3}, r"'image' expected \(H, W, 3\) uint8"),
    ({"responses": np.array([[0.0, 1], [np.nan, 2], [0, 0]])},
     r"image 1 .*'response' expected finite float32 values, found nan at vertex 0"),
    ({"responses": np.zeros((3, 2)), "vertices": {"coords": np.zeros((2, 3)),
      "fsaverage_index": [1, 1], "hemisphere": [0, 0]}}, "each .hemisphere, index. once"),
    ({"responses": np.zeros((3, 2)), "vertices": {"coords": np.zeros((2, 3)),
      "fsaverage_index": [1, 2], "hemisphere": [0, 2]}}, "'hemisphere' expected 0 .left. or 1"),
    ({"vertices": {"coords": np.zeros((2, 3))}}, "'vertices' given without responses"),
  ],
)  # fmt: skip
def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path, kwargs, match):
  args = {"images": np.zeros((3, 4, 4, 3), np.uint8), "image_ids": [0, 1, 2]} | kwargs
  out = tmp_path / "ds"
  with pytest.raises(InputError, match=match):
    image_records.write_stimulus_dataset(str(out), fractions=(1, 0, 0), **args)
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------
# Importers.
# ------------------------------------------------------------------------------------------
def test_image_folder_import_converts_modes_and_keeps_pixels(tmp_path, capsys):
  rng = np.random.default_rng(2)
  folder = tmp_path / "imgs"
  folder.mkdir()
  rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (10, 10), dtype=np.uint8)
  rgba = rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)
  grey16 = rng.integers(0, 65536, (10, 10), dtype=np.uint16)
  Image.fromarray(rgb).save(folder / "b.png")
  Image.fromarray(grey).save(folder / "a_grey.png")
  Image.fromarray(rgba, "RGBA").save(folder / "c.PNG")
  Image.fromarray(grey16).save(folder / "d16.png")
  Image.fromarray(rgb).save(folder / "e.jpg", quality=90)
  (folder / "notes.txt").write_text("not an image")
  out = prepare.main(["images", str(folder), f"--out={tmp_path / 'ds'}", "--size=0",
                      "--val-fraction=0", "--test-fraction=0"])  # fmt: skip
  assert "ignoring 1 other entries" in capsys.readouterr().out
  ds, recs = _read_all(out)
  assert ds.splits["train"] == 5 and ds.meta["source"]["importer"] == "images"
  table = json.load(open(os.path.join(out, "image_files.json")))
  assert table == [[0, "a_grey.png"], [1, "b.png"], [2, "c.PNG"], [3, "d16.png"], [4, "e.jpg"]]
  got = {i: recs[i][1]["image"] for i in range(5)}
  np.testing.assert_array_equal(got[0], np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(got[1], rgb)
  np.testing.assert_array_equal(got[2], rgba[..., :3])
  grey8 = np.round(grey16 / 257).astype(np.uint8)
  np.testing.assert_array_equal(got[3], np.repeat(grey8[..., None], 3, -1))
  np.testing.assert_array_equal(got[4], np.asarray(Image.open(folder / "e.jpg").convert("RGB")))
  bad = tmp_path / "bad"
  argv = ["images", folder, f"--out={bad}", "--size=0"]
  (folder / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # a damaged file is named
  prepare_refuses(capsys, argv, r"f\.png: field 'image' expected a readable PNG/JPEG", bad)
  (folder / "f.png").unlink()
  Image.fromarray(rgb[:8]).save(folder / "f.png")  # different sizes need --size
  match = r"image 5 .*expected shape \(10, 10, 3\) like image 0 \(pass a size"
  prepare_refuses(capsys, argv, match, bad)
  argv = ["images", tmp_path / "none", f"--out={bad}"]
  prepare_refuses(capsys, argv, r"none: field 'folder' expected a directory", bad)


def _brick(path, n=11, side=6, key="imgBrick"):
  x = np.random.default_rng(3).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
  with h5py.File(path, "w") as f:
    f.create_dataset(key, data=x, chunks=(1, side, side, 3))
  return x


def test_nsd_brick_import_rows_indices_limit(tmp_path, capsys, monkeypatch):
  from boldjax.data.importers import images as importer

  monkeypatch.setattr(importer, "CHUNK", 3)  # several chunks, contiguous and scattered
  brick = _brick(tmp_path / "nsd_stimuli.hdf5")
  path = str(tmp_path / "nsd_stimuli.hdf5")
  out = prepare.main(["nsd_images", path, f"--out={tmp_path / 'all'}", "--size=0",
                      "--val-fraction=0.2", "--test-fraction=0.2"])  # fmt: skip
  ds, recs = _read_all(out)
  assert sorted(recs) == list(range(11)) and ds.meta["image_size"] == [6, 6]
  assert ds.splits == {"train": 7, "val": 2, "test": 2}
  for i, (_, rec) in recs.items():
    np.testing.assert_array_equal(rec["image"], brick[i])
  assert ds.meta["source"]["brick_shape"] == [11, 6, 6, 3]
  # --indices (ranges, unsorted) then --limit; image_id is the brick row
  out = prepare.main(["nsd_images", path, f"--out={tmp_path / 'sub'}", "--size=4",
                      "--indices=9,0:3,6", "--limit=4"])  # fmt: skip
  ds, recs = _read_all(out)
  assert sorted(recs) == [0, 1, 2, 6] and ds.meta["image_size"] == [4, 4]
  for i, (_, rec) in recs.items():
    np.testing.assert_array_equal(rec["image"], image_records.resize_image(brick[i], 4))
  np.save(tmp_path / "idx.npy", np.array([10, 4]))
  ds, recs = _read_all(prepare.main(["nsd_images", path, f"--out={tmp_path / 'npy'}",
                                     "--size=0", f"--indices={tmp_path / 'idx.npy'}"]))  # fmt: skip
  assert sorted(recs) == [4, 10]
  bad = tmp_path / "bad"
  prepare_refuses(capsys, ["nsd_images", path, f"--out={bad}", "--key=brick"],
                  r"nsd_stimuli\.hdf5: field 'brick' expected an \(N, H, W, 3\) uint8 image "
                  r"brick \(--key\), found keys \['imgBrick'\]", bad)  # fmt: skip
  prepare_refuses(capsys, ["nsd_images", path, f"--out={bad}", "--indices=3,11"],
                  r"'--indices' expected rows in 0\.\.10, found 3\.\.11", bad)  # fmt: skip
  prepare_refuses(capsys, ["nsd_images", path, f"--out={bad}", "--indices=3,3"],
                  "'--indices' expected each row once", bad)  # fmt: skip
  prepare_refuses(capsys, ["nsd_images", path, f"--out={bad}", "--val-fraction=0.7",
                           "--test-fraction=0.4"], "found 0.7 and 0.4", bad)  # fmt: skip
  with h5py.File(tmp_path / "grey.hdf5", "w") as f:
    f.create_dataset("imgBrick", data=np.zeros((2, 4, 4), np.uint8))
  match = r"'imgBrick' expected \(N, H, W, 3\) uint8 .*found uint8 \(2, 4, 4\)"
  prepare_refuses(capsys, ["nsd_images", tmp_path / "grey.hdf5", f"--out={bad}"], match, bad)


def test_synthetic_images_import(tmp_path):
  out = prepare.main(["synthetic_images", f"--out={tmp_path / 'syn'}", "--count=12",
                      "--size=16", "--seed=5"])  # fmt: skip
  ds, recs = _read_all(out)
  want, kinds = synthetic_images(12, 16, seed=5, with_kinds=True)
  for i in range(12):
    np.testing.assert_array_equal(recs[i][1]["image"], want[i])
  with np.load(os.path.join(out, "kinds.npz")) as z:
    np.testing.assert_array_equal(z["kind"], kinds)
  assert sum(ds.meta["source"]["kinds"].values()) == 12 and ds.meta["resample"] == "none"
