"""benchmarks/: analytic FLOP counts, and torch re-implementations that match boldjax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from benchmarks import dots as dots_lib
from benchmarks import flops as flops_lib
from boldjax import optim
from boldjax import state as state_lib
from boldjax.convert.semantoks import params_to_torch as params_to_torch_semantoks
from boldjax.models.lfb import LfbModel
from boldjax.models.patch_gpt import PatchGPT
from boldjax.tasks.csm import l1_rows
from boldjax.tasks.next_patch import categorical_loss, continuous_loss
from tests import parity

B, N, PD, V = 3, 13, 24, 40


def _cost(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _patch_gpt(categorical: bool = True, embed_dim: int = 32, depth: int = 2) -> PatchGPT:
  return PatchGPT(
    num_patches=N,
    patch_dim=PD,
    categorical=categorical,
    vocab_size=V,
    num_subjects=5,
    embed_dim=embed_dim,
    depth=depth,
    num_heads=2,
  )


def _patch_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "patches": rng.standard_normal((B, N, PD)).astype(np.float32),
    "tokens": rng.integers(0, V, (B, N)).astype(np.int32),
    "order": np.stack([rng.permutation(N) for _ in range(B)]).astype(np.int32),
    "subject_id": rng.integers(0, 5, (B,)).astype(np.int32),
  }


def _random_params(abstract, seed: int = 0):
  """Random values of the shapes of an eval_shape'd init (no init compile): N(0, .3^2),
  LayerNorm scales 1 + N(0, .1^2), kernel_norm buffers in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    if name == "kernel_norm":
      return (0.5 + rng.random(leaf.shape)).astype(leaf.dtype)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, abstract)


