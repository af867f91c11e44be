"""learning-from-brains tasks (csm, seq_bert, net_bert, autoencoder, decode) on random batches
with a stand-in data info: batch packing, masking draws, loss values, padding rows, freezing,
checkpoint grafting and a short optimisation."""

from __future__ import annotations

import dataclasses
import functools
import types

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from boldjax import registry
from boldjax.tasks import decode as decode_lib
from boldjax.tasks.csm import draw_masking_i
from boldjax.tasks.seq_bert import pack_pair

R, T, B = 12, 8, 4


@dataclasses.dataclass
class Info:
  num_parcels: int = R
  networks: np.ndarray = dataclasses.field(default_factory=lambda: np.arange(R) % 3)
  num_networks: int = 3
  num_classes: int = 3
  seq_max: int = T


def make_config(task: str, **task_fields) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(
    dict(
      name="lfb",
      embedding_dim=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_dim_factor=2,
      n_positions=32,
      dropout=0.1,
      teacher_forcing_ratio=0.5,
    )
  )
  c.task = ml_collections.ConfigDict(dict(name=task, masking_rate=0.3, **task_fields))
  return c


def make_batch(seed: int = 0, pairs: bool = False) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  length = rng.integers(3, T + 1, B).astype(np.int32)
  mask = np.arange(T)[None] < length[:, None]
  tr = rng.choice([0.72, 1.0, 2.0], B).astype(np.float32)
  batch = {
    # smooth, parcel-phased oscillations + noise: predictable from context, so losses can fall
    "bold": (
      (
        np.sin(
          0.9 * np.arange(T)[None, :, None]
          + np.arange(R)[None, None]
          + rng.uniform(0, 6, (B, 1, 1))
        )
        + 0.1 * rng.standard_normal((B, T, R))
      )
      * mask[..., None]
    ).astype(np.float32),
    "t_sec": (np.arange(T)[None] * tr[:, None] * mask).astype(np.float32),
    "tr": tr,
    "mask": mask,
    "length": length,
    "subject_id": np.arange(B, dtype=np.int32),
    "label": rng.integers(0, 3, B).astype(np.int32),
  }
  if pairs:
    other = make_batch(seed + 100)
    for key in ("bold", "t_sec", "mask", "length"):
      batch[key + "_next"] = other[key]
    batch["next_is_consecutive"] = np.array([True, False, True, False])
  return batch


@functools.cache
def eval_loss_fn(task):
  """jit(task.loss) in eval mode (eager flax is slow)."""
  return jax.jit(lambda p, e, b, r: task.loss(p, e, b, r, train=False))


@functools.cache
def apply(model):
  return jax.jit(model.apply, static_argnames=("method",))


def build(name: str, **task_fields):
  """(task, params, extra, batch), cached per configuration (init and compiles are slow)."""
  return _build(name, tuple(sorted(task_fields.items())))


@functools.cache
def _build(name: str, fields: tuple):
  task_fields = dict(fields)
  task = registry.get("task", name)(make_config(name, **task_fields), Info())
  batch = make_batch(pairs=name in ("seq_bert", "net_bert"))
  params, extra = task.init(jax.random.key(0), batch)
  import flax.linen as nn

  return task, nn.unbox(params), extra, batch


def test_tasks_are_registered():
  names = registry.names("task")
  for name in ("csm", "seq_bert", "net_bert", "autoencoder", "decode"):
    assert name in names


