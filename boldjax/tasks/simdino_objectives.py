"""SimDINO objectives and schedules of Brain-Semantoks (pure jnp; no registry).

Losses (SamGijsen/Brain-Semantoks simdino.py + model/simdino_loss.py, from RobinWu218/SimDINO):
  - MCR (coding-rate) loss on L2-normalised head outputs of V views, m rows, p dims:
      comp = sum_{i != j} mean_b <t_i, s_j> / (V_t V_s - min(V_t, V_s))
      Z_v = (s_v + t_v) / 2
      expa = (p + m) / (p m) * mean_v 1/2 logdet(I + p / (m eps) Z_v^T Z_v)   (Cholesky, float32)
      loss = -coeff * comp - expa
    on the CLS heads (m = B) and on the per-network time-averaged token heads (m = B N).
  - masked cosine loss: every masked token of every (view, sample) weighs 1 / #masked in
    that (view, sample); loss = -sum(cos * weight) / (V B). Static shapes: the boolean mask
    becomes weights (no x[mask]); masked_cosine_loss takes heads on all tokens,
    masked_cosine_loss_on_masked_rows runs the heads on masked-first chunks of the tokens.
  - total = cls_loss + w_net(step) * network_mcr_loss + mask_loss_weight * mask_cosine_loss.

The MCR terms see the whole (global) batch: under jit on sharded arrays m is the global
batch, as for the original on one device (under DDP each rank used its own covariance).

Schedules are functions of the global optimisation step (float arrays; float64 under
jax.enable_x64) with the original's closed forms: linear warmup from 0 then cosine to 0
(LambdaLR), cosine weight decay from `weight_decay` to `weight_decay_end`, EMA momentum
cosine from base to 1, network-loss weight decayed to 0 (cosine or linear) after a delay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _float(x: Any) -> jax.Array:
  return jnp.asarray(x).astype(jnp.result_type(float))


def _coding_rate_parts(
  student: jax.Array,
  teacher: jax.Array,
  eps: float,
  row_weights: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(comp, the (V_t, p, p) matrices I + p/(m eps) Z^T Z, expa's factor (p + m) / (p m))."""
  s = jnp.asarray(student, jnp.float32)
  t = jnp.asarray(teacher, jnp.float32)
  if s.ndim != 3 or t.ndim != 3 or s.shape[1:] != t.shape[1:] or s.shape[0] < t.shape[0]:
    raise ValueError(
      f"mcr_loss: student (V_s, m, p) and teacher (V_t <= V_s, m, p) expected, found "
      f"{s.shape} and {t.shape}"
    )
  vt, vs = t.shape[0], s.shape[0]
  m, p = t.shape[1], t.shape[2]
  if row_weights is not None:
    w = jnp.asarray(row_weights, jnp.float32).reshape(1, -1, 1)
    s, t = s * w, t * w
    m = jnp.maximum(jnp.sum(row_weights), 1.0)
  sim = jnp.einsum("ibc,jbc->ij", t, s) / m
  sim = sim * (1.0 - jnp.eye(vt, vs, dtype=sim.dtype))
  comp = jnp.sum(sim) / (vt * vs - min(vt, vs))
  z = (s[:vt] + t) / 2
  cov = jnp.einsum("nbc,nbd->ncd", z, z)
  mat = jnp.eye(p, dtype=jnp.float32)[None] + (p / (m * eps)) * cov
  return comp, mat, (p + m) / (p * m)