def _perturbed(params, seed: int = 1):
  """Random non-trivial values everywhere (zero-initialised tokens / biases matter too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (np.asarray(x) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), params
  )


# ---------------------------------------------------------------------------------------
# FLOP counts.
# ---------------------------------------------------------------------------------------
def test_transformer_flops_by_hand():
  # batch 2, length 5, width 8, 3 layers, MLP 32: per token and layer q,k,v,out = 4*2*8*8
  # = 512, MLP = 2*2*8*32 = 1024; 10 tokens * 3 layers * 1536 = 46080. Attention:
  # 4 * 2 * 25 * 8 * 3 = 4800.
  count = flops_lib.transformer_blocks(2, 5, 8, 3, 32)
  assert count.matmul == 46080.0
  assert count.attention == 4800.0
  assert count.train_step == 3 * (46080.0 + 4800.0)


def test_patch_gpt_flops_by_hand():
  m = _patch_gpt(embed_dim=32, depth=2)
  c = flops_lib.patch_gpt(m, B)
  tokens, D = B * (N + 1), 32
  blocks = 2 * (4 * 2 * tokens * D * D + 2 * 2 * tokens * D * 4 * D)
  io = 2 * B * N * PD * D + 2 * B * N * D * V
  assert c.matmul == blocks + io
  assert c.attention == 4 * B * (N + 1) ** 2 * D * 2


def test_patch_gpt_flops_match_xla_cost_analysis():
  """XLA counts matmuls plus elementwise work: within [1, 1.12] of the analytic count."""
  m = PatchGPT(
    num_patches=31, patch_dim=48, vocab_size=64, num_subjects=4, embed_dim=128, depth=2,
    num_heads=2,
  )  # fmt: skip
  b = 4
  p, s = jnp.ones((b, 31, 48)), jnp.zeros((b,), jnp.int32)
  o = jnp.tile(jnp.arange(31), (b, 1))
  params = m.init(jax.random.key(0), p, s, o)
  analytic = flops_lib.patch_gpt(m, b)
  fwd = _cost(lambda v: m.apply(v, p, s, o), params)
  grad = _cost(jax.grad(lambda v: m.apply(v, p, s, o).sum()), params)
  assert 1.0 <= fwd / analytic.forward <= 1.12, fwd / analytic.forward
  assert 1.0 <= grad / analytic.train_step <= 1.12, grad / analytic.train_step


def test_csm_flops_by_hand():
  m = LfbModel(style="csm", in_dim=10, embed_dim=16, num_layers=2, num_heads=2)
  c = flops_lib.csm_gpt(m, 4, 7)
  t = 28
  assert c.matmul == 2 * (4 * 2 * t * 16 * 16 + 2 * 2 * t * 16 * 64) + 2 * 2 * t * 10 * 16
  assert c.attention == 4 * 4 * 49 * 16 * 2


def test_dense_flops_equal_xla():
  a, w = jnp.ones((96, 40)), jnp.ones((40, 24))
  assert _cost(jnp.dot, a, w) == flops_lib.dense(96, 40, 24)


# ---------------------------------------------------------------------------------------
# The matmul floor reads every dot of a compiled step.
# ---------------------------------------------------------------------------------------
def test_dot_einsum_and_flops_by_hand():
  d = dots_lib.Dot("f32", (2, 3, 4), (2, 5, 4), (0,), (2,), (0,), (2,))
  assert d.einsum() == "abc,adc->abd"
  assert d.flops == 2 * 2 * 3 * 5 * 4
  w = dots_lib.Dot("f32", (7, 6), (7, 9), (), (0,), (), (0,))  # a weight gradient x^T dy
  assert w.einsum() == "ab,ac->bc"
  assert w.flops == 2 * 6 * 9 * 7


def test_parse_dots_finds_every_dot_and_the_conditional_ones():
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  q, k = jnp.ones((3, 40, 16)), jnp.ones((3, 24, 16))
  v = jnp.ones((48, 56))

  def step(x, w, q, k, v, flag):
    h = x @ w
    s = jnp.einsum("bqd,bkd->bqk", q, k)
    g = jax.lax.cond(flag, lambda: h @ v, lambda: jnp.zeros((64, 56)))
    return h.sum() + s.sum() + g.sum()

  hlo = jax.jit(step).lower(x, w, q, k, v, True).compile().as_text()
  found = dots_lib.parse_dots(hlo)
  assert sorted(d.flops for d in found.dots) == sorted([2.0 * 64 * 32 * 48, 2.0 * 3 * 40 * 24 * 16])
  assert [d.flops for d in found.conditional] == [2.0 * 64 * 48 * 56]
  # Each parsed dot's einsum computes what dot_general computes with its dimension numbers.
  rng = np.random.default_rng(0)
  for d in found.dots + found.conditional:
    a, b = rng.standard_normal(d.lhs), rng.standard_normal(d.rhs)
    numbers = ((d.lhs_contracting, d.rhs_contracting), (d.lhs_batch, d.rhs_batch))
    expected = jax.lax.dot_general(a, b, numbers, precision="highest")
    np.testing.assert_allclose(np.einsum(d.einsum(), a, b), expected, rtol=1e-4, atol=1e-4)


def test_parse_dots_refuses_a_step_with_a_loop():
  def step(x, w, n):
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x).sum()

  hlo = jax.jit(step).lower(jnp.ones((16, 16)), jnp.ones((16, 16)), 3).compile().as_text()
  with pytest.raises(ValueError, match="while loop"):
    dots_lib.parse_dots(hlo)


# ---------------------------------------------------------------------------------------
# Torch re-implementations load boldjax weights and compute the same loss.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("categorical", [True, False])
def test_torch_patch_gpt_same_loss(categorical):
  torch = parity.torch()
  from benchmarks import torch_patch_gpt

  m = _patch_gpt(categorical)
  batch = _patch_batch()
  params = jax.jit(m.init)(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])
  params = _perturbed(params["params"])
  out = jax.jit(m.apply)({"params": params}, batch["patches"], batch["subject_id"], batch["order"])
  pmask = np.random.default_rng(3).random((N, PD)) > 0.3
  if categorical:
    want, _ = categorical_loss(out, batch["tokens"])
  else:
    want, _ = continuous_loss(out, batch["patches"], jnp.take(pmask, batch["order"], axis=0))
  net = torch_patch_gpt.from_boldjax(m, jax.device_get(params)).eval()
  tb = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
        for k, v in batch.items()}  # fmt: skip
  with torch.no_grad():
    got = float(net.loss(tb, categorical, torch.from_numpy(pmask)))
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_torch_csm_same_loss():
  torch = parity.torch()
  from benchmarks import torch_lfb_gpt

  m = LfbModel(style="csm", in_dim=12, embed_dim=16, num_layers=2, num_heads=2, dropout=0.1)
  rng = np.random.default_rng(0)
  S = 9
  x = rng.standard_normal((B, S, 12)).astype(np.float32)
  t = (np.arange(S)[None] * 0.72 + rng.random((B, 1)) * 3).astype(np.float32)
  length = np.array([9, 5, 1], np.int32)
  i = np.array([4, 2, 1], np.int32)
  params = jax.jit(m.init)(jax.random.key(0), x, t, np.ones((B, S), bool))["params"]
  params = _perturbed(params)
  out = jax.jit(lambda p: m.apply({"params": p}, x, t, i, method="csm"))(params)
  target = jnp.take_along_axis(jnp.asarray(x), jnp.asarray(i)[:, None, None], axis=1)[:, 0]
  want = l1_rows(out["masked_predictions"], target, jnp.asarray(length >= 2, jnp.float32))
  net = torch_lfb_gpt.from_boldjax(m, jax.device_get(params)).eval()
  tb = {"bold": torch.from_numpy(x), "t_sec": torch.from_numpy(t),
        "length": torch.from_numpy(length).long()}  # fmt: skip
  with torch.no_grad():
    got = float(net.loss(tb, torch.from_numpy(i).long()))
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_torch_optimizer_step_equals_optax():
  """One clipped AdamW step with warmup lr and decay groups gives the same parameters."""
  torch = parity.torch()
  from benchmarks import run, torch_patch_gpt
  from boldjax.convert.boldgpt import params_to_torch

  cfg = ml_collections.ConfigDict(
    dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=0.5,
         warmup_steps=4, warmup_init=0.1, min_lr_ratio=0.05, accum_steps=1,
         no_decay=("pos_embed", "sub_embed", "next_pos_query", "eos_query", "group_token"))
  )  # fmt: skip
  m = _patch_gpt(True)
  batch = _patch_batch()
  init = jax.jit(m.init)
  params = _perturbed(
    init(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])["params"]
  )

  def loss(p):
    out = m.apply({"params": p}, batch["patches"], batch["subject_id"], batch["order"])
    return categorical_loss(out, batch["tokens"])[0]

  tx, _ = optim.make_optimizer(cfg, 20)

  @jax.jit
  def update(p):
    grads = jax.grad(loss)(p)
    updates, _ = tx.update(grads, tx.init(p), p)
    return updates, grads

  updates, grads = update(params)  # the gradient the update used (same compiled function)
  want = params_to_torch(jax.tree.map(lambda a, u: a + u, params, updates))

  net = torch_patch_gpt.from_boldjax(m, jax.device_get(params))
  opt, sched = run.torch_optimizer(net, cfg, 20)
  tb = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
        for k, v in batch.items()}  # fmt: skip
  step = run._torch_step(net, lambda: net.loss(tb, True, None), opt, sched, cfg.clip_norm)
  step()
  got = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  assert set(got) == set(want)
  # Tolerance from the maths. AdamW's first step moves each weight by lr_0 * g / (|g| + eps)
  # (+ decay): near |g| ~ eps that ratio swings with the last bits of g, which the two
  # frameworks compute in different orders (on AVX-512 / AMX machines more so). The bound
  # is the move the measured gradient difference explains, plus float32 rounding.
  scale = min(1.0, cfg.clip_norm / float(optax.global_norm(grads)))
  g_jax = params_to_torch(jax.tree.map(lambda g: np.asarray(g, np.float64) * scale, grads))
  g_torch = {k: p.grad.detach().double().numpy() for k, p in net.named_parameters()}
  lr0 = cfg.lr * cfg.warmup_init
  for k in want:
    a, b = g_torch[k], g_jax[k]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max() + 1e-12, err_msg=k)
    ratio = lambda g: g / (np.abs(g) + cfg.eps)  # noqa: E731
    explained = lr0 * np.abs(ratio(a) - ratio(b))
    # float32 rounding of the weight and of the ~lr_0 update (the sides order them differently)
    big = np.maximum(np.abs(want[k]), np.abs(got[k]))
    rounding = 4 * (np.spacing(big) + np.spacing(np.float32(lr0))).astype(np.float64)
    err = np.abs(got[k].astype(np.float64) - want[k].astype(np.float64))
    excess = err - explained - rounding
    i = np.unravel_index(int(np.argmax(excess)), excess.shape)
    assert excess[i] <= 0, (
      f"{k}{list(i)}: off by {err[i]:.3g} ({err[i] / np.spacing(np.float32(want[k][i])):.1f} ulp "
      f"of {want[k][i]:.4g}), gradient explains {explained[i]:.3g}; g {a[i]:.3g} vs {b[i]:.3g}"
    )


# ---------------------------------------------------------------------------------------
# Seq-BERT and Semantoks DINO.
# ---------------------------------------------------------------------------------------


def _bert_model(style: str = "bert", **kw) -> LfbModel:
  return LfbModel(style=style, in_dim=12, embed_dim=16, num_layers=2, num_heads=2, **kw)


def _bert_pair_batch(seed: int = 0, T: int = 7) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  la, lb = np.array([7, 4, 6], np.int32), np.array([5, 7, 2], np.int32)
  j = np.arange(T)[None]
  t0 = rng.random((B, 1)) * 3
  return {
    "bold": rng.standard_normal((B, T, 12)).astype(np.float32) * (j < la[:, None])[..., None],
    "bold_next": rng.standard_normal((B, T, 12)).astype(np.float32) * (j < lb[:, None])[..., None],
    "t_sec": (j * 0.72 + t0).astype(np.float32) * (j < la[:, None]),
    "t_sec_next": (j * 0.72).astype(np.float32) * (j < lb[:, None]),
    "mask": j < la[:, None],
    "mask_next": j < lb[:, None],
    "length": la,
    "length_next": lb,
    "next_is_consecutive": np.array([True, False, True]),
  }


def test_seq_bert_flops_by_hand():
  m = _bert_model()
  c = flops_lib.seq_bert(m, 3, 17)
  t = 3 * 17
  blocks = 2 * (4 * 2 * t * 16 * 16 + 2 * 2 * t * 16 * 64)
  assert c.matmul == blocks + 2 * 2 * t * 12 * 16 + 2 * 3 * 16 * 16 + 2 * 3 * 16
  assert c.attention == 4 * 3 * 17**2 * 16 * 2
  assert c.train_step == 3 * c.forward


def test_seq_bert_flops_match_xla_cost_analysis():
  """XLA counts matmuls plus elementwise work (post-LN, gelu_new): within [1, 1.2]."""
  m = LfbModel(style="bert", in_dim=48, embed_dim=128, num_layers=2, num_heads=2)
  b, S = 4, 30
  x, t = jnp.ones((b, S, 48)), jnp.zeros((b, S))
  am = jnp.ones((b, S), bool)
  tt = jnp.zeros((b, S), jnp.int32).at[:, S // 2 :].set(1)
  mm = jnp.zeros((b, S, 48), bool)
  params = jax.eval_shape(m.init, jax.random.key(0), x, t, am)

  def forward(v):
    out = m.apply(v, x, t, am, tt, mm, method="bert")
    return out["outputs"], out["is_next_logits"]

  ratio = _cost(forward, params) / flops_lib.seq_bert(m, b, S + 3).forward
  assert 1.0 <= ratio <= 1.2, ratio


def _dino_modules(D: int = 32, depth: int = 1, heads: int = 1, hidden: int = 32):
  from boldjax.models import semantoks as sm

  branches = sm.branches_from_config(
    [
      {"type": "dense", "kernel_size": 3, "out_channels": D // 2},
      {"type": "sgconv", "kernel_size": 2, "num_scales": 2, "out_channels": D // 2},
    ]
  )
  rois = sm.network_rois_from_map(np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 3, 0, 1, 2, 0, 3, 0]))
  enc = sm.SemantoksEncoder(
    network_rois=rois, branches=branches, embed_dim=D, depth=depth, num_heads=heads,
    mlp_dim=4 * D, patch_size=4, num_patches=5, layer_scale_init=0.1,
  )  # fmt: skip
  return enc, sm.DinoHead(hidden_dim=hidden, bottleneck_dim=16, nlayers=2)


def test_dino_flops_by_hand():
  enc, head = _dino_modules()
  # 16 ROIs in networks of 7, 4, 3, 2 ROIs; C = 16 per branch; K = 2 + 2 = 4 taps.
  # Per patch time step: dense conv 2*(R*3)*16; SLConv heads ceil(16/R) = 3, 4, 6, 8 ->
  # 2*(4+1)*(h*R) + 2*(h*R)*16.
  per_step = 0
  for r in (7, 4, 3, 2):
    h = -(-16 // r)
    per_step += 2 * r * 3 * 16 + 2 * 5 * h * r + 2 * h * r * 16
  assert flops_lib.semantoks_tokenizers(enc, 3) == 3 * 5 * 4 * per_step
  L, n = 1 + 4 * 5, 3
  blocks = flops_lib.transformer_blocks(n, L, 32, 1, 128)
  heads = 2 * n * (1 + 4 + 20) * (32 * 32 + 32 * 16)
  f = flops_lib.semantoks_forward(enc, head, n)
  assert f.matmul == blocks.matmul + 3 * 5 * 4 * per_step + heads
  assert f.attention == blocks.attention
  step = flops_lib.dino(enc, head, 2)  # 2 samples x 2 views, teacher forward without grad
  fwd4 = flops_lib.semantoks_forward(enc, head, 4).forward
  assert step.forward == fwd4 and step.train_step == 4 * fwd4


def test_dino_flops_match_xla_cost_analysis():
  """Encoder + heads on CLS, network means and patch tokens: XLA within [1, 1.25]."""
  from boldjax.models import semantoks as sm

  enc, head = _dino_modules(D=128, depth=2, heads=2, hidden=512)
  n = 8
  x = jnp.ones((n, 16, 20))
  ev = jax.eval_shape(enc.init, jax.random.key(0), x)
  hv = jax.eval_shape(head.init, jax.random.key(1), jnp.ones((1, 128)))

  def fwd(v, hp):
    tok = enc.apply(v, x)["tokens"]
    parts = sm.split_tokens(tok, 4, 5)
    return [head.apply(hp, parts[k]) for k in ("cls", "net", "patch")]

  ratio = _cost(fwd, ev, hv) / flops_lib.semantoks_forward(enc, head, n).forward
  assert 1.0 <= ratio <= 1.25, ratio


@pytest.mark.parametrize("style", ["bert", "netbert"])
def test_torch_seq_and_net_bert_same_loss(style):
  torch = parity.torch()
  from benchmarks import torch_lfb_bert
  from boldjax.tasks.seq_bert import bert_losses, pack_pair

  m = _bert_model(dropout=0.1, style=style)
  batch = _bert_pair_batch()
  j = jnp.asarray
  x, t, am, tt = pack_pair(
    j(batch["bold"]), j(batch["t_sec"]), j(batch["length"]),
    j(batch["bold_next"]), j(batch["t_sec_next"]), j(batch["length_next"]),
  )  # fmt: skip
  rng = np.random.default_rng(5)
  if style == "bert":  # whole frames
    frames = (rng.random(am.shape) < 0.3) & np.asarray(am)
    mm = np.broadcast_to(frames[..., None], x.shape)
  else:  # whole parcels across the valid frames
    frames = (rng.random((B, 1, x.shape[-1])) < 0.3) & np.asarray(am)[..., None]
    mm = frames
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), x, t, am)["params"])
  out = jax.jit(lambda p: m.apply({"params": p}, x, t, am, tt, mm, method="bert"))(params)
  is_next = 1 - batch["next_is_consecutive"].astype(np.int32)
  want = bert_losses(out, x, j(is_next), jnp.ones(B))
  net = torch_lfb_bert.from_boldjax(m, jax.device_get(params)).eval()
  tb = {k: torch.from_numpy(v) for k, v in batch.items()}
  packed = torch_lfb_bert.pack_pair(tb)
  np.testing.assert_array_equal(packed["inputs"].numpy(), np.asarray(x))
  with torch.no_grad():
    got = net.losses(**packed, frame_mask=torch.from_numpy(frames))
  for k in ("loss", "masking_loss", "is_next_loss"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, err_msg=k)


def _fixture(case: str):
  return parity.load(case)


@pytest.mark.parametrize("case", ["lfb_bert", "lfb_netbert"])
def test_torch_seq_and_net_bert_match_the_original_fixture(case):
  """The torch reference on the original's weights and batch gives the original's numbers:
  the prepared batch, the masked entries and every loss term."""
  torch = parity.torch()
  from benchmarks import torch_lfb_bert
  from boldjax.convert.lfb import IGNORED, model_kwargs_from_spec

  spec, sd, inputs, outputs = _fixture(case)
  kw = model_kwargs_from_spec(spec)
  netbert = kw["style"] == "netbert"
  net = torch_lfb_bert.SeqBert(
    kw["in_dim"], kw["embed_dim"], kw["num_layers"], kw["num_heads"],
    kw["embed_dim"] * kw["intermediate_factor"], kw["n_positions"], kw["dropout"],
    kw["hidden_activation"], netbert=netbert,
  ).eval()  # fmt: skip
  keep = {k: torch.from_numpy(v) for k, v in sd.items()
          if not any(p.fullmatch(k) for p in IGNORED) and "decoding_head" not in k}  # fmt: skip
  net.load_state_dict(keep, strict=True)
  names = ("inputs", "t_rs", "attention_mask", "token_type_ids", "is_next")
  args = {k: torch.from_numpy(inputs[k]) for k in names}
  if netbert:  # the original's draw: one uniform per (row, parcel), at every valid frame
    am = inputs["attention_mask"].astype(bool)
    args["frame_mask"] = torch.from_numpy(inputs["network_mask"][:, None, :] & am[..., None])
  else:
    args["frame_mask"] = torch.from_numpy(inputs["frame_mask"])
  with torch.no_grad():
    got = net.losses(**args)
    prep = net.prep_batch(*(args[k] for k in names if k != "is_next"), args["frame_mask"])
  for k in ("inputs_embeds", "t_rs", "token_type_ids", "modelling_mask", "attention_mask"):
    want = outputs[f"prep/{k}"]
    np.testing.assert_array_equal(prep[k].numpy().astype(want.dtype), want, err_msg=k)
  if "prep/masked_inputs" in outputs:
    masked = inputs["inputs"][prep["frame_mask"].numpy()]
    np.testing.assert_array_equal(masked, outputs["prep/masked_inputs"])
  for k in ("loss", "masking_loss", "is_next_loss", "is_next_logits"):
    np.testing.assert_allclose(got[k].numpy(), outputs[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_torch_autoencoder_matches_the_original_fixture():
  """The LSTM autoencoder on the original's weights: every stage and the loss."""
  torch = parity.torch()
  from benchmarks import torch_lfb_autoencoder
  from boldjax.convert.lfb import IGNORED, model_kwargs_from_spec

  spec, sd, inputs, outputs = _fixture("lfb_autoencoder")
  kw = model_kwargs_from_spec(spec)
  net = torch_lfb_autoencoder.LstmAutoencoder(
    kw["in_dim"], kw["embed_dim"], kw["num_layers"], kw["dropout"]
  ).eval()
  keep = {k: torch.from_numpy(v) for k, v in sd.items() if not any(p.fullmatch(k) for p in IGNORED)}
  net.load_state_dict(keep, strict=True)
  x, t = torch.from_numpy(inputs["inputs"]), torch.from_numpy(inputs["t_rs"])
  with torch.no_grad():
    got = net(x, t)
    loss = net.loss(x, t, torch.from_numpy(inputs["attention_mask"]))
  for k in ("embeds", "encoder/outputs", "encoder/pooler_outputs", "decoder/outputs", "outputs"):
    np.testing.assert_allclose(got[k].numpy(), outputs[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(got["encoder/hidden"].numpy(), outputs["encoder/hidden"][0], atol=1e-6)
  np.testing.assert_allclose(float(loss), outputs["loss"], rtol=1e-6)


@pytest.mark.parametrize("forcing", [False, True])
def test_torch_autoencoder_same_loss(forcing):
  torch = parity.torch()
  from benchmarks import torch_lfb_autoencoder
  from boldjax.tasks.autoencoder import reconstruction_loss

  m = LfbModel(style="autoencoder", in_dim=12, embed_dim=16, num_layers=2, dropout=0.2)
  rng = np.random.default_rng(3)
  lengths = np.array([7, 4, 6])
  valid = np.arange(7)[None] < lengths[:, None]
  x = (rng.standard_normal((B, 7, 12)) * valid[..., None]).astype(np.float32)
  t = (np.arange(7)[None] * 0.72 * valid).astype(np.float32)
  abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), x, t, method="autoencode"))
  params = _random_params(abstract["params"])
  out = m.apply({"params": params}, x, t, forcing, method="autoencode")
  want = reconstruction_loss(out["outputs"], x, valid, jnp.ones(B))
  net = torch_lfb_autoencoder.from_boldjax(m, jax.device_get(params)).eval()
  with torch.no_grad():
    got = net.loss(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(valid), forcing)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_lstm_autoencoder_flops_by_hand():
  m = LfbModel(style="autoencoder", in_dim=10, embed_dim=16, num_layers=2)
  c = flops_lib.lstm_autoencoder(m, 4, 7)
  t = 28  # 4 x 7 frames; an LSTM is 2 matmuls of 16 -> 64 per frame and direction
  lstm = 2 * 2 * t * 16 * 64
  assert c.matmul == 2 * 2 * lstm + 2 * 4 * 16 * 16 + 2 * lstm + 2 * t * 16 * 16 + 2 * (
    2 * t * 10 * 16
  )
  assert c.attention == 0.0


