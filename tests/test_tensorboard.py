"""The README's `tensorboard --logdir runs/` serves the scalars a run wrote."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import portpicker
import pytest

from boldjax import metrics


def _get(url: str):
  with urllib.request.urlopen(url, timeout=5) as response:
    return json.loads(response.read())


@pytest.mark.skipif(shutil.which("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_serves_the_scalars_a_run_wrote(tmp_path):
  runs = tmp_path / "runs"
  writer = metrics.MetricWriter(str(runs / "gpt"))
  for step, loss in ((2, 3.5), (4, 3.25), (6, 3.125)):
    writer.write_scalars(step, {"train/loss": loss})
  writer.close()

  port = portpicker.pick_unused_port()
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tensorboard.main",
      f"--logdir={runs}",
      "--host=127.0.0.1",
      f"--port={port}",
      "--load_fast=false",
    ],  # fmt: skip
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    deadline = time.monotonic() + 90
    tags = {}
    while time.monotonic() < deadline:
      try:
        tags = _get(f"{base}/tags")
        if tags:
          break
      except OSError:
        pass
      time.sleep(1)
    assert list(tags) == ["gpt/tensorboard"] and list(tags["gpt/tensorboard"]) == ["train/loss"]
    rows = _get(f"{base}/scalars?run=gpt/tensorboard&tag=train/loss")
    assert [(step, value) for _, step, value in rows] == [(2, 3.5), (4, 3.25), (6, 3.125)]
  finally:
    server.kill()
    server.wait()
