"""Algonauts 2023 importer: a small subject folder in the real layout, with a small
icosphere standing in for the fsaverage sphere, round-trips exactly; each bad input is
refused with one line naming the file and the field."""

from __future__ import annotations

import json
import os
import shutil

import nibabel.freesurfer
import numpy as np
import pytest
from PIL import Image

from boldjax import prepare
from boldjax.data import image_records
from boldjax.data.importers import algonauts
from tests.cli_helpers import prepare_refuses

N_IMAGES = 7
SIDE = 10


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
  """(vertices on the radius-100 sphere, faces) of a subdivided icosahedron: 12, 42, 162 ...
  vertices, nested like fsaverage's (the first vertices are the coarser mesh's)."""
  t = (1 + 5**0.5) / 2
  verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t),
           (0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]  # fmt: skip
  faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4),
           (11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8),
           (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]  # fmt: skip
  verts = [np.asarray(v, np.float64) / np.linalg.norm(v) for v in verts]
  for _ in range(subdivisions):
    mid: dict[tuple[int, int], int] = {}
    new = []
    for face in faces:
      m = []
      for a, b in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
        key = (min(a, b), max(a, b))
        if key not in mid:
          v = verts[a] + verts[b]
          verts.append(v / np.linalg.norm(v))
          mid[key] = len(verts) - 1
        m.append(mid[key])
      (a, b, c), (ab, bc, ca) = face, m
      new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
    faces = new
  return 100 * np.asarray(verts), np.asarray(faces, np.int32)


def _subject(root, *, lh_cols=9, rh_cols=6, n=N_IMAGES, seed=0):
  """SUBJ_DIR in the Algonauts 2023 layout + a sphere folder (lh.sphere, rh.sphere)."""
  rng = np.random.default_rng(seed)
  subj = root / "subj01"
  fmri_dir = subj / "training_split" / "training_fmri"
  img_dir = subj / "training_split" / "training_images"
  mask_dir = subj / "roi_masks"
  for d in (fmri_dir, img_dir, mask_dir, root / "fsaverage" / "surf"):
    d.mkdir(parents=True)
  coords, faces = icosphere(2)  # 162 vertices
  rh_coords = coords.copy()
  rh_coords[:, 1] += 1.0  # the two hemispheres differ
  data = {"coords": {"lh": coords, "rh": rh_coords}}
  for h, cols in (("lh", lh_cols), ("rh", rh_cols)):
    nibabel.freesurfer.write_geometry(
      str(root / "fsaverage" / "surf" / f"{h}.sphere"), data["coords"][h], faces
    )
    mask = np.zeros(len(coords), np.float32)
    where = np.sort(rng.choice(len(coords), cols, replace=False))
    mask[where] = rng.integers(1, 5, cols)  # ROI labels: any nonzero marks a vertex
    np.save(mask_dir / f"{h}.all-vertices_fsaverage_space.npy", mask)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    np.save(fmri_dir / f"{h}_training_fmri.npy", x)
    data[h] = {"fmri": x, "index": where}
  data["images"] = rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
  data["nsd"] = rng.choice(73000, n, replace=False)
  for i, (im, nsd) in enumerate(zip(data["images"], data["nsd"], strict=True)):
    Image.fromarray(im).save(img_dir / f"train-{i + 1:04d}_nsd-{nsd:05d}.png")
  return subj, root / "fsaverage", data


def test_round_trip_responses_coords_pixels(tmp_path):
  subj, sphere, data = _subject(tmp_path)
  out = prepare.main(["algonauts", str(subj), f"--sphere={sphere}", f"--out={tmp_path / 'ds'}",
                      "--size=0", "--split-seed=1"])  # fmt: skip
  ds = image_records.open_stimulus(out)
  assert ds.meta["name"] == "algonauts2023_subj01"
  assert ds.meta["response"]["num_vertices"] == 15 and ds.meta["response"]["has_vertices"]
  assert ds.meta["hemisphere_columns"] == {"lh": 9, "rh": 6}
  assert ds.meta["fsaverage_vertices"] == {"lh": 162, "rh": 162}
  assert sum(ds.splits.values()) == N_IMAGES
  responses = np.concatenate([data["lh"]["fmri"], data["rh"]["fmri"]], axis=1)
  seen = []
  for split in image_records.SPLITS:
    ids = ds.image_ids(split)
    seen += ids.tolist()
    np.testing.assert_array_equal(ds.images(split), data["images"][ids])
    np.testing.assert_array_equal(ds.responses(split), responses[ids])
  assert sorted(seen) == list(range(N_IMAGES))
  v = ds.vertices()
  index = np.concatenate([data["lh"]["index"], data["rh"]["index"]])
  np.testing.assert_array_equal(v["fsaverage_index"], index)
  np.testing.assert_array_equal(v["hemisphere"], [0] * 9 + [1] * 6)
  lh, rh = data["coords"]["lh"], data["coords"]["rh"].copy()
  # the seed's rule: rh starts at lh's x minimum + 1.5 x lh's x range
  rh[:, 0] += lh[:, 0].min() + 1.5 * np.ptp(lh[:, 0]) - rh[:, 0].min()
  want = np.concatenate([lh[data["lh"]["index"]], rh[data["rh"]["index"]]]).astype(np.float32)
  np.testing.assert_allclose(v["coords"], want, rtol=0, atol=1e-4)
  assert v["coords"][9:, 0].min() >= v["coords"][:9, 0].max()  # hemispheres apart in x
  with open(os.path.join(out, "image_files.json")) as f:
    rows = json.load(f)["rows"]
  assert [r[2] for r in rows] == data["nsd"].tolist() and [r[0] for r in rows] == list(range(7))
  # the sphere as two files, in either order, gives the same coordinates
  files = f"{sphere}/surf/rh.sphere,{sphere}/surf/lh.sphere"
  out2 = prepare.main(["algonauts", str(subj), f"--sphere={files}",
                       f"--out={tmp_path / 'ds2'}", "--size=4"])  # fmt: skip
  ds2 = image_records.open_stimulus(out2)
  np.testing.assert_array_equal(ds2.vertices()["coords"], v["coords"])
  assert ds2.meta["image_size"] == [4, 4] and ds2.meta["original_sizes"] == {"10x10": 7}