def _dino_task(total_steps: int = 10, lr: float = 1e-2):
  import types

  from boldjax.tasks import dino
  from configs import dino_small

  config = dino_small.get_config("runlocal")
  config.total_steps = total_steps
  config.task.mask_frequency = 1.0
  config.optim.lr, config.optim.warmup_steps = lr, 0
  config.optim.eps = 1e-3  # Adam on near-zero gradients amplifies float rounding
  networks = np.repeat(np.arange(4), 4).astype(np.int32)
  info = types.SimpleNamespace(num_parcels=16, networks=networks, num_networks=4)
  return dino.DinoTask(config, info)


def _dino_state(task, seed: int = 0):
  """Random student, a drifted teacher, random kernel-norm buffers (no init compile)."""
  rng = np.random.default_rng(seed)
  batch = {
    "views": rng.standard_normal((5, 2, 16, task.crop_length)).astype(np.float32),
    "masks": rng.random((5, 2, task.num_networks, task.num_patches)) < 0.5,
  }
  abstract = state_lib.strip_boxes(jax.eval_shape(task.init, jax.random.key(0), batch))
  params = _random_params(abstract[0], seed)
  teacher = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
  extra = {
    "teacher": teacher,
    "buffers": _random_params(abstract[1]["buffers"], seed + 1),
    "step": np.zeros((), np.int32),
  }
  return batch, params, extra


