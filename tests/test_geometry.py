"""Flat surfaces, atlases and the flat-map resampler on the real packaged meshes."""

import numpy as np
import pytest

from boldjax.geometry import FlatMapResampler, load_flat_surface, network_labels
from boldjax.geometry.plotting import plot_flat_maps


@pytest.fixture(scope="module", params=["fsLR32k", "fsaverage5"])
def fitted(request):
  surface = load_flat_surface(request.param)
  return surface, FlatMapResampler.fit(surface, height=96)


def test_surfaces_are_real_meshes_side_by_side():
  fslr = load_flat_surface("fsLR32k")
  assert fslr.num_vertices == 2 * 32492 and fslr.cortex.sum() == 59412  # HCP medial-wall mask
  for s in (fslr, load_flat_surface("fsaverage5")):
    left = s.coords[s.cortex & (s.hemisphere == 0), 0]
    right = s.coords[s.cortex & (s.hemisphere == 1), 0]
    assert left.max() < 0 < right.min()
    assert s.cortex[s.faces].all()
  with pytest.raises(ValueError, match="known spaces"):
    load_flat_surface("fsaverage7")


def test_yeo7_labels_cover_the_cortex():
  labels, names = network_labels("fsLR32k", "yeo7")
  surface = load_flat_surface("fsLR32k")
  assert names[1] == "Visual" and len(names) == 8
  assert (labels[~surface.cortex] == 0).all()
  # Every Yeo network is present, and nearly the whole cortex is labelled.
  assert set(np.unique(labels)) == set(range(8))
  assert (labels[surface.cortex] > 0).mean() > 0.95
  with pytest.raises(ValueError, match="not available"):
    network_labels("fsLR32k", "schaefer400")


def test_linear_functions_are_reproduced_exactly(fitted):
  surface, r = fitted
  values = 0.3 * surface.coords[:, 0] - 0.7 * surface.coords[:, 1] + 2.0
  image = r.to_pixels(values)
  ii, jj = np.nonzero(r.mask)
  xmin, _, _, ymax = r.extent
  expected = 0.3 * (xmin + (jj + 0.5) * r.pixel_size) - 0.7 * (ymax - (ii + 0.5) * r.pixel_size)
  np.testing.assert_allclose(image[ii, jj], expected + 2.0, rtol=2e-6, atol=2e-5)
  assert (image[~r.mask] == 0).all()


def test_round_trip_to_vertices_of_smooth_field(fitted):
  surface, r = fitted
  xy = surface.coords
  smooth = np.sin(xy[:, 0] / 25.0) * np.cos(xy[:, 1] / 30.0)
  back = r.to_vertices(r.to_pixels(smooth))
  c = surface.cortex
  assert np.corrcoef(back[c], smooth[c])[0, 1] > 0.99
  assert np.abs(back[c] - smooth[c]).mean() < 0.02
  assert (back[~c] == 0).all()


def test_mask_size_and_save_load_round_trip(fitted, tmp_path):
  surface, r = fitted
  area = r.mask.sum() * r.pixel_size**2
  tri = surface.coords[surface.faces]
  mesh_area = 0.5 * np.abs(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])).sum()
  assert 0.85 < area / mesh_area < 1.15  # pixels cover the flat mesh's area
  r.save(tmp_path / "r.npz")
  r2 = FlatMapResampler.load(tmp_path / "r.npz")
  values = np.random.default_rng(0).normal(size=surface.num_vertices)
  np.testing.assert_array_equal(r2.to_pixels(values), r.to_pixels(values))
  np.testing.assert_array_equal(r2.mask, r.mask)
  assert r2.extent == r.extent


def test_wrong_shapes_are_clear_errors(fitted):
  _, r = fitted
  with pytest.raises(ValueError, match=f"expected last dimension {r.num_vertices}, found 3"):
    r.to_pixels(np.zeros(3))
  with pytest.raises(ValueError, match="must end in"):
    r.to_vertices(np.zeros((4, 4)))


def test_plot_writes_png(fitted, tmp_path):
  _, r = fitted
  maps = np.random.default_rng(0).normal(size=(3, r.height, r.width)) * r.mask
  path = plot_flat_maps(maps, r.mask, str(tmp_path / "m.png"), titles=["a", "b", "c"])
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="3 maps but 2 titles"):
    plot_flat_maps(maps, r.mask, str(tmp_path / "x.png"), titles=["a", "b"])
