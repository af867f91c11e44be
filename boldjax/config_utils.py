"""Helpers for config files: `get_config("size=tiny,runlocal")` argument parsing."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


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
      raise ValueError(
        f"config argument {key!r} is unknown; known arguments: {sorted(defaults)} (in {arg!r})"
      )
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...), got a bare flag")
      out[key] = True
      continue
    out[key] = _coerce(key, raw.strip(), default)
  return out


def _coerce(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    if raw.lower() in ("1", "true", "yes", "on"):
      return True
    if raw.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config argument {key!r}: expected a boolean, found {raw!r}")
  if isinstance(default, int):
    return int(raw)
  if isinstance(default, float):
    return float(raw)
  if isinstance(default, str) or default is None:
    return raw
  return ast.literal_eval(raw)


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """Plain nested dict (JSON-friendly) of a config, for logs and the workdir copy."""
  return config.to_dict()