def test_torch_semantoks_same_loss():
  torch = parity.torch()
  from benchmarks import torch_semantoks

  task = _dino_task()
  batch, params, extra = _dino_state(task)
  want, metrics = jax.jit(lambda p, e: task.loss(p, e, batch, jax.random.key(0), train=False))(
    params, extra
  )
  net = torch_semantoks.from_boldjax(task, jax.device_get(params), jax.device_get(extra)).eval()
  tb = {k: torch.from_numpy(v) for k, v in batch.items()}
  with torch.no_grad():
    got = net.losses(tb["views"], tb["masks"], float(task.network_weight(0)))
  assert float(metrics["mask_cosine_loss"]) != 0.0
  for k in ("total_loss", "cls_loss", "network_mcr_loss", "mask_cosine_loss"):
    np.testing.assert_allclose(float(got[k]), float(metrics[k]), rtol=2e-5, err_msg=k)
  with torch.no_grad():
    np.testing.assert_allclose(float(net.loss(tb, apply_masks=True)), float(want), rtol=2e-5)


def test_torch_semantoks_matches_the_original_fixture():
  torch = parity.torch()
  from benchmarks import torch_semantoks
  from boldjax.convert.semantoks import semantoks_kwargs

  spec, sd, inputs, outputs = _fixture("semantoks")
  kw = semantoks_kwargs(spec["constructor_kwargs"], inputs["network_map"])
  net = torch_semantoks.SimDINO(kw, mask_loss_weight=kw["loss"]["mask_loss_weight"]).eval()
  mine = net.state_dict()
  net.load_state_dict({k: torch.from_numpy(np.asarray(sd[k])) for k in mine}, strict=True)
  views = torch.from_numpy(np.stack([inputs["view1"], inputs["view2"]], 1))
  masks = torch.from_numpy(np.stack([inputs["mask1"], inputs["mask2"]], 1))
  w = float(inputs["network_loss_weight"])
  with torch.no_grad():
    got = net.losses(views, masks, w)
    unmasked = net.losses(views, None, w)["total_loss"]
    tokens = net.teacher_encoder(views[:, 0])
  np.testing.assert_allclose(tokens.numpy(), outputs["teacher_tokens_v1"], atol=2e-5, rtol=1e-5)
  for k in ("total_loss", "cls_loss", "network_mcr_loss", "mask_cosine_loss"):
    np.testing.assert_allclose(float(got[k]), float(outputs[k]), rtol=1e-5, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(
    float(unmasked), float(outputs["total_loss_unmasked_batch"]), rtol=1e-5, atol=1e-5
  )


def test_torch_dino_steps_equal_boldjax_steps():
  """Two train steps (AdamW with the decay-to-0.3 weight-decay schedule on every parameter,
  clipping, then the EMA teacher update) give the same student and teacher on both sides."""
  torch = parity.torch()
  from benchmarks import run, torch_semantoks
  from boldjax.state import TrainState, make_train_step

  task = _dino_task(total_steps=10, lr=1e-2)
  batch, params, extra = _dino_state(task, seed=3)
  cfg = task.config.optim
  tx, schedule = optim.make_optimizer(cfg, task.config.total_steps)
  net = torch_semantoks.from_boldjax(task, jax.device_get(params), jax.device_get(extra))
  step = jax.jit(make_train_step(task, tx, schedule, jax.random.key(0), 1))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     extra=extra)  # fmt: skip
  for _ in range(2):
    state, _ = step(state, batch)
  tb = {k: torch.from_numpy(v) for k, v in batch.items()}
  opt, sched = run.torch_optimizer(net, cfg, task.config.total_steps)
  tstep = run._torch_step(net, lambda: net.loss(tb), opt, sched, cfg.clip_norm, net.update_teacher)
  tstep()
  tstep()
  kw = torch_semantoks.kwargs_from_task(task)
  got = {k: v.numpy() for k, v in net.state_dict().items()}
  for role, tree in (("student", state.params), ("teacher", state.extra["teacher"])):
    want = params_to_torch_semantoks(jax.device_get(tree), kw, role)
    moved = params_to_torch_semantoks(jax.device_get(params), kw, role)
    assert any(not np.allclose(want[k], moved[k]) for k in want), role
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-6, err_msg=k)
  assert net.step == int(state.extra["step"]) == 2


