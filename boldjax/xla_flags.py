"""XLA:CPU flags boldjax's entry points set before jax starts its backend.

Measured on boldjax's train steps (issue #6, benchmarks/README.md "Tuning log"):
`-individual_dot` gives every plain dot to Eigen instead of YNNPACK, faster steps for every
benchmarked family on this jaxlib. Only for jaxlib >= 0.10 (0.10.2 is pinned in
requirements.txt): an older jaxlib aborts on the flag. Entry points (main, evaluate,
sample, prepare, convert, benchmarks), the test suite and the notebooks call
`apply_defaults()`; importing boldjax changes nothing. BOLDJAX_XLA_DEFAULTS=0 turns it off.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",)


def _jaxlib_at_least(major: int, minor: int) -> bool:
  try:
    parts = metadata.version("jaxlib").split(".")[:2]
    return tuple(int(p) for p in parts) >= (major, minor)
  except (metadata.PackageNotFoundError, ValueError):
    return False


def with_defaults(user_flags: str) -> str:
  """user_flags plus each default whose flag name the user did not set."""
  flags = user_flags.split()
  for default in DEFAULT_XLA_FLAGS:
    name = default.split("=")[0]
    if not any(f.split("=")[0] == name for f in flags):
      flags.append(default)
  return " ".join(flags)


def apply_defaults() -> bool:
  """Add the defaults to XLA_FLAGS; False (with a warning) if jax's backend started first."""
  if os.environ.get("BOLDJAX_XLA_DEFAULTS", "1") == "0" or not _jaxlib_at_least(0, 10):
    return False
  current = os.environ.get("XLA_FLAGS", "")
  wanted = with_defaults(current)
  if wanted == current:
    return True
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    logging.warning("boldjax.xla_flags: jax's backend has started; XLA_FLAGS left as they are")
    return False
  os.environ["XLA_FLAGS"] = wanted
  return True
