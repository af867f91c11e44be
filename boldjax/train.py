"""The one train loop. It knows no model family: tasks, data and evaluators come from
the config through registries.
"""

from __future__ import annotations

import logging
import math
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from boldjax import checkpoint, optim, registry, sharding
from boldjax import metrics as metrics_lib
from boldjax import state as state_lib
from boldjax.cli import InputError
from boldjax.data import pipeline_for
from boldjax.state import TrainState


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  check_resumable(workdir, config, say)

  # ---------------------------------------------------------------------------------------
  # Mesh and data.
  # ---------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.sharding.rules)
  batch_sh = sharding.batch_sharding(mesh)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  global_bs = config.data.batch_size
  if global_bs % data_ways or global_bs % jax.process_count():
    raise InputError(
      f"config.data.batch_size: expected a multiple of the data-parallel devices "
      f"({data_ways}) and of the process count ({jax.process_count()}), found {global_bs}"
    )
  say(
    f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
    f"{jax.process_count()} process(es)"
  )

  data = pipeline_for(config.data)
  info = data.prepare(config.data)

  def train_dataset():
    return data.make_dataset(
      config.data,
      info,
      split="train",
      train=True,
      seed=config.seed,
      batch_size=global_bs // jax.process_count(),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )

  train_iter = iter(train_dataset())
  example = state_lib.global_example(next(iter(train_dataset())))

  # ---------------------------------------------------------------------------------------
  # Task, optimizer and sharded state.
  # ---------------------------------------------------------------------------------------
  task = registry.get("task", config.task.name)(config, info)
  tx, schedule = optim.make_optimizer(
    config.optim, config.total_steps, state_lib.trainable_mask(task, example)
  )
  root_rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(root_rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = state_lib.make_state_spec(task, tx, example, init_rng, mesh, rules)
    state_sh, abstract_state = spec.shardings, spec.abstract
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    say(f"task {config.task.name}: {num_params:,} parameters")

    train_step = make_train_step(task, tx, schedule, step_rng, config.optim.accum_steps)
    train_step = jax.jit(
      train_step,
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, None),
      donate_argnums=0,
    )

    # -------------------------------------------------------------------------------------
    # Restore or initialise.
    # -------------------------------------------------------------------------------------
    manager = checkpoint.make_manager(
      workdir, every_steps=config.checkpoint_every, keep=config.keep_checkpoints
    )
    state, start = checkpoint.restore(manager, abstract_state, train_iter)
    if state is None:
      state = spec.init(init_rng)
      params = task.load_pretrained(state.params)
      extra = task.load_pretrained_extra(params, state.extra)
      if params is not state.params or extra is not state.extra:
        state = state.replace(
          params=jax.device_put(params, state_sh.params),
          extra=jax.device_put(extra, state_sh.extra),
        )
      start = 0
      init_from = config.task.get("init_from", "")
      say(f"initialised from {init_from}" if init_from else "initialised from scratch")
    else:
      say(f"resumed from {workdir} at step {start}")
    checkpoint.save_config(workdir, config)  # only now: a refused or failed restore keeps it

    evaluators = [
      registry.get("evaluator", ev.type)(
        name, ev, task=task, info=info, config=config, mesh=mesh, rules=rules
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
      batch = sharding.to_global(next(train_iter), batch_sh)
      state, step_metrics = train_step(state, batch)
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


def make_train_step(task, tx: optax.GradientTransformation, schedule, step_rng, accum_steps: int):
  """The pure (state, batch) -> (state, metrics) update every run (and benchmark) jits."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(step_rng, state.step)

    def loss_fn(params):
      return task.loss(params, state.extra, batch, rng, train=True)

    (loss, step_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    extra = task.update_extra(params, state.extra, step)
    out = {
      **step_metrics,
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step // accum_steps),
    }
    return TrainState(step=step, params=params, opt_state=opt_state, extra=extra), out

  return train_step


def _check_finite(step: int, scalars: dict[str, float]) -> None:
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    logging.error("non-finite metrics at step %d: %s", step, bad)
    raise FloatingPointError(
      f"non-finite training metrics at step {step}: {bad}; all metrics: {scalars}. "
      "The last checkpoint before this step is intact."
    )