def test_separate_hemispheres_only_moves_overlapping_right():
  lh = np.array([[-2.0, 0, 0], [2.0, 1, 0]])
  rh = np.array([[10.0, 0, 0], [12.0, 0, 0]])
  np.testing.assert_array_equal(algonauts.separate_hemispheres(lh, rh), rh)  # already apart
  moved = algonauts.separate_hemispheres(lh, np.array([[-1.0, 5, 5], [3.0, 0, 0]]))
  np.testing.assert_array_equal(moved, [[4.0, 5, 5], [8.0, 0, 0]])  # starts at -2 + 1.5 * 4


def _break(subj, sphere, data, case):
  """Damage the subject folder one way; return the extra argv."""
  fmri = subj / "training_split" / "training_fmri"
  masks = subj / "roi_masks"
  if case == "image_count":
    os.remove(sorted((subj / "training_split" / "training_images").iterdir())[-1])
  elif case == "rows":
    np.save(fmri / "rh_training_fmri.npy", data["rh"]["fmri"][:-1])
  elif case == "nan_row":
    x = data["rh"]["fmri"].copy()
    x[4, [1, 3]] = np.nan
    np.save(fmri / "rh_training_fmri.npy", x)
  elif case == "columns":
    np.save(fmri / "lh_training_fmri.npy", data["lh"]["fmri"][:, :-1])
  elif case == "mask_length":
    mask = np.load(masks / "lh.all-vertices_fsaverage_space.npy")
    np.save(masks / "lh.all-vertices_fsaverage_space.npy", np.concatenate([mask, [0.0, 0.0]]))
  elif case == "missing_fmri":
    os.remove(fmri / "lh_training_fmri.npy")
  elif case == "missing_mask":
    os.remove(masks / "rh.all-vertices_fsaverage_space.npy")
  elif case == "no_sphere_flag":
    return []
  elif case == "sphere_folder_empty":
    shutil.rmtree(sphere / "surf")
    (sphere / "surf").mkdir()
  elif case == "sphere_not_surface":
    (sphere / "surf" / "rh.sphere").write_bytes(b"not a surface")
  return [f"--sphere={sphere}"]


@pytest.mark.parametrize(
  "case, match",
  [
    ("image_count", r"training_images: field 'images' expected 7 PNG files .*found 6"),
    ("rows", r"rh_training_fmri\.npy: field 'rows' expected 7 images .*found 6"),
    ("nan_row", r"rh_training_fmri\.npy: row 4 field 'fmri' expected finite values, found 2 NaN"),
    ("columns", r"lh\.all-vertices_fsaverage_space\.npy: field 'nonzero entries' expected 8 "
                r"\(the columns of .*lh_training_fmri\.npy\), found 9"),
    ("mask_length", r"lh\.sphere: field 'vertices' expected 164 \(the length of "
                    r".*lh\.all-vertices_fsaverage_space\.npy\), found 162"),
    ("missing_fmri", r"lh_training_fmri\.npy: field 'fmri' expected this file \(Algonauts 2023"),
    ("missing_mask", r"rh\.all-vertices_fsaverage_space\.npy: field 'roi mask' expected this file"),
    ("no_sphere_flag", r"--sphere: field 'sphere' expected a FreeSurfer fsaverage sphere: a "
                       r"folder with lh\.sphere and rh\.sphere.*found none"),
    ("sphere_folder_empty", r"fsaverage: field 'sphere' \(--sphere\) expected lh\.sphere and "
                            r"rh\.sphere"),
    ("sphere_not_surface", r"rh\.sphere: field 'sphere' expected a FreeSurfer surface file"),
  ],
)  # fmt: skip
def test_refusals_name_file_and_field(tmp_path, capsys, case, match):
  subj, sphere, data = _subject(tmp_path)
  extra = _break(subj, sphere, data, case)
  out = tmp_path / "out"
  prepare_refuses(capsys, ["algonauts", subj, f"--out={out}", "--size=0", *extra], match, out)
