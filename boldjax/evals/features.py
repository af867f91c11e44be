"""The task's features for every labelled example (evals.examples), extracted jitted and
sharded over the mesh's data axes, batch by batch, on the params `task.feature_params`
gives."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from boldjax.evals.examples import ExampleSet


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """The same full batch on every process -> global arrays split over the data axes."""
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    for k, v in batch.items()
  }


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def vector_keys(sample: dict[str, Any], keys: tuple[str, ...] | None) -> list[str]:
  """Keys probed as vectors: `keys`, or every (B, F) output plus 'cls' (B, K, F)."""
  if keys:
    missing = [k for k in keys if k not in sample]
    if missing:
      raise KeyError(f"--features {missing}: not in features() output {sorted(sample)}")
    for k in keys:
      if len(sample[k].shape) not in (2, 3) or k in ("tokens", "token_mask"):
        raise ValueError(
          f"--features {k!r}: expected a (B, F) or (B, K, F) vector feature, found shape "
          f"{tuple(sample[k].shape)}"
        )
    return list(keys)
  out = [k for k, v in sample.items() if len(v.shape) == 2 and k != "token_mask"]
  if "cls" in sample and len(sample["cls"].shape) == 3:
    out.append("cls")
  return sorted(out)


def extract_features(
  task: Any,
  params: Any,
  examples: ExampleSet,
  *,
  mesh: Any,
  rules: Any,
  batch_size: int = 64,
  keys: tuple[str, ...] | None = None,
  tokens: bool = True,
  label: str = "model",
  log: Callable[[str], None] | None = print,
) -> dict[str, np.ndarray]:
  """{key: (n, K', F)} vector features (+ 'tokens' (n, K, N, D) float16 and 'token_mask'
  (n, K, N) when tokens=True and features() gives them), computed in jitted batches
  sharded over the mesh's data axes; the last batch is padded by repeating a row."""
  import flax.linen as nn

  from boldjax import sharding

  n, k = examples.num_examples, examples.num_crops
  flat = {key: v.reshape(n * k, *v.shape[2:]) for key, v in examples.inputs.items()}
  m = n * k
  shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  b = max(shards, (min(batch_size, m) + shards - 1) // shards * shards)
  batch_sh = sharding.batch_sharding(mesh)
  fn = jax.jit(task.features)
  outs: dict[str, list[np.ndarray]] = {}
  chosen: list[str] | None = None
  start_t = last = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for start in range(0, m, b):
      stop = min(start + b, m)
      idx = np.minimum(np.arange(start, start + b), m - 1)
      batch = _to_global({key: v[idx] for key, v in flat.items()}, batch_sh)
      out = fn(params, batch)
      if chosen is None:
        chosen = vector_keys(out, keys)
        if tokens and "tokens" in out:
          chosen += ["tokens", "token_mask"]
      for key in chosen:
        if key == "token_mask" and "token_mask" not in out:
          value = np.ones(out["tokens"].shape[:2], bool)
        else:
          value = _to_host(out[key])
        if key == "tokens":
          value = value.astype(np.float16)
        outs.setdefault(key, []).append(value[: stop - start])
      now = time.perf_counter()
      if log is not None and (now - last > 10 or stop == m):
        last = now
        log(
          f"[boldjax.evaluate] {label} features: {stop}/{m} crops "
          f"({stop / max(now - start_t, 1e-9):.0f}/s)"
        )
  result = {}
  for key, parts in outs.items():
    arr = np.concatenate(parts).reshape(n, k, *parts[0].shape[1:])
    if key not in ("tokens", "token_mask") and arr.ndim == 4:  # model crops (B, K', F)
      arr = arr.reshape(n, -1, arr.shape[-1])
    result[key] = arr
  return result
