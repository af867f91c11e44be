"""Flat surfaces, atlases, the flat-map resampler and plotting: values, not just shapes."""

from __future__ import annotations

import numpy as np
import pytest

from boldjax.geometry import (
  KNOWN_SPACES,
  FlatMapResampler,
  load_flat_surface,
  network_labels,
  plot_flat_maps,
  plot_surface_values,
)
from boldjax.geometry.plotting import robust_limit


@pytest.fixture(scope="module")
def fslr():
  return load_flat_surface("fsLR32k")


@pytest.fixture(scope="module")
def fs5():
  return load_flat_surface("fsaverage5")


@pytest.fixture(scope="module")
def resampler(fslr):
  return FlatMapResampler.fit(fslr, height=100)


def _flat_area(surface) -> float:
  a, b, c = (surface.coords[surface.faces[:, i]] for i in range(3))
  u, v = b - a, c - a
  return float(0.5 * np.abs(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]).sum())


# ------------------------------------------------------------------ surfaces


@pytest.mark.parametrize(
  "space, num_vertices, num_cortex", [("fsLR32k", 64984, 59412), ("fsaverage5", 20484, 19002)]
)
def test_surface_layout(space, num_vertices, num_cortex):
  s = load_flat_surface(space)
  assert s is load_flat_surface(space)  # cached
  assert s.coords.shape == (num_vertices, 2) and s.coords.dtype == np.float64
  assert s.faces.dtype == np.int64 and s.faces.shape[1] == 3
  assert int(s.cortex.sum()) == num_cortex
  half = num_vertices // 2
  np.testing.assert_array_equal(s.hemisphere, np.repeat(np.int8([0, 1]), half))
  # every kept face is cortex, within one hemisphere, and not a seam-spanning sliver
  assert s.cortex[s.faces].all()
  assert (s.hemisphere[s.faces] == s.hemisphere[s.faces[:, :1]]).all()
  edges = np.linalg.norm(s.coords[s.faces] - s.coords[np.roll(s.faces, 1, axis=1)], axis=-1)
  assert edges.max() <= 4 * np.median(edges) * 1.01
  # hemispheres side by side with a gap; left at x < 0, right at x > 0
  xl, xr = s.coords[s.hemisphere == 0, 0], s.coords[s.hemisphere == 1, 0]
  assert xl.max() < -5 and xr.min() > 5
  # the sphere is scaled to a cortical area of 40k-120k mm^2 per hemisphere
  r = np.linalg.norm(s.sphere[s.hemisphere == 0], axis=1)
  assert np.ptp(r) < 1e-3 * r.mean() and 55 < r.mean() < 100


def test_fslr_cut_vertices_are_placed_near_their_neighbours(fslr):
  missing = np.flatnonzero(fslr.cortex & ~fslr.placed)
  assert 0 < len(missing) < 100  # a few dozen cortex vertices are left out of the flat mesh
  placed = fslr.coords[fslr.placed]
  for v in missing:
    nearest = np.min(np.linalg.norm(placed - fslr.coords[v], axis=1))
    assert nearest == 0.0  # on a placed neighbour, not at the origin or in a cut


def test_unknown_space_lists_known():
  with pytest.raises(ValueError, match="fsLR32k.*fsaverage5"):
    load_flat_surface("fsaverage7")
  assert KNOWN_SPACES == ("fsLR32k", "fsaverage5")


# ------------------------------------------------------------------ atlases


def test_yeo7_on_fslr(fslr):
  labels, names = network_labels("fsLR32k", "yeo7")
  assert names == [
    "",
    "Visual",
    "Somatomotor",
    "Dorsal Attention",
    "Ventral Attention",
    "Limbic",
    "Frontoparietal",
    "Default",
  ]
  assert labels.shape == (64984,)
  assert (labels[~fslr.cortex] == 0).all()
  counts = np.bincount(labels[fslr.cortex], minlength=8)
  np.testing.assert_array_equal(counts, [746, 8788, 11960, 6762, 7173, 4536, 7311, 12136])
  # occipital poles face each other on the flat map: Visual lies nearest the midline
  mean_abs_x = [np.abs(fslr.coords[labels == k, 0]).mean() for k in range(1, 8)]
  assert names[1 + int(np.argmin(mean_abs_x))] == "Visual"
  assert min(mean_abs_x[1:]) > 2 * mean_abs_x[0]
  labels[:] = -1  # callers get a copy
  assert network_labels("fsLR32k")[0].min() == 0


