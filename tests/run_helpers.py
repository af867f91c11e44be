"""Configs for the small runs the tests train."""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import gpt_small


def gpt_runlocal(**overrides) -> ml_collections.ConfigDict:
  """configs/gpt_small.py:runlocal with dotted overrides ('evals.val.every_steps': 1)."""
  return with_overrides(gpt_small.get_config("runlocal"), **overrides)


def with_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """config with dotted-key overrides ('evals.val.every_steps': 1), locked again."""
  config.unlock()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  config.lock()
  return config


def read_bold_runs(path: str, *, with_split: bool = False) -> tuple[Any, dict[str, Any]]:
  """(dataset, {run name: record}) of a parcellated dataset, every split read back.

  with_split=True maps each run to (split, record) instead.
  """
  from boldjax.data import bold_records

  ds = bold_records.open_bold_dataset(path)
  out = {}
  for split, n in ds.splits.items():
    src = ds.split(split)
    for i in range(n):
      rec = src[i]
      out[rec["run"]] = (split, rec) if with_split else rec
  return ds, out