# ---------------------------------------------------------------------------------------
# Encoding (FactorTopy) and the backbone feature pass (issue 17).
# ---------------------------------------------------------------------------------------
ENC_N, ENC_L, ENC_C, ENC_GRID, ENC_B = 40, 3, 16, (4, 4), 5


def _encoding_task(reg_steps: int = 2000, total_steps: int = 10, eps: float = 1e-8):
  import types

  from boldjax.tasks.encoding import EncodingTask

  # configs/encoding.py's objective and optimizer (the seed's), at small sizes.
  config = ml_collections.ConfigDict({
    "total_steps": total_steps,
    "task": dict(name="encoding", bottleneck=8, hidden=16, num_freqs=4, reg_weight=0.1,
                 reg_steps=reg_steps, smooth_l1_beta=0.1),
    "optim": dict(lr=1e-3, b1=0.9, b2=0.999, eps=eps, weight_decay=0.01, clip_norm=0.5,
                  warmup_steps=0, warmup_init=1.0, min_lr_ratio=1.0, accum_steps=1, no_decay=()),
  })  # fmt: skip
  coords = np.random.default_rng(0).normal(size=(ENC_N, 3)).astype(np.float32) * 50
  info = types.SimpleNamespace(coords=coords, num_layers=ENC_L, token_dim=ENC_C, grid=ENC_GRID,
                               num_vertices=ENC_N, path="fake")  # fmt: skip
  return EncodingTask(config, info)