def test_pack_pair_values():
  a = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1) + 1
  b = -np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1) - 1
  ta = np.tile(np.arange(3, dtype=np.float32), (2, 1))
  x, t, am, tt = pack_pair(a, ta, np.array([2, 3]), b, ta + 10, np.array([1, 2]))
  np.testing.assert_array_equal(np.asarray(x)[..., 0], [[1, 2, -1, 0, 0, 0], [4, 5, 6, -4, -5, 0]])
  np.testing.assert_array_equal(np.asarray(t), [[0, 1, 10, 0, 0, 0], [0, 1, 2, 10, 11, 0]])
  np.testing.assert_array_equal(np.asarray(am), [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(tt), [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])


def test_masking_i_is_uniform_over_1_to_len_minus_1():
  length = jnp.full((20000,), 5, jnp.int32)
  i = np.asarray(draw_masking_i(jax.random.key(1), length))
  assert i.min() == 1 and i.max() == 4
  np.testing.assert_allclose(np.bincount(i, minlength=5)[1:] / i.size, 0.25, atol=0.02)


def test_csm_loss_is_l1_at_the_masked_frame():
  task, params, extra, batch = build("csm")
  rng = jax.random.key(3)
  loss, metrics = eval_loss_fn(task)(params, extra, batch, rng)
  i = draw_masking_i(jax.random.split(rng)[0], jnp.asarray(batch["length"]))
  out = apply(task.model)({"params": params}, batch["bold"], batch["t_sec"], i, method="csm")
  pred = np.asarray(out["masked_predictions"])
  target = batch["bold"][np.arange(B), np.asarray(i)]
  np.testing.assert_allclose(float(loss), np.abs(pred - target).mean(), rtol=1e-6)
  assert float(metrics["masking_loss"]) == float(loss)


def test_padded_rows_do_not_count():
  for name in ("csm", "seq_bert", "net_bert", "autoencoder", "decode"):
    kw = {"backbone": "csm"} if name == "decode" else {}
    task, params, extra, batch = build(name, **kw)
    valid = np.array([True, True, False, False])
    garbage = {k: v.copy() for k, v in batch.items()}
    for key in ("bold", "bold_next"):
      if key in garbage:
        garbage[key][2:] = 1e3
    garbage["label"][2:] = (batch["label"][2:] + 1) % 3
    rng, fn = jax.random.key(5), eval_loss_fn(task)
    l1, _ = fn(params, extra, {**batch, "valid": valid}, rng)
    l2, _ = fn(params, extra, {**garbage, "valid": valid}, rng)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6, err_msg=name)


def test_seq_bert_nsp_target_is_inverted():
  task, params, extra, batch = build("seq_bert")
  rng = jax.random.key(7)
  _, metrics = eval_loss_fn(task)(params, extra, batch, rng)
  # Recompute the BCE with is_next = 1 - next_is_consecutive from the model's logits.
  from boldjax.tasks.seq_bert import pack_pair as pack

  x, t, am, tt = pack(
    *(
      jnp.asarray(batch[k])
      for k in ("bold", "t_sec", "length", "bold_next", "t_sec_next", "length_next")
    )
  )
  mm = task.draw_mask(jax.random.split(rng)[0], am, R)
  out = apply(task.model)({"params": params}, x, t, am, tt, mm, method="bert")
  z = np.asarray(out["is_next_logits"]).ravel()
  y = 1.0 - batch["next_is_consecutive"].astype(np.float64)
  bce = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
  np.testing.assert_allclose(float(metrics["is_next_loss"]), bce, rtol=1e-5)
  total = float(metrics["masking_loss"]) + float(metrics["is_next_loss"])
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-6)


def test_net_bert_masks_whole_networks_at_valid_frames():
  task, *_ = build("net_bert")
  am = jnp.asarray(np.arange(10)[None] < np.array([[4], [10], [7], [1]]))
  mm = np.asarray(task.draw_mask(jax.random.key(2), am, R))
  nets = Info().networks
  for b in range(4):
    per_parcel = mm[b].any(axis=0)
    for n in range(3):  # a network's parcels are all masked or none
      assert len(set(per_parcel[nets == n])) == 1
    np.testing.assert_array_equal(
      mm[b][np.asarray(am[b])], np.broadcast_to(per_parcel, mm[b][np.asarray(am[b])].shape)
    )
    assert not mm[b][~np.asarray(am[b])].any()
  parcel_task = registry.get("task", "net_bert")(
    make_config("net_bert", network_masking="parcels"), Info()
  )
  draws = np.asarray(parcel_task.draw_mask(jax.random.key(0), jnp.ones((2000, 1), bool), R))
  np.testing.assert_allclose(draws.mean(), 0.3, atol=0.01)


