"""PatchGPT, the next_patch task and KV-cache generation: values, not just shapes."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax import registry
from boldjax.convert.boldgpt import convert_boldgpt, params_to_torch
from boldjax.data.patching import PatchLayout
from boldjax.data.tokenizer import KMeansTokenizer
from boldjax.generate import sample
from boldjax.models import layers
from boldjax.models.patch_gpt import PatchGPT
from boldjax.tasks.next_patch import unigram_baseline

VOCAB = 16


def _layout() -> PatchLayout:
  rows, cols = np.mgrid[:22, :31]
  mask = ((rows - 11) / 10.0) ** 2 + ((cols - 15) / 14.0) ** 2 < 1.0
  return PatchLayout.from_mask(mask, 5, "radial")


LAYOUT = _layout()
N, P = LAYOUT.num_patches, LAYOUT.patch_dim
TOKENIZER = KMeansTokenizer(
  np.random.default_rng(0).normal(size=(VOCAB, P)).astype(np.float32) * LAYOUT.patch_mask[0]
)


def _model(**kw) -> PatchGPT:
  base = dict(
    num_patches=N,
    patch_dim=P,
    vocab_size=VOCAB,
    num_subjects=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
  )
  return PatchGPT(**(base | kw))


def _batch(B: int = 3, seed: int = 0, shuffled: bool = True) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  maps = rng.normal(size=(B,) + LAYOUT.mask.shape).astype(np.float32)
  patches = LAYOUT.patchify(maps)
  order = (
    np.stack([rng.permutation(N) for _ in range(B)]) if shuffled else np.tile(np.arange(N), (B, 1))
  ).astype(np.int32)
  patches = np.take_along_axis(patches, order[..., None], axis=1)
  return {
    "patches": patches,
    "tokens": TOKENIZER.encode(patches),
    "order": order,
    "subject_id": np.arange(B, dtype=np.int32) % 4,
  }


def _init(model: PatchGPT, batch: dict[str, np.ndarray]):
  # Scale the tiny init up so attention is far from uniform and every term matters.
  # (Eager on purpose: op-by-op kernels are shared across models, a jitted init is not.)
  params = nn.unbox(
    model.init(jax.random.key(1), batch["patches"], batch["subject_id"], batch["order"])["params"]
  )
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(tree, leaves)


def test_init_names_axes_and_init_values():
  model = _model()
  batch = _batch()
  boxed = model.init(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["blocks_1"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
    "embed", "heads", "kv"
  )
  assert specs["blocks_0"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["sub_embed"] == jax.sharding.PartitionSpec("subjects", None, "embed")
  assert specs["head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  params = nn.unbox(boxed)["params"]
  assert sorted(params) == sorted(
    [
      "blocks_0",
      "blocks_1",
      "eos_query",
      "group_token",
      "head",
      "next_pos_query",
      "norm",
      "patch_embed",
      "pos_embed",
      "sub_embed",
    ]
  )
  assert sorted(params["blocks_0"]) == ["attn", "mlp", "norm1", "norm3"]
  assert params["blocks_0"]["attn"]["out"]["kernel"].shape == (2, 16, 32)
  np.testing.assert_array_equal(params["group_token"], 0.0)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  assert abs(float(jnp.std(params["sub_embed"])) - 0.02) < 0.004
  assert abs(float(jnp.std(params["blocks_0"]["mlp"]["fc1"]["kernel"])) - 0.02) < 0.002


def test_causal_and_order_semantics():
  model = _model()
  batch = _batch()
  params = _init(model, batch)

  def f(patches, order):
    return np.asarray(model.apply({"params": params}, patches, batch["subject_id"], order))

  out = f(batch["patches"], batch["order"])
  t = 7
  changed = batch["patches"].copy()
  changed[:, t] += 1.0
  out2 = f(changed, batch["order"])
  # Position t has seen patches < t only: outputs up to t are bit-identical, later ones move.
  np.testing.assert_array_equal(out2[:, : t + 1], out[:, : t + 1])
  assert np.abs(out2[:, t + 1 :] - out[:, t + 1 :]).min(axis=-1).max() > 1e-3
  # The query for position t is next_pos_query[order[t]]: swapping which patch comes next
  # changes the prediction at t but nothing before it.
  order = batch["order"].copy()
  order[:, [t, t + 1]] = order[:, [t + 1, t]]
  out3 = f(batch["patches"], order)
  np.testing.assert_array_equal(out3[:, :t], out[:, :t])
  assert np.abs(out3[:, t] - out[:, t]).max() > 1e-3
  # order=None is the identity order.
  np.testing.assert_allclose(
    f(batch["patches"], None), f(batch["patches"], np.arange(N, dtype=np.int32)), atol=0, rtol=0
  )


def test_features_cls_is_last_position_and_registers_leak():
  model = _model()
  batch = _batch()
  params = _init(model, batch)
  feats = model.apply(
    {"params": params}, batch["patches"], batch["subject_id"], batch["order"], method="features"
  )
  hidden = model.apply(
    {"params": params}, batch["patches"], batch["subject_id"], batch["order"], method="hidden"
  )
  np.testing.assert_array_equal(feats["cls"], hidden[:, N])
  np.testing.assert_array_equal(feats["tokens"], hidden[:, 1 : N + 1])
  np.testing.assert_allclose(feats["mean"], hidden[:, 1 : N + 1].mean(1), rtol=1e-6)

  reg = _model(num_registers=2)
  rparams = _init(reg, batch)
  assert rparams["reg_embed"].shape == (2, 32)
  changed = batch["patches"].copy()
  changed[:, -1] += 1.0
  a = reg.apply({"params": rparams}, batch["patches"], batch["subject_id"], batch["order"])
  b = reg.apply({"params": rparams}, changed, batch["subject_id"], batch["order"])
  # boldGPT's registers attend globally, so even position 0 sees the last patch.
  assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-4
  with pytest.raises(ValueError, match="use_cache=False"):
    sample(reg, rparams, num=1, order=None, vocab=TOKENIZER.vocab, temperature=0.0)


def _info() -> types.SimpleNamespace:
  """The FlatMapInfo fields the task reads."""
  return types.SimpleNamespace(
    layout=LAYOUT, tokenizer=TOKENIZER, num_subjects=4, token_counts=None
  )


def _config(target: str, **model) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "task": {"name": "next_patch", "target": target},
      "model": {"name": "patch_gpt", "embed_dim": 32, "depth": 2, "num_heads": 2, **model},
      "data": {"shuffle_order": True},
    }
  )


def test_categorical_task_loss_matches_numpy_and_ignores_padding():
  task = registry.get("task", "next_patch")(_config("categorical"), _info())
  batch = _batch(B=4)
  params, extra = task.init(jax.random.key(0), batch)
  assert extra == {}
  params = _init(task.model, batch)
  loss, metrics = jax.jit(lambda p, b: task.loss(p, {}, b, jax.random.key(0), train=False))(
    params, batch
  )
  logits = np.asarray(
    task.model.apply({"params": params}, batch["patches"], batch["subject_id"], batch["order"]),
    np.float64,
  )
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, batch["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)
  acc = (logits.argmax(-1) == batch["tokens"]).mean()
  np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
  # A padded row (valid=False) holding garbage must not change the metrics of the others.
  padded = {k: v.copy() for k, v in batch.items()}
  padded["patches"][3] = 100.0
  padded["valid"] = np.array([True, True, True, False])
  sub = {k: v[:3] for k, v in batch.items()}
  lp, mp = task.loss(params, {}, padded, jax.random.key(0), train=False)
  ls, ms = task.loss(params, {}, sub, jax.random.key(0), train=False)
  np.testing.assert_allclose(float(lp), float(ls), rtol=1e-6)
  np.testing.assert_allclose(float(mp["accuracy"]), float(ms["accuracy"]), rtol=1e-6)
  # Features: tokens come back in the canonical patch order.
  feats = task.features(params, batch)
  direct = task.model.apply(
    {"params": params}, batch["patches"], batch["subject_id"], batch["order"], method="features"
  )
  b, t = 1, 5
  j = batch["order"][b, t]
  np.testing.assert_array_equal(feats["tokens"][b, j], direct["tokens"][b, t])
  # Generation from the task takes vocab and patch mask from the data info.
  a = sample(task, params, num=2, subject_id=1, temperature=0.0)
  b = sample(
    task.model,
    params,
    num=2,
    subject_id=1,
    temperature=0.0,
    vocab=TOKENIZER.vocab,
    patch_mask=LAYOUT.patch_mask,
  )
  np.testing.assert_array_equal(a, b)
  bad = dict(batch, subject_id=np.array([0, 1, 2, 4], np.int32))
  with pytest.raises(ValueError, match=r"subject_id.*found range \[0, 4\]"):
    task.init(jax.random.key(0), bad)


def test_continuous_task_masked_mse_and_r2():
  task = registry.get("task", "next_patch")(_config("continuous"), _info())
  batch = _batch(B=2)
  params = _init(task.model, batch)
  loss, metrics = task.loss(params, {}, batch, jax.random.key(0), train=False)
  pred = np.asarray(
    task.model.apply({"params": params}, batch["patches"], batch["subject_id"], batch["order"]),
    np.float64,
  )
  assert pred.shape == (2, N, P)
  m = LAYOUT.patch_mask[batch["order"]].astype(np.float64)
  x = batch["patches"].astype(np.float64)
  mse = np.sum(m * (pred - x) ** 2) / m.sum()
  np.testing.assert_allclose(float(loss), mse, rtol=1e-5)
  mean = np.sum(m * x) / m.sum()
  r2 = 1 - mse / (np.sum(m * (x - mean) ** 2) / m.sum())
  np.testing.assert_allclose(float(metrics["r2"]), r2, rtol=1e-5)


def test_training_steps_reduce_loss_and_dropout_uses_rng():
  task = registry.get("task", "next_patch")(
    _config("categorical", drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1), _info()
  )
  batch = _batch(B=4)
  params = nn.unbox(task.init(jax.random.key(0), batch)[0])
  a = task.loss(params, {}, batch, jax.random.key(1))[0]
  b = task.loss(params, {}, batch, jax.random.key(1))[0]
  c = task.loss(params, {}, batch, jax.random.key(2))[0]
  assert float(a) == float(b) and float(a) != float(c)
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, {}, batch, rng)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  first = float(task.loss(params, {}, batch, jax.random.key(0), train=False)[0])
  for i in range(30):
    params, state, _ = step(params, state, jax.random.key(i))
  last = float(task.loss(params, {}, batch, jax.random.key(0), train=False)[0])
  assert first > np.log(VOCAB) - 0.5 and last < 0.5 * first


def test_reference_metrics_unigram():
  train = np.array([6, 2, 0, 0])
  val = np.array([1, 2, 1, 0])
  out = unigram_baseline(train, val)
  p = (train + 1) / (8 + 4)
  np.testing.assert_allclose(
    out["unigram_loss"], -(0.25 * np.log(p[0]) + 0.5 * np.log(p[1]) + 0.25 * np.log(p[2]))
  )
  assert out["unigram_accuracy"] == 0.25
  info = _info()
  info.token_counts = {"train": np.arange(VOCAB), "val": np.ones(VOCAB)}
  task = registry.get("task", "next_patch")(_config("categorical"), info)
  ref = task.reference_metrics()
  assert ref["unigram_accuracy"] == pytest.approx(1 / VOCAB)
  # a uniform val distribution pays the mean of -log p_train
  p = (np.arange(VOCAB) + 1) / (np.arange(VOCAB).sum() + VOCAB)
  assert ref["unigram_loss"] == pytest.approx(-np.log(p).mean())


def test_config_errors_name_the_field():
  with pytest.raises(KeyError, match="emebd_dim"):
    registry.get("task", "next_patch")(_config("categorical", emebd_dim=8), _info())
  with pytest.raises(ValueError, match="target"):
    registry.get("task", "next_patch")(_config("tokens"), _info())
  task = registry.get("task", "next_patch")(_config("categorical"), _info())
  bad = _batch()
  bad["patches"] = bad["patches"][:, :-1]
  with pytest.raises(ValueError, match=rf"batch\['patches'\].*found \(3, {N - 1}, {P}\)"):
    task.init(jax.random.key(0), bad)


@pytest.mark.parametrize("k", [0, 5])
def test_kv_cache_generation_matches_full_forward(k):
  model = _model()
  batch = _batch(B=2)
  params = _init(model, batch)
  order, subject = batch["order"], batch["subject_id"]
  prefix = batch["tokens"][:, :k]
  kw = dict(
    num=2,
    subject_id=subject,
    order=order,
    vocab=TOKENIZER.vocab,
    patch_mask=LAYOUT.patch_mask,
    prefix_tokens=prefix,
    return_logits=True,
  )
  with jax.default_matmul_precision("highest"):
    toks_c, logits_c = sample(model, params, temperature=0.0, use_cache=True, **kw)
    toks_n, logits_n = sample(model, params, temperature=0.0, use_cache=False, **kw)
    np.testing.assert_array_equal(toks_c, toks_n)
    np.testing.assert_array_equal(toks_c[:, :k], prefix)
    # The fed-back sequence is centroid * in-mask pixels; a full forward over it must give
    # the logits the cached decoder produced at every sampled position.
    patches = TOKENIZER.vocab[np.asarray(toks_c)] * LAYOUT.patch_mask[order]
    full = model.apply({"params": params}, patches, subject, order)
    np.testing.assert_allclose(logits_c[:, k:], full[:, k:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits_n[:, k:], full[:, k:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(toks_c)[:, k:], np.argmax(full[:, k:], -1))
    if k == 0:
      return
    # Temperature sampling: same rng -> same draw with and without the cache.
    rng = jax.random.key(3)
    s1 = sample(model, params, temperature=1.5, rng=rng, use_cache=True, **kw)[0]
    s2 = sample(model, params, temperature=1.5, rng=rng, use_cache=False, **kw)[0]
    s3 = sample(model, params, temperature=1.5, rng=jax.random.key(4), use_cache=True, **kw)[0]
  np.testing.assert_array_equal(s1, s2)
  assert (np.asarray(s1) != np.asarray(s3)).any()
  assert len(np.unique(np.asarray(s1))) > 3


def test_continuous_generation_cache_matches_no_cache():
  model = _model(categorical=False)
  batch = _batch(B=2)
  params = _init(model, batch)
  kw = dict(
    num=2,
    subject_id=batch["subject_id"],
    order=batch["order"],
    patch_mask=LAYOUT.patch_mask,
    prefix_patches=batch["patches"][:, :3],
  )
  with jax.default_matmul_precision("highest"):
    a = sample(model, params, use_cache=True, **kw)
    b = sample(model, params, use_cache=False, **kw)
    order = batch["order"]
    full_a = model.apply({"params": params}, np.asarray(a), batch["subject_id"], order)
    full_b = model.apply({"params": params}, np.asarray(b), batch["subject_id"], order)
  m = LAYOUT.patch_mask[order]
  # Each step is consistent with a full forward over the sequence it fed itself ...
  np.testing.assert_allclose(np.asarray(a)[:, 3:], (full_a * m)[:, 3:], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(b)[:, 3:], (full_b * m)[:, 3:], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(a[:, :3], batch["patches"][:, :3])
  np.testing.assert_array_equal(np.asarray(a)[~m], 0.0)
  # ... and the two trajectories agree, up to float32 rounding compounded by feeding
  # predictions back for N - 3 steps (first sampled step: 1e-5).
  np.testing.assert_allclose(a[:, 3], b[:, 3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_bfloat16_compute_close_to_float32():
  batch = _batch()
  m32, m16 = _model(), _model(dtype=jnp.bfloat16)
  params = _init(m32, batch)
  a = m32.apply({"params": params}, batch["patches"], batch["subject_id"], batch["order"])
  b = m16.apply({"params": params}, batch["patches"], batch["subject_id"], batch["order"])
  assert b.dtype == jnp.float32
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert rel < 0.05


def test_converter_round_trip_cross_registers_and_strict_keys():
  model = _model(with_cross=True, num_registers=2, categorical=False)
  batch = _batch(B=2)
  context = np.random.default_rng(5).normal(size=(2, 4, 12)).astype(np.float32)
  params = nn.unbox(
    model.init(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"], context)
  )["params"]
  sd = params_to_torch(params)
  assert sd["decoder.blocks.1.cross.kv.weight"].shape == (64, 32)
  assert sd["decoder.cross_embed.weight"].shape == (32, 12)
  back, extras = convert_boldgpt(sd, num_heads=2, model=model)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  kw = extras["model_kwargs"]
  assert (kw["num_registers"], kw["with_cross"], kw["categorical"], kw["depth"]) == (
    2,
    True,
    False,
    2,
  )
  out = model.apply(
    {"params": back}, batch["patches"], batch["subject_id"], batch["order"], context
  )
  assert out.shape == (2, N, P) and bool(jnp.isfinite(out).all())

  with pytest.raises(KeyError, match=r"unknown keys \['decoder.mask_token'\]"):
    convert_boldgpt(sd | {"decoder.mask_token": np.zeros((1, 1, 32))}, num_heads=2)
  partial = {k: v for k, v in sd.items() if k != "decoder.blocks.1.norm3.bias"}
  with pytest.raises(KeyError, match=r"missing keys \['decoder.blocks.1.norm3.bias'\]"):
    convert_boldgpt(partial, num_heads=2)
  with pytest.raises(ValueError, match="blocks_2"):
    convert_boldgpt(
      sd, num_heads=2, model=_model(with_cross=True, num_registers=2, categorical=False, depth=3)
    )


def test_sharded_forward_matches_single_device():
  """The logical axis names are valid: a (data=4, tensor=2) mesh gives the same logits."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec

  rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  model = _model()
  batch = _batch(B=4)
  boxed = model.init(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])
  expected = model.apply(boxed, batch["patches"], batch["subject_id"], batch["order"])
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  params = jax.device_put(nn.unbox(boxed), shardings)  # (eager unbox under rules would constrain)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    data = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    out = jax.jit(lambda p, b: model.apply(p, b["patches"], b["subject_id"], b["order"]))(
      params, data
    )
  assert params["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == PartitionSpec(
    None, "tensor"
  )
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 12, 4), (3, 5, 12, 40)])
def test_dense_dot_general_grads_equal_lax(shape):
  """layers.dense_dot_general (weight grad as (dy^T x)^T when in > out) gives lax's values."""
  b, t, k, n = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  dn = (((2,), (0,)), ((), ()))

  def loss(dot):
    return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dn)))

  got = jax.jit(jax.grad(loss(layers.dense_dot_general), (0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(jax.lax.dot_general), (0, 1)))(x, w)
  for g, e in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(layers.dense_dot_general(x, w, dn)), np.asarray(jax.lax.dot_general(x, w, dn))
  )