def test_other_fslr_atlases(fslr):
  labels17, names17 = network_labels("fsLR32k", "yeo17")
  assert len(names17) == 18 and names17[1] == "network_1"
  assert set(np.unique(labels17[fslr.cortex])) <= set(range(18))
  ca, ca_names = network_labels("fsLR32k", "ca")
  assert ca_names[1:3] == ["Visual1", "Visual2"] and len(ca_names) == 13
  assert (ca[fslr.cortex] > 0).all()  # Cole-Anticevic covers all cortex


def test_fsaverage5_clusters(fs5):
  labels, names = network_labels("fsaverage5")
  assert names == [""] + [f"cluster_{k}" for k in range(7)]
  assert (labels[~fs5.cortex] == 0).all() and (labels[fs5.cortex] > 0).all()
  left = (fs5.hemisphere == 0) & fs5.cortex
  centres = [fs5.sphere[left & (labels == k), 1].mean() for k in range(1, 8)]
  assert np.all(np.diff(centres) > 0)  # numbered posterior -> anterior
  counts = np.bincount(labels[fs5.cortex], minlength=8)[1:]
  assert counts.min() > 1500
  np.testing.assert_array_equal(network_labels("fsaverage5", "clusters")[0], labels)


def test_unknown_atlas():
  with pytest.raises(ValueError, match="'yeo17'.*fsaverage5"):
    network_labels("fsaverage5", "yeo17")


# ------------------------------------------------------------------ resampler


@pytest.mark.parametrize(
  "space, kwargs, shape, pixels",
  [
    ("fsLR32k", {"height": 64}, (64, 158), 5331),
    ("fsLR32k", {"height": 100}, (100, 248), 13363),
    ("fsLR32k", {"pixel_size": 2.0}, (185, 459), 46039),
    ("fsaverage5", {"height": 100}, (100, 232), 14006),
    ("fsaverage5", {"width": 120}, (53, 120), None),
  ],
)
def test_fit_grid_and_mask_area(space, kwargs, shape, pixels):
  s = load_flat_surface(space)
  r = FlatMapResampler.fit(s, **kwargs)
  assert (r.height, r.width) == shape and r.mask.shape == shape
  dx, dy = r.pixel_size
  assert dx == pytest.approx(dy, rel=1e-12)
  # the mask covers the flat area of the kept faces (within 2%: boundary pixels)
  assert r.num_pixels == pytest.approx(_flat_area(s) / (dx * dy), rel=0.02)
  if pixels is not None:
    assert r.num_pixels == pixels
  # one-pixel margin: no mask pixel on the border
  assert not (r.mask[0].any() or r.mask[-1].any() or r.mask[:, 0].any() or r.mask[:, -1].any())


