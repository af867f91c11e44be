"""Data layer: datasets on disk, importers, transforms and the grain pipelines.

Each pipeline registers as ("pipeline", source name) and offers
prepare(data_cfg) -> info and make_dataset(data_cfg, info, *, split, train, seed,
batch_size, shard_index, shard_count) -> grain.IterDataset; the train loop picks one
by config.data.source and knows nothing else about the data.
"""

from typing import Any

# Modules that register importers and pipelines; heavy imports inside them stay lazy.
from boldjax.data import (  # noqa: F401
  bold_pipeline,
  encoding_pipeline,
  fmri2img_pipeline,
  importers,
  pipeline,
)


def pipeline_for(data_cfg: Any):
  """The registered pipeline for config.data.source."""
  from boldjax import registry

  return registry.get("pipeline", data_cfg.source)
