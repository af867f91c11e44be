"""Optimizer construction: warmup + cosine AdamW with clipping, decay masks, accumulation."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_init * lr` to lr, then cosine to `min_lr_ratio * lr`.

  boldGPT: warmup from 5% of lr over 2000 steps, cosine decay to 5% of lr.
  """
  lr = cfg.lr
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=lr * cfg.warmup_init,
    peak_value=lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=lr * cfg.min_lr_ratio,
  )


def make_weight_decay(cfg: ml_collections.ConfigDict, total_steps: int) -> float | optax.Schedule:
  """A constant, or (weight_decay_end set) a cosine from weight_decay to weight_decay_end.

  DINO-family recipes (Brain-Semantoks: 0.05 -> 0.3) raise the decay as training goes.
  """
  end = cfg.get("weight_decay_end", None)
  if end is None:
    return cfg.weight_decay
  start, n = float(cfg.weight_decay), max(total_steps, 1)

  def schedule(count):
    progress = jnp.minimum(count, n) / n
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * progress))

  return schedule


def decay_mask(params, no_decay_names: tuple[str, ...], min_rank: int = 2):
  """True where weight decay applies: arrays of rank >= min_rank whose path names no exempt
  part (min_rank=2 spares biases and norm scales; 0 decays everything, as Semantoks does).

  Exempt names are matched against each path component (e.g. 'pos_embed' exempts
  params['pos_embed'] and params['blocks_0']['pos_embed']).
  """
  patterns = [re.compile(f"^{name}$") for name in no_decay_names]

  def applies(path, leaf) -> bool:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(p.match(k) for p in patterns for k in keys):
      return False
    return getattr(leaf, "ndim", 0) >= min_rank

  return jax.tree_util.tree_map_with_path(applies, params)


def make_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int, trainable=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping and optional gradient accumulation (optax.MultiSteps).

  `trainable` (a bool tree shaped like the params, or None for all) freezes the False
  leaves: zero updates and no optimizer moments.
  """
  # With accumulation a train step is a microbatch; the schedule counts optimizer updates.
  updates = max(total_steps // max(cfg.accum_steps, 1), 1)
  schedule = make_schedule(cfg, updates)
  no_decay = tuple(cfg.no_decay)
  min_rank = int(cfg.get("decay_min_rank", 2))
  chain = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(
    optax.adamw(
      learning_rate=schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=make_weight_decay(cfg, updates),
      mask=lambda p: decay_mask(p, no_decay, min_rank),
    )
  )
  tx = optax.chain(*chain)
  if trainable is not None:
    labels = jax.tree.map(lambda m: "train" if m else "frozen", trainable)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if cfg.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
  return tx, schedule