def test_autoencoder_teacher_forcing_only_in_training():
  task, params, extra, batch = build("autoencoder")
  fn = eval_loss_fn(task)
  losses = {float(fn(params, extra, batch, jax.random.key(s))[0]) for s in range(4)}
  assert len(losses) == 1  # eval: no teacher forcing, no dropout
  x, t = batch["bold"], batch["t_sec"]
  free = apply(task.model)({"params": params}, x, t, False, method="autoencode")
  forced = apply(task.model)({"params": params}, x, t, True, method="autoencode")
  # step 0 is fed the pooler without forcing and frame 0's embedding with it
  assert not np.allclose(np.asarray(free["outputs"])[:, 0], np.asarray(forced["outputs"])[:, 0])
  np.testing.assert_array_equal(  # the encoder does not depend on forcing
    np.asarray(free["pooler_outputs"]), np.asarray(forced["pooler_outputs"])
  )


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_custom_backward_equals_autodiff_of_the_scan(reverse):
  """run_lstm's hand-written backward through time (dW_hh as one matmul after the loop)
  gives the gradients jax's autodiff of the plain step-by-step scan gives."""
  from boldjax.models import lstm

  rng = np.random.default_rng(0)
  B, S, D = 3, 9, 8
  shapes = {"weight_ih": (D, 4 * D), "weight_hh": (D, 4 * D), "bias_ih": (4 * D,)}
  w = {k: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  w["bias_hh"] = jnp.asarray(0.3 * rng.standard_normal(4 * D), jnp.float32)
  x, g = (jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32) for _ in range(2))
  h0, c0, gh, gc = (jnp.asarray(rng.standard_normal((B, D)), jnp.float32) for _ in range(4))

  def plain(w, x, h0, c0):
    xp = x @ w["weight_ih"] + w["bias_ih"]

    def step(carry, xt):
      h, c = lstm.lstm_step(w, xt, *carry)
      return (h, c), h

    (h, c), ys = jax.lax.scan(step, (h0, c0), jnp.swapaxes(xp, 0, 1), reverse=reverse)
    return jnp.swapaxes(ys, 0, 1), (h, c)

  def loss(fn):
    def f(w, x, h0, c0):
      ys, (h, c) = fn(w, x, h0, c0)
      return (ys * g).sum() + (h * gh).sum() + (c * gc).sum()

    return f

  custom = functools.partial(lstm.run_lstm, reverse=reverse)
  np.testing.assert_allclose(loss(custom)(w, x, h0, c0), loss(plain)(w, x, h0, c0), rtol=1e-6)
  want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(w, x, h0, c0)
  got = jax.grad(loss(custom), argnums=(0, 1, 2, 3))(w, x, h0, c0)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decode_metrics_and_balanced_accuracy():
  task, params, extra, batch = build("decode", backbone="seq_bert")
  batch = {**batch, "label": np.array([0, 0, 1, 2], np.int32), "valid": np.ones(B, bool)}
  _, m = eval_loss_fn(task)(params, extra, batch, jax.random.key(0))
  out = apply(task.model)(
    {"params": params}, batch["bold"], batch["t_sec"], batch["mask"], method="decode"
  )
  pred = np.argmax(np.asarray(out["logits"]), -1)
  correct = pred == batch["label"]
  np.testing.assert_allclose(float(m["accuracy"]), correct.mean(), rtol=1e-6)
  recall = [correct[batch["label"] == k].mean() for k in range(3)]
  np.testing.assert_allclose(float(m["balanced_accuracy"]), np.mean(recall), rtol=1e-6)
  final = task.finalize_metrics({k: float(v) for k, v in m.items()})
  np.testing.assert_allclose(final["balanced_accuracy"], np.mean(recall), rtol=1e-6)
  # split-level: class fractions averaged over two "batches" of different composition
  split = {
    "class_0_count": 0.5,
    "class_0_correct": 0.25,
    "class_1_count": 0.5,
    "class_1_correct": 0.5,
  }
  assert decode_lib.balanced_accuracy_from(split, 3) == pytest.approx(0.75)
  assert task.reference_metrics() == {"chance_balanced_accuracy": pytest.approx(1 / 3)}


@pytest.mark.parametrize("backbone", ["csm", "seq_bert"])
def test_decode_poolings_summarise_the_frames_the_pooler_sees(backbone):
  """cls: the original's position (GPT: the CLS after the last frame, BERT: 0); mean: the
  average over valid frames only. Either way the pooler is tanh(Linear)."""
  task, params, _, batch = build("decode", backbone=backbone)
  lengths = batch["length"]
  kernel, bias = (np.asarray(params["pooler"][k]) for k in ("kernel", "bias"))
  for pooling in ("cls", "mean"):
    model = task.model.clone(decode_pooling=pooling)
    out = jax.jit(functools.partial(model.apply, method="encode"))(
      {"params": params}, batch["bold"], batch["t_sec"], batch["mask"]
    )
    h = np.asarray(out["hidden_states"], np.float64)
    if pooling == "mean":
      summary = np.stack([h[b, : lengths[b]].mean(0) for b in range(B)])
    else:
      at = lengths if backbone == "csm" else np.zeros(B, int)
      summary = h[np.arange(B), at]
    np.testing.assert_allclose(
      out["pooler_outputs"], np.tanh(summary @ kernel + bias), rtol=1e-5, atol=1e-6
    )
  with pytest.raises(ValueError, match="decode_pooling.*'cls', 'mean'.*'max'"):
    task.model.clone(decode_pooling="max").init(
      jax.random.key(0), batch["bold"], batch["t_sec"], batch["mask"]
    )