@pytest.mark.parametrize("space", ["fsLR32k", "fsaverage5"])
def test_linear_functions_map_exactly(space):
  s = load_flat_surface(space)
  r = FlatMapResampler.fit(s, height=80)
  x, y = s.coords[:, 0], s.coords[:, 1]
  values = np.stack([0.01 * x - 0.02 * y + 0.5, np.ones_like(x), y / 100])
  img = r.to_pixels(values)
  assert img.shape == (3, 80, r.width) and img.dtype == np.float32
  px, py = r.pixel_centres()
  expect = np.stack([0.01 * px - 0.02 * py + 0.5, np.ones_like(px), py / 100])
  np.testing.assert_allclose(img[:, r.mask], expect[:, r.mask], atol=1e-5)
  assert (img[:, ~r.mask] == 0).all()
  # row 0 is the top: y decreases down the rows
  col = img[2, :, r.width // 4]
  rows = np.flatnonzero(r.mask[:, r.width // 4])
  assert np.all(np.diff(col[rows]) < 0)


@pytest.mark.parametrize("space", ["fsLR32k", "fsaverage5"])
def test_round_trip_of_smooth_values(space):
  s = load_flat_surface(space)
  r = FlatMapResampler.fit(s, height=100)
  x, y = s.coords[:, 0], s.coords[:, 1]
  v = np.sin(x / 40) + np.cos(y / 30) + 0.5 * np.sin((x + y) / 25)
  back = r.to_vertices(r.to_pixels(v))
  c = s.cortex
  assert np.corrcoef(back[c], v[c])[0, 1] > 0.999
  err = np.abs(back[c] - v[c])
  assert err.mean() < 0.01 and np.percentile(err, 99) < 0.1
  assert (back[~c] == 0).all()


def test_to_vertices_renormalises_over_the_mask(resampler, fslr):
  ones = resampler.to_vertices(resampler.mask.astype(np.float32))
  np.testing.assert_allclose(ones[fslr.cortex], 1.0, rtol=0, atol=1e-6)
  assert (ones[~fslr.cortex] == 0).all()
  # values outside the mask never leak into vertices
  junk = np.where(resampler.mask, 0.0, 1e6).astype(np.float32)
  assert np.abs(resampler.to_vertices(junk)).max() == 0
  # every cortex row sums to one, every pixel row to one or zero
  np.testing.assert_allclose(resampler.vertices_from_pixels.sum(axis=1).A1[fslr.cortex], 1, 1e-6)
  rows = resampler.pixels_from_vertices.sum(axis=1).A1
  np.testing.assert_allclose(rows[resampler.mask.ravel()], 1, atol=1e-6)
  assert (rows[~resampler.mask.ravel()] == 0).all()


def test_batch_shapes_and_errors(resampler):
  v = np.random.default_rng(0).normal(size=(2, 3, resampler.num_vertices))
  img = resampler.to_pixels(v)
  assert img.shape == (2, 3, resampler.height, resampler.width)
  np.testing.assert_allclose(img[1, 2], resampler.to_pixels(v[1, 2]), atol=1e-6)
  assert resampler.to_vertices(img).shape == (2, 3, resampler.num_vertices)
  with pytest.raises(ValueError, match="expected 64984 vertices, found shape"):
    resampler.to_pixels(np.zeros(10))
  with pytest.raises(ValueError, match=r"expected \(100, 248\)"):
    resampler.to_vertices(np.zeros((100, 100)))
  with pytest.raises(ValueError, match="pixel_size or height"):
    FlatMapResampler.fit(load_flat_surface(), height=10, pixel_size=1.0)


def test_explicit_extent(fslr):
  r = FlatMapResampler.fit(fslr, extent=(-100.0, 100.0, -120.0, 95.0), pixel_size=1.0)
  assert (r.height, r.width) == (215, 200) and r.extent == (-100.0, 100.0, -120.0, 95.0)
  px, py = r.pixel_centres()
  assert (px[0, 0], py[0, 0]) == (-99.5, 94.5)
  x, y = fslr.coords[:, 0], fslr.coords[:, 1]
  img = r.to_pixels(x + 2 * y)
  np.testing.assert_allclose(img[r.mask], (px + 2 * py)[r.mask], atol=1e-3)


def test_save_load_round_trip(resampler, tmp_path):
  path = tmp_path / "resampler.npz"
  resampler.save(path)
  loaded = FlatMapResampler.load(path)
  np.testing.assert_array_equal(loaded.mask, resampler.mask)
  assert loaded.extent == resampler.extent and loaded.num_vertices == resampler.num_vertices
  assert loaded.surface_name == "fsLR32k"
  for a, b in (
    (loaded.pixels_from_vertices, resampler.pixels_from_vertices),
    (loaded.vertices_from_pixels, resampler.vertices_from_pixels),
  ):
    assert (a != b).nnz == 0 and a.dtype == b.dtype
  v = np.random.default_rng(1).normal(size=(4, resampler.num_vertices)).astype(np.float32)
  np.testing.assert_array_equal(loaded.to_pixels(v), resampler.to_pixels(v))
  np.savez(tmp_path / "bad.npz", mask=np.zeros((2, 2), bool))
  with pytest.raises(ValueError, match="bad.npz: field 'format_version'"):
    FlatMapResampler.load(tmp_path / "bad.npz")


# ------------------------------------------------------------------ plotting


def test_robust_limit():
  maps = np.zeros((2, 10, 10), np.float32)
  mask = np.zeros((10, 10), bool)
  mask[:, :5] = True
  maps[..., :5] = np.linspace(-1, 1, 50).reshape(10, 5)
  maps[..., 5:] = 1e6  # outside the mask: ignored
  assert robust_limit(maps, mask) == pytest.approx(np.percentile(np.abs(maps[:, mask]), 99))
  assert robust_limit(np.zeros((3, 3)), None) == 1.0


def test_plot_flat_maps_png(resampler, fslr, tmp_path):
  from PIL import Image

  x = fslr.coords[:, 0]
  values = np.stack([np.sign(x), -np.sign(x)])  # left hemisphere blue, right red; then swapped
  path = plot_surface_values(
    values, resampler, str(tmp_path / "maps.png"), titles=["a", "b"], colorbar_label="z"
  )
  img = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert img.shape[0] > 100 and img.shape[1] > 300
  grey = (np.abs(img - 209).max(axis=-1) <= 2).mean()
  red = (img[..., 0] > img[..., 2] + 60).mean()
  blue = (img[..., 2] > img[..., 0] + 60).mean()
  assert grey > 0.05 and red > 0.05 and blue > 0.05
  single = plot_flat_maps(resampler.to_pixels(x), resampler.mask, str(tmp_path / "one.png"))
  assert Image.open(single).size[0] > 300
  with pytest.raises(ValueError, match="mask shape"):
    plot_flat_maps(np.zeros((3, 4)), np.zeros((4, 3), bool), str(tmp_path / "x.png"))
