"""Name -> object registries, so configs pick models, tasks and evaluators by string."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str) -> Callable[[T], T]:
  """Decorator: make `obj` reachable as get(kind, name)."""

  def wrap(obj: T) -> T:
    table = _REGISTRY.setdefault(kind, {})
    if name in table and table[name] is not obj:
      raise ValueError(f"{kind} {name!r} is registered twice: {table[name]!r} and {obj!r}")
    table[name] = obj
    return obj

  return wrap


def get(kind: str, name: str) -> Any:
  """Look up a registered object; an unknown name lists the known ones."""
  _import_builtin_modules()
  table = _REGISTRY.get(kind, {})
  if name not in table:
    known = sorted(table)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {known}.{hint}")
  return table[name]


def names(kind: str) -> list[str]:
  _import_builtin_modules()
  return sorted(_REGISTRY.get(kind, {}))


def _import_builtin_modules() -> None:
  """Import the packages whose modules register themselves on import."""
  import importlib

  for package in ("boldjax.models", "boldjax.tasks", "boldjax.evals", "boldjax.data"):
    importlib.import_module(package)