def _encoding_state(task, seed: int = 0):
  """Cache-like float16 tokens, targets, random params (selector outputs non-zero)."""
  rng = np.random.default_rng(seed)
  batch = {
    "local": rng.normal(size=(ENC_B, ENC_L, *ENC_GRID, ENC_C)).astype(np.float16),
    "global": rng.normal(size=(ENC_B, ENC_L, ENC_C)).astype(np.float16),
    "fmri": (rng.normal(size=(ENC_B, ENC_N)) * 0.3).astype(np.float32),
  }
  abstract = state_lib.strip_boxes(jax.eval_shape(task.init, jax.random.key(0), batch))
  params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), abstract[0])
  return batch, params, {"step": np.zeros((), np.int32), "pe": task.pe}


@pytest.mark.parametrize("case", parity.cases("bddn_encoding*"))
def test_torch_factortopy_matches_the_seed_fixture(case):
  """The benchmark's torch FactorTopy on the seed's weights and inputs gives the seed's
  numbers: position encoding, selections, bottlenecks, y, reg, smooth-L1, the objective at
  both steps and the gradients. Sizes from the fixture (state_dict shapes, spec layers)."""
  torch = parity.torch()
  from benchmarks import torch_factortopy
  from boldjax.convert.bddn import infer_structure
  from tests.test_parity_bddn import objective_constants

  spec, sd, inputs, outputs = parity.load(case)
  st = infer_structure(sd, spec["config"]["layers"])
  keys = st["layers"]
  net = torch_factortopy.FactorTopy(st["num_vertices"], keys, st["layer_widths"], st["bottleneck"],
                                    st["hidden"], st["num_freqs"])  # fmt: skip
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  local = {k: torch.from_numpy(inputs[f"local_tokens/{k}"]) for k in keys}
  glob = {k: torch.from_numpy(inputs[f"global_tokens/{k}"]) for k in keys}
  coords = torch.from_numpy(inputs["coords"])
  lam, total, beta = objective_constants(spec)
  y, reg = net(local, glob, coords)  # local / glob now hold the bottlenecks (the seed's quirk)
  sl1 = torch.nn.functional.smooth_l1_loss(y, torch.from_numpy(inputs["fmri"]), beta=beta)
  actual = {"pe": net.space_selector_mlp[0](coords), "y": y, "reg": reg, "smooth_l1": sl1}
  actual.update(net.selections(coords))
  for k in keys:
    actual[f"local_bottleneck/{k}"], actual[f"global_bottleneck/{k}"] = local[k], glob[k]
  steps = [int(s) for s in inputs["steps"]]
  for i, step in enumerate(steps):
    model = torch_factortopy.PLModel(inputs["coords"], st["layer_widths"], reg_weight=lam,
                                     reg_steps=total, beta=beta)  # fmt: skip
    model.model = net
    model.global_step = step
    decay = model.get_decay()
    actual[f"reg_decay/step{step}"] = np.float64(decay)
    actual[f"reg_term/step{step}"] = reg * lam * decay
    actual[f"loss/step{step}"] = sl1 + reg * lam * decay
    if i == 0:
      net.zero_grad()
      loss = model.training_loss(
        {k: torch.from_numpy(inputs[f"local_tokens/{k}"]) for k in keys},
        {k: torch.from_numpy(inputs[f"global_tokens/{k}"]) for k in keys},
        torch.from_numpy(inputs["fmri"]),
      )
      loss.backward()
      np.testing.assert_array_equal(loss.detach().numpy(), actual[f"loss/step{step}"].detach())
      grads = {n: p.grad for n, p in net.named_parameters()}
  for name in outputs:
    if name.startswith("grad/"):
      actual[name] = grads[name[len("grad/") :]]
  actual = {k: np.asarray(v.detach() if hasattr(v, "detach") else v) for k, v in actual.items()}
  assert set(actual) == set(outputs), sorted(set(outputs) ^ set(actual))
  parity.check_all(actual, outputs, spec)


