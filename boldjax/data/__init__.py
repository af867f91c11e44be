"""Data layer: flat-map datasets on disk, importers, transforms and the grain pipeline."""

# Modules that register importers (registry kind "importer"); both keep heavy imports lazy.
from boldjax.data import flat_builder, nsd_flat  # noqa: F401
