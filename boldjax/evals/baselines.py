"""Baselines probed on the same examples and splits as the model's features.

fc           upper triangle of the Pearson functional connectivity of each crop's frames
             (the Brainmarks connectome baseline); parcellated data only.
identity     the raw input flattened: the zero-padded (T, R) window, or a flat map's
             in-mask pixels (Brainmarks' identity baseline, scored with an MLP).
random_init  the same task with fresh parameters from task.init, through the same
             features() path: what the architecture gives without training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from boldjax.evals.features import ExampleSet

FC_NA = "a single flat map has no time axis to correlate"


def fc_features(bold: np.ndarray, mask: np.ndarray, chunk: int = 256) -> np.ndarray:
  """(..., T, R) windows + (..., T) frame masks -> (..., R(R-1)/2) float32 upper triangle
  (k=1, row-major, as np.triu_indices) of the Pearson correlation over the masked frames.

  A parcel constant over the window gets correlation 0 (np.corrcoef would give nan).
  """
  bold = np.asarray(bold, np.float32)
  mask = np.asarray(mask, bool)
  if bold.shape[:-1] != mask.shape:
    raise ValueError(
      f"fc_features: mask shape expected {bold.shape[:-1]} (bold without R), found {mask.shape}"
    )
  lead, (t, r) = bold.shape[:-2], bold.shape[-2:]
  x = bold.reshape(-1, t, r)
  m = mask.reshape(-1, t, 1).astype(np.float64)
  iu = np.triu_indices(r, k=1)
  out = np.empty((len(x), len(iu[0])), np.float32)
  for s in range(0, len(x), chunk):
    xs, ms = x[s : s + chunk].astype(np.float64), m[s : s + chunk]
    n = np.maximum(ms.sum(axis=1, keepdims=True), 1.0)
    centred = (xs - (xs * ms).sum(axis=1, keepdims=True) / n) * ms
    norm = np.sqrt((centred**2).sum(axis=1))  # (b, R)
    cov = np.einsum("btr,bts->brs", centred, centred)
    denom = norm[:, :, None] * norm[:, None, :]
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)
    out[s : s + chunk] = corr[:, iu[0], iu[1]]
  return out.reshape(*lead, -1)


def identity_features(examples: ExampleSet) -> np.ndarray:
  """(n, K, F) raw inputs: the zero-padded window (T * R) or the in-mask pixels of a map."""
  n, k = examples.num_examples, examples.num_crops
  if examples.kind == "parcellated":
    return examples.inputs["bold"].reshape(n, k, -1)
  patch_mask = examples.meta["patch_mask"]
  return examples.inputs["patches"][..., patch_mask].reshape(n, k, -1)


def fc_or_reason(examples: ExampleSet) -> tuple[np.ndarray | None, str | None]:
  """(n, K, R(R-1)/2) FC features, or (None, why it does not apply)."""
  if examples.kind != "parcellated":
    return None, FC_NA
  return fc_features(examples.inputs["bold"], examples.inputs["mask"]), None


def random_init_params(run: Any, seed: int) -> Any:
  """Fresh params for run.task (its init on an example of the training format, sharded on
  run.mesh as the train loop shards them); never grafted from a pretrained run."""
  import flax.linen as nn

  from boldjax import build
  from boldjax import state as state_lib
  from boldjax.data import pipeline_for

  config = run.config
  per_device = jax.device_count() // jax.process_count()
  local = next(iter(build.train_dataset(pipeline_for(config.data), config, run.info, per_device)))
  example = state_lib.global_example(local)
  key = jax.random.key(seed)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    spec = state_lib.make_state_spec(run.task, optax.identity(), example, key, run.mesh, run.rules)
    fresh = spec.init(key)
  return fresh.params, fresh.extra
