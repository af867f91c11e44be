"""Config parsing, registry, optimizer schedule/decay mask, mesh and metric writer."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax import config_utils, metrics, optim, registry, sharding


def test_parse_arg_types_and_flags():
  out = config_utils.parse_arg(
    "size=small,runlocal,lr=0.5,steps=7", size="tiny", runlocal=False, lr=1.0, steps=1
  )
  assert (out.size, out.runlocal, out.lr, out.steps) == ("small", True, 0.5, 7)


def test_parse_arg_typo_lists_known_keys():
  with pytest.raises(
    ValueError, match=r"'sise' is unknown; known arguments: \['runlocal', 'size'\]"
  ):
    config_utils.parse_arg("sise=small", size="tiny", runlocal=False)


def test_registry_unknown_name_suggests():
  registry.register("widget_test", "alpha")(object)
  with pytest.raises(KeyError, match="Did you mean 'alpha'"):
    registry.get("widget_test", "alpah")


def _optim_cfg(**kw):
  base = dict(
    lr=3e-4,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.05,
    clip_norm=1.0,
    warmup_steps=10,
    warmup_init=0.05,
    min_lr_ratio=0.05,
    accum_steps=1,
    no_decay=("pos_embed",),
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedule_warmup_and_cosine_endpoints():
  sched = optim.make_schedule(_optim_cfg(), total_steps=100)
  np.testing.assert_allclose(float(sched(0)), 3e-4 * 0.05, rtol=1e-5)
  np.testing.assert_allclose(float(sched(10)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 3e-4 * 0.05, rtol=1e-5)
  # cosine midpoint between warmup end and the end: (peak + end) / 2
  np.testing.assert_allclose(float(sched(55)), 3e-4 * (1 + 0.05) / 2, rtol=1e-5)


def test_decay_mask_skips_vectors_and_named_embeddings():
  params = {
    "pos_embed": jnp.ones((4, 3)),
    "dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
  }
  mask = optim.decay_mask(params, ("pos_embed",))
  assert mask == {"pos_embed": False, "dense": {"kernel": True, "bias": False}}


def test_weight_decay_cosine_schedule_and_decay_everything():
  """weight_decay_end: decay rises 0.05 -> 0.3 on a cosine; decay_min_rank=0 decays vectors."""
  cfg = _optim_cfg(clip_norm=0.0, warmup_steps=0, warmup_init=1.0, min_lr_ratio=1.0)
  cfg.lr = 1.0
  cfg.weight_decay_end = 0.3
  cfg.decay_min_rank = 0
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {"bias": jnp.ones(3)}
  state = tx.init(params)
  for count in range(11):
    updates, state = tx.update({"bias": jnp.zeros(3)}, state, params)
    expected = 0.3 + 0.5 * (0.05 - 0.3) * (1 + np.cos(np.pi * count / 10))
    np.testing.assert_allclose(updates["bias"], -expected, rtol=1e-5)


def test_adamw_step_matches_closed_form():
  """One AdamW step: decayed params move by lr*(sign(g) + wd*p); exempt ones by lr*sign(g)."""
  cfg = _optim_cfg(clip_norm=0.0, warmup_steps=0, warmup_init=1.0, min_lr_ratio=1.0)
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {"pos_embed": jnp.full((2, 2), 2.0), "w": jnp.full((2, 2), 2.0)}
  grads = {"pos_embed": jnp.full((2, 2), 0.5), "w": jnp.full((2, 2), -0.5)}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  lr, eps_ratio = 3e-4, 0.5 / (0.5 + 1e-8)
  np.testing.assert_allclose(new["pos_embed"], 2.0 - lr * eps_ratio, rtol=1e-6)
  np.testing.assert_allclose(new["w"], 2.0 + lr * eps_ratio - lr * 0.05 * 2.0, rtol=1e-6)


def test_mesh_fill_axis_and_errors():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2), ("tensor", 1)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="needs 6 devices; found 8"):
    sharding.make_mesh((("data", 3), ("fsdp", 2), ("tensor", 1)))
  with pytest.raises(ValueError, match="must name the axes"):
    sharding.make_mesh((("data", -1), ("model", 1), ("tensor", 1)))


def test_to_global_splits_batch_over_devices():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  g = sharding.to_global({"x": x}, sharding.batch_sharding(mesh))["x"]
  assert len(g.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(g), x)
  assert sharding.bytes_per_device({"x": g}) == {i: 8 for i in range(8)}


def test_metric_accumulator_and_writer(tmp_path):
  acc = metrics.MetricAccumulator()
  for v in (1.0, 2.0, 6.0):
    acc.add({"loss": jnp.asarray(v)})
  assert acc.compute() == {"loss": pytest.approx(3.0)}
  assert acc.compute() == {}
  w = metrics.MetricWriter(str(tmp_path))
  w.write_scalars(5, {"train/loss": 3.0})
  w.close()
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows[0]["step"] == 5 and rows[0]["train/loss"] == 3.0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  json.dumps(rows)


def test_progress_line_reports_rate_and_eta():
  p = metrics.Progress(total_steps=100, first_step=0)
  line, rate = p.line(10, {"loss": 1.5})
  assert line.startswith("step     10/100 | loss 1.5 |") and "ETA" in line and rate > 0
  assert jax.device_count() == 8


def test_frozen_params_get_no_updates():
  cfg = _optim_cfg(warmup_steps=0, warmup_init=1.0, min_lr_ratio=1.0)
  params = {"encoder": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
  tx, _ = optim.make_optimizer(cfg, 10, trainable={"encoder": {"w": False}, "head": {"w": True}})
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["encoder"]["w"], 0.0)
  assert float(jnp.abs(updates["head"]["w"]).min()) > 1e-5


def test_dropout_masks_are_seeded_scaled_and_at_rate():
  from boldjax.models.layers import Dropout

  x = jnp.ones((64, 50, 32), jnp.float32)
  drop = Dropout(0.1)

  def apply(seed):
    return drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})

  a, b, c = apply(0), apply(0), apply(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  kept = np.asarray(a) != 0
  np.testing.assert_allclose(np.asarray(a)[kept], 1 / 0.9, rtol=1e-6)
  assert abs(kept.mean() - 0.9) < 0.005  # 102,400 elements: sd of the rate ~0.001
  # neighbouring elements are independent: P(both kept) ~ 0.81
  assert abs((kept[..., 1:] & kept[..., :-1]).mean() - 0.81) < 0.01
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)


def test_default_xla_flags_respect_the_users():
  from boldjax import xla_flags

  flag = xla_flags.DEFAULT_XLA_FLAGS[0]
  name = flag.split("=")[0]
  assert xla_flags.with_defaults("") == flag
  user = "--xla_force_host_platform_device_count=8"
  assert xla_flags.with_defaults(user) == f"{user} {flag}"
  mine = f"{name}=individual_dot"
  assert xla_flags.with_defaults(f"{user} {mine}") == f"{user} {mine}"


def test_importing_boldjax_leaves_xla_flags_alone_and_entry_points_set_them(tmp_path):
  import subprocess
  import sys

  from boldjax import xla_flags

  code = "import os, boldjax.main, boldjax.convert.cli, benchmarks.run; "
  code += "print(os.environ.get('XLA_FLAGS'))"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "BOLDJAX_XLA_DEFAULTS")}
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "None"
  # An entry point sets them before jax starts; a started backend is left alone.
  code = (
    "import os, jax; from boldjax import xla_flags; a = xla_flags.apply_defaults(); "
    "f = os.environ['XLA_FLAGS']; jax.devices(); os.environ['XLA_FLAGS'] = ''; "
    "b = xla_flags.apply_defaults(); print(a, b, f, os.environ['XLA_FLAGS'] or '-')"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ["True", "False", xla_flags.DEFAULT_XLA_FLAGS[0], "-"]