def test_decode_freeze_and_load_pretrained(monkeypatch):
  pre, pre_params, _, _ = build("csm")
  task, params, extra, batch = build("decode", backbone="csm", init_from="/fake/run", freeze=True)
  mask = task.trainable(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert all(v == ("pooler" in k or "decoding_head" in k) for k, v in flat.items())
  fake = types.SimpleNamespace(
    config=ml_collections.ConfigDict({"task": {"name": "csm"}}),
    state=types.SimpleNamespace(params=pre_params),
  )
  import boldjax.workdir

  monkeypatch.setattr(boldjax.workdir, "load_run", lambda workdir: fake)
  grafted = task.load_pretrained(params)
  np.testing.assert_array_equal(
    grafted["embedder"]["wt_re"]["embedding"], pre_params["embedder"]["wt_re"]["embedding"]
  )
  np.testing.assert_array_equal(
    grafted["decoding_head"]["kernel"], params["decoding_head"]["kernel"]
  )
  fake.config.task.name = "autoencoder"
  with pytest.raises(ValueError, match="init_from"):
    task.load_pretrained(params)


def test_frozen_train_state_builds_and_keeps_the_backbone():
  """The sharded TrainState of a frozen run (optax MaskedNode slots) builds and steps."""
  from boldjax import optim, sharding, state

  task, params, extra, batch = build("decode", backbone="csm", freeze=True)
  cfg = ml_collections.ConfigDict(
    dict(
      lr=1e-2,
      b1=0.9,
      b2=0.9,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
      warmup_steps=0,
      warmup_init=1.0,
      min_lr_ratio=1.0,
      accum_steps=1,
      no_decay=(),
    )
  )
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  tx, _ = optim.make_optimizer(cfg, 10, state.trainable_mask(task, example))
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  rules = sharding.logical_rules(())
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
    spec = state.make_state_spec(task, tx, example, jax.random.key(0), mesh, rules)
    s0 = spec.init(jax.random.key(0))
  grads = jax.grad(lambda p: task.loss(p, s0.extra, batch, jax.random.key(1))[0])(s0.params)
  updates, _ = tx.update(grads, s0.opt_state, s0.params)
  new = optax.apply_updates(s0.params, updates)
  np.testing.assert_array_equal(
    new["embedder"]["wt_re"]["embedding"], s0.params["embedder"]["wt_re"]["embedding"]
  )
  assert not np.allclose(new["decoding_head"]["kernel"], s0.params["decoding_head"]["kernel"])


def test_bad_inputs_name_the_field():
  task, params, extra, batch = build("csm")
  with pytest.raises(ValueError, match=r"batch\['bold'\].*\(B, T, 12\)"):
    task.loss(params, extra, {**batch, "bold": batch["bold"][..., :5]}, jax.random.key(0))
  with pytest.raises(ValueError, match="n_positions"):
    registry.get("task", "seq_bert")(make_config("seq_bert"), Info(seq_max=20))
  with pytest.raises(ValueError, match="backbone"):
    registry.get("task", "decode")(make_config("decode", backbone="vit"), Info())
  with pytest.raises(ValueError, match="tr_max"):
    task.init(jax.random.key(0), {**batch, "t_sec": batch["t_sec"] + 400.0})


@pytest.mark.parametrize(
  "name",
  ["csm"]
  + [pytest.param(n, marks=pytest.mark.slow) for n in ("seq_bert", "net_bert", "autoencoder")],
)
def test_training_reduces_loss(name):
  task, params, extra, batch = build(name)
  opt = optax.adam(1e-2 if name == "autoencoder" else 3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, i):
    rng = jax.random.fold_in(jax.random.key(0), i)
    (loss, _), grads = jax.value_and_grad(
      lambda p: task.loss(p, extra, batch, rng, train=True), has_aux=True
    )(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  fn = eval_loss_fn(task)

  def eval_loss(p):
    return np.mean([float(fn(p, extra, batch, jax.random.key(s))[0]) for s in range(4)])

  before = eval_loss(params)
  for i in range(30):
    params, state, _ = step(params, state, i)
  after = eval_loss(params)
  assert np.isfinite(after) and after < 0.85 * before, (name, before, after)
