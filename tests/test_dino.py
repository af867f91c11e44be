"""DINO (Brain-Semantoks) task: EMA teacher, padded-row weights, probe crops, a short run."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.tasks import dino, simdino_objectives
from configs import dino_small


def _task(total_steps: int = 10) -> dino.DinoTask:
  config = dino_small.get_config("runlocal")
  config.total_steps = total_steps
  networks = np.repeat(np.arange(4), 4).astype(np.int32)  # 16 parcels in 4 networks
  info = types.SimpleNamespace(num_parcels=16, networks=networks, num_networks=4)
  return dino.DinoTask(config, info)


def _batch(task: dino.DinoTask, B: int = 6, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  N, P, L = task.num_networks, task.num_patches, task.crop_length
  return {
    "views": rng.standard_normal((B, 2, 16, L)).astype(np.float32),
    "masks": rng.random((B, 2, N, P)) < 0.5,
    "valid": np.ones(B, bool),
  }


def test_teacher_is_an_ema_with_the_original_momentum():
  task = _task(total_steps=10)
  params, extra = jax.tree.map(jnp.asarray, task.init(jax.random.key(0), _batch(task)))
  import flax.linen as nn

  params, extra = nn.unbox(params), nn.unbox(extra)
  moved = jax.tree.map(lambda p: p + 1.0, params)
  new = task.update_extra(moved, extra, jnp.asarray(4))
  m = 1 - (1 - 0.99) * (np.cos(np.pi * 3 / 10) + 1) / 2  # pre-increment step 3
  leaf = lambda t: jax.tree.leaves(t)[0]
  np.testing.assert_allclose(
    leaf(new["teacher"]), m * leaf(extra["teacher"]) + (1 - m) * leaf(moved), atol=1e-6
  )
  assert int(new["step"]) == 4
  np.testing.assert_array_equal(leaf(new["buffers"]), leaf(extra["buffers"]))


def test_padded_rows_do_not_change_the_losses():
  """A batch with 2 padding rows (valid=False) gives the losses of the 4 real rows alone."""
  task = _task()
  import flax.linen as nn

  batch = _batch(task, B=6)
  params, extra = nn.unbox(task.init(jax.random.key(1), batch))
  real = {k: v[:4] for k, v in batch.items()}
  padded = dict(batch, valid=np.array([1, 1, 1, 1, 0, 0], bool))
  padded["views"] = batch["views"].copy()
  padded["views"][4:] = 0.0
  _, a = task.loss(params, extra, real, jax.random.key(2), train=False)
  _, b = task.loss(params, extra, padded, jax.random.key(2), train=False)
  for key in ("cls_loss", "network_mcr_loss", "mask_cosine_loss", "total_loss"):
    np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_weighted_mcr_equals_mcr_on_the_kept_rows():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  y = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  w = np.array([1, 1, 0, 1, 1, 0, 1], np.float32)
  keep = w > 0
  full = simdino_objectives.mcr_loss(x, y, row_weights=w)
  sub = simdino_objectives.mcr_loss(x[:, keep], y[:, keep])
  for key in ("loss", "comp", "expa"):
    np.testing.assert_allclose(full[key], sub[key], rtol=1e-5)


def test_probe_crops_resample_a_ramp_exactly():
  """Sequence batches: a ramp at TR 0.5 s resampled to views_tr=1 s is every other frame."""
  task = _task()
  L = task.crop_length  # runlocal: 20 frames at 1 s
  T = 60
  ramp = np.arange(T, dtype=np.float32)[:, None] * np.ones((1, 16), np.float32)
  batch = {
    "bold": ramp[None],
    "mask": (np.arange(T) < 50)[None],
    "tr": np.array([0.5], np.float32),
  }
  task.probe_crops = 3
  crops = np.asarray(task._crops(batch))  # (1, 3, 16, L)
  n = 25  # 50 frames x 0.5 s / 1 s
  starts = np.floor(np.linspace(0, 1, 3) * (n - L)).astype(int)
  for k, s in enumerate(starts):
    np.testing.assert_allclose(crops[0, k, 0], 2.0 * (s + np.arange(L)), atol=1e-5)
  # A window shorter than a crop is zero-padded after its last resampled frame.
  batch["mask"] = (np.arange(T) < 20)[None]
  crops = np.asarray(task._crops(batch))
  np.testing.assert_allclose(crops[0, 0, 0, :10], 2.0 * np.arange(10), atol=1e-5)
  np.testing.assert_array_equal(crops[0, 0, 0, 10:], 0.0)


@pytest.mark.slow
def test_dino_runlocal_trains_and_loss_falls(tmp_path):
  from boldjax import train

  config = dino_small.get_config("runlocal")
  config.total_steps = 40
  config.checkpoint_every = 40  # runlocal's 2 would write 20 checkpoints (~1 min of CI)
  config.log_every = 10
  config.evals.val.every_steps = 40
  out = train.run(config, str(tmp_path / "dino"))
  import json

  rows = [json.loads(x) for x in open(tmp_path / "dino" / "metrics.jsonl")]
  losses = [r["train/cls_loss"] for r in rows if "train/cls_loss" in r]
  assert losses[-1] < losses[0], losses
  assert out["val/effective_rank"] > 1.5  # not collapsed
  assert out["val/teacher_feature_std"] > 0.01

  # A run fine-tuned from this one (task.init_from) starts from its EMA teacher and buffers.
  from boldjax import workdir

  run = workdir.load_run(str(tmp_path / "dino"))
  config.unlock()
  config.task.init_from = str(tmp_path / "dino")
  task = dino.DinoTask(config, run.info)
  fresh = jax.tree.map(jnp.zeros_like, run.state.extra)
  extra = task.load_pretrained_extra(None, fresh)
  for key in ("teacher", "buffers"):
    jax.tree.map(np.testing.assert_array_equal, extra[key], jax.device_get(run.state.extra[key]))
  assert int(extra["step"]) == 0
  teacher = jax.tree.leaves(run.state.extra["teacher"])[0]
  student = jax.tree.leaves(run.state.params)[0]
  assert not np.array_equal(teacher, student)  # the teacher is not a copy of the student


def test_effective_rank_is_the_participation_ratio():
  rng = np.random.default_rng(0)
  ones = jnp.ones(4000)
  iso = rng.standard_normal((4000, 8)).astype(np.float32)
  assert float(dino.effective_rank(jnp.asarray(iso), ones)) == pytest.approx(8.0, rel=0.02)
  line = np.outer(rng.standard_normal(4000), rng.standard_normal(8)).astype(np.float32)
  assert float(dino.effective_rank(jnp.asarray(line), ones)) == pytest.approx(1.0, rel=1e-4)
  # eigenvalues (4, 1): (4 + 1)^2 / (16 + 1)
  two = iso[:, :2] * np.array([2.0, 1.0], np.float32)
  assert float(dino.effective_rank(jnp.asarray(two), ones)) == pytest.approx(25 / 17, rel=0.03)


def test_optimizer_schedules_are_the_originals():
  """dino_small's optimizer lr / weight decay follow the original's closed forms."""
  from boldjax import optim

  config = dino_small.get_config()
  o, total = config.optim, config.total_steps
  lr = optim.make_schedule(o, total)
  wd = optim.make_weight_decay(o, total)
  for step in (0, 1, o.warmup_steps // 2, o.warmup_steps, 400, total - 1, total):
    expected_lr = simdino_objectives.lr_schedule(
      step, base_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=total
    )
    expected_wd = simdino_objectives.weight_decay_schedule(
      step, weight_decay=0.05, weight_decay_end=0.3, total_steps=total
    )
    np.testing.assert_allclose(float(lr(step)), float(expected_lr), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(float(wd(step)), float(expected_wd), rtol=1e-5)


def _masked_cosine_case(seed: int, V: int = 2, B: int = 5, T: int = 7, D: int = 6, p: int = 4):
  rng = np.random.default_rng(seed)
  s = jnp.asarray(rng.standard_normal((V, B, T, D)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((V, B, T, D)), jnp.float32)
  head = {
    "w": jnp.asarray(rng.standard_normal((D, p)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal(p), jnp.float32),
  }
  return rng, s, t, head


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_masked_cosine_loss_on_masked_rows_equals_the_full_heads(fraction, chunks):
  """Heads on the compacted masked rows: the value and the gradients (head parameters and
  student tokens) of masked_cosine_loss on every token's head output, for empty, partial and
  full masks, chunk counts that do not divide V B T, and padded rows."""
  rng, s, t, head = _masked_cosine_case(int(fraction * 10) + chunks)
  mask = jnp.asarray(rng.random(s.shape[:3]) < fraction)
  weights = jnp.asarray([1, 1, 0, 1, 1], jnp.float32)
  apply = lambda h, x: jnp.tanh(x @ h["w"] + h["b"])
  t_head = jax.tree.map(lambda a: a + 0.5, head)

  def full(h, s):
    return simdino_objectives.masked_cosine_loss(
      apply(h, s), apply(t_head, t), mask, row_weights=weights
    )

  def compact(h, s):
    return simdino_objectives.masked_cosine_loss_on_masked_rows(
      lambda r: apply(h, r),
      lambda r: apply(t_head, r),
      s,
      t,
      mask,
      row_weights=weights,
      chunks=chunks,
    )

  want, want_g = jax.value_and_grad(full, argnums=(0, 1))(head, s)
  got, got_g = jax.jit(jax.value_and_grad(compact, argnums=(0, 1)))(head, s)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if fraction == 0.0:
    assert float(got) == 0.0


def test_masked_cosine_loss_on_masked_rows_runs_the_heads_on_masked_rows_only():
  """A head that is NaN on unmasked rows leaves the loss finite when every computed chunk
  holds masked rows only (M = 12 tokens in 4 chunks, 6 masked: chunks 0 and 1)."""
  _, s, t, head = _masked_cosine_case(0, V=1, B=2, T=6)
  mask = jnp.asarray([[[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]]], bool)
  marked_s = jnp.where(mask[..., None], s, jnp.nan)
  loss = simdino_objectives.masked_cosine_loss_on_masked_rows(
    lambda r: r @ head["w"], lambda r: r @ head["w"], marked_s, t, mask, chunks=4
  )
  want = simdino_objectives.masked_cosine_loss(s @ head["w"], t @ head["w"], mask)
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_tokenizer_linear_map_equals_the_direct_branches():
  """NetworkTokenizer(linear_map=True) (branches run on unit patches, one matmul) gives the
  direct branches' tokens and parameter gradients, for every branch kind."""
  import flax.linen as nn

  from boldjax.models import semantoks

  branches = semantoks.branches_from_config(
    [
      {"type": "dense", "kernel_size": 3, "out_channels": 6},
      {"type": "dense", "kernel_size": 3, "depthwise": True, "out_channels": 4},
      {"type": "dilated", "kernel_size": 2, "dilation": 2, "out_channels": 4},
      {"type": "sgconv", "kernel_size": 2, "num_scales": 2, "out_channels": 10},
    ]
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((9, 5, 3)), jnp.float32)  # (N, patch 5, R_n 3)
  direct = semantoks.NetworkTokenizer(branches, linear_map=False)
  mapped = semantoks.NetworkTokenizer(branches, linear_map=True)
  variables = direct.init(jax.random.key(0), x)
  params, buffers = nn.unbox(variables["params"]), variables["buffers"]
  # The direct path's variables fit the mapped one (same modules, same names).
  assert jax.tree.structure(mapped.init(jax.random.key(0), x)["params"]) == jax.tree.structure(
    variables["params"]
  )

  def f(module, p):
    y = module.apply({"params": p, "buffers": buffers}, x)
    return jnp.sum(jnp.sin(3.0 * y)), y

  (_, want), want_g = jax.value_and_grad(lambda p: f(direct, p), has_aux=True)(params)
  (_, got), got_g = jax.jit(jax.value_and_grad(lambda p: f(mapped, p), has_aux=True))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_linear_map_is_chosen_for_short_patches_only():
  from boldjax.models import semantoks

  small = semantoks.branches_from_config(
    [
      {"type": "dense", "kernel_size": 3, "out_channels": 64},
      {"type": "sgconv", "kernel_size": 2, "num_scales": 2, "out_channels": 64},
    ]
  )
  # dino_small: patches of 4 frames, ~9 ROIs per network -> map (4*9*128 vs 2*(3*9*64 + ...)).
  assert semantoks.linear_map_is_cheaper(small, 4, 9)
  # The original: patches of 20 TRs, ~50 ROIs per network, 96 + 96 channels -> direct.
  big = semantoks.branches_from_config(
    [
      {"type": "dense", "kernel_size": 3, "out_channels": 96},
      {"type": "sgconv", "kernel_size": 4, "num_scales": 3, "out_channels": 96},
    ]
  )
  assert not semantoks.linear_map_is_cheaper(big, 20, 50)
