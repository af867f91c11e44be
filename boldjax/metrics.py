"""Training metrics: clu.metrics averages, a TensorFlow-free writer, and progress lines.

clu.metric_writers imports TensorFlow, so the writer here keeps clu's method names
(write_scalars, write_hparams, flush, close) and writes JSONL plus TensorBoard event
files through tensorboardX.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import jax
import numpy as np
from clu import metrics as clu_metrics
from etils import epath


def average_collection(names) -> type[clu_metrics.Collection]:
  """A clu Collection with one Average per metric name."""
  return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


class MetricAccumulator:
  """Averages step metrics over a log interval with clu.metrics.Average."""

  def __init__(self):
    self._collection = None
    self._value = None

  def add(self, step_metrics: Mapping[str, jax.Array]) -> None:
    if self._collection is None:
      self._collection = average_collection(sorted(step_metrics))
    update = self._collection.single_from_model_output(**step_metrics)
    self._value = update if self._value is None else self._value.merge(update)

  def compute(self) -> dict[str, float]:
    if self._value is None:
      return {}
    out = {k: float(v) for k, v in self._value.compute().items()}
    self._value = None
    return out


class MetricWriter:
  """JSONL + TensorBoard writer; only process 0 writes.

  All files go through etils.epath. An object store cannot append, so on a remote workdir
  the JSONL is kept in memory and rewritten whole on flush, and TensorBoard events are
  written to a local staging folder and copied up on flush (tensorboardX does its own IO).
  """

  def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool | None = None,
               remote_flush_seconds: float = 30.0):  # fmt: skip
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._root = epath.Path(workdir)
    self._remote = "://" in str(workdir)
    self._jsonl = None
    self._lines: list[str] = []
    self._tb = None
    self._staging = None
    self._flush_every = remote_flush_seconds
    self._last_flush = time.monotonic()
    if not self.enabled:
      return
    self._root.mkdir(parents=True, exist_ok=True)
    file = self._root / "metrics.jsonl"
    if self._remote:
      self._lines = file.read_text().splitlines(keepends=True) if file.exists() else []
    else:
      self._jsonl = file.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      if self._remote:
        self._staging = tempfile.mkdtemp(prefix="boldjax-tb-")
        self._tb = SummaryWriter(self._staging)
      else:
        self._tb = SummaryWriter(str(self._root / "tensorboard"))

  def _write_line(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._last_flush > self._flush_every:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    self._write_line(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, _to_float(v), int(step))

  def write_hparams(self, hparams: Mapping[str, object]) -> None:
    if not self.enabled:
      return
    self._write_line(json.dumps({"hparams": hparams}, default=str) + "\n")
    if self._tb is not None:
      self._tb.add_text("config", "```\n" + json.dumps(hparams, indent=2, default=str) + "\n```")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self.enabled and self._remote:
      (self._root / "metrics.jsonl").write_text("".join(self._lines))
      if self._staging is not None:
        _upload(self._staging, self._root / "tensorboard")
      self._last_flush = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None
    self._tb = None


def _upload(local_dir: str, remote: epath.Path) -> None:
  """Copy every file under local_dir to remote (same relative names)."""
  for folder, _, names in os.walk(local_dir):
    for name in names:
      local = os.path.join(folder, name)
      target = remote / os.path.relpath(local, local_dir)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(epath.Path(local).read_bytes())


def _to_float(v) -> float:
  return float(np.asarray(v))


def read_jsonl(path) -> list[dict]:
  """Scalar records of a metrics.jsonl (hparams lines skipped)."""
  lines = epath.Path(path).read_text().splitlines()
  return [r for r in map(json.loads, filter(None, lines)) if "step" in r]


class Progress:
  """One line per log interval: step, metrics, steps/s and ETA."""

  def __init__(self, total_steps: int, first_step: int = 0):
    self.total = total_steps
    self._t0 = time.perf_counter()
    self._s0 = first_step
    self._last_t = self._t0
    self._last_s = first_step

  def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
    now = time.perf_counter()
    rate = (step - self._last_s) / max(now - self._last_t, 1e-9)
    overall = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / overall if overall > 0 else float("nan")
    self._last_t, self._last_s = now, step
    parts = [f"step {step:>6d}/{self.total}"]
    parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
    parts += [f"{rate:.2f} steps/s", f"ETA {_fmt_seconds(eta)}"]
    return " | ".join(parts), rate


def _fmt_seconds(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
