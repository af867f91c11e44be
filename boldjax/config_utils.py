"""Helpers for config files: `get_config("size=tiny,runlocal")` argument parsing."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from boldjax.cli import InputError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag' against typed defaults; a bare key sets a bool to True.

  Unknown keys are an error that lists the known ones, so a typo never passes silently.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise InputError(
        f"config argument {key!r} is unknown; known arguments: {sorted(defaults)} "
        f"(in {arg[:200]!r})"
      )
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise InputError(f"config argument {key!r} needs a value ({key}=...), got a bare flag")
      out[key] = True
      continue
    value = _coerce(key, raw.strip(), default)
    try:
      out[key] = value
    except TypeError as e:  # ConfigDict keeps a field's type: shape=1 for a tuple default
      raise InputError(
        f"config argument {key!r}: expected a {type(default).__name__} like {default!r}, "
        f"found {repr(value)[:80]}"
      ) from e
  return out


def _coerce(key: str, raw: str, default: Any) -> Any:
  """raw as the type of default; a malformed value is an InputError naming the argument."""
  try:
    return _coerce_value(key, raw, default)
  except InputError:
    raise
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
    kind = type(default).__name__
    raise InputError(
      f"config argument {key!r}: expected a {kind} like {default!r}, found {raw[:80]!r} "
      f"({type(e).__name__}: {' '.join(str(e).split())})"
    ) from None


def _coerce_value(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    if raw.lower() in ("1", "true", "yes", "on"):
      return True
    if raw.lower() in ("0", "false", "no", "off"):
      return False
    raise InputError(f"config argument {key!r}: expected a boolean, found {raw!r}")
  if isinstance(default, int):
    return int(raw)
  if isinstance(default, float):
    return float(raw)
  if isinstance(default, str) or default is None:
    return raw
  return ast.literal_eval(raw)
