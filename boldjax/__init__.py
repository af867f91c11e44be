"""boldjax: a JAX/Flax training stack for fMRI foundation models."""

from __future__ import annotations

import os
from importlib import metadata

__version__ = "0.1.0"

# XLA:CPU flags measured on boldjax's train steps (issue #6, benchmarks/README.md "Tuning
# log"). `-individual_dot` gives every plain dot to Eigen instead of YNNPACK: faster steps
# for every benchmarked family on this jaxlib. Added to the user's XLA_FLAGS (unless they
# set the same flag themselves) here, before jax initialises its backend; only for jaxlib
# >= 0.10 (0.10.2 is pinned in requirements.txt): an older jaxlib would abort on the flag.
# BOLDJAX_XLA_DEFAULTS=0 turns this off.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",)


def _jaxlib_at_least(major: int, minor: int) -> bool:
  try:
    parts = metadata.version("jaxlib").split(".")[:2]
    return tuple(int(p) for p in parts) >= (major, minor)
  except (metadata.PackageNotFoundError, ValueError):
    return False


def _with_default_xla_flags(user_flags: str) -> str:
  """user_flags plus each default whose flag name the user did not set."""
  flags = user_flags.split()
  for default in DEFAULT_XLA_FLAGS:
    name = default.split("=")[0]
    if not any(f.split("=")[0] == name for f in flags):
      flags.append(default)
  return " ".join(flags)


if os.environ.get("BOLDJAX_XLA_DEFAULTS", "1") != "0" and _jaxlib_at_least(0, 10):
  os.environ["XLA_FLAGS"] = _with_default_xla_flags(os.environ.get("XLA_FLAGS", ""))