def test_torch_factortopy_same_loss_as_the_encoding_task():
  """Same weights, float16 cache tokens and step (the reg decay below 1): same loss, y, reg."""
  torch = parity.torch()
  from benchmarks import torch_factortopy

  task = _encoding_task(reg_steps=400)
  batch, params, extra = _encoding_state(task)
  extra["step"] = np.asarray(150, np.int32)
  with jax.default_matmul_precision("highest"):
    want, metrics = jax.jit(lambda p, e: task.loss(p, e, batch, jax.random.key(0)))(params, extra)
    out = task.model.apply({"params": params}, task.pe, batch["local"], batch["global"])
  net = torch_factortopy.from_boldjax(task, jax.device_get(params))
  net.global_step = 150
  local, glob = torch_factortopy.tokens_from_batch(batch["local"], batch["global"])
  with torch.no_grad():
    y, reg = net(local, glob)
    got = net.training_loss(local, glob, torch.from_numpy(batch["fmri"]))
  assert list(local["0"].shape) == [ENC_B, ENC_C, *ENC_GRID]  # the dicts were not overwritten
  assert float(jnp.std(out["sel_scale"])) > 0.05 and float(jnp.abs(out["sel_space"]).min()) > 0
  assert float(metrics["reg_weight"]) == pytest.approx(0.1 * (1 - 150 / 400), rel=1e-6)
  np.testing.assert_allclose(y.numpy(), np.asarray(out["y"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(reg), float(metrics["reg"]), rtol=1e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_torch_encoding_steps_equal_boldjax_steps():
  """Three train steps (AdamW, decay mask, clipping at 0.5, the reg decay reaching 0 on the
  steps taken) give the same FactorTopy on both sides, as benchmarks.run builds them."""
  torch = parity.torch()
  from benchmarks import run, torch_factortopy
  from boldjax.convert.bddn import params_to_torch
  from boldjax.state import TrainState, make_train_step

  # eps 1e-3: Adam's first steps on near-zero gradients amplify float rounding (as for DINO).
  task = _encoding_task(reg_steps=2, total_steps=10, eps=1e-3)
  batch, params, extra = _encoding_state(task, seed=2)
  cfg = task.config.optim
  tx, schedule = optim.make_optimizer(cfg, task.config.total_steps)
  net = torch_factortopy.from_boldjax(task, jax.device_get(params))
  step = jax.jit(make_train_step(task, tx, schedule, jax.random.key(0), 1))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     extra=extra)  # fmt: skip
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  local, glob = torch_factortopy.tokens_from_batch(batch["local"], batch["global"])
  fmri = torch.from_numpy(batch["fmri"])
  opt, sched = run.torch_optimizer(net, cfg, task.config.total_steps)
  tlosses = []

  def loss():
    value = net.training_loss(local, glob, fmri)
    tlosses.append(float(value.detach()))
    return value

  tstep = run._torch_step(net, loss, opt, sched, cfg.clip_norm, net.count_step)
  for _ in range(3):
    tstep()
  assert net.global_step == int(state.extra["step"]) == 3 and net.get_decay() == 0
  np.testing.assert_allclose(tlosses, losses, rtol=1e-5)
  got = {k: v.numpy() for k, v in net.model.state_dict().items()}
  want = params_to_torch(jax.device_get(state.params), range(ENC_L))
  moved = params_to_torch(jax.device_get(params), range(ENC_L))
  for k in want:
    assert not np.allclose(want[k], moved[k]), k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_factortopy_flops_by_hand():
  from benchmarks import run

  task = _encoding_task()
  m = task.model  # N 40, L 3, C 16, bottleneck 8, hidden 16, 4 frequencies (24 inputs)
  c = run.factortopy_flops(m, 5, (4, 4))
  bottlenecks = 3 * (2 * 80 * 16 * 8 + 2 * 5 * 16 * 8)
  selectors = sum(2 * 40 * (24 * 16 + 16 * 16 + 16 * k) for k in (2, 3, 1))
  sampling = 2 * 40 * 5 * 8 * (4 * 3 + 3 + 1)
  assert c.matmul == bottlenecks + selectors + sampling
  assert c.attention == 0.0 and c.train_step == 3 * c.forward


def test_vit_flops_by_hand():
  from benchmarks import run
  from boldjax.models import vit

  cfg = vit.ViTConfig(image_size=32, patch_size=8, width=16, layers=2, heads=2, output_dim=4)
  c = run.vit_flops(cfg, 3)
  T, tokens = 17, 3 * 17
  blocks = 2 * (4 * 2 * tokens * 16 * 16 + 2 * 2 * tokens * 16 * 64)
  assert c.matmul == 2 * 48 * 192 * 16 + blocks + 2 * 3 * 16 * 4
  assert c.attention == 4 * 3 * T * T * 16 * 2


@pytest.mark.parametrize("case", parity.cases("openclip_vit*"))
def test_torch_vit_matches_the_openclip_fixture(case):
  """The benchmark's torch tower loads open_clip's state_dict strictly and gives every block
  and the embedding of the fixture; get_tokens reads the same blocks. Sizes from spec.json."""
  torch = parity.torch()
  from benchmarks import torch_vit

  spec, sd, inputs, outputs = parity.load(case)
  c = spec["config"]
  net = torch_vit.VisionTransformer(
    c["image_size"], c["patch_size"], c["width"], c["layers"], c["heads"], c["mlp_ratio"],
    c["output_dim"], quick_gelu=c["quick_gelu"],
  ).eval()  # fmt: skip
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  x = torch.from_numpy(inputs["images"])
  with torch.no_grad():
    blocks, embedding = net.blocks(x), net(x)
    local, glob = net.get_tokens(x)
  actual = {f"block{i}": b.numpy() for i, b in enumerate(blocks)}
  actual["embedding"] = embedding.numpy()
  assert set(actual) == set(outputs), sorted(set(outputs) ^ set(actual))
  parity.check_all(actual, outputs, spec)
  g = c["image_size"] // c["patch_size"]
  for i, b in enumerate(blocks):
    patches = b[:, 1:].numpy().reshape(len(b), g, g, -1).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(local[str(i)].numpy(), patches)
    np.testing.assert_array_equal(glob[str(i)].numpy(), b[:, 0].numpy())


@pytest.fixture
def small_clip_pass(monkeypatch):
  """A small QuickGELU CLIP tower whose 12 x 12 patch grid the token pass resizes to 8 x 8."""
  from benchmarks import run
  from boldjax.models import vit

  cfg = vit.ViTConfig(image_size=48, patch_size=4, width=32, layers=2, heads=2, ln_pre=True,
                      output_dim=16, act="quick_gelu", ln_eps=1e-5, patch_bias=False,
                      name="test_clip")  # fmt: skip
  monkeypatch.setitem(vit.PRESETS, "test_clip", cfg)
  monkeypatch.setitem(run.PASSES, "vit_test", ("test_clip", 3))
  return "vit_test"


def test_feature_passes_give_the_same_tokens(small_clip_pass):
  """The token cache's jitted pass and the seed's get_tokens + 8 x 8 resize (torch), on one
  torch init converted by boldjax.convert.vision: the same tokens; a different init does not."""
  parity.torch()
  from benchmarks import run

  sides = run.build_pass(small_clip_pass)
  local, glob = sides.jax_pass()
  assert local.shape == (3, 2, 8, 8, 32) and glob.shape == (3, 2, 32)
  assert run.tokens_error(sides) < 1e-5
  other = run.build_pass(small_clip_pass, seed=1)
  mixed = run.PassSides(sides.config, 3, sides.jax_pass, other.torch_pass)
  assert run.tokens_error(mixed) > 0.1


def test_bench_pass_runs_and_reports(small_clip_pass):
  parity.torch()
  from benchmarks import run

  r = run.bench_pass(small_clip_pass, repeats=2, steps_per_repeat=1, warmup=1, batch=2)
  assert r["batch"] == 2 and r["tokens_per_row"] == 145 and r["recompiles_after_warmup"] == 0
  assert r["tokens_rel_error"] < 1e-5 and len(r["step_s_torch_repeats"]) == 2
  assert r["images_per_s_boldjax"] == pytest.approx(2 / r["step_s_boldjax"])
  config = run.build_pass(small_clip_pass).config
  assert r["train_step_gflop"] == run.vit_flops(config, 2).forward / 1e9


# ------------------------------------------------------------------ fmri2img / vae sides


def test_torch_fmri2img_and_vae_match_boldjax_on_the_same_weights():
  """benchmarks/torch_fmri2img: diffusers' AutoencoderKL (converted into boldjax) and the
  seed's encoder (boldjax params -> torch) give boldjax's losses on the same batch."""
  pytest.importorskip("diffusers")
  torch = parity.torch()
  from benchmarks import torch_fmri2img
  from boldjax.convert.fmri2img import params_to_torch as fmri_to_torch
  from boldjax.convert.vae import convert_state_dict
  from boldjax.models import vae as vae_lib
  from boldjax.models.fmri2img import FmriEncoder
  from boldjax.models.vae import VAEConfig

  cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
  torch.manual_seed(0)
  tvae = torch_fmri2img.diffusers_vae(cfg)
  with torch.no_grad():  # away from the zero-init biases
    for p in tvae.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = {k: v.detach().numpy() for k, v in tvae.state_dict().items()}
  vparams, _ = convert_state_dict(sd, cfg)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  fmri = rng.normal(size=(2, 12)).astype(np.float32)

  # VAE objective at the posterior mean (the deterministic path both sides share).
  kl_weight = 0.1
  with jax.default_matmul_precision("highest"):
    mean, logvar = vae_lib.encode(vparams, images, cfg)
    recon = vae_lib.decode(vparams, mean, cfg)
    kl = vae_lib.kl_divergence(mean, logvar)
  want = float(jnp.mean(jnp.square(recon - images)) + kl_weight / images[0].size * jnp.mean(kl))
  with torch.no_grad():
    got = float(torch_fmri2img.VAETrain(tvae, kl_weight).loss(torch_fmri2img.nchw(images), False))
  np.testing.assert_allclose(got, want, rtol=1e-4)

  # fmri2img: encoder (8 x 8 x 4 latent from a 4 x 4 x 8 grid) + the frozen decoder.
  enc = FmriEncoder(input_dim=12, hidden=(32, 128), latent_hw=(8, 8), latent_channels=4)
  eparams = enc.init(jax.random.key(1), fmri)["params"]
  with jax.default_matmul_precision("highest"):
    latent = enc.apply({"params": eparams}, fmri)["latent"]
    want = float(jnp.mean(jnp.square(vae_lib.decode(vparams, latent, cfg) - images)))
  tenc = torch_fmri2img.FmriEncoder(12, (32, 128), (8, 4, 4), 4)
  tenc.load_state_dict(
    {k: torch.from_numpy(np.asarray(v)) for k, v in fmri_to_torch(eparams).items()}
  )
  model = torch_fmri2img.Fmri2Image(tenc, tvae)
  assert not any(p.requires_grad for p in model.vae.parameters())
  with torch.no_grad():
    got = float(model.loss(torch.from_numpy(fmri), torch_fmri2img.nchw(images)))
  np.testing.assert_allclose(got, want, rtol=1e-4)
