"""The one train loop. It knows no model family: tasks, data and evaluators come from
the config through registries.
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np

from boldjax import build, checkpoint, registry, sharding
from boldjax import metrics as metrics_lib
from boldjax.cli import InputError


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  check_resumable(workdir, config, say)

  # ---------------------------------------------------------------------------------------
  # Mesh, data, task, optimizer, sharded state and the jitted step.
  # ---------------------------------------------------------------------------------------
  built = build.build_run(config)
  mesh, info, task, spec = built.mesh, built.info, built.task, built.spec
  say(
    f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
    f"{jax.process_count()} process(es)"
  )
  say(f"task {config.task.name}: {built.num_params:,} parameters")
  train_iter = iter(built.train_dataset())

  with built.context():
    # -------------------------------------------------------------------------------------
    # Restore or initialise.
    # -------------------------------------------------------------------------------------
    manager = checkpoint.make_manager(
      workdir, every_steps=config.checkpoint_every, keep=config.keep_checkpoints
    )
    state, start = checkpoint.restore(manager, spec.abstract, train_iter)
    if state is None:
      state = spec.init(built.init_rng)
      params = task.load_pretrained(state.params)
      extra = task.load_pretrained_extra(params, state.extra)
      if params is not state.params or extra is not state.extra:
        state = state.replace(
          params=jax.device_put(params, spec.shardings.params),
          extra=jax.device_put(extra, spec.shardings.extra),
        )
      start = 0
      init_from = config.task.get("init_from", "")
      say(f"initialised from {init_from}" if init_from else "initialised from scratch")
    else:
      say(f"resumed from {workdir} at step {start}")
    checkpoint.save_config(workdir, config)  # only now: a refused or failed restore keeps it

    evaluators = [
      registry.get("evaluator", ev.type)(
        name, ev, task=task, info=info, config=config, mesh=mesh, rules=built.rules
      )
      for name, ev in config.evals.items()
    ]
    if start >= config.total_steps:
      say(f"run complete at step {start} ({workdir}): nothing to train")
      final = finished_table(workdir, start, state, evaluators, task.reference_metrics())
      print_summary(say, final)
      return final
    writer = metrics_lib.MetricWriter(workdir)
    if start == 0:
      writer.write_hparams(config.to_dict())

    # -------------------------------------------------------------------------------------
    # Train.
    # -------------------------------------------------------------------------------------
    total = config.total_steps
    progress = metrics_lib.Progress(total, first_step=start)
    accumulator = metrics_lib.MetricAccumulator()
    final: dict[str, float] = {}
    t_start = time.perf_counter()
    preempted = False
    stop = checkpoint.StopSignal()  # SIGTERM (preemption): checkpoint now, exit cleanly
    for step in range(start + 1, total + 1):
      batch = sharding.to_global(next(train_iter), built.batch_sharding)
      state, step_metrics = built.train_step(state, batch)
      accumulator.add(step_metrics)

      if step % config.log_every == 0 or step == total:
        averaged = accumulator.compute()
        scalars = {f"train/{k}": v for k, v in averaged.items()}
        _check_finite(step, scalars)
        shown = {k: v for k, v in averaged.items() if k in ("loss", "accuracy")}
        line, rate = progress.line(step, shown)
        scalars["train/steps_per_sec"] = rate
        writer.write_scalars(step, scalars)
        say(line, flush=True)

      for ev in evaluators:
        if step % ev.every_steps == 0 or step == total:
          results = dict(ev.run(state, step))
          writer.write_scalars(step, results)
          final.update(results)
          say("  eval " + " | ".join(f"{k} {v:.4g}" for k, v in results.items()), flush=True)

      preempted = stop.received
      if preempted or step == total or step % config.checkpoint_every == 0:
        # Never write a checkpoint of a diverged state: the last good one must survive.
        _check_finite(step, {k: float(step_metrics[k]) for k in ("loss", "grad_norm")})
        checkpoint.save(manager, step, state, train_iter, force=True)
      if preempted:
        say(
          f"received {stop.signal_name} at step {step}: checkpoint saved, stopping; "
          "run the same command again to resume",
          flush=True,
        )
        break

    stop.restore()
    manager.wait_until_finished()
    writer.flush()
    if preempted:
      writer.close()
      return final

  # ---------------------------------------------------------------------------------------
  # Summary.
  # ---------------------------------------------------------------------------------------
  reference = task.reference_metrics()
  say(f"done: {total - start} steps in {time.perf_counter() - t_start:.0f}s")
  writer.write_scalars(total, {f"baseline/{k}": v for k, v in reference.items()})
  writer.close()
  final = {**final, **{f"baseline/{k}": v for k, v in reference.items()}}
  if is_main:
    checkpoint.write_json(checkpoint.path(workdir) / checkpoint.FINAL_FILE,
                          {"step": total, "metrics": final})  # fmt: skip
  print_summary(say, final)
  return final


def check_resumable(workdir: str, config: ml_collections.ConfigDict, say) -> None:
  """Refuse, before anything is built or written, a resume that would train another run."""
  root = checkpoint.path(workdir)
  marker = root / checkpoint.CONVERTED_FILE
  if marker.exists():
    source = checkpoint.read_json(marker).get("source", "a published checkpoint")
    raise InputError(
      f"{root}: field 'workdir': expected a training run to resume, found a converted "
      f"checkpoint of {source} (it has no data-iterator state); fine-tune from it with "
      f"--config.task.init_from={workdir} and a new --workdir"
    )
  saved = root / checkpoint.CONFIG_FILE
  if not checkpoint.saved_steps(workdir) or not saved.exists():
    return  # nothing to resume: a new run (a stale config.json is replaced)
  refused, allowed = checkpoint.config_changes(checkpoint.load_config(workdir), config)
  if refused:
    raise InputError(
      f"{saved}: the resumed run's config differs in {len(refused)} key(s): "
      + "; ".join(refused)
      + f". Only {', '.join(checkpoint.SAFE_ON_RESUME)} may change on resume; "
      "use a new --workdir to train another configuration"
    )
  if allowed:
    say("resuming with changed settings: " + "; ".join(allowed))


def finished_table(workdir: str, step: int, state, evaluators, reference) -> dict[str, float]:
  """The final table of a finished run: saved at its end, or (killed before) recomputed."""
  file = checkpoint.path(workdir) / checkpoint.FINAL_FILE
  if file.exists():
    saved = checkpoint.read_json(file)
    if saved.get("step") == step:
      return saved["metrics"]
  final: dict[str, float] = {}
  for ev in evaluators:
    final.update(dict(ev.run(state, step)))
  final.update({f"baseline/{k}": v for k, v in reference.items()})
  if jax.process_index() == 0:
    checkpoint.write_json(file, {"step": step, "metrics": final})
  return final


def print_summary(say, final: dict[str, float]) -> None:
  if not final:
    return
  say("final evaluation:")
  for k, v in final.items():
    label = f"baseline {k.removeprefix('baseline/')}" if k.startswith("baseline/") else k
    say(f"  {label:<28s} {v:.4f}")


def _check_finite(step: int, scalars: dict[str, float]) -> None:
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    logging.error("non-finite metrics at step %d: %s", step, bad)
    raise FloatingPointError(
      f"non-finite training metrics at step {step}: {bad}; all metrics: {scalars}. "
      "The last checkpoint before this step is intact."
    )
