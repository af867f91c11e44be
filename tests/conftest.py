"""Test setup: 8 fake CPU devices, parsed absl flags (grain reads them), a private cache."""

import os
import shutil
import tempfile

import jax
from absl import flags

jax.config.update("jax_num_cpu_devices", 8)
flags.FLAGS.mark_as_parsed()

# Synthetic datasets built by tests go to a per-session cache, never the user's.
_CACHE = None
if "BOLDJAX_CACHE" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="boldjax-test-cache-")
  os.environ["BOLDJAX_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
