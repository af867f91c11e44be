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
