"""Nested-dict helpers the converters share (param trees addressed by key paths)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  """tree[p0][p1]...[pn] = value, creating the intermediate dicts."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  """tree[p0][p1]...[pn]."""
  for p in path:
    tree = tree[p]
  return tree


def check_filled(params: Any, abstract: Any, source: str, model: str) -> None:
  """Every param of `abstract` (jax.eval_shape of the model) filled with its shape, nothing
  else; InputError naming the first misses otherwise."""
  import jax

  from boldjax.cli import InputError

  leaves = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]  # noqa: E731
  want = {jax.tree_util.keystr(p): a.shape for p, a in leaves(abstract)}
  have = {jax.tree_util.keystr(p): a.shape for p, a in leaves(params)}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise InputError(
      f"{source}: params left unfilled {missing[:6]} / not in the model {extra[:6]} for {model}"
    )
  for k, shape in want.items():
    if tuple(have[k]) != tuple(shape):
      raise InputError(f"{source}: param {k}: shape expected {tuple(shape)}, found {have[k]}")
