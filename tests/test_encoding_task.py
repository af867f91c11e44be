"""The encoding task (FactorTopy objective) on a tiny fake data info: values, masking, the
regulariser's decay, training on a planted problem, and the bddn converter's checks."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.bddn import BddnConverter, params_to_torch
from boldjax.convert.converter import Options
from boldjax.models.factortopy import position_encoding

N, L, C, GRID, B = 24, 3, 8, (4, 4), 6


def make_info(coords=None):
  rng = np.random.default_rng(0)
  coords = rng.normal(size=(N, 3)).astype(np.float32) * 50 if coords is None else coords
  return types.SimpleNamespace(
    coords=coords, num_layers=L, token_dim=C, grid=GRID, num_vertices=len(coords), path="fake"
  )


def make_config(**task):
  fields = dict(name="encoding", bottleneck=16, hidden=16, num_freqs=4, reg_weight=0.1,
                reg_steps=2000, smooth_l1_beta=0.1)  # fmt: skip
  fields.update(task)
  return ml_collections.ConfigDict({"task": fields})


def make_batch(seed=1, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  return {
    "local": jnp.asarray(rng.normal(size=(B, L, *GRID, C)), dtype),
    "global": jnp.asarray(rng.normal(size=(B, L, C)), dtype),
    "fmri": jnp.asarray(rng.normal(size=(B, N)) * 0.2, jnp.float32),
    "valid": jnp.ones((B,), bool),
  }


@functools.cache
def setup(**task):
  t = registry.get("task", "encoding")(make_config(**task), make_info())
  params, extra = jax.jit(t.init)(jax.random.key(0), make_batch())
  fn = jax.value_and_grad(lambda p, e, b: t.loss(p, e, b, jax.random.key(1)), has_aux=True)
  value_and_grad = jax.jit(fn)  # one compile for every loss and gradient of these tests

  def loss(p, e, b):
    return value_and_grad(p, e, b)[0]

  return t, params, extra, loss, value_and_grad


def test_init_values_loss_and_gradients():
  t, params, extra, loss_fn, value_and_grad = setup()
  np.testing.assert_array_equal(extra["pe"], position_encoding(make_info().coords, 4))
  assert int(extra["step"]) == 0 and params["weight"].shape == (N, 16)
  # Zero-initialised selector outputs: centre, uniform over layers, half global.
  sel = t.selections(t.feature_params(params, extra))
  np.testing.assert_array_equal(sel["sel_space"], np.zeros((N, 2), np.float32))
  np.testing.assert_allclose(sel["sel_layer"], np.full((N, L), 1 / L), rtol=1e-6)
  np.testing.assert_array_equal(sel["sel_scale"], np.full((N, 1), 0.5, np.float32))
  np.testing.assert_array_equal(t.readout_weights(params), np.asarray(params["weight"]))
  # ...so reg = mean sum p log(p + 1e-8) / log L + 0 = -1 (up to the 1e-8).
  batch = make_batch()
  (loss, m), grads = value_and_grad(params, extra, batch)
  assert float(m["reg"]) == pytest.approx(-1.0, abs=1e-6)

  feats = jax.jit(t.features)(t.feature_params(params, extra), batch)
  y = np.asarray(feats["y"], np.float64)
  assert feats["sel_layer"].shape == (B, N, L) and feats["sel_scale"].shape == (B, N, 1)
  np.testing.assert_array_equal(feats["sel_space"][3], sel["sel_space"])
  # Plain params use the host copy of the encoding (eager here: equal up to rounding).
  np.testing.assert_allclose(t.features(params, batch)["y"], feats["y"], rtol=1e-6, atol=1e-8)
  d = np.abs(y - np.asarray(batch["fmri"], np.float64))
  want = np.mean(np.where(d < 0.1, 0.5 * d * d / 0.1, d - 0.05))
  assert float(m["smooth_l1"]) == pytest.approx(want, rel=1e-5)
  t_ = np.asarray(batch["fmri"], np.float64)
  r2 = 1 - ((t_ - y) ** 2).sum(0) / ((t_ - t_.mean(0)) ** 2).sum(0)
  assert float(m["r2"]) == pytest.approx(r2.mean(), rel=1e-4, abs=1e-5)

  # d loss / d bias_n = mean over the batch of clip((y - t) / beta, -1, 1) / N.
  want_b = np.mean(np.clip((y - t_) / 0.1, -1, 1), axis=0) / N
  np.testing.assert_allclose(grads["bias"], want_b, rtol=1e-4, atol=1e-7)
  # Behind a zero output layer, the selectors' hidden layers get no gradient at init.
  for kind in ("space", "layer", "scale"):
    g = grads[f"{kind}_selector"]
    assert float(jnp.abs(g["hidden_0"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(g["out"]["kernel"]).max()) > 0.0
  for name in ("local_bottleneck_0", "global_bottleneck_2"):
    assert float(jnp.abs(grads[name]["kernel"]).max()) > 0.0


def test_invalid_rows_do_not_count():
  t, params, extra, loss_fn, _ = setup()
  batch = make_batch()
  valid = jnp.asarray([True, False, True, True, False, True])
  masked = {**batch, "valid": valid}
  loss, m = loss_fn(params, extra, masked)
  other = make_batch(seed=7)
  changed = {k: jnp.where(valid.reshape(-1, *[1] * (v.ndim - 1)), v, other[k])
             for k, v in masked.items() if k != "valid"}  # fmt: skip
  loss2, m2 = loss_fn(params, extra, {**changed, "valid": valid})
  assert float(loss2) == float(loss)
  for k in m:
    assert float(m2[k]) == float(m[k]), k
  # ...and equal the loss of the valid rows alone.
  keep = np.flatnonzero(np.asarray(valid))
  alone = {k: v[keep] for k, v in batch.items()}
  loss3, m3 = t.loss(params, extra, alone, jax.random.key(1))
  assert float(loss3) == pytest.approx(float(loss), rel=1e-6)
  assert float(m3["r2"]) == pytest.approx(float(m["r2"]), rel=1e-5, abs=1e-6)


def rounded(sl1: np.float32, reg: np.float32, weight: float) -> set[float]:
  """sl1 + reg * weight in float32, rounded after each op (the seed) or once (an FMA, which
  XLA may emit for the multiply-add)."""
  w = np.float32(weight)
  fma = np.float32(np.float64(sl1) + np.float64(reg) * np.float64(w))
  return {float(sl1 + reg * w), float(fma)}


def test_regulariser_weight_and_decay():
  t, params, extra, loss_fn, _ = setup()
  # Non-uniform selections so that reg is not the constant of the zero init.
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: x, params)
  for kind in ("layer", "scale"):
    k = params[f"{kind}_selector"]["out"]["kernel"]
    params[f"{kind}_selector"]["out"]["kernel"] = jnp.asarray(rng.normal(size=k.shape), k.dtype)
  batch = make_batch()
  loss0, m0 = loss_fn(params, extra, batch)
  sl1, reg = np.float32(m0["smooth_l1"]), np.float32(m0["reg"])
  assert float(m0["reg_weight"]) == np.float32(0.1)
  assert float(loss0) in rounded(sl1, reg, 0.1)  # step 0: exactly smooth_l1 + 0.1 reg
  for step, decay in ((1000, 0.5), (2000, 0.0), (2500, 0.0)):
    weight = float(np.float32(0.1) * np.float32(decay))
    e = t.update_extra(params, extra, jnp.asarray(step))
    assert int(e["step"]) == step
    loss, m = loss_fn(params, e, batch)
    assert float(m["reg_weight"]) == weight
    assert float(m["smooth_l1"]) == float(sl1) and float(m["reg"]) == float(reg)
    if weight == 0.0:
      assert float(loss) == float(sl1)
    else:
      assert float(loss) in rounded(sl1, reg, float(m["reg_weight"]))


def test_adamw_reduces_loss_on_a_planted_problem():
  t, params, extra, loss_fn, _ = setup()
  # Targets from a 'teacher' FactorTopy with drawn selector outputs: exactly representable.
  rng = np.random.default_rng(5)
  teacher = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), params)
  predict = jax.jit(lambda p, b: t.features(t.feature_params(p, extra), b)["y"])
  batches = []
  for seed in range(4):
    b = make_batch(seed=10 + seed)
    b["fmri"] = predict(teacher, b)
    batches.append(b)
  tx = optax.adamw(3e-2, weight_decay=0.01)

  @jax.jit
  def step(p, o, e, b):
    (loss, m), g = jax.value_and_grad(lambda q: t.loss(q, e, b, jax.random.key(0)), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, m

  opt = tx.init(params)
  first = [float(loss_fn(params, extra, b)[1]["smooth_l1"]) for b in batches]
  for i in range(60):
    params, opt, _ = step(params, opt, extra, batches[i % 4])
    extra = t.update_extra(params, extra, jnp.asarray(i + 1))
  last = [float(loss_fn(params, extra, b)[1]["smooth_l1"]) for b in batches]
  assert int(extra["step"]) == 60
  assert np.mean(last) < 0.3 * np.mean(first), (first, last)


def test_bad_info_and_batches_are_named():
  info = make_info()
  flat = info.coords.copy()
  flat[:, 2] = 1.0
  with pytest.raises(InputError, match=r"fake: info\.coords: .*zero range on axis \[2\]"):
    registry.get("task", "encoding")(make_config(), make_info(flat))
  with pytest.raises(InputError, match=r"info\.coords: expected shape \(N, 3\)"):
    registry.get("task", "encoding")(make_config(), make_info(info.coords[:, :2]))
  with pytest.raises(InputError, match="config.task.reg_steps"):
    registry.get("task", "encoding")(make_config(reg_steps=0), info)
  t, params, extra, *_ = setup()
  bad = {**make_batch(), "global": jnp.zeros((B, L, C + 1))}
  with pytest.raises(ValueError, match=r"global \(B, 3, 8\)"):
    t.loss(params, extra, bad, jax.random.key(0))


def test_bddn_converter_round_trip_and_coords_check():
  t, params, extra, *_ = setup()
  conv = BddnConverter()
  sd = params_to_torch(params, [0, 1, 2])
  info = make_info()
  args = (t, None, extra, info, Options(), "ckpt.pt")
  out = conv.convert(sd, *args)
  jax.tree.map(np.testing.assert_array_equal, out.params, jax.device_get(params))
  assert out.extra is None and any("unchecked" in n for n in out.notes)
  assert conv.torch_name(("layer_selector", "out", "kernel")) == "layer_selector_mlp.5.weight"

  pl = {f"model.{k}": v for k, v in sd.items()}
  pl["coords"] = info.coords * 2.0 + 5.0  # shift and scale: the same encoding
  out = conv.convert(pl, *args)
  jax.tree.map(np.testing.assert_array_equal, out.params, jax.device_get(params))
  assert any("shift / scale" in n for n in out.notes)
  pl["coords"] = info.coords[::-1].copy()  # another vertex order
  with pytest.raises(InputError, match="ckpt.pt: coords: expected the vertex coordinates"):
    conv.convert(pl, *args)

  small = {k: v for k, v in sd.items()}
  small["weight"], small["bias"] = sd["weight"][:5], sd["bias"][:5]
  with pytest.raises(InputError, match=r"info.num_vertices \(config.data\)=24 but the checkpoint"):
    conv.convert(small, *args)
  with pytest.raises(InputError, match="config.task.bottleneck=16 but the checkpoint has 8"):
    t8 = registry.get("task", "encoding")(make_config(bottleneck=8), info)
    shapes = jax.eval_shape(t8.init, jax.random.key(0), make_batch())[0]
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    conv.convert(params_to_torch(zeros, [0, 1, 2]), *args)