def _half_logdets(mats: jax.Array) -> jax.Array:
  """1/2 logdet of SPD matrices (n, p, p) by ONE batched Cholesky.

  One call on purpose: jaxlib's CPU Cholesky spreads its batch over the intra-op thread pool
  and waits for it, so two Cholesky thunks running at once on a 2-thread pool (2 cores)
  deadlock (seen with jax 0.10.2). Callers put every matrix of a step into one batch.
  """
  chol = jnp.linalg.cholesky(mats)
  return jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def mcr_loss(
  student: jax.Array,
  teacher: jax.Array,
  eps: float = 0.05,
  coeff: float = 1.0,
  row_weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """MCRLoss(expa_type=1, no_diag=True) on student (V_s, m, p) and teacher (V_t, m, p).

  row_weights (m,) of 0/1: rows with 0 (eval padding) are left out, m = their sum.
  Returns loss, comp, expa (float32 scalars).
  """
  comp, mat, factor = _coding_rate_parts(student, teacher, eps, row_weights)
  expa = jnp.mean(_half_logdets(mat)) * factor
  return {"loss": -coeff * comp - expa, "comp": comp, "expa": expa}


def _normalize(x: jax.Array, eps: float) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _masked_token_weights(
  mask: jax.Array, row_weights: jax.Array | None
) -> tuple[jax.Array, jax.Array | int]:
  """(V, B, T) weights 1 / #masked of each (view, row) on its masked tokens, and the number
  of rows counted (row_weights (B,) of 0/1 leave rows out)."""
  mask = jnp.asarray(mask).astype(jnp.float32)
  rows = mask.shape[1]
  if row_weights is not None:
    w = jnp.asarray(row_weights, jnp.float32)
    mask = mask * w[None, :, None]
    rows = jnp.maximum(jnp.sum(w), 1.0)
  return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0), rows


def masked_cosine_loss(
  student: jax.Array,
  teacher: jax.Array,
  mask: jax.Array,
  eps: float = 1e-8,
  row_weights: jax.Array | None = None,
) -> jax.Array:
  """CosinePatchLoss.forward_masked with static shapes.

  student, teacher (V, B, T, p) head outputs on every token; mask (V, B, T) bool (True =
  masked for the student). -sum_{v,b} mean_{masked t} cos(s, t) / (V B); row_weights (B,)
  of 0/1 leave rows out (B = their sum).
  """
  s = jnp.asarray(student, jnp.float32)
  t = jnp.asarray(teacher, jnp.float32)
  mask = jnp.asarray(mask).astype(jnp.float32)
  if s.shape != t.shape or mask.shape != s.shape[:-1] or s.ndim != 4:
    raise ValueError(
      f"masked_cosine_loss: student/teacher (V, B, T, p) and mask (V, B, T) expected, found "
      f"{s.shape}, {t.shape}, {mask.shape}"
    )
  cos = jnp.sum(_normalize(t, eps) * _normalize(s, eps), axis=-1)
  weight, rows = _masked_token_weights(mask, row_weights)
  return -jnp.sum(cos * weight) / (mask.shape[0] * rows)


