"""Test setup: 8 fake CPU devices, parsed absl flags (grain reads them), a private cache."""

import os
import tempfile

import jax
from absl import flags

jax.config.update("jax_num_cpu_devices", 8)
flags.FLAGS.mark_as_parsed()
# Synthetic datasets built by tests go to a per-session cache, never the user's.
os.environ.setdefault("BOLDJAX_CACHE", tempfile.mkdtemp(prefix="boldjax-test-cache-"))
