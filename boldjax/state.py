"""The train state every task shares, and its sharded construction.

Train, sampling and evaluation all build the state the same way (eval_shape ->
logical partition specs -> mesh shardings -> jit(init, out_shardings)), so a checkpoint
restores identically in each of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from boldjax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any  # task-owned state outside the optimizer (EMA teacher, ...); {} if none


@dataclasses.dataclass
class StateSpec:
  init: Callable[[jax.Array], TrainState]  # jitted, returns the sharded state
  shardings: TrainState
  abstract: TrainState  # ShapeDtypeStructs with shardings: the restore target


def make_state_spec(
  task, tx: optax.GradientTransformation, example, rng, mesh: Mesh, rules, boxed=None
):
  """Shardings from the task's logical axis names; call inside the mesh/rules context.

  boxed: jax.eval_shape(task.init, rng, example) when the caller has it already."""
  if boxed is None:
    boxed = jax.eval_shape(task.init, rng, example)
  params_sh = sharding.tree_shardings(boxed[0], mesh, rules)
  extra_sh = sharding.tree_shardings(boxed[1], mesh, rules)
  # Frozen params (optax.multi_transform) leave MaskedNode placeholders in the state.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(
    tx,
    lambda v, s: v if masked(v) else s,
    jax.eval_shape(tx.init, strip_boxes(boxed[0])),
    params_sh,
    transform_non_params=lambda _: sharding.replicated(mesh),
    is_leaf=masked,
  )
  shardings = TrainState(
    step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh, extra=extra_sh
  )

  def init(r) -> TrainState:
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
    params, extra = nn.unbox(task.init(r, zeros))
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra
    )

  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    jax.eval_shape(init, rng),
    shardings,
  )
  return StateSpec(
    init=jax.jit(init, out_shardings=shardings), shardings=shardings, abstract=abstract
  )


def strip_boxes(tree):
  """Values of flax axis-metadata boxes, without applying their sharding constraints."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
  )


def trainable_mask(task, example):
  """The task's frozen-parameter mask (None = train everything), from abstract params."""
  abstract = jax.eval_shape(task.init, jax.random.key(0), example)
  return task.trainable(strip_boxes(abstract[0]))


def global_example(local_batch, process_count: int | None = None):
  """ShapeDtypeStructs of the global batch from one host-local numpy batch."""
  n = jax.process_count() if process_count is None else process_count

  def f(x):
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct((x.shape[0] * n, *x.shape[1:]), x.dtype)

  return jax.tree.map(f, local_batch)


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
