"""Cortical geometry: flat surfaces, network atlases, the flat-map resampler, plotting."""

from boldjax.geometry.atlases import network_labels
from boldjax.geometry.flatmap import FlatMapResampler
from boldjax.geometry.plotting import plot_flat_maps, plot_surface_values
from boldjax.geometry.surfaces import KNOWN_SPACES, FlatSurface, load_flat_surface

__all__ = [
  "KNOWN_SPACES",
  "FlatMapResampler",
  "FlatSurface",
  "load_flat_surface",
  "network_labels",
  "plot_flat_maps",
  "plot_surface_values",
]
