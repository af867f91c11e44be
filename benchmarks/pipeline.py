"""Input-pipeline throughput against the train step's consumption (issue #6, target 2).

  python -m benchmarks.pipeline [--json] [--batches N]

grain: batches/s of boldjax.data.pipeline.make_dataset(train=True) for configs/gpt_small.py
(the real transforms: dequantize, patchify, random patch order, tokenize; the config's
threads/workers), after the first batch. Train step: steps/s of the jitted donated boldjax
step on that config (benchmarks.run.build_jax). Resampling: maps/s of
FlatMapResampler.to_pixels on the config's surface and image height, one map per call and
64 per call.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np

from benchmarks import run


def grain_batches_per_s(config, num_batches: int = 50) -> float:
  """Batches/s of the train pipeline after its first batch (pipeline start-up excluded)."""
  from boldjax import build
  from boldjax.data import pipeline_for

  data = pipeline_for(config.data)
  it = iter(build.train_dataset(data, config, data.prepare(config.data)))
  next(it)
  t0 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches / (time.perf_counter() - t0)


def train_steps_per_s(config, steps: int = 10) -> float:
  """Steps/s of the boldjax train step on one fixed batch (compile and warm-up excluded)."""
  side = run.build_jax(config)
  state, metrics = side.step(side.state, side.batch)
  for _ in range(2):
    state, metrics = side.step(state, side.batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = side.step(state, side.batch)
  jax.block_until_ready((state, metrics))
  return steps / (time.perf_counter() - t0)


def resample_maps_per_s(space: str, height: int, per_call: int, seconds: float = 2.0) -> float:
  """Maps/s of FlatMapResampler.to_pixels with `per_call` maps in each call."""
  from boldjax.geometry import FlatMapResampler, load_flat_surface

  surface = load_flat_surface(space)
  resampler = FlatMapResampler.fit(surface, height=height)
  values = np.random.default_rng(0).standard_normal((per_call, surface.num_vertices))
  values = values.astype(np.float32)
  resampler.to_pixels(values)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    resampler.to_pixels(values)
    n += per_call
  return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  from boldjax import xla_flags

  xla_flags.apply_defaults()  # before the first jax computation, as every entry point
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--no-wait", action="store_true")
  args = p.parse_args(argv)
  load, waited = (run.load_average(), 0.0) if args.no_wait else run.wait_for_idle()
  config = run.load_config("patch_gpt")
  syn = config.data.synthetic
  grain_bps = grain_batches_per_s(config, args.batches)
  steps = train_steps_per_s(config)
  result = {
    "config": "configs/gpt_small.py",
    "batch_size": int(config.data.batch_size),
    "num_threads": int(config.data.get("num_threads", 2)),
    "num_workers": int(config.data.num_workers),
    "load_1min_before": load,
    "waited_for_idle_s": waited,
    "grain_batches_per_s": grain_bps,
    "train_steps_per_s": steps,
    "grain_over_step": grain_bps / steps,
    "resample_space": syn.space,
    "resample_height": int(syn.height),
    "resample_maps_per_s_1": resample_maps_per_s(syn.space, syn.height, 1),
    "resample_maps_per_s_64": resample_maps_per_s(syn.space, syn.height, 64),
    "load_1min_after": run.load_average(),
  }
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(
      f"grain {grain_bps:.1f} batches/s vs train step {steps:.2f} steps/s "
      f"({result['grain_over_step']:.1f}x); resampling {syn.space} h={syn.height}: "
      f"{result['resample_maps_per_s_1']:.0f} maps/s (1 per call), "
      f"{result['resample_maps_per_s_64']:.0f} maps/s (64 per call); "
      f"load {load:.2f} -> {result['load_1min_after']:.2f}"
    )
  return result


if __name__ == "__main__":
  main()
