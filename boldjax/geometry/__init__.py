"""Cortical geometry: flat surfaces, network atlases, flat-map resampling and plots."""

from boldjax.geometry.atlases import network_labels
from boldjax.geometry.flatmap import FlatMapResampler
from boldjax.geometry.surfaces import FlatSurface, load_flat_surface

__all__ = ["FlatMapResampler", "FlatSurface", "load_flat_surface", "network_labels"]