def masked_cosine_loss_on_masked_rows(
  student_head: Callable[[jax.Array], jax.Array],
  teacher_head: Callable[[jax.Array], jax.Array],
  student_tokens: jax.Array,
  teacher_tokens: jax.Array,
  mask: jax.Array,
  eps: float = 1e-8,
  row_weights: jax.Array | None = None,
  chunks: int = 8,
) -> jax.Array:
  """masked_cosine_loss(student_head(student_tokens), teacher_head(teacher_tokens), mask)
  with the heads run on (about) the masked tokens only, as the original's x[mask] does.

  student_tokens, teacher_tokens (V, B, T, D); mask (V, B, T) bool; the heads map rows
  (n, D) -> (n, p). The M = V B T tokens are ordered masked-first (stable) and cut into
  `chunks` equal slices (the last ones shorter when M does not divide); slice k runs the heads
  only when it holds a masked token (lax.cond on the traced count), so a batch with m masked
  tokens costs ceil(m chunks / M) slices of head work and an unmasked batch none. Unmasked
  tokens inside a computed slice weigh exactly 0, as in masked_cosine_loss: the same terms,
  summed in a different order.
  """
  s = jnp.asarray(student_tokens)
  t = jnp.asarray(teacher_tokens)
  mask = jnp.asarray(mask).astype(bool)
  if s.shape != t.shape or s.ndim != 4 or mask.shape != s.shape[:3]:
    raise ValueError(
      f"masked_cosine_loss_on_masked_rows: tokens (V, B, T, D) and mask (V, B, T) expected, "
      f"found {s.shape}, {t.shape}, {mask.shape}"
    )
  V, B, T, D = s.shape
  weight, rows = _masked_token_weights(mask, row_weights)
  weight = weight.reshape(-1)
  flat = mask.reshape(-1)
  M = flat.shape[0]
  count = jnp.sum(flat.astype(jnp.int32))
  order = jnp.argsort(jnp.logical_not(flat).astype(jnp.int32), stable=True)  # masked first
  s, t = s.reshape(M, D), t.reshape(M, D)
  size = -(-M // max(1, int(chunks)))

  def run(idx):
    ss = _normalize(jnp.asarray(student_head(s[idx]), jnp.float32), eps)
    tt = _normalize(jnp.asarray(teacher_head(t[idx]), jnp.float32), eps)
    return jnp.sum(jnp.sum(tt * ss, axis=-1) * weight[idx])

  zero = lambda idx: jnp.zeros((), jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for start in range(0, M, size):
    total = total + jax.lax.cond(count > start, run, zero, order[start : start + size])
  return -total / (V * rows)


def simdino_losses(
  student: Mapping[str, jax.Array],
  teacher: Mapping[str, jax.Array],
  masks: jax.Array | None,
  network_loss_weight: jax.Array | float,
  *,
  mask_loss_weight: float = 0.5,
  eps: float = 0.05,
  coeff: float = 1.0,
  row_weights: jax.Array | None = None,
  mask_cosine: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Every loss term of SimDINOModel.forward from the head outputs of V views.

  student / teacher: 'cls' (V, B, p), 'net' (V, B, N, p) (heads on the per-network
  patch-averaged tokens) and, when masks is given, 'patch' (V, B, N*P, p) (heads on every
  non-CLS token). Teacher outputs come from the unmasked views and should be under
  stop_gradient. masks: (V, B, N, P) or (V, B, N*P) bool, or None for an unmasked batch
  (no mask loss; an all-False mask gives the same numbers). The network term is computed
  always (for logging) and weighted by network_loss_weight (0 switches it off).
  row_weights (B,) of 0/1 leaves padded evaluation rows out of every term.
  mask_cosine: the masked cosine loss computed elsewhere (masked_cosine_loss_on_masked_rows);
  then 'patch' is not needed and masks is not read.
  """
  V = student["net"].shape[0]
  s_net = jnp.reshape(student["net"], (V, -1, student["net"].shape[-1]))
  t_net = jnp.reshape(teacher["net"], (teacher["net"].shape[0], -1, teacher["net"].shape[-1]))
  net_weights = None
  if row_weights is not None:
    num_networks = student["net"].shape[2]
    net_weights = jnp.repeat(jnp.asarray(row_weights, jnp.float32), num_networks)
  # Both coding rates' log-dets in one Cholesky call (see _half_logdets).
  cls_comp, cls_mat, cls_factor = _coding_rate_parts(
    student["cls"], teacher["cls"], eps, row_weights
  )
  net_comp, net_mat, net_factor = _coding_rate_parts(s_net, t_net, eps, net_weights)
  logdets = _half_logdets(jnp.concatenate([cls_mat, net_mat]))
  cls_expa = jnp.mean(logdets[: cls_mat.shape[0]]) * cls_factor
  net_expa = jnp.mean(logdets[cls_mat.shape[0] :]) * net_factor
  cls = {"loss": -coeff * cls_comp - cls_expa, "comp": cls_comp, "expa": cls_expa}
  net = {"loss": -coeff * net_comp - net_expa, "comp": net_comp, "expa": net_expa}
  w_net = jnp.asarray(network_loss_weight, jnp.float32)
  network_loss = jnp.where(w_net > 0, net["loss"] * w_net, 0.0)  # the original skips w <= 0
  if mask_cosine is not None:
    mask_cos = jnp.asarray(mask_cosine, jnp.float32)
  elif masks is None or mask_loss_weight == 0:
    mask_cos = jnp.zeros((), jnp.float32)
  else:
    m = jnp.asarray(masks).reshape(student["patch"].shape[:3])
    mask_cos = masked_cosine_loss(student["patch"], teacher["patch"], m, row_weights=row_weights)
  mask_loss = mask_cos * mask_loss_weight
  return {
    "cls_loss": cls["loss"],
    "cls_comp_loss": cls["comp"],
    "cls_expa_loss": cls["expa"],
    "network_mcr_loss": net["loss"],
    "network_comp_loss": net["comp"],
    "network_expa_loss": net["expa"],
    "network_loss": network_loss,
    "mask_cosine_loss": mask_cos,
    "mask_loss": mask_loss,
    "total_loss": cls["loss"] + network_loss + mask_loss,
  }


# ---------------------------------------------------------------- schedules (global step)


def lr_schedule(step: Any, *, base_lr: float, warmup_steps: int, total_steps: int) -> jax.Array:
  """util.get_lr_schedule_with_warmup: base_lr * (s / W if s < W else cosine from 1 to 0)."""
  s = _float(step)
  warm = s / max(1, warmup_steps)
  progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
  cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
  return base_lr * jnp.where(s < warmup_steps, warm, cosine)


def weight_decay_schedule(
  step: Any, *, weight_decay: float, weight_decay_end: float, total_steps: int
) -> jax.Array:
  """main.py: wd_end + (wd - wd_end) (1 + cos(pi s / total)) / 2 (constant when equal)."""
  s = _float(step)
  if weight_decay == weight_decay_end:
    return jnp.full(s.shape, weight_decay, s.dtype)
  cos = 1.0 + jnp.cos(math.pi * s / total_steps)
  return weight_decay_end + 0.5 * (weight_decay - weight_decay_end) * cos


def teacher_momentum(step: Any, *, base_momentum: float, total_steps: int) -> jax.Array:
  """SimDINOModel._get_teacher_momentum: 1 - (1 - base) (cos(pi s / total) + 1) / 2."""
  s = _float(step)
  if total_steps <= 1:
    return jnp.full(s.shape, base_momentum, s.dtype)
  cos_val = jnp.cos(math.pi * s / total_steps) * 0.5 + 0.5
  return 1.0 - (1.0 - base_momentum) * cos_val


def network_loss_weight(
  step: Any,
  *,
  weight: float,
  delay_steps: int = 0,
  decay_steps: int = 0,
  schedule: str = "linear",
) -> jax.Array:
  """main.get_network_loss_weight: 0 before the delay, then `weight` decayed to 0 over
  decay_steps (cosine or linear; constant when decay_steps == 0), 0 afterwards."""
  if schedule not in ("cosine", "linear"):
    raise ValueError(
      f"network_loss_weight: schedule must be 'cosine' or 'linear', found {schedule!r}"
    )
  s = _float(step)
  if decay_steps <= 0:
    w = jnp.full(s.shape, weight, s.dtype)
  else:
    since = s - delay_steps
    progress = since / decay_steps
    if schedule == "cosine":
      w = weight * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    else:
      w = weight * (1.0 - progress)
    w = jnp.where(since >= decay_steps, 0.0, w)
  return jnp.where(s < delay_steps, 0.0, w)


def schedules_from_config(cfg: Mapping[str, Any]) -> dict[str, Callable[[Any], jax.Array]]:
  """Schedules from the original's config values (keys of spec.json 'schedule_config').

  Needs epochs, steps_per_epoch, warmup_epochs, batch_size, base_lr_scale, weight_decay,
  base_teacher_momentum, network_loss_weight; optional gradient_accumulation_steps,
  world_size, weight_decay_end, netloss_delay_epochs, netloss_weight_decay_epochs,
  netloss_decay_schedule. lr = base_lr_scale * effective batch / 256.
  """
  spe = int(cfg["steps_per_epoch"])
  total = spe * int(cfg["epochs"])
  warmup = spe * int(cfg["warmup_epochs"])
  eff = (
    int(cfg["batch_size"])
    * int(cfg.get("world_size", 1))
    * int(cfg.get("gradient_accumulation_steps", 1))
  )
  base_lr = float(cfg["base_lr_scale"]) * eff / 256
  wd = float(cfg["weight_decay"])
  wd_end = float(cfg.get("weight_decay_end", wd))
  return {
    "lr": lambda s: lr_schedule(s, base_lr=base_lr, warmup_steps=warmup, total_steps=total),
    "weight_decay": lambda s: weight_decay_schedule(
      s, weight_decay=wd, weight_decay_end=wd_end, total_steps=total
    ),
    "teacher_momentum": lambda s: teacher_momentum(
      s, base_momentum=float(cfg["base_teacher_momentum"]), total_steps=total
    ),
    "network_loss_weight": lambda s: network_loss_weight(
      s,
      weight=float(cfg["network_loss_weight"]),
      delay_steps=int(cfg.get("netloss_delay_epochs", 0)) * spe,
      decay_steps=int(cfg.get("netloss_weight_decay_epochs", 0)) * spe,
      schedule=str(cfg.get("netloss_decay_schedule", "linear")),
    ),
  }
