"""Training metrics: clu.metrics averages, a TensorFlow-free writer, and progress lines.

clu.metric_writers imports TensorFlow, so the writer here keeps clu's method names
(write_scalars, write_hparams, flush, close) and writes JSONL plus TensorBoard event
files through tensorboardX.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from clu import metrics as clu_metrics


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
  """JSONL + TensorBoard writer; only process 0 writes."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, _to_float(v), int(step))

  def write_hparams(self, hparams: Mapping[str, object]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"hparams": hparams}, default=str) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_text("config", "```\n" + json.dumps(hparams, indent=2, default=str) + "\n```")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _to_float(v) -> float:
  return float(np.asarray(v))


def read_jsonl(path: str) -> list[dict]:
  """Scalar records of a metrics.jsonl (hparams lines skipped)."""
  with open(path) as f:
    return [r for r in map(json.loads, f) if "step" in r]


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
