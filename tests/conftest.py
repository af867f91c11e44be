"""Test setup: 8 fake CPU devices, parsed absl flags (grain reads them), a private cache."""

import os
import shutil
import tempfile

import controls
import jax
import pytest
from absl import flags

from boldjax import xla_flags

xla_flags.apply_defaults()  # as the entry points do: the tests run the same XLA
jax.config.update("jax_num_cpu_devices", 8)
flags.FLAGS.mark_as_parsed()

# Synthetic datasets built by tests go to a per-session cache, never the user's.
_CACHE = None
if "BOLDJAX_CACHE" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="boldjax-test-cache-")
  os.environ["BOLDJAX_CACHE"] = _CACHE


def pytest_addoption(parser):
  parser.addoption(
    "--control",
    choices=controls.CONTROLS,
    help="negative control: run only the value checks marked for it, expecting them to fail",
  )


def pytest_collection_modifyitems(config, items):
  if config.getoption("--control"):
    controls.mark_items(config.getoption("--control"), items)


@pytest.fixture(autouse=True)
def _negative_control(request, monkeypatch, tmp_path_factory):
  control = request.config.getoption("--control")
  if control and request.node.get_closest_marker("value_check"):
    controls.apply(control, monkeypatch, tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


# Hypothesis profiles (tests/test_fuzz_importers.py): "ci" is derandomized and small (the
# fuzz file in ~1.5 min); `pytest --hypothesis-profile=long` runs 10x as many, randomized.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
  "ci",
  derandomize=True,
  max_examples=80,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  print_blob=True,
)
settings.register_profile(
  "long",
  parent=settings.get_profile("ci"),
  derandomize=False,
  max_examples=800,
)
settings.load_profile("ci")
